//! Presence on the wire (contract v1.1): the `presence` and `presence_stats` replies,
//! the `join` / `leave` events, and the envelope a node publishes them in through Redis.

use bytes::Bytes;
use serde::Serialize;

use crate::{
    message::Encoding,
    ws::{frame_in_place, MAX_FRAME_HEADER},
};

/// Most clients one `presence` reply lists; the reply says `"truncated":true` beyond.
pub const MAX_PRESENCE_LIST: usize = 1000;

/// One connection in a channel's presence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Present {
    pub client: String,
    pub user: String,
}

/// A channel's presence as a `presence` reply carries it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PresenceList {
    pub clients: Vec<Present>,
    /// More clients are present than listed.
    pub truncated: bool,
}

/// How many connections and distinct users are present.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PresenceStats {
    pub clients: u64,
    pub users: u64,
}

/// Whether a presence event says a connection came or went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceEvent {
    Join,
    Leave,
}

impl PresenceEvent {
    pub const fn as_str(self) -> &'static str {
        match self {
            PresenceEvent::Join => "join",
            PresenceEvent::Leave => "leave",
        }
    }
}

/// What a WebSocket reply has before its body (nothing, in an HTTP answer).
#[derive(Serialize, Default)]
struct Head<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    op: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<u64>,
}

#[derive(Serialize)]
struct ListWire<'a> {
    #[serde(flatten)]
    head: Head<'a>,
    clients: &'a [Present],
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    truncated: bool,
}

#[derive(Serialize)]
struct StatsWire<'a> {
    #[serde(flatten)]
    head: Head<'a>,
    clients: u64,
    users: u64,
}

#[derive(Serialize)]
struct EventWire<'a> {
    op: &'static str,
    channel: &'a str,
    client: &'a str,
    user: &'a str,
}

fn to_vec<T: Serialize>(enc: Encoding, v: &T) -> Vec<u8> {
    // Serialising plain strings and integers cannot fail.
    match enc {
        Encoding::Json => serde_json::to_vec(v).unwrap_or_default(),
        Encoding::MsgPack => rmp_serde::to_vec_named(v).unwrap_or_default(),
    }
}

fn framed<T: Serialize>(enc: Encoding, v: &T) -> Bytes {
    let mut buf = Vec::with_capacity(MAX_FRAME_HEADER + 64);
    buf.resize(MAX_FRAME_HEADER, 0);
    buf.extend_from_slice(&to_vec(enc, v));
    frame_in_place(enc.opcode(), buf)
}

/// `{"op":"presence","channel":C,"id":I,"clients":[{"client":ID,"user":U},...]}`.
pub fn encode_presence_reply(enc: Encoding, id: Option<u64>, channel: &str, list: &PresenceList) -> Bytes {
    let head = Head { op: Some("presence"), channel: Some(channel), id };
    framed(enc, &ListWire { head, clients: &list.clients, truncated: list.truncated })
}

/// `{"op":"presence_stats","channel":C,"id":I,"clients":N,"users":M}`.
pub fn encode_presence_stats_reply(enc: Encoding, id: Option<u64>, channel: &str, stats: PresenceStats) -> Bytes {
    let head = Head { op: Some("presence_stats"), channel: Some(channel), id };
    framed(enc, &StatsWire { head, clients: stats.clients, users: stats.users })
}

/// The HTTP answers: `{"clients":[...]}` and `{"clients":N,"users":M}`.
pub fn encode_api_presence(enc: Encoding, list: &PresenceList) -> Vec<u8> {
    to_vec(enc, &ListWire { head: Head::default(), clients: &list.clients, truncated: list.truncated })
}

pub fn encode_api_presence_stats(enc: Encoding, stats: PresenceStats) -> Vec<u8> {
    to_vec(enc, &StatsWire { head: Head::default(), clients: stats.clients, users: stats.users })
}

/// `{"op":"join"|"leave","channel":C,"client":ID,"user":U}`.
pub fn encode_presence_event(enc: Encoding, event: PresenceEvent, channel: &str, client: &str, user: &str) -> Bytes {
    framed(enc, &EventWire { op: event.as_str(), channel, client, user })
}

/// The envelope a node publishes a presence event in: `{"v":1,"ts":T,"ev":"join",
/// "client":ID,"user":U}`. It has no `data`, so a node that does not know presence events
/// drops it as invalid rather than delivering it as a message.
pub fn encode_event_envelope(ts: u64, event: PresenceEvent, client: &str, user: &str) -> Vec<u8> {
    let mut buf = Vec::with_capacity(48 + client.len() + user.len());
    let _ = rmp::encode::write_map_len(&mut buf, 5);
    let _ = rmp::encode::write_str(&mut buf, "v");
    let _ = rmp::encode::write_uint(&mut buf, crate::ENVELOPE_VERSION);
    let _ = rmp::encode::write_str(&mut buf, "ts");
    let _ = rmp::encode::write_uint(&mut buf, ts);
    let _ = rmp::encode::write_str(&mut buf, "ev");
    let _ = rmp::encode::write_str(&mut buf, event.as_str());
    let _ = rmp::encode::write_str(&mut buf, "client");
    let _ = rmp::encode::write_str(&mut buf, client);
    let _ = rmp::encode::write_str(&mut buf, "user");
    let _ = rmp::encode::write_str(&mut buf, user);
    buf
}

/// A presence event envelope: `(event, client, user)`; `None` for anything else (a
/// publication envelope, garbage).
pub fn decode_event_envelope(payload: &[u8]) -> Option<(PresenceEvent, String, String)> {
    use rmpv::ValueRef;
    let mut rd = payload;
    let value = rmpv::decode::read_value_ref_with_max_depth(&mut rd, 16).ok()?;
    let ValueRef::Map(entries) = value else { return None };
    let (mut ev, mut client, mut user) = (None, None, None);
    for (k, v) in entries {
        let (ValueRef::String(k), ValueRef::String(v)) = (k, v) else { continue };
        match (k.as_str(), v.as_str()) {
            (Some("ev"), Some("join")) => ev = Some(PresenceEvent::Join),
            (Some("ev"), Some("leave")) => ev = Some(PresenceEvent::Leave),
            (Some("client"), Some(c)) => client = Some(c.to_owned()),
            (Some("user"), Some(u)) => user = Some(u.to_owned()),
            _ => {}
        }
    }
    Some((ev?, client?, user?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_replies_have_the_contract_shape() {
        let env = encode_event_envelope(5, PresenceEvent::Leave, "n1-7", "alice");
        assert_eq!(decode_event_envelope(&env), Some((PresenceEvent::Leave, "n1-7".into(), "alice".into())));
        assert_eq!(decode_event_envelope(&crate::encode_envelope(1, Encoding::Json, b"1")), None);
        assert!(crate::decode_envelope(&env).is_err(), "not a publication");
        let list = PresenceList { clients: vec![Present { client: "c".into(), user: "u".into() }], truncated: false };
        assert_eq!(encode_api_presence(Encoding::Json, &list), br#"{"clients":[{"client":"c","user":"u"}]}"#);
        assert_eq!(
            encode_api_presence_stats(Encoding::Json, PresenceStats { clients: 2, users: 1 }),
            br#"{"clients":2,"users":1}"#
        );
        let mp = encode_presence_stats_reply(Encoding::MsgPack, Some(3), "p:1", PresenceStats { clients: 2, users: 1 });
        let json: serde_json::Value =
            serde_json::from_slice(&crate::transcode(Encoding::MsgPack, Encoding::Json, &mp[2..]).unwrap()).unwrap();
        assert_eq!(json, serde_json::json!({"op":"presence_stats","channel":"p:1","id":3,"clients":2,"users":1}));
        let f = encode_presence_event(Encoding::Json, PresenceEvent::Join, "p:1", "c", "u");
        assert_eq!(&f[2..], br#"{"op":"join","channel":"p:1","client":"c","user":"u"}"#);
    }
}
