//! Decoding client commands from a data frame in either wire format.

use std::borrow::Cow;

use bytes::Bytes;
use rmpv::ValueRef;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::{
    channel::ChannelName,
    error::ErrorCode,
    history::{HistoryQuery, Position, MAX_EPOCH_LEN, MAX_HISTORY_LIMIT},
    message::{validate_data, Encoding, RMPV_MAX_DEPTH},
};

/// A well-formed client command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// v1.1: with `since`, recover what was published after that position.
    Subscribe {
        id: Option<u64>,
        channel: ChannelName,
        since: Option<Position>,
    },
    Unsubscribe {
        id: Option<u64>,
        channel: ChannelName,
    },
    /// `data` is one valid value encoded as `enc` (the connection's format).
    Publish {
        id: Option<u64>,
        channel: ChannelName,
        enc: Encoding,
        data: Bytes,
        /// v1.1: a retry with the same key on the same channel within
        /// [`IDEMPOTENCY_WINDOW`] is not published again.
        idempotency_key: Option<String>,
    },
    Ping {
        id: Option<u64>,
    },
    /// v1.1: who is subscribed to a channel (`stats`: only how many).
    Presence {
        id: Option<u64>,
        channel: ChannelName,
        stats: bool,
    },
    /// v1.1: read a channel's history.
    History {
        id: Option<u64>,
        channel: ChannelName,
        query: HistoryQuery,
    },
    /// Extension: replace the connection's auth token before it expires.
    Refresh {
        id: Option<u64>,
        token: String,
    },
}

impl Command {
    pub fn id(&self) -> Option<u64> {
        match self {
            Command::Subscribe { id, .. }
            | Command::Unsubscribe { id, .. }
            | Command::Publish { id, .. }
            | Command::Ping { id }
            | Command::History { id, .. }
            | Command::Presence { id, .. }
            | Command::Refresh { id, .. } => *id,
        }
    }

    pub fn op(&self) -> &'static str {
        match self {
            Command::Subscribe { .. } => "subscribe",
            Command::Unsubscribe { .. } => "unsubscribe",
            Command::Publish { .. } => "publish",
            Command::Ping { .. } => "ping",
            Command::History { .. } => "history",
            Command::Presence { stats: false, .. } => "presence",
            Command::Presence { stats: true, .. } => "presence_stats",
            Command::Refresh { .. } => "refresh",
        }
    }
}

/// A frame that is not a valid command. The connection stays open; the client gets an
/// `error` reply echoing `id` when the frame had a readable one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct CommandError {
    pub id: Option<u64>,
    pub code: ErrorCode,
    pub message: Cow<'static, str>,
}

pub(crate) fn bad(id: Option<u64>, message: impl Into<Cow<'static, str>>) -> CommandError {
    CommandError { id, code: ErrorCode::BadRequest, message: message.into() }
}

/// The fields of a command as found in the frame, before validation.
#[derive(Default)]
pub(crate) struct Fields<'a> {
    pub(crate) op: Option<Cow<'a, str>>,
    pub(crate) id: Option<u64>,
    pub(crate) id_invalid: bool,
    pub(crate) channel: Option<Cow<'a, str>>,
    pub(crate) channels: Option<Vec<Cow<'a, str>>>,
    pub(crate) data: Option<&'a [u8]>,
    pub(crate) token: Option<Cow<'a, str>>,
    pub(crate) idempotency_key: Option<Cow<'a, str>>,
    pub(crate) since: Option<(u64, Cow<'a, str>)>,
    pub(crate) limit: Option<u64>,
    pub(crate) user: Option<Cow<'a, str>>,
}

/// Decodes one frame's payload sent by a client speaking `format`.
pub fn decode_command(format: Encoding, payload: &[u8]) -> Result<Command, CommandError> {
    build(format, fields(format, payload)?)
}

#[derive(Deserialize)]
struct JsonFrame<'a> {
    #[serde(borrow, default)]
    op: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    channel: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    channels: Option<Vec<Cow<'a, str>>>,
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    token: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    idempotency_key: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    since: Option<&'a RawValue>,
    #[serde(default)]
    limit: Option<u64>,
    #[serde(borrow, default)]
    user: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct SinceJson<'a> {
    offset: u64,
    #[serde(borrow)]
    epoch: Cow<'a, str>,
}

fn since_type(id: Option<u64>) -> CommandError {
    bad(id, "field \"since\" must be an object with an unsigned \"offset\" and a string \"epoch\"")
}

/// Just the `id` of a frame that failed to decode as a whole.
#[derive(Deserialize)]
struct IdOnly {
    #[serde(default)]
    id: Option<u64>,
}

/// Keeps an explicit `null` as a present value: `"data": null` publishes null.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

pub(crate) fn fields(format: Encoding, payload: &[u8]) -> Result<Fields<'_>, CommandError> {
    match format {
        Encoding::Json => json_fields(payload),
        Encoding::MsgPack => msgpack_fields(payload),
    }
}

fn json_fields(payload: &[u8]) -> Result<Fields<'_>, CommandError> {
    let frame: JsonFrame<'_> = serde_json::from_slice(payload).map_err(|e| {
        // A field of the wrong type fails the whole frame; the reply should still carry
        // the id when it is readable, as it does in MessagePack.
        let id = serde_json::from_slice::<IdOnly>(payload).ok().and_then(|f| f.id);
        bad(id, format!("invalid JSON command: {e}"))
    })?;
    let (id, id_invalid) = match frame.id {
        None => (None, false),
        Some(raw) if raw.get() == "null" => (None, false),
        Some(raw) => match raw.get().parse::<u64>() {
            Ok(id) => (Some(id), false),
            Err(_) => (None, true),
        },
    };
    Ok(Fields {
        op: frame.op,
        id,
        id_invalid,
        channel: frame.channel,
        channels: frame.channels,
        data: frame.data.map(|raw| raw.get().as_bytes()),
        token: frame.token,
        idempotency_key: frame.idempotency_key,
        since: match frame.since {
            None => None,
            Some(raw) if raw.get() == "null" => None,
            // serde would also take `[offset, epoch]` for a struct: only an object is one.
            Some(raw) if !raw.get().starts_with('{') => return Err(since_type(id)),
            Some(raw) => {
                let s: SinceJson<'_> = serde_json::from_str(raw.get()).map_err(|_| since_type(id))?;
                Some((s.offset, s.epoch))
            }
        },
        limit: frame.limit,
        user: frame.user,
    })
}

fn msgpack_fields(payload: &[u8]) -> Result<Fields<'_>, CommandError> {
    let not_map = || bad(None, "a MessagePack command must be a map");
    let mut rd = payload;
    let len = rmp::decode::read_map_len(&mut rd).map_err(|_| not_map())?;
    let mut f = Fields::default();
    let mut wrong_type: Option<&'static str> = None;
    for _ in 0..len {
        let key = rmpv::decode::read_value_ref_with_max_depth(&mut rd, RMPV_MAX_DEPTH)
            .map_err(|e| bad(None, format!("invalid MessagePack command: {e}")))?;
        let before = rd;
        let value = rmpv::decode::read_value_ref_with_max_depth(&mut rd, RMPV_MAX_DEPTH)
            .map_err(|e| bad(None, format!("invalid MessagePack command: {e}")))?;
        let span = &before[..before.len() - rd.len()];
        let ValueRef::String(key) = key else { continue };
        match key.as_str() {
            Some("op") => {
                f.op = str_of(&value).or_else(|| {
                    wrong_type = Some("op");
                    None
                })
            }
            Some("channel") => {
                f.channel = str_of(&value).or_else(|| {
                    wrong_type = Some("channel");
                    None
                })
            }
            Some("token") => {
                f.token = str_of(&value).or_else(|| {
                    wrong_type = Some("token");
                    None
                })
            }
            Some("user") => {
                f.user = str_of(&value).or_else(|| {
                    wrong_type = Some("user");
                    None
                })
            }
            Some("idempotency_key") => {
                f.idempotency_key = str_of(&value).or_else(|| {
                    wrong_type = Some("idempotency_key");
                    None
                })
            }
            Some("data") => f.data = Some(span),
            Some("since") => match since_of(&value) {
                Some(since) => f.since = Some(since),
                None => wrong_type = Some("since"),
            },
            Some("limit") => match value {
                ValueRef::Nil => {}
                ValueRef::Integer(i) if i.as_u64().is_some() => f.limit = i.as_u64(),
                _ => wrong_type = Some("limit"),
            },
            Some("channels") => match value {
                ValueRef::Array(items) => {
                    let names: Option<Vec<_>> = items.iter().map(str_of).collect();
                    f.channels = names.or_else(|| {
                        wrong_type = Some("channels");
                        None
                    });
                }
                _ => wrong_type = Some("channels"),
            },
            Some("id") => match value {
                ValueRef::Nil => {}
                ValueRef::Integer(i) => match i.as_u64() {
                    Some(id) => f.id = Some(id),
                    None => f.id_invalid = true,
                },
                _ => f.id_invalid = true,
            },
            _ => {}
        }
    }
    if !rd.is_empty() {
        return Err(bad(f.id, "trailing bytes after the command"));
    }
    if let Some(field) = wrong_type {
        let what = match field {
            "since" => "an object with an unsigned \"offset\" and a string \"epoch\"",
            "limit" => "an unsigned integer",
            _ => "a string",
        };
        return Err(bad(f.id, format!("field \"{field}\" must be {what}")));
    }
    Ok(f)
}

/// `{"offset":N,"epoch":E}` as a MessagePack map (other keys ignored).
fn since_of<'a>(v: &ValueRef<'a>) -> Option<(u64, Cow<'a, str>)> {
    let ValueRef::Map(entries) = v else { return None };
    let (mut offset, mut epoch) = (None, None);
    for (k, v) in entries {
        match (k, v) {
            (ValueRef::String(k), ValueRef::Integer(i)) if k.as_str() == Some("offset") => offset = i.as_u64(),
            (ValueRef::String(k), v) if k.as_str() == Some("epoch") => epoch = str_of(v),
            _ => {}
        }
    }
    Some((offset?, epoch?))
}

/// Checks a `since` field: the epoch at most [`MAX_EPOCH_LEN`] bytes.
pub(crate) fn since(id: Option<u64>, since: Option<(u64, Cow<'_, str>)>) -> Result<Option<Position>, CommandError> {
    match since {
        Some((_, epoch)) if epoch.len() > MAX_EPOCH_LEN => {
            Err(bad(id, format!("\"since.epoch\" is longer than {MAX_EPOCH_LEN} bytes")))
        }
        Some((offset, epoch)) => Ok(Some(Position::new(offset, &epoch))),
        None => Ok(None),
    }
}

/// Checks a `limit` field: at most [`MAX_HISTORY_LIMIT`].
pub(crate) fn limit(id: Option<u64>, limit: Option<u64>) -> Result<Option<u64>, CommandError> {
    match limit {
        Some(n) if n > MAX_HISTORY_LIMIT => Err(bad(id, format!("\"limit\" must be at most {MAX_HISTORY_LIMIT}"))),
        other => Ok(other),
    }
}

fn str_of<'a>(v: &ValueRef<'a>) -> Option<Cow<'a, str>> {
    match v {
        ValueRef::String(s) => s.into_str().map(Cow::Borrowed),
        _ => None,
    }
}

/// Longest `idempotency_key`, in bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 64;

/// How long a publication's idempotency key is remembered on its channel.
pub const IDEMPOTENCY_WINDOW: std::time::Duration = std::time::Duration::from_secs(300);

/// Checks an `idempotency_key` field (at most [`MAX_IDEMPOTENCY_KEY`] bytes).
pub(crate) fn idempotency_key(id: Option<u64>, key: Option<Cow<'_, str>>) -> Result<Option<String>, CommandError> {
    match key {
        Some(k) if k.len() > MAX_IDEMPOTENCY_KEY => {
            Err(bad(id, format!("\"idempotency_key\" is longer than {MAX_IDEMPOTENCY_KEY} bytes")))
        }
        other => Ok(other.map(Cow::into_owned)),
    }
}

fn build(format: Encoding, f: Fields<'_>) -> Result<Command, CommandError> {
    let id = f.id;
    if f.id_invalid {
        return Err(bad(None, "\"id\" must be an unsigned integer"));
    }
    let op = f.op.ok_or_else(|| bad(id, "missing field \"op\""))?;
    let channel = || -> Result<ChannelName, CommandError> {
        let name = f.channel.as_deref().ok_or_else(|| bad(id, "missing field \"channel\""))?;
        ChannelName::new(name).map_err(|e| bad(id, format!("invalid channel name: {e}")))
    };
    Ok(match &*op {
        "subscribe" => Command::Subscribe { id, channel: channel()?, since: since(id, f.since)? },
        "presence" => Command::Presence { id, channel: channel()?, stats: false },
        "presence_stats" => Command::Presence { id, channel: channel()?, stats: true },
        "history" => Command::History {
            id,
            channel: channel()?,
            query: HistoryQuery { since: since(id, f.since)?, limit: limit(id, f.limit)? },
        },
        "unsubscribe" => Command::Unsubscribe { id, channel: channel()? },
        "publish" => {
            let channel = channel()?;
            let data = f.data.ok_or_else(|| bad(id, "missing field \"data\""))?;
            // Refused here rather than dropped later for subscribers of the other format.
            validate_data(format, data).map_err(|e| bad(id, format!("invalid data: {e}")))?;
            let idempotency_key = idempotency_key(id, f.idempotency_key)?;
            Command::Publish { id, channel, enc: format, data: Bytes::copy_from_slice(data), idempotency_key }
        }
        "ping" => Command::Ping { id },
        "refresh" => {
            let token = f.token.ok_or_else(|| bad(id, "missing field \"token\""))?;
            Command::Refresh { id, token: token.into_owned() }
        }
        other => {
            let mut shown: String = other.chars().take(32).collect();
            if shown.len() < other.len() {
                shown.push('…');
            }
            return Err(bad(id, format!("unknown op {shown:?}")));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(s: &str) -> Result<Command, CommandError> {
        decode_command(Encoding::Json, s.as_bytes())
    }

    fn mp(v: rmpv::Value) -> Result<Command, CommandError> {
        let mut buf = Vec::new();
        rmpv::encode::write_value(&mut buf, &v).unwrap();
        decode_command(Encoding::MsgPack, &buf)
    }

    fn ch(s: &str) -> ChannelName {
        ChannelName::new(s).unwrap()
    }

    #[test]
    fn json_commands() {
        assert_eq!(
            json(r#"{"op":"subscribe","channel":"a:b","id":1}"#),
            Ok(Command::Subscribe { id: Some(1), channel: ch("a:b"), since: None })
        );
        assert_eq!(
            json(r#"{"op":"unsubscribe","channel":"a"}"#),
            Ok(Command::Unsubscribe { id: None, channel: ch("a") })
        );
        assert_eq!(
            json(r#"{"op":"ping","id":18446744073709551615,"extra":[1]}"#),
            Ok(Command::Ping { id: Some(u64::MAX) })
        );
        assert_eq!(
            json(r#"{"op":"publish","channel":"a","data":{"x": [1, "é"]},"id":2}"#),
            Ok(Command::Publish {
                id: Some(2),
                channel: ch("a"),
                enc: Encoding::Json,
                data: Bytes::from_static(r#"{"x": [1, "é"]}"#.as_bytes()),
                idempotency_key: None,
            })
        );
        assert_eq!(
            json(r#"{"op":"publish","channel":"a","data":null}"#),
            Ok(Command::Publish {
                id: None,
                channel: ch("a"),
                enc: Encoding::Json,
                data: Bytes::from_static(b"null"),
                idempotency_key: None
            })
        );
        // Escaped keys and values decode like plain ones.
        assert_eq!(json(r#"{"\u006fp":"p\u0069ng"}"#), Ok(Command::Ping { id: None }));
    }

    #[test]
    fn json_errors_echo_id_when_readable() {
        let e = json(r#"{"op":"nope","id":5}"#).unwrap_err();
        assert_eq!((e.id, e.code), (Some(5), ErrorCode::BadRequest));
        assert!(e.message.contains("unknown op"));
        let e = json(r#"{"op":"subscribe","id":6}"#).unwrap_err();
        assert_eq!(e.id, Some(6));
        assert!(e.message.contains("channel"));
        let e = json(r#"{"op":"subscribe","channel":"bad name","id":7}"#).unwrap_err();
        assert_eq!(e.id, Some(7));
        let e = json(r#"{"op":"publish","channel":"a","id":8}"#).unwrap_err();
        assert!(e.message.contains("data"));
        assert_eq!(json(r#"{"id":9}"#).unwrap_err().id, Some(9));
        // A wrong type elsewhere keeps a readable id, as in MessagePack.
        for (frame, id) in [(r#"{"op":1,"id":4}"#, 4), (r#"{"id":5,"channel":["x"],"op":"subscribe"}"#, 5)] {
            let e = json(frame).unwrap_err();
            assert_eq!((e.id, e.code), (Some(id), ErrorCode::BadRequest), "{frame}");
        }
        let e = json(r#"{"op":"publish","channel":"a","data":1e999,"id":6}"#).unwrap_err();
        assert_eq!(e.id, Some(6));
        assert!(e.message.contains("invalid data"), "{}", e.message);
        for garbage in [
            "",
            "{",
            "[]",
            "\"op\"",
            "null",
            r#"{"op":1}"#,
            r#"{"op":"ping","id":-1}"#,
            r#"{"op":"ping","id":"1"}"#,
            r#"{"op":"ping","id":1.5}"#,
        ] {
            let e = json(garbage).unwrap_err();
            assert_eq!((e.id, e.code), (None, ErrorCode::BadRequest), "{garbage}");
        }
    }

    #[test]
    fn msgpack_commands_keep_data_bytes() {
        use rmpv::Value as V;
        let data = V::Map(vec![(V::from("k"), V::Binary(vec![1, 2, 3]))]);
        let cmd = mp(V::Map(vec![
            (V::from("op"), V::from("publish")),
            (V::from("channel"), V::from("x")),
            (V::from(1), V::from("ignored non-string key")),
            (V::from("data"), data.clone()),
            (V::from("id"), V::from(4)),
        ]))
        .unwrap();
        let Command::Publish { id, channel, enc, data: raw, .. } = cmd else { panic!() };
        assert_eq!((id, channel, enc), (Some(4), ch("x"), Encoding::MsgPack));
        assert_eq!(rmpv::decode::read_value(&mut &raw[..]).unwrap(), data);
        assert_eq!(mp(V::Map(vec![(V::from("op"), V::from("ping"))])), Ok(Command::Ping { id: None }));
    }

    #[test]
    fn idempotency_keys_are_strings_of_at_most_64_bytes() {
        let cmd = json(r#"{"op":"publish","channel":"a","data":1,"idempotency_key":"order-7","id":1}"#).unwrap();
        assert!(matches!(cmd, Command::Publish { idempotency_key: Some(ref k), .. } if k == "order-7"));
        let long =
            format!(r#"{{"op":"publish","channel":"a","data":1,"idempotency_key":"{}","id":2}}"#, "k".repeat(65));
        assert_eq!(json(&long).unwrap_err().id, Some(2));
        let ok = format!(r#"{{"op":"publish","channel":"a","data":1,"idempotency_key":"{}"}}"#, "k".repeat(64));
        assert!(json(&ok).is_ok());
        let e = json(r#"{"op":"publish","channel":"a","data":1,"idempotency_key":7,"id":3}"#).unwrap_err();
        assert_eq!((e.id, e.code), (Some(3), ErrorCode::BadRequest));
        use rmpv::Value as V;
        let cmd = mp(V::Map(vec![
            (V::from("op"), V::from("publish")),
            (V::from("channel"), V::from("a")),
            (V::from("data"), V::from(1)),
            (V::from("idempotency_key"), V::from("k")),
        ]))
        .unwrap();
        assert!(matches!(cmd, Command::Publish { idempotency_key: Some(ref k), .. } if k == "k"));
    }

    #[test]
    fn since_and_limit() {
        assert_eq!(
            json(r#"{"op":"subscribe","channel":"h:a","since":{"offset":7,"epoch":"e1"},"id":1}"#),
            Ok(Command::Subscribe { id: Some(1), channel: ch("h:a"), since: Some(Position::new(7, "e1")) })
        );
        assert_eq!(
            json(r#"{"op":"history","channel":"h:a","limit":0}"#),
            Ok(Command::History { id: None, channel: ch("h:a"), query: HistoryQuery { since: None, limit: Some(0) } })
        );
        for bad_frame in [
            r#"{"op":"subscribe","channel":"h:a","since":{"offset":-1,"epoch":"e"},"id":4}"#,
            r#"{"op":"subscribe","channel":"h:a","since":{"offset":1},"id":4}"#,
            r#"{"op":"subscribe","channel":"h:a","since":{"offset":"1","epoch":"e"},"id":4}"#,
            r#"{"op":"subscribe","channel":"h:a","since":7,"id":4}"#,
            r#"{"op":"history","channel":"h:a","limit":-1,"id":4}"#,
            r#"{"op":"history","channel":"h:a","limit":100001,"id":4}"#,
            r#"{"op":"history","channel":"h:a","limit":"5","id":4}"#,
        ] {
            let e = json(bad_frame).unwrap_err();
            assert_eq!((e.id, e.code), (Some(4), ErrorCode::BadRequest), "{bad_frame}");
        }
        let long = format!(
            r#"{{"op":"subscribe","channel":"h:a","since":{{"offset":1,"epoch":"{}"}},"id":4}}"#,
            "e".repeat(65)
        );
        assert_eq!(json(&long).unwrap_err().id, Some(4));
        use rmpv::Value as V;
        let since = V::Map(vec![(V::from("offset"), V::from(3)), (V::from("epoch"), V::from("x"))]);
        assert_eq!(
            mp(V::Map(vec![
                (V::from("op"), V::from("subscribe")),
                (V::from("channel"), V::from("c")),
                (V::from("since"), since)
            ])),
            Ok(Command::Subscribe { id: None, channel: ch("c"), since: Some(Position::new(3, "x")) })
        );
        let e = mp(V::Map(vec![
            (V::from("op"), V::from("subscribe")),
            (V::from("channel"), V::from("c")),
            (V::from("since"), V::Map(vec![(V::from("offset"), V::from(-3)), (V::from("epoch"), V::from("x"))])),
            (V::from("id"), V::from(2)),
        ]))
        .unwrap_err();
        assert_eq!(e.id, Some(2));
        let e = mp(V::Map(vec![
            (V::from("op"), V::from("history")),
            (V::from("channel"), V::from("c")),
            (V::from("limit"), V::from(-1)),
        ]))
        .unwrap_err();
        assert!(e.message.contains("limit"), "{}", e.message);
    }

    #[test]
    fn msgpack_errors() {
        use rmpv::Value as V;
        assert!(mp(V::from(1)).is_err());
        assert!(mp(V::Array(vec![])).is_err());
        let e = mp(V::Map(vec![(V::from("op"), V::from(3)), (V::from("id"), V::from(2))])).unwrap_err();
        assert_eq!(e.id, Some(2));
        let e = mp(V::Map(vec![(V::from("op"), V::from("ping")), (V::from("id"), V::from(-2))])).unwrap_err();
        assert_eq!(e.id, None);
        assert!(decode_command(Encoding::MsgPack, &[0x81]).is_err());
        assert!(decode_command(Encoding::MsgPack, &[0x80, 0x00]).is_err());
        assert!(decode_command(Encoding::MsgPack, &[]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = decode_command(Encoding::Json, &bytes);
            let _ = decode_command(Encoding::MsgPack, &bytes);
        }

        #[test]
        fn json_roundtrip_of_valid_commands(id in proptest::option::of(proptest::num::u64::ANY), channel in "[A-Za-z0-9_.:@/=-]{1,40}", n in proptest::num::i64::ANY) {
            let mut v = serde_json::json!({"op":"publish","channel":channel,"data":{"n":n}});
            if let Some(id) = id { v["id"] = id.into(); }
            let cmd = json(&v.to_string()).unwrap();
            proptest::prop_assert_eq!(cmd.id(), id);
            let Command::Publish { data, .. } = cmd else { panic!() };
            let parsed: serde_json::Value = serde_json::from_slice(&data).unwrap();
            proptest::prop_assert_eq!(parsed, serde_json::json!({"n":n}));
        }
    }
}
