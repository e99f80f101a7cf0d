//! HTTP API bodies as this client writes and reads them. Requests embed the caller's
//! already-encoded `data` bytes verbatim, so a value is serialised exactly once.

use fanout_protocol::Encoding;
use serde::Deserialize;

pub(crate) fn content_type(enc: Encoding) -> &'static str {
    match enc {
        Encoding::Json => "application/json",
        Encoding::MsgPack => "application/msgpack",
    }
}

/// `{"channel":C,"data":V}`. `channel` must already be validated: valid names contain no
/// character that JSON would escape.
pub(crate) fn publish_body(enc: Encoding, channel: &str, data: &[u8], key: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + channel.len() + data.len());
    match enc {
        Encoding::Json => {
            out.extend_from_slice(b"{\"channel\":\"");
            out.extend_from_slice(channel.as_bytes());
            out.extend_from_slice(b"\",\"data\":");
            out.extend_from_slice(data);
            if let Some(key) = key {
                out.extend_from_slice(b",\"idempotency_key\":");
                // A key is any string: escaped.
                let _ = serde_json::to_writer(&mut out, key);
            }
            out.push(b'}');
        }
        Encoding::MsgPack => {
            // Writes into a Vec cannot fail.
            let _ = rmp::encode::write_map_len(&mut out, 2 + u32::from(key.is_some()));
            let _ = rmp::encode::write_str(&mut out, "channel");
            let _ = rmp::encode::write_str(&mut out, channel);
            let _ = rmp::encode::write_str(&mut out, "data");
            out.extend_from_slice(data);
            if let Some(key) = key {
                let _ = rmp::encode::write_str(&mut out, "idempotency_key");
                let _ = rmp::encode::write_str(&mut out, key);
            }
        }
    }
    out
}

/// What a successful `POST /api/publish` answered: `offset` and `epoch` in a namespace
/// that keeps history.
#[derive(Deserialize, Default)]
pub(crate) struct Published {
    #[serde(default)]
    pub(crate) offset: Option<u64>,
    #[serde(default)]
    pub(crate) epoch: Option<String>,
}

pub(crate) fn published_of(content_type: Option<&str>, body: &[u8]) -> Published {
    let msgpack =
        content_type.is_some_and(|ct| ct.trim_start().to_ascii_lowercase().starts_with("application/msgpack"));
    let parsed = if msgpack { rmp_serde::from_slice(body).ok() } else { serde_json::from_slice(body).ok() };
    parsed.unwrap_or_default()
}

/// `{"channels":[C,…],"data":V}`, channels validated as for [`publish_body`].
pub(crate) fn broadcast_body(enc: Encoding, channels: &[&str], data: &[u8]) -> Vec<u8> {
    let names: usize = channels.iter().map(|c| c.len() + 3).sum();
    let mut out = Vec::with_capacity(32 + names + data.len());
    match enc {
        Encoding::Json => {
            out.extend_from_slice(b"{\"channels\":[");
            for (i, c) in channels.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.push(b'"');
                out.extend_from_slice(c.as_bytes());
                out.push(b'"');
            }
            out.extend_from_slice(b"],\"data\":");
            out.extend_from_slice(data);
            out.push(b'}');
        }
        Encoding::MsgPack => {
            let _ = rmp::encode::write_map_len(&mut out, 2);
            let _ = rmp::encode::write_str(&mut out, "channels");
            let _ = rmp::encode::write_array_len(&mut out, channels.len() as u32);
            for c in channels {
                let _ = rmp::encode::write_str(&mut out, c);
            }
            let _ = rmp::encode::write_str(&mut out, "data");
            out.extend_from_slice(data);
        }
    }
    out
}

/// `{"publications":[{"channel":C,"data":V},…]}` (`POST /api/publish_batch`), every
/// element written as [`publish_body`] writes one.
pub(crate) fn batch_body(enc: Encoding, items: &[(&str, &[u8])]) -> Vec<u8> {
    let size: usize = items.iter().map(|(c, d)| 24 + c.len() + d.len()).sum();
    let mut out = Vec::with_capacity(24 + size);
    match enc {
        Encoding::Json => out.extend_from_slice(b"{\"publications\":["),
        Encoding::MsgPack => {
            let _ = rmp::encode::write_map_len(&mut out, 1);
            let _ = rmp::encode::write_str(&mut out, "publications");
            let _ = rmp::encode::write_array_len(&mut out, items.len() as u32);
        }
    }
    for (i, (channel, data)) in items.iter().enumerate() {
        if enc == Encoding::Json && i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&publish_body(enc, channel, data, None));
    }
    if enc == Encoding::Json {
        out.extend_from_slice(b"]}");
    }
    out
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorInner,
}

#[derive(Deserialize)]
struct ErrorInner {
    code: String,
    #[serde(default)]
    message: String,
}

/// `(code, message)` from an error response; a body that is not the documented shape
/// (a proxy's HTML page, say) becomes `http_STATUS` and a cut-down copy of its text.
pub(crate) fn error_of(status: u16, content_type: Option<&str>, body: &[u8]) -> (String, String) {
    let msgpack =
        content_type.is_some_and(|ct| ct.trim_start().to_ascii_lowercase().starts_with("application/msgpack"));
    let parsed = if msgpack {
        rmp_serde::from_slice::<ErrorBody>(body).ok()
    } else {
        serde_json::from_slice::<ErrorBody>(body).ok()
    };
    match parsed {
        Some(b) => (b.error.code, b.error.message),
        None => {
            let text = String::from_utf8_lossy(body);
            let mut message: String = text.trim().chars().take(200).collect();
            if message.is_empty() {
                message = "no error body".to_owned();
            }
            (format!("http_{status}"), message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_bodies_embed_data_verbatim() {
        assert_eq!(
            publish_body(Encoding::Json, "chat:1", br#"{"a": [1, 2]}"#, None),
            br#"{"channel":"chat:1","data":{"a": [1, 2]}}"#
        );
        assert_eq!(broadcast_body(Encoding::Json, &["a", "b"], b"null"), br#"{"channels":["a","b"],"data":null}"#);
        assert_eq!(
            publish_body(Encoding::Json, "c", b"1", Some("k\"1")),
            br#"{"channel":"c","data":1,"idempotency_key":"k\"1"}"#
        );
        let mp = publish_body(Encoding::MsgPack, "c", &[1], Some("k"));
        assert_eq!(rmpv::decode::read_value(&mut &mp[..]).unwrap().as_map().unwrap().len(), 3);
        let v: serde_json::Value = serde_json::from_slice(&broadcast_body(Encoding::Json, &["x"], b"1")).unwrap();
        assert_eq!(v, serde_json::json!({"channels":["x"],"data":1}));
    }

    #[test]
    fn msgpack_bodies_decode_to_the_documented_maps() {
        use rmpv::Value as V;
        let data = rmp_serde::to_vec_named(&serde_json::json!({"k": "v"})).unwrap();
        let body = publish_body(Encoding::MsgPack, "c", &data, None);
        let v = rmpv::decode::read_value(&mut &body[..]).unwrap();
        assert_eq!(
            v,
            V::Map(vec![
                (V::from("channel"), V::from("c")),
                (V::from("data"), V::Map(vec![(V::from("k"), V::from("v"))]))
            ])
        );
        let body = broadcast_body(Encoding::MsgPack, &["a", "b"], &[0xc0]);
        let v = rmpv::decode::read_value(&mut &body[..]).unwrap();
        assert_eq!(
            v,
            V::Map(vec![(V::from("channels"), V::Array(vec![V::from("a"), V::from("b")])), (V::from("data"), V::Nil)])
        );
    }

    #[test]
    fn error_bodies() {
        let json = br#"{"error":{"code":"bad_request","message":"invalid channel"}}"#;
        assert_eq!(error_of(400, Some("application/json"), json), ("bad_request".into(), "invalid channel".into()));
        let mp =
            rmp_serde::to_vec_named(&serde_json::json!({"error": {"code": "unavailable", "message": "down"}})).unwrap();
        assert_eq!(error_of(503, Some("application/msgpack"), &mp), ("unavailable".into(), "down".into()));
        assert_eq!(
            error_of(502, Some("text/html"), b"<h1>Bad Gateway</h1>\n"),
            ("http_502".into(), "<h1>Bad Gateway</h1>".into())
        );
        assert_eq!(error_of(500, None, b""), ("http_500".into(), "no error body".into()));
    }
}
