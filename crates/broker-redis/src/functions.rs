//! The `fanout` Redis Function library (Redis ≥ 7): the one atomic step that stores a
//! publication in its channel's history and publishes it, the history read, and how a
//! node loads the library without ever replacing one a newer node loaded.
//!
//! # Keys
//!
//! For a channel whose Redis channel is `K` (`{prefix}{channel}`, e.g. `fanout:h:x`):
//! `{K}:meta` (hash: `e` epoch, `o` last offset), `{K}:history` (stream; entry id
//! `OFFSET-0`, field `d` the stored envelope) and `{K}:idem:KEY` (idempotency keys). The
//! whole Redis channel is their hash tag, so on a Redis Cluster they share the slot of the
//! channel (and of the `FCALL` key).
//!
//! # Functions
//!
//! * `FCALL fanout_publish 1 K ENVELOPE [IDEMPOTENCY_KEY]`: for backends. In a namespace
//!   that keeps history (as configured on the node that loaded the library), stores and
//!   publishes; returns the offset (0 outside history; the first publication's for a
//!   repeated idempotency key).
//! * `FCALL fanout_node_publish 1 K ENVELOPE SIZE TTL_S IDEMPOTENCY_KEY WINDOW_S`: what
//!   nodes call, with their own settings; returns `[offset, epoch, duplicate]`.
//! * `FCALL fanout_history 1 K SIZE TTL_S SINCE_EPOCH SINCE_OFFSET LIMIT`: `[top, epoch,
//!   entries]`; creates the channel's epoch when it has none, so that the position a
//!   reader is given stays valid for the next publication.
//! * `FCALL_RO fanout_version 0`: `[version, config digest]`.
//!
//! The stored envelope is the published one with `offset` and `epoch` appended (the map
//! header patched), so what history returns and what pub/sub delivers are the same bytes.

use std::fmt::Write as _;

use fanout_hub::Histories;

/// Bumped whenever the library's code changes. A node loads its library when Redis has
/// none or an older one, never over a newer one: a newer library keeps every function
/// and argument list of the older ones working.
pub(crate) const VERSION: u64 = 2;

const LIBRARY: &str = r#"
local VERSION = __VERSION__
local DIGEST = '__DIGEST__'
local PREFIX = __PREFIX__
-- PUBLISH, or SPUBLISH on a Redis Cluster.
local PUBLISH = __PUBLISH__
local IDEMPOTENCY_WINDOW = __WINDOW__
-- namespace -> {history_size, history_ttl_seconds}; OFF: listed with history off.
local HISTORY = {__HISTORY__}
local OFF = {__OFF__}
local FALLBACK = __FALLBACK__

local function policy(key)
  if string.sub(key, 1, #PREFIX) ~= PREFIX then return nil end
  local channel = string.sub(key, #PREFIX + 1)
  local colon = string.find(channel, ':', 1, true)
  local ns = ''
  if colon then ns = string.sub(channel, 1, colon - 1) end
  if OFF[ns] then return nil end
  return HISTORY[ns] or FALLBACK
end

local function mp_str(s)
  local n = #s
  if n < 32 then return string.char(0xa0 + n) .. s end
  if n < 256 then return '\217' .. string.char(n) .. s end
  return '\218' .. string.char(math.floor(n / 256), n % 256) .. s
end

local function mp_u64(n)
  local b = {}
  for i = 8, 1, -1 do
    b[i] = n % 256
    n = math.floor(n / 256)
  end
  return '\207' .. string.char(unpack(b))
end

-- The envelope's map header: entries and the rest, or nil when it is not a map.
local function map_header(env)
  local b = string.byte(env, 1)
  if b and b >= 0x80 and b <= 0x8f then return b - 0x80, string.sub(env, 2) end
  if b == 0xde and #env >= 3 then return string.byte(env, 2) * 256 + string.byte(env, 3), string.sub(env, 4) end
  return nil
end

local function with_position(n, rest, offset, epoch)
  n = n + 2
  local head
  if n < 16 then head = string.char(0x80 + n) else head = '\222' .. string.char(math.floor(n / 256), n % 256) end
  return head .. rest .. mp_str('offset') .. mp_u64(offset) .. mp_str('epoch') .. mp_str(epoch)
end

local function meta_of(key) return '{' .. key .. '}:meta' end
local function stream_of(key) return '{' .. key .. '}:history' end

-- The channel's epoch, made (with an empty history) when it has none.
local function epoch_of(key, ttl)
  local meta = meta_of(key)
  local epoch = redis.call('HGET', meta, 'e')
  if not epoch then
    local t = redis.call('TIME')
    epoch = string.format('%x%05x', tonumber(t[1]), tonumber(t[2]))
    redis.call('DEL', stream_of(key))
    redis.call('HSET', meta, 'e', epoch, 'o', 0)
    redis.call('EXPIRE', meta, ttl)
  end
  return epoch
end

local function publish(key, envelope, size, ttl, idem, window)
  local idem_key
  if idem and idem ~= '' then
    idem_key = '{' .. key .. '}:idem:' .. idem
    local first = redis.call('GET', idem_key)
    if first then
      local offset, epoch = string.match(first, '^(%d+):(.*)$')
      return {tonumber(offset) or 0, epoch or '', 1}
    end
  end
  local offset, epoch = 0, ''
  if size > 0 then
    local n, rest = map_header(envelope)
    if not n then return redis.error_reply('ERR fanout: the envelope is not a MessagePack map') end
    epoch = epoch_of(key, ttl)
    local meta = meta_of(key)
    offset = redis.call('HINCRBY', meta, 'o', 1)
    envelope = with_position(n, rest, offset, epoch)
    local stream = stream_of(key)
    -- Trimmed loosely (whole radix nodes, far cheaper than one entry at a time); reads
    -- return only the last `size`, so history_size stays exact.
    redis.call('XADD', stream, 'MAXLEN', '~', size, string.format('%d-0', offset), 'd', envelope)
    redis.call('EXPIRE', stream, ttl)
    redis.call('EXPIRE', meta, ttl)
  end
  redis.call(PUBLISH, key, envelope)
  if idem_key then
    redis.call('SET', idem_key, string.format('%d:%s', offset, epoch), 'EX', window)
  end
  return {offset, epoch, 0}
end

redis.register_function('fanout_publish', function(keys, args)
  local p = policy(keys[1])
  local size, ttl = 0, 0
  if p then size, ttl = p[1], p[2] end
  return publish(keys[1], args[1], size, ttl, args[2], IDEMPOTENCY_WINDOW)[1]
end)

redis.register_function('fanout_node_publish', function(keys, args)
  return publish(keys[1], args[1], tonumber(args[2]) or 0, tonumber(args[3]) or 0, args[4],
    tonumber(args[5]) or IDEMPOTENCY_WINDOW)
end)

redis.register_function('fanout_history', function(keys, args)
  local key = keys[1]
  local size = tonumber(args[1]) or 0
  local ttl = tonumber(args[2]) or 60
  local since_epoch, since, limit = args[3] or '', tonumber(args[4]) or 0, tonumber(args[5]) or -1
  local epoch = epoch_of(key, ttl)
  local top = tonumber(redis.call('HGET', meta_of(key), 'o')) or 0
  local entries = {}
  if limit ~= 0 and (since_epoch == '' or (since_epoch == epoch and since < top)) then
    -- Exactly the last `size` are kept, whatever the loose trim left.
    local first = math.max(top - size + 1, 1)
    if since_epoch ~= '' then first = math.max(first, since + 1) end
    local start = string.format('%d-0', first)
    if limit > 0 then
      entries = redis.call('XRANGE', stream_of(key), start, '+', 'COUNT', limit)
    else
      entries = redis.call('XRANGE', stream_of(key), start, '+')
    end
  end
  return {top, epoch, entries}
end)

-- Presence: {K}:presence (zset client -> expiry ms), {K}:presence:users (hash client ->
-- user), {K}:presence:ucount (hash user -> clients), so counts never load the set.
local function presence_keys(key)
  return '{' .. key .. '}:presence', '{' .. key .. '}:presence:users', '{' .. key .. '}:presence:ucount'
end

local function presence_add(z, u, c, client, user, expires)
  if redis.call('ZADD', z, expires, client) == 1 then
    redis.call('HSET', u, client, user)
    redis.call('HINCRBY', c, user, 1)
    return 1
  end
  return 0
end

local function presence_remove(key, client)
  local z, u, c = presence_keys(key)
  if redis.call('ZREM', z, client) == 0 then return nil end
  local user = redis.call('HGET', u, client) or ''
  redis.call('HDEL', u, client)
  if redis.call('HINCRBY', c, user, -1) <= 0 then redis.call('HDEL', c, user) end
  return user
end

-- Entries whose node stopped refreshing them, a bounded number per call.
local function presence_expire(key, now)
  local z = presence_keys(key)
  for _, client in ipairs(redis.call('ZRANGEBYSCORE', z, '-inf', now, 'LIMIT', 0, 1000)) do
    presence_remove(key, client)
  end
end

local function presence_keep(key, keep_ms)
  local z, u, c = presence_keys(key)
  redis.call('PEXPIRE', z, keep_ms)
  redis.call('PEXPIRE', u, keep_ms)
  redis.call('PEXPIRE', c, keep_ms)
end

-- fanout_presence_join 1 K CLIENT USER EXPIRES_MS KEEP_MS EVENT: publishes EVENT ('' none) when new.
redis.register_function('fanout_presence_join', function(keys, args)
  local z, u, c = presence_keys(keys[1])
  local added = presence_add(z, u, c, args[1], args[2], args[3])
  presence_keep(keys[1], args[4])
  if added == 1 and args[5] ~= '' then redis.call(PUBLISH, keys[1], args[5]) end
  return added
end)

-- fanout_presence_leave 1 K CLIENT EVENT
redis.register_function('fanout_presence_leave', function(keys, args)
  local user = presence_remove(keys[1], args[1])
  if user and args[2] ~= '' then redis.call(PUBLISH, keys[1], args[2]) end
  if user then return 1 end
  return 0
end)

-- fanout_presence_refresh 1 K EXPIRES_MS KEEP_MS CLIENT USER [CLIENT USER ...]: re-adds
-- what is missing (a Redis that restarted empty heals within one refresh).
redis.register_function('fanout_presence_refresh', function(keys, args)
  local z, u, c = presence_keys(keys[1])
  for i = 3, #args, 2 do presence_add(z, u, c, args[i], args[i + 1], args[1]) end
  presence_keep(keys[1], args[2])
  return 1
end)

-- fanout_presence 1 K NOW_MS LIMIT -> {total, client, user, ...}
redis.register_function('fanout_presence', function(keys, args)
  presence_expire(keys[1], args[1])
  local z, u = presence_keys(keys[1])
  local live = '(' .. args[1]
  local out = {redis.call('ZCOUNT', z, live, '+inf')}
  local clients = redis.call('ZRANGEBYSCORE', z, live, '+inf', 'LIMIT', 0, args[2])
  if #clients > 0 then
    local users = redis.call('HMGET', u, unpack(clients))
    for i, client in ipairs(clients) do
      out[#out + 1] = client
      out[#out + 1] = users[i] or ''
    end
  end
  return out
end)

-- fanout_presence_stats 1 K NOW_MS -> {clients, users}
redis.register_function('fanout_presence_stats', function(keys, args)
  presence_expire(keys[1], args[1])
  local z, _, c = presence_keys(keys[1])
  return {redis.call('ZCOUNT', z, '(' .. args[1], '+inf'), redis.call('HLEN', c)}
end)

redis.register_function{
  function_name = 'fanout_version',
  callback = function() return {VERSION, DIGEST} end,
  flags = {'no-writes'},
}
"#;

/// Lua string literal of `s` (decimal escapes for everything but plain characters).
fn lua_string(s: &str) -> String {
    let mut out = String::from("'");
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-.:@/=".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "\\{b}");
        }
    }
    out.push('\'');
    out
}

/// The library's source for this node: its code version, prefix and history settings.
/// `publish` is the command the library publishes with: `SPUBLISH` on a cluster, so a
/// publication goes only to the shard that owns the channel's slot (the channel is the
/// call's key, so it is always local to the script).
pub(crate) fn library(prefix: &str, histories: &Histories, window_s: u64, publish: &str) -> String {
    let mut history = String::new();
    let mut fallback = "nil".to_string();
    for (ns, p) in histories.entries() {
        let entry = format!("{{{}, {}}}", p.size, p.ttl.as_secs().max(1));
        if ns == "*" {
            fallback = entry;
        } else {
            let _ = write!(history, "[{}] = {entry}, ", lua_string(&ns));
        }
    }
    let off: String = histories.off().iter().map(|ns| format!("[{}] = true, ", lua_string(ns))).collect();
    let settings = format!("{prefix}\n{history}\n{off}\n{fallback}\n{window_s}\n{publish}");
    let digest = format!("{:016x}", fnv1a(settings.as_bytes()));
    format!("#!lua name=fanout\n-- fanout Redis Function library (see the fanout-broker-redis crate)\n{}", LIBRARY)
        .replace("__VERSION__", &VERSION.to_string())
        .replace("__DIGEST__", &digest)
        .replace("__PREFIX__", &lua_string(prefix))
        .replace("__PUBLISH__", &lua_string(publish))
        .replace("__WINDOW__", &window_s.to_string())
        .replace("__HISTORY__", &history)
        .replace("__OFF__", &off)
        .replace("__FALLBACK__", &fallback)
}

/// A small, stable digest of the settings baked into the library (not for security: it
/// only tells a node whether the loaded library carries its own settings).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

fn digest_of(library: &str) -> Option<&str> {
    let start = library.find("local DIGEST = '")? + "local DIGEST = '".len();
    library.get(start..start + 16)
}

/// What [`ensure_loaded`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Loaded {
    /// Ours was loaded (none, an older one, or ours with other settings was there).
    Ours,
    /// The same library was already there.
    Present,
    /// A newer node's library is there and stays.
    Newer(u64),
}

/// Loads `library` unless Redis already has it or a newer one.
///
/// Between reading the version and loading, a newer node could load its own, which this
/// would then replace; every node checks again whenever it reconnects and when a call
/// finds a function missing, so a newer library is restored by its own nodes.
///
/// `force` loads it without asking: on a cluster the version check reaches one master,
/// and a master that lost the library (while another still has it) must get it anyway.
/// `FUNCTION LOAD` itself goes to every master.
pub(crate) async fn ensure_loaded<C: redis::aio::ConnectionLike + Send>(
    conn: &mut C,
    library: &str,
    force: bool,
) -> redis::RedisResult<Loaded> {
    let current: redis::RedisResult<(u64, String)> = if force {
        Ok((0, String::new()))
    } else {
        redis::cmd("FCALL_RO").arg("fanout_version").arg(0).query_async(conn).await
    };
    match current {
        Ok((v, _)) if v > VERSION => return Ok(Loaded::Newer(v)),
        Ok((v, digest)) if v == VERSION && Some(digest.as_str()) == digest_of(library) => return Ok(Loaded::Present),
        Ok(_) => {}
        Err(e) if is_missing_function(&e) => {}
        Err(e) => return Err(e),
    }
    redis::cmd("FUNCTION").arg("LOAD").arg("REPLACE").arg(library).query_async::<String>(conn).await?;
    Ok(Loaded::Ours)
}

/// Redis has no such function: the library is not loaded (a Redis that restarted empty,
/// `FUNCTION FLUSH`), or this Redis predates functions.
pub(crate) fn is_missing_function(e: &redis::RedisError) -> bool {
    let text = e.to_string();
    text.contains("Function not found") || text.contains("unknown command")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use fanout_hub::HistoryPolicy;

    use super::*;

    #[test]
    fn the_library_carries_the_settings_and_a_digest_of_them() {
        let h = Histories::new([
            ("h".to_string(), HistoryPolicy { size: 100, ttl: Duration::from_secs(600) }),
            ("x'y".to_string(), HistoryPolicy { size: 0, ttl: Duration::ZERO }),
        ]);
        let lib = library("fanout:", &h, 300, "PUBLISH");
        assert!(lib.starts_with("#!lua name=fanout\n"));
        assert!(lib.contains("local HISTORY = {['h'] = {100, 600}, }"), "{lib}");
        assert!(lib.contains(r"['x\39y'] = true"), "quotes are escaped");
        assert!(!lib.contains("__"), "every placeholder is filled");
        let other = library("fanout:", &Histories::default(), 300, "PUBLISH");
        assert_ne!(digest_of(&lib), digest_of(&other));
        assert_eq!(digest_of(&lib).map(str::len), Some(16));
    }
}
