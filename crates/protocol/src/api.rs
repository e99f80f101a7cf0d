//! Bodies of the internal HTTP API (`/api/publish`, `/api/broadcast`) in JSON or MessagePack.

use bytes::Bytes;
use serde::Serialize;

use crate::{
    channel::ChannelName,
    command::{bad, fields, idempotency_key, limit, since, CommandError},
    error::ErrorCode,
    history::{HistoryQuery, Position},
    message::{validate_data, Encoding},
};

/// Upper bound on channels in one broadcast, so one request cannot pin a node for long.
pub const MAX_BROADCAST_CHANNELS: usize = 1000;

/// A decoded publish or broadcast request: one `data` for every listed channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiPublish {
    pub channels: Vec<ChannelName>,
    pub enc: Encoding,
    pub data: Bytes,
    /// v1.1 idempotent publishing: remembered per channel.
    pub idempotency_key: Option<String>,
}

fn channel(name: &str) -> Result<ChannelName, CommandError> {
    ChannelName::new(name).map_err(|e| bad(None, format!("invalid channel name {:?}: {e}", truncate(name))))
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Decodes `{"channel":C,"data":V}` (or, when `broadcast`, `{"channels":[C,…],"data":V}`).
pub fn decode_api_publish(enc: Encoding, body: &[u8], broadcast: bool) -> Result<ApiPublish, CommandError> {
    let f = fields(enc, body)
        .map_err(|e| CommandError { message: format!("malformed body: {}", e.message).into(), ..e })?;
    let channels = if broadcast {
        let names = f.channels.ok_or_else(|| bad(None, "missing field \"channels\""))?;
        if names.is_empty() {
            return Err(bad(None, "\"channels\" is empty"));
        }
        if names.len() > MAX_BROADCAST_CHANNELS {
            return Err(bad(None, format!("more than {MAX_BROADCAST_CHANNELS} channels")));
        }
        names.iter().map(|n| channel(n)).collect::<Result<Vec<_>, _>>()?
    } else {
        vec![channel(f.channel.as_deref().ok_or_else(|| bad(None, "missing field \"channel\""))?)?]
    };
    let data = f.data.ok_or_else(|| bad(None, "missing field \"data\""))?;
    validate_data(enc, data).map_err(|e| bad(None, format!("invalid data: {e}")))?;
    let idempotency_key = idempotency_key(None, f.idempotency_key)?;
    Ok(ApiPublish { channels, enc, data: Bytes::copy_from_slice(data), idempotency_key })
}

/// Most publications one `POST /api/publish_batch` carries.
pub const MAX_BATCH_PUBLICATIONS: usize = 1000;

/// Decodes `{"publications":[{"channel":C,"data":V,"idempotency_key":K?},...]}`
/// (`POST /api/publish_batch`): each element exactly as `POST /api/publish` takes it. One
/// invalid element refuses the whole batch, naming it.
pub fn decode_api_batch(enc: Encoding, body: &[u8]) -> Result<Vec<ApiPublish>, CommandError> {
    let elements = batch_elements(enc, body)?;
    if elements.is_empty() {
        return Err(bad(None, "\"publications\" is empty"));
    }
    if elements.len() > MAX_BATCH_PUBLICATIONS {
        return Err(bad(None, format!("more than {MAX_BATCH_PUBLICATIONS} publications")));
    }
    elements
        .iter()
        .enumerate()
        .map(|(i, raw)| {
            decode_api_publish(enc, raw, false)
                .map_err(|e| CommandError { message: format!("publications[{i}]: {}", e.message).into(), ..e })
        })
        .collect()
}

/// The encoded elements of a batch's `publications` array.
fn batch_elements(enc: Encoding, body: &[u8]) -> Result<Vec<&[u8]>, CommandError> {
    let malformed = |e: &dyn std::fmt::Display| bad(None, format!("malformed body: {e}"));
    match enc {
        Encoding::Json => {
            #[derive(serde::Deserialize)]
            struct Batch<'a> {
                #[serde(borrow)]
                publications: Option<Vec<&'a serde_json::value::RawValue>>,
            }
            let batch: Batch<'_> = serde_json::from_slice(body).map_err(|e| malformed(&e))?;
            let list = batch.publications.ok_or_else(|| bad(None, "missing field \"publications\""))?;
            Ok(list.into_iter().map(|raw| raw.get().as_bytes()).collect())
        }
        Encoding::MsgPack => {
            let mut rd = body;
            let len = rmp::decode::read_map_len(&mut rd).map_err(|_| bad(None, "the body must be a map"))?;
            for _ in 0..len {
                let key = rmpv::decode::read_value_ref_with_max_depth(&mut rd, crate::message::RMPV_MAX_DEPTH)
                    .map_err(|e| malformed(&e))?;
                let is_list = matches!(&key, rmpv::ValueRef::String(k) if k.as_str() == Some("publications"));
                if !is_list {
                    rmpv::decode::read_value_ref_with_max_depth(&mut rd, crate::message::RMPV_MAX_DEPTH)
                        .map_err(|e| malformed(&e))?;
                    continue;
                }
                let n =
                    rmp::decode::read_array_len(&mut rd).map_err(|_| bad(None, "\"publications\" must be an array"))?;
                let mut out = Vec::with_capacity((n as usize).min(MAX_BATCH_PUBLICATIONS + 1));
                for _ in 0..n {
                    let before = rd;
                    rmpv::decode::read_value_ref_with_max_depth(&mut rd, crate::message::RMPV_MAX_DEPTH)
                        .map_err(|e| malformed(&e))?;
                    out.push(&before[..before.len() - rd.len()]);
                    if out.len() > MAX_BATCH_PUBLICATIONS {
                        break;
                    }
                }
                return Ok(out);
            }
            Err(bad(None, "missing field \"publications\""))
        }
    }
}

/// One element's outcome in a batch answer: published (with its position in a history
/// namespace), or the error that stopped it.
pub enum BatchResult<'a> {
    Published(Option<&'a Position>),
    Failed(ErrorCode, &'a str),
}

/// `{"ok":true,"results":[{"ok":true,"offset":N?,"epoch":E?} | {"error":{...}}, ...]}`, in
/// the batch's order; `ok` is true when every element was published.
pub fn encode_api_batch(enc: Encoding, results: &[BatchResult<'_>]) -> Vec<u8> {
    #[derive(Serialize)]
    #[serde(untagged)]
    enum Item<'a> {
        Ok(Ok_<'a>),
        Err(ErrBody<'a>),
    }
    #[derive(Serialize)]
    struct Answer<'a> {
        ok: bool,
        results: Vec<Item<'a>>,
    }
    let results: Vec<Item<'_>> = results
        .iter()
        .map(|r| match r {
            BatchResult::Published(p) => {
                Item::Ok(Ok_ { ok: true, offset: p.map(|p| p.offset), epoch: p.map(|p| &*p.epoch) })
            }
            BatchResult::Failed(code, message) => {
                Item::Err(ErrBody { error: ErrInner { code: code.as_str(), message } })
            }
        })
        .collect();
    let ok = results.iter().all(|r| matches!(r, Item::Ok(_)));
    encode(enc, &Answer { ok, results })
}

/// Decodes `{"channel":C,"since":{"offset":N,"epoch":E}?,"limit":N?}` (`POST /api/history`).
pub fn decode_api_history(enc: Encoding, body: &[u8]) -> Result<(ChannelName, HistoryQuery), CommandError> {
    let f = fields(enc, body)
        .map_err(|e| CommandError { message: format!("malformed body: {}", e.message).into(), ..e })?;
    let name = channel(f.channel.as_deref().ok_or_else(|| bad(None, "missing field \"channel\""))?)?;
    Ok((name, HistoryQuery { since: since(None, f.since)?, limit: limit(None, f.limit)? }))
}

/// Longest `user` the server API takes, in bytes (a token's `sub`).
pub const MAX_USER_LEN: usize = 1024;

/// Decodes `{"user":U}` (`POST /api/disconnect`) or, with `with_channel`,
/// `{"user":U,"channel":C}` (`POST /api/unsubscribe`).
pub fn decode_api_user(
    enc: Encoding,
    body: &[u8],
    with_channel: bool,
) -> Result<(String, Option<ChannelName>), CommandError> {
    let f = fields(enc, body)
        .map_err(|e| CommandError { message: format!("malformed body: {}", e.message).into(), ..e })?;
    let user = f.user.ok_or_else(|| bad(None, "missing field \"user\""))?;
    if user.len() > MAX_USER_LEN {
        return Err(bad(None, format!("\"user\" is longer than {MAX_USER_LEN} bytes")));
    }
    let channel = if with_channel {
        Some(channel(f.channel.as_deref().ok_or_else(|| bad(None, "missing field \"channel\""))?)?)
    } else {
        None
    };
    Ok((user.into_owned(), channel))
}

#[derive(Serialize)]
struct Ok_<'a> {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    epoch: Option<&'a str>,
}

#[derive(Serialize)]
struct ErrBody<'a> {
    error: ErrInner<'a>,
}

#[derive(Serialize)]
struct ErrInner<'a> {
    code: &'static str,
    message: &'a str,
}

fn encode<T: Serialize>(enc: Encoding, value: &T) -> Vec<u8> {
    // Serialising plain structs into a Vec cannot fail.
    match enc {
        Encoding::Json => serde_json::to_vec(value).unwrap_or_default(),
        Encoding::MsgPack => rmp_serde::to_vec_named(value).unwrap_or_default(),
    }
}

/// `{"ok":true}`.
pub fn encode_api_ok(enc: Encoding) -> Vec<u8> {
    encode_api_published(enc, None)
}

/// `{"ok":true}`, with `"offset":N,"epoch":E` for a publication stored in history.
pub fn encode_api_published(enc: Encoding, position: Option<&Position>) -> Vec<u8> {
    encode(enc, &Ok_ { ok: true, offset: position.map(|p| p.offset), epoch: position.map(|p| &*p.epoch) })
}

/// `{"error":{"code":K,"message":M}}`.
pub fn encode_api_error(enc: Encoding, code: ErrorCode, message: &str) -> Vec<u8> {
    encode(enc, &ErrBody { error: ErrInner { code: code.as_str(), message } })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_bodies() {
        let b = decode_api_batch(
            Encoding::Json,
            br#"{"publications":[{"channel":"a","data":1},{"channel":"b","data":{"x":2},"idempotency_key":"k"}]}"#,
        )
        .unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(
            (b[1].channels[0].as_str(), &b[1].data[..], b[1].idempotency_key.as_deref()),
            ("b", &br#"{"x":2}"#[..], Some("k"))
        );
        for (body, wanted) in [
            (&br#"{"publications":[]}"#[..], "is empty"),
            (br#"{"nothing":1}"#, "missing field"),
            (br#"{"publications":[{"channel":"a","data":1},{"channel":"a b","data":1}]}"#, "publications[1]"),
            (br#"{"publications":[{"channel":"a"}]}"#, r#"publications[0]: missing field "data""#),
            (br#"[1]"#, "malformed"),
        ] {
            let e = decode_api_batch(Encoding::Json, body).err().unwrap();
            assert!(e.message.contains(wanted), "{}: {}", String::from_utf8_lossy(body), e.message);
        }
        let many = format!(
            "{{\"publications\":[{}]}}",
            vec![r#"{"channel":"a","data":1}"#; MAX_BATCH_PUBLICATIONS + 1].join(",")
        );
        assert!(decode_api_batch(Encoding::Json, many.as_bytes()).is_err());
        let mut mp = Vec::new();
        let item = rmpv::Value::Map(vec![("channel".into(), "z".into()), ("data".into(), 7.into())]);
        rmpv::encode::write_value(
            &mut mp,
            &rmpv::Value::Map(vec![
                ("v".into(), 1.into()),
                ("publications".into(), rmpv::Value::Array(vec![item.clone(), item])),
            ]),
        )
        .unwrap();
        let b = decode_api_batch(Encoding::MsgPack, &mp).unwrap();
        assert_eq!((b.len(), &b[0].data[..]), (2, &[7u8][..]));
        let p = Position::new(3, "e");
        let answer = encode_api_batch(
            Encoding::Json,
            &[
                BatchResult::Published(None),
                BatchResult::Published(Some(&p)),
                BatchResult::Failed(ErrorCode::Unavailable, "down"),
            ],
        );
        assert_eq!(
            String::from_utf8(answer).unwrap(),
            r#"{"ok":false,"results":[{"ok":true},{"ok":true,"offset":3,"epoch":"e"},{"error":{"code":"unavailable","message":"down"}}]}"#
        );
    }

    #[test]
    fn publish_and_broadcast_bodies() {
        let p = decode_api_publish(Encoding::Json, br#"{"channel":"a","data":[1]}"#, false).unwrap();
        assert_eq!((p.channels.len(), &p.data[..]), (1, &b"[1]"[..]));
        let p = decode_api_publish(Encoding::Json, br#"{"channels":["a","b:c"],"data":"x"}"#, true).unwrap();
        assert_eq!(p.channels.iter().map(|c| c.as_str()).collect::<Vec<_>>(), ["a", "b:c"]);
        let mut mp = Vec::new();
        rmpv::encode::write_value(
            &mut mp,
            &rmpv::Value::Map(vec![
                ("channels".into(), rmpv::Value::Array(vec!["z".into()])),
                ("data".into(), rmpv::Value::Binary(vec![9])),
            ]),
        )
        .unwrap();
        let p = decode_api_publish(Encoding::MsgPack, &mp, true).unwrap();
        assert_eq!(&p.data[..], &[0xc4, 1, 9]);
    }

    #[test]
    fn bad_bodies() {
        for (body, broadcast) in [
            (&br#"{"data":1}"#[..], false),
            (br#"{"channel":"a"}"#, false),
            (br#"{"channel":"a b","data":1}"#, false),
            (br#"{"channels":[],"data":1}"#, true),
            (br#"{"channels":["ok","no way"],"data":1}"#, true),
            (br#"{"channels":"a","data":1}"#, true),
            (b"not json", false),
            (br#"{"channel":"a","data":"\ud800"}"#, false),
            (b"{\"channel\":\"a\",\"data\":\"\xff\"}", false),
        ] {
            let e = decode_api_publish(Encoding::Json, body, broadcast).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest);
        }
    }

    #[test]
    fn responses() {
        assert_eq!(encode_api_ok(Encoding::Json), br#"{"ok":true}"#);
        assert_eq!(
            encode_api_error(Encoding::Json, ErrorCode::Unavailable, "down"),
            br#"{"error":{"code":"unavailable","message":"down"}}"#
        );
        assert_eq!(encode_api_ok(Encoding::MsgPack), [0x81, 0xa2, b'o', b'k', 0xc3]);
        assert_eq!(
            encode_api_published(Encoding::Json, Some(&Position::new(4, "e"))),
            br#"{"ok":true,"offset":4,"epoch":"e"}"#
        );
    }

    #[test]
    fn server_api_bodies() {
        assert_eq!(decode_api_user(Encoding::Json, br#"{"user":"u1"}"#, false).unwrap(), ("u1".into(), None));
        let (u, c) = decode_api_user(Encoding::Json, br#"{"user":"u1","channel":"chat:1"}"#, true).unwrap();
        assert_eq!((u.as_str(), c.unwrap().as_str()), ("u1", "chat:1"));
        for (body, with_channel) in [
            (&br#"{}"#[..], false),
            (br#"{"user":1}"#, false),
            (br#"{"user":"u"}"#, true),
            (br#"{"user":"u","channel":"bad name"}"#, true),
            (b"nope", false),
        ] {
            assert_eq!(decode_api_user(Encoding::Json, body, with_channel).unwrap_err().code, ErrorCode::BadRequest);
        }
        let long = format!(r#"{{"user":"{}"}}"#, "u".repeat(1025));
        assert!(decode_api_user(Encoding::Json, long.as_bytes(), false).is_err());
    }

    #[test]
    fn history_bodies() {
        let (c, q) =
            decode_api_history(Encoding::Json, br#"{"channel":"h:a","since":{"offset":2,"epoch":"e"},"limit":3}"#)
                .unwrap();
        assert_eq!((c.as_str(), q.since, q.limit), ("h:a", Some(Position::new(2, "e")), Some(3)));
        for body in [&br#"{"since":{"offset":2,"epoch":"e"}}"#[..], br#"{"channel":"h:a","limit":-4}"#, b"[]"] {
            assert_eq!(decode_api_history(Encoding::Json, body).unwrap_err().code, ErrorCode::BadRequest);
        }
    }
}
