//! The Redis envelope: the MessagePack map a publication travels in between nodes, and
//! the format backends `PUBLISH` straight into Redis.

use crate::message::{validate_data, DataError, Encoding};

/// The only envelope version this build reads and writes.
pub const ENVELOPE_VERSION: u64 = 1;

/// A Redis payload that is not a deliverable envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("envelope is not a MessagePack map")]
    NotAMap,
    #[error("envelope is malformed MessagePack: {0}")]
    Malformed(String),
    #[error("envelope field {0:?} is missing")]
    Missing(&'static str),
    #[error("envelope field {0:?} has the wrong type")]
    WrongType(&'static str),
    #[error("envelope version {0} is not supported")]
    Version(u64),
    #[error("envelope encoding {0:?} is not json or msgpack")]
    UnknownEncoding(String),
    #[error("envelope has trailing bytes")]
    Trailing,
    #[error(transparent)]
    Data(#[from] DataError),
}

impl EnvelopeError {
    /// A short, fixed label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            EnvelopeError::NotAMap | EnvelopeError::Malformed(_) | EnvelopeError::Trailing => "malformed",
            EnvelopeError::Missing(_) | EnvelopeError::WrongType(_) => "bad_field",
            EnvelopeError::Version(_) => "version",
            EnvelopeError::UnknownEncoding(_) => "encoding",
            EnvelopeError::Data(_) => "bad_data",
        }
    }
}

/// The Redis channel a fanout channel travels on: the configured prefix, then the name
/// (`fanout:` + `chat:lobby`). Every component that talks to Redis builds it here.
pub fn redis_channel(prefix: &str, channel: &str) -> String {
    let mut key = String::with_capacity(prefix.len() + channel.len());
    key.push_str(prefix);
    key.push_str(channel);
    key
}

/// Encodes an envelope: `{"v":1,"ts":ts,"enc":enc,"data":bin(data)}`.
pub fn encode_envelope(ts: u64, enc: Encoding, data: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(32 + data.len());
    // Writes into a Vec cannot fail.
    let _ = rmp::encode::write_map_len(&mut buf, 4);
    let _ = rmp::encode::write_str(&mut buf, "v");
    let _ = rmp::encode::write_uint(&mut buf, ENVELOPE_VERSION);
    let _ = rmp::encode::write_str(&mut buf, "ts");
    let _ = rmp::encode::write_uint(&mut buf, ts);
    let _ = rmp::encode::write_str(&mut buf, "enc");
    let _ = rmp::encode::write_str(&mut buf, enc.as_str());
    let _ = rmp::encode::write_str(&mut buf, "data");
    let _ = rmp::encode::write_bin(&mut buf, data);
    buf
}

/// A decoded envelope; `data` borrows from the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope<'a> {
    pub ts: u64,
    pub enc: Encoding,
    pub data: &'a [u8],
    /// v1.1: `offset` and `epoch`, which the `fanout_publish` Redis Function adds to the
    /// envelopes it stores and publishes (a v1 reader ignores them as extra keys).
    pub position: Option<(u64, &'a str)>,
}

/// Decodes and validates an envelope; `data` is checked to be one valid value of `enc`.
/// Unknown keys are ignored; of a key given twice, the last counts.
pub fn decode_envelope(payload: &[u8]) -> Result<Envelope<'_>, EnvelopeError> {
    use rmpv::ValueRef;
    let mut rd = payload;
    let len = rmp::decode::read_map_len(&mut rd).map_err(|_| EnvelopeError::NotAMap)?;
    let (mut v, mut ts, mut enc, mut data) = (None, None, None, None);
    let (mut offset, mut epoch) = (None, None);
    for _ in 0..len {
        let key = rmpv::decode::read_value_ref_with_max_depth(&mut rd, 16)
            .map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
        let value = rmpv::decode::read_value_ref_with_max_depth(&mut rd, crate::message::RMPV_MAX_DEPTH)
            .map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
        let ValueRef::String(key) = key else { continue };
        match key.as_str() {
            Some("v") => v = Some(value.as_u64().ok_or(EnvelopeError::WrongType("v"))?),
            Some("ts") => ts = Some(value.as_u64().ok_or(EnvelopeError::WrongType("ts"))?),
            Some("enc") => {
                let s = match value {
                    ValueRef::String(s) => s.into_str().ok_or(EnvelopeError::WrongType("enc"))?,
                    _ => return Err(EnvelopeError::WrongType("enc")),
                };
                enc = Some(match s {
                    "json" => Encoding::Json,
                    "msgpack" => Encoding::MsgPack,
                    other => return Err(EnvelopeError::UnknownEncoding(other.chars().take(32).collect())),
                });
            }
            Some("data") => match value {
                ValueRef::Binary(b) => data = Some(b),
                _ => return Err(EnvelopeError::WrongType("data")),
            },
            Some("offset") => offset = Some(value.as_u64().ok_or(EnvelopeError::WrongType("offset"))?),
            Some("epoch") => match value {
                ValueRef::String(s) => match s.into_str() {
                    Some(s) if s.len() <= crate::history::MAX_EPOCH_LEN => epoch = Some(s),
                    _ => return Err(EnvelopeError::WrongType("epoch")),
                },
                _ => return Err(EnvelopeError::WrongType("epoch")),
            },
            _ => {}
        }
    }
    if !rd.is_empty() {
        return Err(EnvelopeError::Trailing);
    }
    let v = v.ok_or(EnvelopeError::Missing("v"))?;
    if v != ENVELOPE_VERSION {
        return Err(EnvelopeError::Version(v));
    }
    let ts = ts.ok_or(EnvelopeError::Missing("ts"))?;
    let enc = enc.ok_or(EnvelopeError::Missing("enc"))?;
    let data = data.ok_or(EnvelopeError::Missing("data"))?;
    validate_data(enc, data)?;
    let position = match (offset, epoch) {
        (Some(o), Some(e)) => Some((o, e)),
        (None, None) => None,
        (Some(_), None) => return Err(EnvelopeError::Missing("epoch")),
        (None, Some(_)) => return Err(EnvelopeError::Missing("offset")),
    };
    Ok(Envelope { ts, enc, data, position })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmpv::Value as V;

    fn enc_value(v: &V) -> Vec<u8> {
        let mut buf = Vec::new();
        rmpv::encode::write_value(&mut buf, v).unwrap();
        buf
    }

    #[test]
    fn roundtrip() {
        let bytes = encode_envelope(42, Encoding::Json, br#"{"a":1}"#);
        assert_eq!(
            decode_envelope(&bytes),
            Ok(Envelope { ts: 42, enc: Encoding::Json, data: &br#"{"a":1}"#[..], position: None })
        );
        let bytes = encode_envelope(u64::MAX, Encoding::MsgPack, &[0x93, 1, 2, 3]);
        let e = decode_envelope(&bytes).unwrap();
        assert_eq!((e.ts, e.enc, e.data), (u64::MAX, Encoding::MsgPack, &[0x93, 1, 2, 3][..]));
    }

    /// What the `fanout_publish` Function does to an envelope: two more keys at the end.
    #[test]
    fn a_stored_envelope_carries_its_position() {
        let mut bytes = encode_envelope(1, Encoding::Json, b"1");
        bytes[0] = 0x86;
        bytes.extend_from_slice(&[0xa6, b'o', b'f', b'f', b's', b'e', b't', 0xcf, 0, 0, 0, 0, 0, 0, 1, 2]);
        bytes.extend_from_slice(&[0xa5, b'e', b'p', b'o', b'c', b'h', 0xa2, b'e', b'7']);
        assert_eq!(decode_envelope(&bytes).unwrap().position, Some((258, "e7")));
        let mut half = encode_envelope(1, Encoding::Json, b"1");
        half[0] = 0x85;
        half.extend_from_slice(&[0xa6, b'o', b'f', b'f', b's', b'e', b't', 0x05]);
        assert_eq!(decode_envelope(&half), Err(EnvelopeError::Missing("epoch")));
    }

    #[test]
    fn byte_layout_is_the_documented_one() {
        let bytes = encode_envelope(1, Encoding::Json, b"1");
        let expected = [
            0x84, 0xa1, b'v', 0x01, 0xa2, b't', b's', 0x01, 0xa3, b'e', b'n', b'c', 0xa4, b'j', b's', b'o', b'n', 0xa4,
            b'd', b'a', b't', b'a', 0xc4, 0x01, b'1',
        ];
        assert_eq!(bytes, expected);
    }

    #[test]
    fn extra_keys_are_ignored() {
        let v = V::Map(vec![
            (V::from("x"), V::Array(vec![V::Nil])),
            (V::from("v"), V::from(1)),
            (V::from(7), V::from(7)),
            (V::from("ts"), V::from(5)),
            (V::from("enc"), V::from("json")),
            (V::from("data"), V::Binary(b"\"hi\"".to_vec())),
        ]);
        let bytes = enc_value(&v);
        let e = decode_envelope(&bytes).unwrap();
        assert_eq!((e.ts, e.enc, e.data), (5, Encoding::Json, &b"\"hi\""[..]));
    }

    #[test]
    fn rejects_invalid_envelopes() {
        let ok = |k: &str| -> Vec<(V, V)> {
            [("v", V::from(1)), ("ts", V::from(5)), ("enc", V::from("json")), ("data", V::Binary(b"1".to_vec()))]
                .into_iter()
                .filter(|(n, _)| *n != k)
                .map(|(n, v)| (V::from(n), v))
                .collect()
        };
        for k in ["v", "ts", "enc", "data"] {
            assert_eq!(
                decode_envelope(&enc_value(&V::Map(ok(k)))),
                Err(EnvelopeError::Missing(match k {
                    "v" => "v",
                    "ts" => "ts",
                    "enc" => "enc",
                    _ => "data",
                }))
            );
        }
        let with = |k: &str, v: V| {
            let mut m = ok(k);
            m.push((V::from(k), v));
            enc_value(&V::Map(m))
        };
        assert_eq!(decode_envelope(&with("v", V::from(2))), Err(EnvelopeError::Version(2)));
        assert_eq!(decode_envelope(&with("ts", V::from(-1))), Err(EnvelopeError::WrongType("ts")));
        assert_eq!(decode_envelope(&with("enc", V::from("xml"))), Err(EnvelopeError::UnknownEncoding("xml".into())));
        assert_eq!(decode_envelope(&with("data", V::from("1"))), Err(EnvelopeError::WrongType("data")));
        assert!(matches!(decode_envelope(&with("data", V::Binary(b"{".to_vec()))), Err(EnvelopeError::Data(_))));
        assert_eq!(decode_envelope(b"hello"), Err(EnvelopeError::NotAMap));
        assert_eq!(decode_envelope(b""), Err(EnvelopeError::NotAMap));
        let mut trailing = encode_envelope(1, Encoding::Json, b"1");
        trailing.push(0);
        assert_eq!(decode_envelope(&trailing), Err(EnvelopeError::Trailing));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = decode_envelope(&bytes);
        }
    }
}
