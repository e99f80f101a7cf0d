//! Publications and everything the server sends inside a data frame: `message` events
//! in either wire format (transcoding `data` when the formats differ) and command replies.

use std::io::Write as _;

use bytes::Bytes;
use serde::Serialize;

use crate::{
    channel::ChannelName,
    error::ErrorCode,
    history::Position,
    ws::{frame_in_place, OpCode, MAX_FRAME_HEADER},
};

/// Nesting depth accepted in `data`, the same in both formats. serde_json parses at most
/// 127 levels; this is one less, so a JSON subscriber that parses a whole `message` frame (one
/// level more than its `data`) with serde_json's defaults can read every publication that
/// was accepted, whichever format it arrived in.
pub(crate) const MAX_DEPTH: usize = 126;

/// The `max_depth` to give rmpv's decoder so it accepts [`MAX_DEPTH`] levels (and a little
/// more, for the frame around `data`) while still bounding recursion: rmpv spends two units
/// per container level, and one more on the value inside it. The exact depth is counted
/// by [`validate_data`].
pub(crate) const RMPV_MAX_DEPTH: usize = 2 * (MAX_DEPTH + 4);

/// A wire format, used both for a connection (its subprotocol) and for how a
/// publication's `data` bytes are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// UTF-8 JSON, sent in text frames.
    Json,
    /// MessagePack, sent in binary frames.
    MsgPack,
}

impl Encoding {
    pub const ALL: [Encoding; 2] = [Encoding::Json, Encoding::MsgPack];

    pub const fn as_str(self) -> &'static str {
        match self {
            Encoding::Json => "json",
            Encoding::MsgPack => "msgpack",
        }
    }

    pub const fn opcode(self) -> OpCode {
        match self {
            Encoding::Json => OpCode::Text,
            Encoding::MsgPack => OpCode::Binary,
        }
    }

    pub const fn index(self) -> usize {
        self as usize
    }
}

/// A publication as it travels through the system: `ts` is stamped once where it entered
/// and `data` keeps the encoding it arrived in until a subscriber needs the other one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    pub channel: ChannelName,
    /// Microseconds since the Unix epoch.
    pub ts: u64,
    pub enc: Encoding,
    pub data: Bytes,
    /// v1.1: where it sits in its channel's history, when its namespace keeps history and
    /// it was stored (a plain `PUBLISH` into such a namespace has none).
    pub position: Option<Position>,
}

impl Publication {
    /// A publication with no place in any history.
    pub fn new(channel: ChannelName, ts: u64, enc: Encoding, data: Bytes) -> Self {
        Self { channel, ts, enc, data, position: None }
    }

    pub fn offset(&self) -> Option<u64> {
        self.position.as_ref().map(|p| p.offset)
    }
}

/// `data` could not be decoded, or not represented in the requested format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DataError {
    #[error("data is not valid JSON: {0}")]
    Json(String),
    #[error("data is not valid MessagePack: {0}")]
    MsgPack(String),
    #[error("data has trailing bytes after the value")]
    Trailing,
    #[error("data cannot be represented as {0}: {1}")]
    Transcode(&'static str, String),
}

/// Checks that `data` holds exactly one well-formed value of `enc` that also has a form in
/// the other wire format, nested at most [`MAX_DEPTH`] deep.
///
/// This is the ingress rule for every path (WebSocket, HTTP API, Redis envelope): a
/// publication that passes reaches subscribers of both formats, so nothing accepted is
/// dropped later for one of them. JSON is checked by parsing it exactly as the MessagePack
/// transcoder will (which rejects numbers out of range, lone surrogates and invalid UTF-8
/// that a skipping parser lets through); MessagePack by walking its values for what JSON
/// cannot carry (extension types, non-finite floats, map keys other than strings and
/// integers, strings that are not UTF-8).
pub fn validate_data(enc: Encoding, data: &[u8]) -> Result<(), DataError> {
    match enc {
        Encoding::Json => {
            // serde_json skips over string contents unchecked when it only validates; JSON
            // text is UTF-8 as a whole, so check that first.
            if std::str::from_utf8(data).is_err() {
                return Err(DataError::Json("data is not valid UTF-8".into()));
            }
            if json_depth(data) > MAX_DEPTH {
                return Err(DataError::Json(format!("data is nested more than {MAX_DEPTH} deep")));
            }
            let mut de = serde_json::Deserializer::from_slice(data);
            serde_transcode::transcode(&mut de, &mut rmp_serde::Serializer::new(std::io::sink()))
                .map_err(|e| DataError::Json(e.to_string()))?;
            de.end().map_err(|_| DataError::Trailing)
        }
        Encoding::MsgPack => {
            let mut rd = data;
            let value = rmpv::decode::read_value_ref_with_max_depth(&mut rd, RMPV_MAX_DEPTH)
                .map_err(|e| DataError::MsgPack(e.to_string()))?;
            if !rd.is_empty() {
                return Err(DataError::Trailing);
            }
            json_form(&value, 0)?;
            // rmpv reads the reserved marker 0xc1 as nil, the transcoder refuses it: where
            // the byte occurs at all (rarely, and then mostly inside strings or numbers),
            // check by transcoding.
            if data.contains(&0xc1) {
                write_data(&mut Vec::with_capacity(data.len() * 2), Encoding::MsgPack, Encoding::Json, data)?;
            }
            Ok(())
        }
    }
}

/// The deepest nesting of arrays and objects in JSON text (brackets inside strings do not
/// count). serde_json's own limit is one level too lenient for data that is then wrapped
/// in a `message` frame, and it cannot be lowered, so the depth is counted here.
fn json_depth(text: &[u8]) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in text {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Whether a MessagePack value, inside `depth` containers, has a JSON form and is nested at
/// most [`MAX_DEPTH`] deep (counted as [`json_depth`] counts).
fn json_form(v: &rmpv::ValueRef<'_>, depth: usize) -> Result<(), DataError> {
    use rmpv::ValueRef as V;
    let no = |why: &str| Err(DataError::Transcode("json", why.into()));
    if matches!(v, V::Array(_) | V::Map(_)) && depth >= MAX_DEPTH {
        return Err(DataError::MsgPack(format!("data is nested more than {MAX_DEPTH} deep")));
    }
    match v {
        V::Nil | V::Boolean(_) | V::Integer(_) | V::Binary(_) => Ok(()),
        V::F32(f) if !f.is_finite() => no("a non-finite float has no JSON form"),
        V::F64(f) if !f.is_finite() => no("a non-finite float has no JSON form"),
        V::F32(_) | V::F64(_) => Ok(()),
        V::String(s) if s.as_str().is_none() => no("a string that is not valid UTF-8 has no JSON form"),
        V::String(_) => Ok(()),
        V::Ext(..) => no("an extension type has no JSON form"),
        V::Array(items) => items.iter().try_for_each(|item| json_form(item, depth + 1)),
        V::Map(entries) => entries.iter().try_for_each(|(k, v)| match k {
            V::String(s) if s.as_str().is_some() => json_form(v, depth + 1),
            V::Integer(_) => json_form(v, depth + 1),
            _ => no("a map key that is not a string or an integer has no JSON form"),
        }),
    }
}

/// Re-encodes one value from `from` to `to` (a copy when they are the same).
pub fn transcode(from: Encoding, to: Encoding, data: &[u8]) -> Result<Vec<u8>, DataError> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 4);
    write_data(&mut out, from, to, data)?;
    Ok(out)
}

/// Appends `data` (encoded as `from`) to `out` encoded as `to`.
pub(crate) fn write_data(out: &mut Vec<u8>, from: Encoding, to: Encoding, data: &[u8]) -> Result<(), DataError> {
    match (from, to) {
        (a, b) if a == b => {
            out.extend_from_slice(data);
            Ok(())
        }
        (Encoding::Json, _) => {
            let mut de = serde_json::Deserializer::from_slice(data);
            let mut ser = rmp_serde::Serializer::new(&mut *out);
            serde_transcode::transcode(&mut de, &mut ser).map_err(|e| DataError::Transcode("msgpack", e.to_string()))
        }
        (Encoding::MsgPack, _) => {
            let mut de = rmp_serde::Deserializer::new(data);
            let mut ser = serde_json::Serializer::new(&mut *out);
            serde_transcode::transcode(&mut de, &mut ser).map_err(|e| DataError::Transcode("json", e.to_string()))
        }
    }
}

/// The framed `message` event for `p` in wire format `to`. Called once per publication per
/// format by the fan-out; the result is shared by every subscriber.
pub fn encode_message(to: Encoding, p: &Publication) -> Result<Bytes, DataError> {
    let channel = p.channel.as_str();
    let mut buf = Vec::with_capacity(MAX_FRAME_HEADER + 64 + channel.len() + p.data.len());
    buf.resize(MAX_FRAME_HEADER, 0);
    match to {
        Encoding::Json => {
            // Channel names are restricted to characters that need no JSON escaping.
            buf.extend_from_slice(b"{\"op\":\"message\",\"channel\":\"");
            buf.extend_from_slice(channel.as_bytes());
            buf.extend_from_slice(b"\",\"data\":");
            write_data(&mut buf, p.enc, to, &p.data)?;
            if let Some(pos) = &p.position {
                let _ = write!(buf, ",\"offset\":{}", pos.offset);
            }
            let _ = write!(buf, ",\"ts\":{}}}", p.ts);
        }
        Encoding::MsgPack => {
            // Writes into a Vec cannot fail.
            let _ = rmp::encode::write_map_len(&mut buf, 4 + u32::from(p.position.is_some()));
            let _ = rmp::encode::write_str(&mut buf, "op");
            let _ = rmp::encode::write_str(&mut buf, "message");
            let _ = rmp::encode::write_str(&mut buf, "channel");
            let _ = rmp::encode::write_str(&mut buf, channel);
            let _ = rmp::encode::write_str(&mut buf, "data");
            write_data(&mut buf, p.enc, to, &p.data)?;
            if let Some(pos) = &p.position {
                let _ = rmp::encode::write_str(&mut buf, "offset");
                let _ = rmp::encode::write_uint(&mut buf, pos.offset);
            }
            let _ = rmp::encode::write_str(&mut buf, "ts");
            let _ = rmp::encode::write_uint(&mut buf, p.ts);
        }
    }
    Ok(frame_in_place(to.opcode(), buf))
}

/// A reply to a client command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply<'a> {
    /// `top`: the channel's position, in a history namespace; `recovered`: whether the
    /// gap since the client's `since` was filled (only when it sent one).
    Subscribed {
        id: Option<u64>,
        channel: &'a str,
        top: Option<&'a Position>,
        recovered: Option<bool>,
    },
    /// `reason`: `"server"` when the backend removed the subscription (v1.1).
    Unsubscribed {
        id: Option<u64>,
        channel: &'a str,
        reason: Option<&'a str>,
    },
    /// `position`: where the publication (or, for a suppressed duplicate, the first one)
    /// was stored, in a history namespace.
    Published {
        id: Option<u64>,
        position: Option<&'a Position>,
    },
    Pong {
        id: Option<u64>,
    },
    /// Extension: a `refresh` command replaced the connection's token.
    Refreshed {
        id: Option<u64>,
        exp: u64,
    },
    Error {
        id: Option<u64>,
        code: ErrorCode,
        message: &'a str,
    },
}

#[derive(Serialize)]
struct ReplyWire<'a> {
    op: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exp: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    epoch: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recovered: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

impl<'a> Reply<'a> {
    fn wire(&self) -> ReplyWire<'a> {
        let mut w = ReplyWire {
            op: "",
            channel: None,
            code: None,
            message: None,
            exp: None,
            id: None,
            offset: None,
            epoch: None,
            recovered: None,
            reason: None,
        };
        match *self {
            Reply::Subscribed { id, channel, top, recovered } => {
                (w.op, w.id, w.channel, w.recovered) = ("subscribed", id, Some(channel), recovered);
                (w.offset, w.epoch) = (top.map(|t| t.offset), top.map(|t| &*t.epoch));
            }
            Reply::Unsubscribed { id, channel, reason } => {
                (w.op, w.id, w.channel, w.reason) = ("unsubscribed", id, Some(channel), reason)
            }
            Reply::Published { id, position } => {
                (w.op, w.id) = ("published", id);
                (w.offset, w.epoch) = (position.map(|t| t.offset), position.map(|t| &*t.epoch));
            }
            Reply::Pong { id } => (w.op, w.id) = ("pong", id),
            Reply::Refreshed { id, exp } => (w.op, w.id, w.exp) = ("refreshed", id, Some(exp)),
            Reply::Error { id, code, message } => {
                (w.op, w.id, w.code, w.message) = ("error", id, Some(code.as_str()), Some(message))
            }
        }
        w
    }
}

/// The framed reply in wire format `to`.
pub fn encode_reply(to: Encoding, reply: &Reply<'_>) -> Bytes {
    let mut buf = Vec::with_capacity(MAX_FRAME_HEADER + 64);
    buf.resize(MAX_FRAME_HEADER, 0);
    let wire = reply.wire();
    // Serialising plain strings and integers into a Vec cannot fail.
    match to {
        Encoding::Json => {
            let _ = serde_json::to_writer(&mut buf, &wire);
        }
        Encoding::MsgPack => {
            let _ = rmp_serde::encode::write_named(&mut buf, &wire);
        }
    }
    frame_in_place(to.opcode(), buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publication(enc: Encoding, data: &[u8]) -> Publication {
        Publication {
            channel: ChannelName::new("chat:1").unwrap(),
            ts: 1_700_000_000_000_000,
            enc,
            data: Bytes::copy_from_slice(data),
            position: None,
        }
    }

    /// Strips the (short) frame header that tests' payloads fit in.
    fn body(frame: &Bytes) -> &[u8] {
        match frame[1] {
            126 => &frame[4..],
            127 => &frame[10..],
            _ => &frame[2..],
        }
    }

    #[test]
    fn json_message_is_spliced_verbatim() {
        let f = encode_message(Encoding::Json, &publication(Encoding::Json, br#"{"a":[1,2,"x"]}"#)).unwrap();
        assert_eq!(f[0], 0x81);
        let v: serde_json::Value = serde_json::from_slice(body(&f)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"op":"message","channel":"chat:1","data":{"a":[1,2,"x"]},"ts":1_700_000_000_000_000u64})
        );
    }

    #[test]
    fn json_to_msgpack_and_back() {
        let data = br#"{"s":"h\u00e9llo \ud83d\ude00","n":-5,"f":1.5,"b":true,"z":null,"big":18446744073709551615,"arr":[{"k":"v"}]}"#;
        let f = encode_message(Encoding::MsgPack, &publication(Encoding::Json, data)).unwrap();
        assert_eq!(f[0], 0x82);
        let v: rmpv::Value = rmpv::decode::read_value(&mut body(&f)).unwrap();
        let map: Vec<(String, rmpv::Value)> =
            v.as_map().unwrap().iter().map(|(k, v)| (k.as_str().unwrap().to_owned(), v.clone())).collect();
        assert_eq!(map[0], ("op".into(), rmpv::Value::from("message")));
        assert_eq!(map[1], ("channel".into(), rmpv::Value::from("chat:1")));
        assert_eq!(map[3], ("ts".into(), rmpv::Value::from(1_700_000_000_000_000u64)));
        // Re-encode the msgpack data to JSON and compare with the original JSON.
        let mut data_mp = Vec::new();
        rmpv::encode::write_value(&mut data_mp, &map[2].1).unwrap();
        let back = encode_message(Encoding::Json, &publication(Encoding::MsgPack, &data_mp)).unwrap();
        let v: serde_json::Value = serde_json::from_slice(body(&back)).unwrap();
        let orig: serde_json::Value = serde_json::from_slice(data).unwrap();
        assert_eq!(v["data"], orig);
    }

    #[test]
    fn msgpack_with_unrepresentable_key_fails_for_json_only() {
        // {[1]: 2}: an array as a map key has no JSON form, so it is refused at ingress; the
        // encoder (which trusts validated data) would fail for JSON only.
        let data = [0x81, 0x91, 0x01, 0x02];
        assert!(validate_data(Encoding::MsgPack, &data).is_err());
        assert!(encode_message(Encoding::MsgPack, &publication(Encoding::MsgPack, &data)).is_ok());
        assert!(matches!(
            encode_message(Encoding::Json, &publication(Encoding::MsgPack, &data)),
            Err(DataError::Transcode(..))
        ));
    }

    #[test]
    fn validate_rejects_garbage_and_deep_nesting() {
        assert!(validate_data(Encoding::Json, b"{").is_err());
        assert!(validate_data(Encoding::Json, b"1 2").is_err());
        assert!(validate_data(Encoding::Json, "[".repeat(10_000).as_bytes()).is_err());
        assert!(validate_data(Encoding::MsgPack, &[0x92, 0x01]).is_err());
        assert_eq!(validate_data(Encoding::MsgPack, &[0x01, 0x02]), Err(DataError::Trailing));
        assert!(validate_data(Encoding::MsgPack, &vec![0x91; 10_000]).is_err());
        assert!(validate_data(Encoding::MsgPack, &[0xdd, 0xff, 0xff, 0xff, 0xff]).is_err());
        // The reserved marker, alone or nested; but the byte inside a number or binary is fine.
        assert!(validate_data(Encoding::MsgPack, &[0xc1]).is_err());
        assert!(validate_data(Encoding::MsgPack, &[0x91, 0xc1]).is_err());
        assert!(validate_data(Encoding::MsgPack, &[0xcd, 0x00, 0xc1]).is_ok());
        assert!(validate_data(Encoding::MsgPack, &[0xc4, 0x01, 0xc1]).is_ok());
    }

    /// Every frame body of `data` published as `enc`, in both wire formats.
    fn frames_of(enc: Encoding, data: &[u8]) -> Result<[Bytes; 2], DataError> {
        let p = publication(enc, data);
        Ok([encode_message(Encoding::Json, &p)?, encode_message(Encoding::MsgPack, &p)?])
    }

    /// What a subscriber of each format does with a frame: parse all of it.
    fn subscribers_can_read(frames: &[Bytes; 2]) {
        serde_json::from_slice::<serde_json::Value>(body(&frames[0])).expect("JSON subscriber parses the frame");
        let mut rd = body(&frames[1]);
        rmpv::decode::read_value(&mut rd).expect("MessagePack subscriber parses the frame");
        transcode(Encoding::MsgPack, Encoding::Json, body(&frames[1])).expect("and can turn it into JSON");
    }

    #[test]
    fn json_without_a_messagepack_form_is_refused() {
        // Invalid UTF-8 inside a string (a skipping parser does not look).
        assert!(validate_data(Encoding::Json, b"\"\xff\xfe\"").is_err());
        assert!(validate_data(Encoding::Json, b"{\"k\":\"a\xc3\"}").is_err());
        assert!(validate_data(Encoding::Json, b"1e999").is_err());
        assert!(validate_data(Encoding::Json, br#"{"x":[-1e400]}"#).is_err());
        assert!(validate_data(Encoding::Json, br#""\ud800""#).is_err());
        assert!(validate_data(Encoding::Json, br#"{"\udc00":1}"#).is_err());
        // What does have a form passes and reaches both formats.
        for ok in [&br#""\ud83d\ude00""#[..], b"1e308", b"-0", b"18446744073709551615", br#"{"a":"[\"{"}"#] {
            validate_data(Encoding::Json, ok).unwrap();
            subscribers_can_read(&frames_of(Encoding::Json, ok).unwrap());
        }
    }

    #[test]
    fn messagepack_without_a_json_form_is_refused() {
        let refused: [&[u8]; 6] = [
            &[0xd4, 0x01, 0x00],                   // fixext 1
            &[0x91, 0xc7, 0x01, 0x05, 0x00],       // ext 8 inside an array
            &[0xcb, 0x7f, 0xf8, 0, 0, 0, 0, 0, 0], // NaN
            &[0xca, 0x7f, 0x80, 0, 0],             // +inf (f32)
            &[0x81, 0xc4, 0x01, 0x61, 0x01],       // {bin: 1}
            &[0xa2, 0xff, 0xfe],                   // a str that is not UTF-8
        ];
        for data in refused {
            assert!(validate_data(Encoding::MsgPack, data).is_err(), "{data:x?}");
        }
        // An integer key and binary data have JSON forms.
        for ok in [&[0x81, 0x01, 0xc4, 0x02, 0x01, 0x02][..], &[0xcb, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0]] {
            validate_data(Encoding::MsgPack, ok).unwrap();
            subscribers_can_read(&frames_of(Encoding::MsgPack, ok).unwrap());
        }
    }

    #[test]
    fn both_formats_accept_the_same_depth_and_accepted_data_is_readable_everywhere() {
        let mut accepted = [0usize; 2];
        for depth in 1..=200usize {
            let json = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            let mut mp = vec![0x91; depth - 1];
            mp.push(0x90);
            let results = [validate_data(Encoding::Json, json.as_bytes()), validate_data(Encoding::MsgPack, &mp)];
            assert_eq!(results[0].is_ok(), results[1].is_ok(), "depth {depth}: {results:?}");
            for (i, (enc, data)) in
                [(Encoding::Json, json.as_bytes()), (Encoding::MsgPack, &mp[..])].into_iter().enumerate()
            {
                if results[i].is_ok() {
                    accepted[i] = depth;
                    subscribers_can_read(
                        &frames_of(enc, data).unwrap_or_else(|e| panic!("depth {depth} {enc:?}: {e}")),
                    );
                }
            }
        }
        assert_eq!(accepted, [MAX_DEPTH, MAX_DEPTH]);
        // Objects count like arrays; brackets inside strings do not count.
        let deep_objects = format!("{}1{}", "{\"k\":".repeat(MAX_DEPTH + 1), "}".repeat(MAX_DEPTH + 1));
        assert!(validate_data(Encoding::Json, deep_objects.as_bytes()).is_err());
        let brackets_in_string = format!("\"{}\"", "[".repeat(500));
        assert!(validate_data(Encoding::Json, brackets_in_string.as_bytes()).is_ok());
    }

    proptest::proptest! {
        #[test]
        fn accepted_bytes_reach_both_formats(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            for enc in Encoding::ALL {
                if validate_data(enc, &bytes).is_ok() {
                    let frames = frames_of(enc, &bytes);
                    proptest::prop_assert!(frames.is_ok(), "{enc:?} {bytes:x?}: {frames:?}");
                }
            }
        }

        #[test]
        fn accepted_json_text_reaches_both_formats(text in "[\\[\\]{}\":,0-9a-z.eE+\\\\ -]{0,40}") {
            if validate_data(Encoding::Json, text.as_bytes()).is_ok() {
                let frames = frames_of(Encoding::Json, text.as_bytes());
                proptest::prop_assert!(frames.is_ok(), "{text}: {frames:?}");
            }
        }
    }

    #[test]
    fn replies_in_both_formats() {
        let r =
            encode_reply(Encoding::Json, &Reply::Subscribed { id: Some(7), channel: "a", top: None, recovered: None });
        assert_eq!(body(&r), br#"{"op":"subscribed","channel":"a","id":7}"#);
        let r = encode_reply(Encoding::Json, &Reply::Pong { id: None });
        assert_eq!(body(&r), br#"{"op":"pong"}"#);
        let r = encode_reply(
            Encoding::Json,
            &Reply::Error { id: Some(1), code: ErrorCode::BadRequest, message: "no \"op\"" },
        );
        let v: serde_json::Value = serde_json::from_slice(body(&r)).unwrap();
        assert_eq!(v, serde_json::json!({"op":"error","code":"bad_request","message":"no \"op\"","id":1}));
        let r = encode_reply(Encoding::MsgPack, &Reply::Published { id: Some(3), position: None });
        assert_eq!(r[0], 0x82);
        let v = rmpv::decode::read_value(&mut body(&r)).unwrap();
        assert_eq!(v, rmpv::Value::Map(vec![("op".into(), "published".into()), ("id".into(), 3.into())]));
        let top = Position::new(12, "e1");
        let r = encode_reply(
            Encoding::Json,
            &Reply::Subscribed { id: None, channel: "h:a", top: Some(&top), recovered: Some(true) },
        );
        assert_eq!(body(&r), br#"{"op":"subscribed","channel":"h:a","offset":12,"epoch":"e1","recovered":true}"#);
    }

    #[test]
    fn a_stored_publication_carries_its_offset() {
        let mut p = publication(Encoding::Json, b"1");
        p.position = Some(Position::new(5, "e"));
        let f = encode_message(Encoding::Json, &p).unwrap();
        assert_eq!(body(&f), br#"{"op":"message","channel":"chat:1","data":1,"offset":5,"ts":1700000000000000}"#);
        let f = encode_message(Encoding::MsgPack, &p).unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&transcode(Encoding::MsgPack, Encoding::Json, body(&f)).unwrap()).unwrap();
        assert_eq!(v["offset"], 5);
    }
}
