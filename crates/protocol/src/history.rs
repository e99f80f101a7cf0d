//! Channel history on the wire (contract v1.1): positions `(epoch, offset)`, the `since`
//! a client recovers from, and the frames and bodies that carry history (`history`
//! replies, `resync` events, `POST /api/history` answers).

use std::{io::Write as _, sync::Arc};

use bytes::Bytes;

use crate::{
    message::{write_data, DataError, Encoding, Publication},
    ws::{frame_in_place, MAX_FRAME_HEADER},
};

/// Longest epoch a client may send in `since`, in bytes. Epochs this server makes are
/// far shorter; the bound keeps a hostile `since` from costing anything.
pub const MAX_EPOCH_LEN: usize = 64;

/// Most publications one `history` read may ask for with `limit`, and most a namespace
/// may keep (`history_size`): a read must fit in one reply.
pub const MAX_HISTORY_LIMIT: u64 = 100_000;

/// A channel's history generation: changes whenever its history may have been lost.
pub type Epoch = Arc<str>;

/// A place in a channel's history: the publication with `offset` in `epoch` (or, as a
/// channel's top, the last one published; offset 0 before the first).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Position {
    pub offset: u64,
    pub epoch: Epoch,
}

impl Position {
    pub fn new(offset: u64, epoch: &str) -> Self {
        Self { offset, epoch: epoch.into() }
    }
}

/// What a history read returns: the channel's top and the publications asked for,
/// oldest first (each with its [`Publication::position`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPage {
    pub top: Position,
    pub publications: Vec<Publication>,
}

impl HistoryPage {
    /// Whether this page, read after `since`, continues exactly from it: same epoch, not
    /// behind `since`, and nothing missing between `since` and the first publication kept.
    pub fn continues_from(&self, since: &Position) -> bool {
        since.epoch == self.top.epoch
            && since.offset <= self.top.offset
            && (since.offset == self.top.offset
                || self.publications.first().and_then(Publication::offset) == Some(since.offset + 1))
    }
}

/// What a `history` read asks for: publications after `since` (all kept without it), at
/// most `limit` of them (all without it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryQuery {
    pub since: Option<Position>,
    pub limit: Option<u64>,
}

/// `{"op":"resync","channel":C,"epoch":E,"offset":TOP}`: publications on C may have been
/// lost; live delivery continues after TOP.
pub fn encode_resync(to: Encoding, channel: &str, top: &Position) -> Bytes {
    let mut buf = header();
    match to {
        Encoding::Json => {
            buf.extend_from_slice(b"{\"op\":\"resync\",\"channel\":\"");
            buf.extend_from_slice(channel.as_bytes());
            buf.extend_from_slice(b"\",\"epoch\":");
            json_str(&mut buf, &top.epoch);
            let _ = write!(buf, ",\"offset\":{}}}", top.offset);
        }
        Encoding::MsgPack => {
            let _ = rmp::encode::write_map_len(&mut buf, 4);
            mp_str(&mut buf, "op", "resync");
            mp_str(&mut buf, "channel", channel);
            mp_str(&mut buf, "epoch", &top.epoch);
            mp_uint(&mut buf, "offset", top.offset);
        }
    }
    frame_in_place(to.opcode(), buf)
}

/// The framed reply to a `history` command:
/// `{"op":"history","channel":C,"id":I,"offset":TOP,"epoch":E,"publications":[...]}`.
pub fn encode_history_reply(
    to: Encoding,
    id: Option<u64>,
    channel: &str,
    page: &HistoryPage,
) -> Result<Bytes, DataError> {
    let mut buf = header();
    match to {
        Encoding::Json => {
            buf.extend_from_slice(b"{\"op\":\"history\",\"channel\":\"");
            buf.extend_from_slice(channel.as_bytes());
            buf.push(b'"');
            if let Some(id) = id {
                let _ = write!(buf, ",\"id\":{id}");
            }
            buf.push(b',');
            history_fields(&mut buf, to, page)?;
            buf.push(b'}');
        }
        Encoding::MsgPack => {
            let _ = rmp::encode::write_map_len(&mut buf, 5 + u32::from(id.is_some()));
            mp_str(&mut buf, "op", "history");
            mp_str(&mut buf, "channel", channel);
            if let Some(id) = id {
                mp_uint(&mut buf, "id", id);
            }
            history_fields(&mut buf, to, page)?;
        }
    }
    Ok(frame_in_place(to.opcode(), buf))
}

/// The `POST /api/history` answer: `{"offset":TOP,"epoch":E,"publications":[...]}`.
pub fn encode_api_history(to: Encoding, page: &HistoryPage) -> Result<Vec<u8>, DataError> {
    let mut buf = Vec::with_capacity(64);
    match to {
        Encoding::Json => {
            buf.push(b'{');
            history_fields(&mut buf, to, page)?;
            buf.push(b'}');
        }
        Encoding::MsgPack => {
            let _ = rmp::encode::write_map_len(&mut buf, 3);
            history_fields(&mut buf, to, page)?;
        }
    }
    Ok(buf)
}

/// `"offset":TOP,"epoch":E,"publications":[{"data":V,"offset":O,"ts":T},...]` (three
/// map entries in MessagePack).
fn history_fields(buf: &mut Vec<u8>, to: Encoding, page: &HistoryPage) -> Result<(), DataError> {
    match to {
        Encoding::Json => {
            let _ = write!(buf, "\"offset\":{},\"epoch\":", page.top.offset);
            json_str(buf, &page.top.epoch);
            buf.extend_from_slice(b",\"publications\":[");
            for (i, p) in page.publications.iter().enumerate() {
                if i > 0 {
                    buf.push(b',');
                }
                buf.extend_from_slice(b"{\"data\":");
                write_data(buf, p.enc, to, &p.data)?;
                if let Some(pos) = &p.position {
                    let _ = write!(buf, ",\"offset\":{}", pos.offset);
                }
                let _ = write!(buf, ",\"ts\":{}}}", p.ts);
            }
            buf.push(b']');
        }
        Encoding::MsgPack => {
            mp_uint(buf, "offset", page.top.offset);
            mp_str(buf, "epoch", &page.top.epoch);
            let _ = rmp::encode::write_str(buf, "publications");
            let _ = rmp::encode::write_array_len(buf, page.publications.len() as u32);
            for p in &page.publications {
                let _ = rmp::encode::write_map_len(buf, 2 + u32::from(p.position.is_some()));
                let _ = rmp::encode::write_str(buf, "data");
                write_data(buf, p.enc, to, &p.data)?;
                if let Some(pos) = &p.position {
                    mp_uint(buf, "offset", pos.offset);
                }
                mp_uint(buf, "ts", p.ts);
            }
        }
    }
    Ok(())
}

fn header() -> Vec<u8> {
    let mut buf = Vec::with_capacity(MAX_FRAME_HEADER + 96);
    buf.resize(MAX_FRAME_HEADER, 0);
    buf
}

/// Epochs come from Redis, where anyone with access could have written one: escaped.
fn json_str(buf: &mut Vec<u8>, s: &str) {
    let _ = serde_json::to_writer(&mut *buf, s);
}

fn mp_str(buf: &mut Vec<u8>, key: &str, value: &str) {
    let _ = rmp::encode::write_str(buf, key);
    let _ = rmp::encode::write_str(buf, value);
}

fn mp_uint(buf: &mut Vec<u8>, key: &str, value: u64) {
    let _ = rmp::encode::write_str(buf, key);
    let _ = rmp::encode::write_uint(buf, value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ChannelName;

    fn body(frame: &Bytes) -> &[u8] {
        match frame[1] {
            126 => &frame[4..],
            127 => &frame[10..],
            _ => &frame[2..],
        }
    }

    fn page() -> HistoryPage {
        let p = |offset, data: &'static [u8], enc| Publication {
            channel: ChannelName::new("h:x").unwrap(),
            ts: 7,
            enc,
            data: Bytes::from_static(data),
            position: Some(Position::new(offset, "e1")),
        };
        HistoryPage {
            top: Position::new(5, "e1"),
            publications: vec![p(4, b"{\"a\":1}", Encoding::Json), p(5, &[0x92, 1, 2], Encoding::MsgPack)],
        }
    }

    #[test]
    fn history_reply_in_both_formats() {
        let json = encode_history_reply(Encoding::Json, Some(3), "h:x", &page()).unwrap();
        let v: serde_json::Value = serde_json::from_slice(body(&json)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"op":"history","channel":"h:x","id":3,"offset":5,"epoch":"e1","publications":[
                {"data":{"a":1},"offset":4,"ts":7},{"data":[1,2],"offset":5,"ts":7}]})
        );
        let mp = encode_history_reply(Encoding::MsgPack, None, "h:x", &page()).unwrap();
        let v: rmpv::Value = rmpv::decode::read_value(&mut body(&mp)).unwrap();
        let as_json: serde_json::Value =
            serde_json::from_slice(&crate::transcode(Encoding::MsgPack, Encoding::Json, body(&mp)).unwrap()).unwrap();
        assert!(v.is_map());
        assert_eq!(as_json["publications"][1]["data"], serde_json::json!([1, 2]));
        assert_eq!(as_json["offset"], 5);
        assert!(as_json.get("id").is_none());
    }

    #[test]
    fn api_history_and_resync() {
        let v: serde_json::Value =
            serde_json::from_slice(&encode_api_history(Encoding::Json, &page()).unwrap()).unwrap();
        assert_eq!(v["epoch"], "e1");
        assert_eq!(v["publications"].as_array().unwrap().len(), 2);
        let r = encode_resync(Encoding::Json, "h:x", &Position::new(9, "e\"2"));
        let v: serde_json::Value = serde_json::from_slice(body(&r)).unwrap();
        assert_eq!(v, serde_json::json!({"op":"resync","channel":"h:x","epoch":"e\"2","offset":9}));
        let r = encode_resync(Encoding::MsgPack, "h:x", &Position::new(9, "e2"));
        assert_eq!(r[0], 0x82);
    }
}
