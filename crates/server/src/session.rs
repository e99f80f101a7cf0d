//! One WebSocket session: the task that owns a connection from the upgrade to the close
//! and decides what its frames mean (commands, auth, limits, subscriptions, the timers);
//! and [`Live`], the set of open sessions a drain closes. Framing, writes and the closing
//! handshake are `connection.rs`.

use std::{collections::HashSet, sync::Arc, time::Duration};

use bytes::Bytes;
use fanout_hub::{Control, Hub, LogLimiter, Order, Outbox, Status, Subscription};
use fanout_protocol::{
    close_frame, decode_command, encode_history_reply, encode_presence_reply, encode_presence_stats_reply,
    encode_reply, frame, now_micros, ChannelName, Command, CommandError, Encoding, ErrorCode, OpCode, Publication,
    Reply,
};
use tokio::{net::TcpStream, time::Instant};

use crate::{
    auth::{Identity, Verifier},
    channelset::ChannelSet,
    connection::{Connection, Read},
    limit::{Rate, TokenBucket},
    metrics::{CloseReason, NodeMetrics},
    policy::{Denied, Policy},
    wsframe::{FrameError, Incoming},
};

/// Limits every session applies.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_message_size: usize,
    pub outbound_queue_bytes: usize,
    pub max_subscriptions: usize,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    /// Commands per connection; None: unlimited.
    pub command_rate: Option<Rate>,
}

/// What all sessions share.
pub struct SessionContext {
    pub hub: Hub,
    pub live: Live,
    pub metrics: Arc<NodeMetrics>,
    pub limits: Limits,
    pub policy: Policy,
    /// None: authentication is off.
    pub verifier: Option<Arc<Verifier>>,
    /// Which namespaces track presence.
    pub presences: Arc<fanout_hub::Presences>,
    /// This node's id: client ids are `NODE-CONNECTION`, unique in the cluster.
    pub node_id: Arc<str>,
}

/// Every open session's outbox, so a drain can reach them. Draining goes through the
/// outbox the session already polls, which costs the hot loop nothing, where a
/// cancellation future polled on every pass showed up in profiles.
#[derive(Default)]
pub struct Live {
    inner: std::sync::Mutex<LiveInner>,
}

#[derive(Default)]
struct LiveInner {
    draining: bool,
    outboxes: std::collections::HashMap<u64, std::sync::Weak<Outbox>>,
    /// Token `sub` → that user's connections here, for the server API.
    users: std::collections::HashMap<String, HashSet<u64>>,
}

impl Live {
    fn lock(&self) -> std::sync::MutexGuard<'_, LiveInner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn join(&self, outbox: &Arc<Outbox>, user: Option<&str>) {
        let mut live = self.lock();
        if live.draining {
            outbox.drain();
        }
        live.outboxes.insert(outbox.id(), Arc::downgrade(outbox));
        if let Some(user) = user {
            live.users.entry(user.to_owned()).or_default().insert(outbox.id());
        }
    }

    fn leave(&self, id: u64, user: Option<&str>) {
        let mut live = self.lock();
        live.outboxes.remove(&id);
        if let Some(user) = user {
            if let Some(ids) = live.users.get_mut(user) {
                ids.remove(&id);
                if ids.is_empty() {
                    live.users.remove(user);
                }
            }
        }
    }

    /// Open connections on this node.
    pub fn connections(&self) -> usize {
        self.lock().outboxes.len()
    }

    /// Hands a server-API action to the sessions of its user on this node; how many.
    pub fn apply(&self, control: &Control) -> usize {
        let live = self.lock();
        let (user, order) = match control {
            Control::Disconnect { user } => (user, Order::Disconnect),
            Control::Unsubscribe { user, channel } => (user, Order::Unsubscribe(channel.clone())),
        };
        let Some(ids) = live.users.get(user.as_str()) else { return 0 };
        let outboxes: Vec<Arc<Outbox>> =
            ids.iter().filter_map(|id| live.outboxes.get(id).and_then(std::sync::Weak::upgrade)).collect();
        drop(live);
        for outbox in &outboxes {
            outbox.order(order.clone());
        }
        outboxes.len()
    }

    /// Tells every open session, and any that opens from now on, to close with 1001.
    pub fn drain_all(&self) {
        let mut live = self.lock();
        live.draining = true;
        for outbox in live.outboxes.values().filter_map(std::sync::Weak::upgrade) {
            outbox.drain();
        }
    }
}

/// How long a closing session keeps trying to flush and say goodbye.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// A slow consumer gets longer: its socket buffer is full by definition, and the close
/// frame only goes out once it reads again.
const SLOW_CONSUMER_GRACE: Duration = Duration::from_secs(5);
/// A number in [0, 1) that is evenly spread over consecutive ids (Fibonacci hashing).
fn spread(id: u64) -> f64 {
    (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64
}

static BAD_INPUT_LOG: LogLimiter = LogLimiter::new(10_000);
static BROKER_ERROR_LOG: LogLimiter = LogLimiter::new(10_000);

/// What the command rate says about one more frame from the client.
enum Charge {
    Allowed,
    /// Over the rate: refuse this one.
    Refused,
    /// Far over the rate for long: close the connection (1008).
    Abusive,
}

/// How a pass of the event loop ended the session.
enum End {
    /// Send this close code (if any) after flushing, then close.
    Close(CloseReason),
    /// The client sent Close with this code: echo it.
    ClientClose(Option<u16>),
}

/// Refused commands a client may keep sending, as a multiple of its command rate: past 3x
/// the rate (1x accepted, 2x refused) the refusals drain a bucket of `command_burst` and
/// the connection closes with 1008.
const ABUSE_RATE_FACTOR: f64 = 2.0;

/// The bucket of refused commands that tolerates `ABUSE_RATE_FACTOR` times `rate`.
fn abuse_rate(rate: Rate) -> Rate {
    Rate { per_second: rate.per_second * ABUSE_RATE_FACTOR, burst: rate.burst }
}

/// The session of an upgraded connection, ready to be spawned as its task. `leftover`
/// holds bytes the HTTP layer read past the upgrade request; `permit` is the connection's
/// place under `max_connections`, held for the session's life.
///
/// Built here rather than at the top of an async fn: an async fn's arguments stay in its
/// state for as long as it runs, even once moved into the session, and that state is the
/// task every connection pays for until it closes.
pub fn start(
    stream: TcpStream,
    leftover: Bytes,
    format: Encoding,
    shared: Arc<SessionContext>,
    identity: Identity,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let m = &shared.metrics;
    m.opened.increment(1);
    m.connections.increment(1.0);
    let now = std::time::Instant::now();
    let rate = shared.limits.command_rate.unwrap_or(Rate::new(0.0, 1));
    let mut s = Session {
        expires_at: expiry_of(&identity, shared.verifier.as_deref()),
        identity,
        commands: TokenBucket::new(rate, now),
        abuse: TokenBucket::new(rate, now),
        publish_rates: Box::default(),
        refreshes: TokenBucket::new(REFRESH_RATE, now),
        outbox: Arc::new(Outbox::new(format, shared.limits.outbound_queue_bytes)),
        conn: Connection::new(stream, leftover, shared.limits.max_message_size),
        subscriptions: ChannelSet::default(),
        replays: Vec::new(),
        shared,
        _permit: permit,
    };
    s.shared.live.join(&s.outbox, s.user());
    // A block that uses the session in place, not an `async fn run(self)`: that would move
    // its argument into a local and keep both copies in the state.
    async move {
        let end = s.event_loop().await;
        // It takes no more frames: the fan-out's wake queue must not wait for it.
        s.outbox.set_busy(true);
        // Boxed: only a closing session needs the room.
        let reason = Box::pin(s.finish(end)).await;
        s.shared.metrics.closed(reason).increment(1);
    }
}

struct Session {
    conn: Connection,
    outbox: Arc<Outbox>,
    subscriptions: ChannelSet,
    /// Recoveries too large to push at once, each feeding its channel as the socket
    /// drains (a task of its own: this one must keep writing). Aborted with the
    /// subscription.
    replays: Vec<(ChannelName, tokio::task::AbortHandle)>,
    shared: Arc<SessionContext>,
    /// Who the client is; a token's `sub` says whose connection this is for the server API.
    identity: Identity,
    /// When the token (plus leeway) expires; the session closes with 1008 then.
    expires_at: Option<Instant>,
    commands: TokenBucket,
    /// Drained by commands refused for rate: when empty, the client is abusive.
    abuse: TokenBucket,
    /// Publish-rate buckets by namespace slot, allocated on the first rate-limited publish.
    /// (A boxed slice: 8 bytes less than a Vec in every session.)
    publish_rates: Box<[Option<TokenBucket>]>,
    /// `refresh` verifies a signature, the costliest thing a client can ask for: it gets a
    /// bucket of its own, far below the command rate.
    refreshes: TokenBucket,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// Runs on every way out of a session, a panic included, so nothing it registered (its
/// subscriptions, its place in the live set, the connection gauge) outlives it.
impl Drop for Session {
    fn drop(&mut self) {
        for (_, replay) in self.replays.drain(..) {
            replay.abort();
        }
        for channel in self.subscriptions.take() {
            self.leave_channel(&channel);
        }
        self.shared.live.leave(self.outbox.id(), self.user());
        self.outbox.close();
        self.shared.metrics.connections.decrement(1.0);
    }
}

/// `refresh` commands per second per connection, and their burst.
const REFRESH_RATE: Rate = Rate { per_second: 1.0, burst: 8.0 };

fn expiry_of(identity: &Identity, verifier: Option<&Verifier>) -> Option<Instant> {
    match (identity, verifier) {
        (Identity::Token(grant), Some(v)) => Some(Instant::now() + grant.remaining(v.leeway())),
        _ => None,
    }
}

/// Takes a token from the publish-rate bucket of namespace `slot`, if it has a rate.
fn within_publish_rate(policy: &Policy, buckets: &mut Box<[Option<TokenBucket>]>, slot: usize) -> bool {
    let Some(rate) = policy.rule_at(slot).publish_rate else { return true };
    if buckets.is_empty() {
        *buckets = vec![None; policy.slots()].into_boxed_slice();
    }
    let now = std::time::Instant::now();
    buckets.get_mut(slot).is_none_or(|b| b.get_or_insert_with(|| TokenBucket::new(rate, now)).try_take(rate, now))
}

impl Session {
    /// The token's `sub` (a refresh must keep it, so it never changes).
    fn user(&self) -> Option<&str> {
        match &self.identity {
            Identity::Token(grant) => grant.sub.as_deref(),
            _ => None,
        }
    }

    async fn event_loop(&mut self) -> End {
        // Limits are read from `shared` where needed, never copied into locals here: this
        // future lives as long as the connection, and every byte of it is paid per
        // connection.
        // One timer serves both the pings and the token's expiry, whichever is due first.
        // The first ping comes after a fraction of the interval that differs per session:
        // connections opened together (a deploy, a reconnect wave) must not ping together
        // forever after, or every interval the node does thousands of writes at once.
        let mut next_ping =
            Instant::now() + self.shared.limits.ping_interval.mul_f64(0.5 + 0.5 * spread(self.outbox.id()));
        let timer = tokio::time::sleep_until(self.next_wake(next_ping));
        tokio::pin!(timer);
        // Bytes the client sent together with its upgrade request (a command, a Ping) are
        // already here: handle them now, not when the client happens to send again.
        if self.conn.has_buffered() {
            self.outbox.set_busy(true);
            let end = Box::pin(self.process()).await;
            self.outbox.set_busy(false);
            if let Some(end) = end {
                return end;
            }
        }
        loop {
            // Reading the socket is done by readiness + try_read, so every branch here is
            // cancel-safe and no partially read frame is ever dropped. Not biased: under
            // constant traffic the outbox is always ready, and polled first it would starve
            // the client's input (its Close, its commands) and the timer (token expiry, idle
            // timeout). tokio starts at a random branch each pass.
            let writing = self.conn.has_pending();
            let (pending, socket) = self.conn.split();
            tokio::select! {
                // Polled even while earlier frames wait for the socket: an outbox that
                // overflows behind a stalled socket must still end the session now.
                status = self.outbox.take(pending) => match status {
                    Status::Open => {
                        if let Some(end) = self.obey() {
                            return end;
                        }
                        // No yield for more to arrive first: the fan-out wakes sessions in
                        // the order they got frames, a chunk at a time (hub's wake queue),
                        // so by now the whole fan-out, and whatever came in behind it while
                        // earlier sessions ran, is here, and one write carries it all.
                        if self.conn.flush(&self.outbox, &self.shared.metrics).is_err() {
                            return End::Close(CloseReason::Disconnected);
                        }
                    }
                    Status::Overflowed => return End::Close(CloseReason::SlowConsumer),
                    Status::Draining | Status::Closed => return End::Close(CloseReason::Draining),
                },
                ready = std::future::poll_fn(|cx| socket.poll_write(cx)), if writing => {
                    if ready.is_err() || self.conn.flush(&self.outbox, &self.shared.metrics).is_err() {
                        return End::Close(CloseReason::Disconnected);
                    }
                }
                ready = std::future::poll_fn(|cx| socket.poll_read(cx)) => {
                    if ready.is_err() {
                        return End::Close(CloseReason::Disconnected);
                    }
                    let expires_at = self.expires_at;
                    // Boxed: inline, the command handling it may await would sit in every
                    // idle connection's task; a read is rare next to the deliveries.
                    // Busy while reading: a command may await (a publish, a history
                    // read), and the fan-out's wake queue must not wait for this session
                    // to take frames meanwhile (hub's wakeups).
                    self.outbox.set_busy(true);
                    let end = Box::pin(self.read()).await;
                    self.outbox.set_busy(false);
                    if let Some(end) = end {
                        return end;
                    }
                    if self.expires_at != expires_at {
                        timer.as_mut().reset(self.next_wake(next_ping));
                    }
                }
                () = &mut timer => {
                    let now = Instant::now();
                    if self.expires_at.is_some_and(|at| now >= at) {
                        return End::Close(CloseReason::AuthExpired);
                    }
                    if now >= next_ping {
                        if self.conn.silent_for() >= self.shared.limits.idle_timeout {
                            return End::Close(CloseReason::IdleTimeout);
                        }
                        self.outbox.push(Bytes::from_static(&[0x89, 0x00]), 0);
                        next_ping = now + self.shared.limits.ping_interval;
                    }
                    timer.as_mut().reset(self.next_wake(next_ping));
                }
            }
        }
    }

    /// Acts on what the backend ordered (server API); `Some` when the session must end.
    fn obey(&mut self) -> Option<End> {
        for order in self.outbox.take_orders() {
            match order {
                Order::Disconnect => return Some(End::Close(CloseReason::Kicked)),
                Order::Unsubscribe(channel) => {
                    if self.subscriptions.remove(&channel) {
                        self.stop_replay(&channel);
                        self.leave_channel(&channel);
                        let reply = Reply::Unsubscribed { id: None, channel: channel.as_str(), reason: Some("server") };
                        self.reply(&reply);
                    }
                }
            }
        }
        None
    }

    /// When the session timer must fire next: the next ping or the token's expiry.
    fn next_wake(&self, next_ping: Instant) -> Instant {
        self.expires_at.map_or(next_ping, |at| at.min(next_ping))
    }

    /// Reads what the socket has and handles every complete frame in it.
    async fn read(&mut self) -> Option<End> {
        match self.conn.read() {
            Read::Gone => Some(End::Close(CloseReason::Disconnected)),
            Read::Nothing => None,
            Read::Data => self.process().await,
        }
    }

    /// Handles every complete frame the decoder holds.
    async fn process(&mut self) -> Option<End> {
        loop {
            match self.conn.next_frame() {
                Ok(Some(Incoming::Message { binary, payload })) => {
                    // Commands are accepted in either format; replies use the connection's.
                    let enc = if binary { Encoding::MsgPack } else { Encoding::Json };
                    // Not boxed again: the callers box this whole future.
                    if let Some(end) = self.command(enc, &payload).await {
                        return Some(end);
                    }
                }
                // Control frames cost the node like commands do, so they count against the
                // same rate; one over it is ignored (a Ping goes unanswered), and far over
                // it closes the connection like any flood.
                Ok(Some(Incoming::Ping(payload))) => match self.charge() {
                    Charge::Allowed => self.conn.pong(&self.outbox, payload),
                    Charge::Refused => {}
                    Charge::Abusive => return Some(End::Close(CloseReason::RateLimited)),
                },
                Ok(Some(Incoming::Pong)) => {
                    if let Charge::Abusive = self.charge() {
                        return Some(End::Close(CloseReason::RateLimited));
                    }
                }
                Ok(Some(Incoming::Close(code))) => return Some(End::ClientClose(code)),
                Ok(None) => break,
                Err(e) => {
                    if let Some(suppressed) = BAD_INPUT_LOG.check() {
                        tracing::info!(peer = ?self.conn.peer_addr(), error = %e, suppressed, "closing connection on a WebSocket protocol error");
                    }
                    return Some(End::Close(match e {
                        FrameError::Protocol(_) => CloseReason::ProtocolError,
                        FrameError::InvalidUtf8 => CloseReason::InvalidUtf8,
                        FrameError::TooLarge => CloseReason::TooLarge,
                    }));
                }
            }
        }
        None
    }

    fn reply(&self, reply: &Reply<'_>) {
        self.outbox.push_reply(encode_reply(self.outbox.format(), reply));
    }

    /// Takes one token from the command rate for a frame the client sent.
    fn charge(&mut self) -> Charge {
        let Some(rate) = self.shared.limits.command_rate else { return Charge::Allowed };
        let now = std::time::Instant::now();
        if self.commands.try_take(rate, now) {
            return Charge::Allowed;
        }
        if self.abuse.try_take(abuse_rate(rate), now) {
            return Charge::Refused;
        }
        if let Some(suppressed) = BAD_INPUT_LOG.check() {
            tracing::info!(peer = ?self.conn.peer_addr(), suppressed, "closing a connection that kept sending far over its command rate");
        }
        Charge::Abusive
    }

    fn error(&self, id: Option<u64>, code: ErrorCode, message: &str) {
        self.shared.metrics.command_error(code).increment(1);
        self.reply(&Reply::Error { id, code, message });
    }

    /// Handles one command frame; `Some` when the session must end because of it.
    async fn command(&mut self, enc: Encoding, payload: &[u8]) -> Option<End> {
        let decoded = decode_command(enc, payload);
        // Every data frame counts, malformed ones too: they cost as much to handle.
        match self.charge() {
            Charge::Allowed => {}
            Charge::Refused => {
                let id = match &decoded {
                    Ok(cmd) => cmd.id(),
                    Err(e) => e.id,
                };
                self.error(id, ErrorCode::RateLimited, "too many commands: slow down");
                return None;
            }
            Charge::Abusive => return Some(End::Close(CloseReason::RateLimited)),
        }
        self.execute(decoded).await;
        None
    }

    async fn execute(&mut self, decoded: Result<Command, CommandError>) {
        let cmd = match decoded {
            Ok(cmd) => cmd,
            Err(e) => {
                if let Some(suppressed) = BAD_INPUT_LOG.check() {
                    tracing::info!(peer = ?self.conn.peer_addr(), error = %e, suppressed, "bad client command");
                }
                return self.error(e.id, e.code, &e.message);
            }
        };
        let hub = &self.shared.hub;
        match cmd {
            Command::Subscribe { id, channel, since } => {
                if let Err(denied) = self.shared.policy.check_subscribe(&self.identity, channel.as_str()) {
                    return self.denied(id, denied);
                }
                if self.subscriptions.contains(&channel) {
                    return self.reply(&Reply::Subscribed {
                        id,
                        channel: channel.as_str(),
                        top: None,
                        recovered: None,
                    });
                }
                if self.subscriptions.len() >= self.shared.limits.max_subscriptions {
                    let msg = format!("at most {} subscriptions per connection", self.shared.limits.max_subscriptions);
                    return self.error(id, ErrorCode::TooManySubscriptions, &msg);
                }
                let reply = |s: &Subscription| {
                    self.reply(&Reply::Subscribed {
                        id,
                        channel: channel.as_str(),
                        top: s.top.as_ref(),
                        recovered: s.recovered,
                    })
                };
                match hub.subscribe(&channel, &self.outbox, since.as_ref(), reply).await {
                    Ok(replay) => {
                        if let Some(replay) = replay {
                            self.replays.retain(|(_, r)| !r.is_finished());
                            let task = tokio::spawn(replay.run());
                            self.replays.push((channel.clone(), task.abort_handle()));
                        }
                        if self.shared.presences.of(channel.as_str()).is_some() {
                            hub.presence_join(&channel, &self.client_id(), self.user().unwrap_or(""));
                        }
                        self.subscriptions.insert(channel);
                    }
                    Err(e) => self.broker_error(id, "subscribe", &e),
                }
            }
            Command::Unsubscribe { id, channel } => {
                if self.subscriptions.remove(&channel) {
                    self.stop_replay(&channel);
                    self.leave_channel(&channel);
                }
                self.reply(&Reply::Unsubscribed { id, channel: channel.as_str(), reason: None });
            }
            Command::Publish { id, channel, enc, data, idempotency_key } => {
                if data.len() > self.shared.limits.max_message_size {
                    return self.error(id, ErrorCode::MessageTooLarge, "data exceeds max_message_size");
                }
                let slot = match self.shared.policy.check_publish(&self.identity, channel.as_str(), data.len()) {
                    Ok(slot) => slot,
                    Err(denied) => return self.denied(id, denied),
                };
                if !within_publish_rate(&self.shared.policy, &mut self.publish_rates, slot) {
                    return self.error(id, ErrorCode::RateLimited, "publish rate of this namespace exceeded");
                }
                let publication = Publication::new(channel, now_micros(), enc, data);
                match hub.publish(&publication, idempotency_key.as_deref()).await {
                    Ok(published) => {
                        // A duplicate is answered as the first was: the retry of a publish
                        // whose answer was lost.
                        if published.duplicate {
                            self.shared.metrics.idempotent_duplicates.increment(1);
                        } else {
                            self.shared.metrics.publications_ws.increment(1);
                        }
                        self.reply(&Reply::Published { id, position: published.position.as_ref() });
                    }
                    Err(e) => self.broker_error(id, "publish", &e),
                }
            }
            Command::Presence { id, channel, stats } => {
                if let Err(denied) = self.shared.policy.check_subscribe(&self.identity, channel.as_str()) {
                    return self.denied(id, denied);
                }
                if self.shared.presences.of(channel.as_str()).is_none() {
                    return self.error(id, ErrorCode::BadRequest, "this channel's namespace does not track presence");
                }
                let frame = if stats {
                    hub.presence_stats(&channel)
                        .await
                        .map(|s| encode_presence_stats_reply(self.outbox.format(), id, channel.as_str(), s))
                } else {
                    hub.presence(&channel)
                        .await
                        .map(|l| encode_presence_reply(self.outbox.format(), id, channel.as_str(), &l))
                };
                match frame {
                    Ok(frame) => {
                        self.outbox.push_reply(frame);
                    }
                    Err(e) => self.broker_error(id, "presence", &e),
                }
            }
            Command::History { id, channel, query } => {
                if let Err(denied) = self.shared.policy.check_subscribe(&self.identity, channel.as_str()) {
                    return self.denied(id, denied);
                }
                if !hub.keeps_history(channel.as_str()) {
                    return self.error(id, ErrorCode::BadRequest, "this channel's namespace keeps no history");
                }
                self.shared.metrics.history_reads_ws.increment(1);
                match hub.history(&channel, &query).await {
                    Ok(page) => match encode_history_reply(self.outbox.format(), id, channel.as_str(), &page) {
                        // A reply larger than the queue would cut the connection off (4008).
                        Ok(frame) if frame.len() + 1024 > self.outbox.room() => self.error(
                            id,
                            ErrorCode::MessageTooLarge,
                            "the history is larger than this connection's send queue: ask for less with limit",
                        ),
                        Ok(frame) => {
                            self.outbox.push_reply(frame);
                        }
                        Err(_) => self.error(id, ErrorCode::Internal, "history could not be encoded"),
                    },
                    Err(e) => self.broker_error(id, "history", &e),
                }
            }
            Command::Ping { id } => self.reply(&Reply::Pong { id }),
            Command::Refresh { id, token } => self.refresh(id, &token),
        }
    }

    /// This connection's id in the cluster: `NODE-CONNECTION`.
    fn client_id(&self) -> String {
        format!("{}-{}", self.shared.node_id, self.outbox.id())
    }

    /// Leaves `channel` in the registry and, where it tracks presence, in presence.
    fn leave_channel(&self, channel: &ChannelName) {
        self.shared.hub.unsubscribe(channel, self.outbox.id());
        if self.shared.presences.of(channel.as_str()).is_some() {
            self.shared.hub.presence_leave(channel, &self.client_id());
        }
    }

    fn stop_replay(&mut self, channel: &ChannelName) {
        self.replays.retain(|(c, replay)| {
            if c == channel {
                replay.abort();
            }
            c != channel
        });
    }

    /// The client learns that the broker failed, not how: addresses and Redis or ACL text
    /// go to the log only.
    fn broker_error(&self, id: Option<u64>, op: &'static str, e: &fanout_hub::BrokerError) {
        if let Some(suppressed) = BROKER_ERROR_LOG.check() {
            tracing::warn!(op, error = %e, suppressed, "broker failed a client's request");
        }
        self.error(id, ErrorCode::Unavailable, e.client_message());
    }

    fn denied(&self, id: Option<u64>, denied: Denied) {
        match denied {
            Denied::Forbidden(why) => self.error(id, ErrorCode::Forbidden, why),
            Denied::TooLarge => {
                self.error(id, ErrorCode::MessageTooLarge, "data exceeds this namespace's max_message_size")
            }
        }
    }

    /// Replaces the connection's token with a fresh one for the same `sub`; a bad one
    /// changes nothing. Subscriptions the new token no longer allows are dropped, each
    /// announced with an `unsubscribed` that carries no `id`.
    fn refresh(&mut self, id: Option<u64>, token: &str) {
        let Some(verifier) = self.shared.verifier.clone() else {
            return self.error(id, ErrorCode::BadRequest, "authentication is not enabled on this node");
        };
        if !self.refreshes.try_take(REFRESH_RATE, std::time::Instant::now()) {
            return self.error(
                id,
                ErrorCode::RateLimited,
                "too many refreshes: at most one per second after a burst of 8",
            );
        }
        let m = &self.shared.metrics;
        let current_sub = match &self.identity {
            Identity::Token(grant) => grant.sub.clone(),
            _ => {
                m.refreshes_rejected.increment(1);
                return self.error(id, ErrorCode::Forbidden, "only a connection opened with a token can refresh it");
            }
        };
        let grant = match verifier.verify(token) {
            Ok(grant) => grant,
            Err(e) => {
                m.refreshes_rejected.increment(1);
                return self.error(id, ErrorCode::Forbidden, &format!("invalid token: {e}"));
            }
        };
        if grant.sub != current_sub {
            m.refreshes_rejected.increment(1);
            return self.error(id, ErrorCode::Forbidden, "the new token is for a different sub");
        }
        m.refreshes_ok.increment(1);
        let exp = grant.exp;
        self.expires_at = Some(Instant::now() + grant.remaining(verifier.leeway()));
        self.identity = Identity::Token(Box::new(grant));
        self.reply(&Reply::Refreshed { id, exp });
        let policy = &self.shared.policy;
        let revoked: Vec<ChannelName> = self
            .subscriptions
            .iter()
            .filter(|c| policy.check_subscribe(&self.identity, c.as_str()).is_err())
            .cloned()
            .collect();
        for channel in revoked {
            self.subscriptions.remove(&channel);
            self.stop_replay(&channel);
            self.leave_channel(&channel);
            self.reply(&Reply::Unsubscribed { id: None, channel: channel.as_str(), reason: None });
        }
    }

    /// Leaves every channel, says goodbye the way `end` asks, and closes the socket.
    async fn finish(&mut self, end: End) -> CloseReason {
        for (_, replay) in self.replays.drain(..) {
            replay.abort();
        }
        for channel in self.subscriptions.take() {
            self.leave_channel(&channel);
        }
        let (reason, close) = match end {
            End::ClientClose(code) => {
                // Echo the client's code as RFC 6455 asks; 1005 (no code) becomes an empty Close.
                let f = match code {
                    Some(c) => close_frame(c, ""),
                    None => frame(OpCode::Close, &[]),
                };
                (CloseReason::Client, Some(f))
            }
            End::Close(reason) => (reason, reason.code().map(|c| close_frame(c, reason.as_str()))),
        };
        if reason == CloseReason::SlowConsumer {
            self.shared.metrics.slow_consumers.increment(1);
            self.conn.drop_unsent();
        } else if reason != CloseReason::Disconnected {
            // Deliver what was already queued before saying goodbye.
            let _ = self.outbox.take_now(self.conn.pending());
        }
        self.outbox.close();
        if let Some(close) = close {
            // A slow consumer gets longer: its socket buffer is full by definition, and the
            // close frame only goes out once it reads again.
            let grace = if reason == CloseReason::SlowConsumer { SLOW_CONSUMER_GRACE } else { CLOSE_GRACE };
            // After echoing the client's Close the handshake is complete; after our own we
            // wait for the client's.
            let client_grace = (reason != CloseReason::Client).then_some(CLOSE_GRACE);
            self.conn.close(&self.outbox, &self.shared.metrics, close, grace, client_grace).await;
        }
        reason
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ping_offsets_spread_evenly_over_consecutive_ids() {
        let mut buckets = [0u32; 10];
        for id in 1..=1000 {
            let x = super::spread(id);
            assert!((0.0..1.0).contains(&x));
            buckets[(x * 10.0) as usize] += 1;
        }
        assert!(buckets.iter().all(|&n| (80..=120).contains(&n)), "{buckets:?}");
    }

    /// The size of what `f` returns, without calling it.
    fn output_size<A, B, C, D, E, G, Fut>(_: impl FnOnce(A, B, C, D, E, G) -> Fut) -> usize {
        std::mem::size_of::<Fut>()
    }

    /// Every open connection keeps its session's future for its whole life, inside a tokio
    /// task cell that is aligned to 128 bytes (so sizes round up in steps of 128): at 656
    /// bytes the cell is 768, one byte more and it is 896. This is the largest item of the
    /// idle memory per connection (docs/benchmarks.md); a change that grows it must shrink
    /// something else or say why here.
    #[test]
    fn a_session_task_fits_a_768_byte_task_cell() {
        let size = output_size(super::start);
        assert!(size <= 656, "the session future is {size} bytes");
    }
}
