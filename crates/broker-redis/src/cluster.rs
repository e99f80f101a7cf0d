//! The cluster's control plane over the same Redis: a control channel every node listens
//! on (server-API actions such as disconnecting a user's connections anywhere), and the
//! node registry (each node's report, refreshed every second with a short expiry, so a
//! node that stops leaves `/api/nodes` within seconds).
//!
//! Keys: the control channel `{prefix}!control`; reports `{{prefix}!nodes}:ID` (JSON,
//! expiring) indexed by the sorted set `{prefix}!nodes` hash-tagged `{{prefix}!nodes}`
//! (score: the last report, ms). `!` never occurs in a channel name, so none of these can
//! collide with a channel's keys, and the registry's keys share one Cluster slot.

use std::time::Duration;

use fanout_hub::{BrokerError, Control, NodeReport};
use fanout_protocol::ChannelName;
use serde_json::{json, Value};

use crate::broker::BrokerState;

/// How often a node refreshes its report, and how long one lives without a refresh.
pub(crate) const REPORT_EVERY: Duration = Duration::from_secs(1);
const REPORT_TTL: Duration = Duration::from_secs(5);

pub(crate) fn control_channel(prefix: &str) -> String {
    format!("{prefix}!control")
}

fn registry_key(prefix: &str) -> String {
    format!("{{{prefix}!nodes}}")
}

fn report_key(prefix: &str, id: &str) -> String {
    format!("{{{prefix}!nodes}}:{id}")
}

pub(crate) fn encode_control(c: &Control) -> String {
    match c {
        Control::Disconnect { user } => json!({"op": "disconnect", "user": user}),
        Control::Unsubscribe { user, channel } => {
            json!({"op": "unsubscribe", "user": user, "channel": channel.as_str()})
        }
    }
    .to_string()
}

pub(crate) fn decode_control(payload: &[u8]) -> Option<Control> {
    let v: Value = serde_json::from_slice(payload).ok()?;
    let user = v.get("user")?.as_str()?.to_owned();
    match v.get("op")?.as_str()? {
        "disconnect" => Some(Control::Disconnect { user }),
        "unsubscribe" => {
            Some(Control::Unsubscribe { user, channel: ChannelName::new(v.get("channel")?.as_str()?).ok()? })
        }
        _ => None,
    }
}

fn encode_report(r: &NodeReport) -> String {
    json!({
        "id": r.id, "version": r.version, "uptime_s": r.uptime_s, "connections": r.connections,
        "subscriptions": r.subscriptions, "channel_count": r.channel_count,
        "channels": r.channels.iter().map(|(c, n)| json!([c, n])).collect::<Vec<_>>(),
    })
    .to_string()
}

fn decode_report(text: &[u8]) -> Option<NodeReport> {
    let v: Value = serde_json::from_slice(text).ok()?;
    let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    let channels = v
        .get("channels")?
        .as_array()?
        .iter()
        .filter_map(|e| Some((e.get(0)?.as_str()?.to_owned(), e.get(1)?.as_u64()?)))
        .collect();
    Some(NodeReport {
        id: v.get("id")?.as_str()?.to_owned(),
        version: v.get("version").and_then(Value::as_str).unwrap_or_default().to_owned(),
        uptime_s: n("uptime_s"),
        connections: n("connections"),
        subscriptions: n("subscriptions"),
        channel_count: n("channel_count"),
        channels,
    })
}

fn now_ms() -> u64 {
    fanout_protocol::now_micros() / 1000
}

impl BrokerState {
    /// Publishes `control` on the control channel.
    pub(crate) async fn send_control(&self, control: &Control) -> Result<(), BrokerError> {
        let mut cmd = redis::cmd(self.publish_command());
        cmd.arg(&self.control_channel).arg(encode_control(control));
        self.publisher.run::<()>(self, &cmd, "control PUBLISH").await
    }

    /// A message on the control channel: this node acts on it.
    pub(crate) fn on_control(&self, payload: &[u8]) {
        self.metrics.control_received.increment(1);
        match (decode_control(payload), self.node.get()) {
            (Some(c), Some(node)) => (node.control)(&c),
            (None, _) => self.invalid("control channel", &"not a control message"),
            (Some(_), None) => {}
        }
    }

    /// Writes this node's report and drops reports that stopped long ago from the index.
    pub(crate) async fn report(&self) -> Result<(), BrokerError> {
        let Some(node) = self.node.get() else { return Ok(()) };
        let r = (node.report)();
        let prefix = &self.config.prefix;
        let now = now_ms();
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(report_key(prefix, &r.id))
            .arg(encode_report(&r))
            .arg("PX")
            .arg(REPORT_TTL.as_millis() as u64)
            .ignore();
        pipe.cmd("ZADD").arg(registry_key(prefix)).arg(now).arg(&r.id).ignore();
        pipe.cmd("ZREMRANGEBYSCORE").arg(registry_key(prefix)).arg("-inf").arg(now.saturating_sub(60_000)).ignore();
        self.publisher.run_pipe(self, &pipe, "node report").await
    }

    /// Every node that reported within the report TTL.
    pub(crate) async fn live_nodes(&self) -> Result<Vec<NodeReport>, BrokerError> {
        let prefix = &self.config.prefix;
        let since = now_ms().saturating_sub(REPORT_TTL.as_millis() as u64);
        let mut cmd = redis::cmd("ZRANGEBYSCORE");
        cmd.arg(registry_key(prefix)).arg(since).arg("+inf");
        let ids: Vec<String> = self.publisher.run(self, &cmd, "node index").await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut get = redis::cmd("MGET");
        for id in &ids {
            get.arg(report_key(prefix, id));
        }
        let reports: Vec<Option<Vec<u8>>> = self.publisher.run(self, &get, "node reports").await?;
        Ok(reports.into_iter().flatten().filter_map(|r| decode_report(&r)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages_and_reports_round_trip() {
        for c in [
            Control::Disconnect { user: "u\"1\n".into() },
            Control::Unsubscribe { user: "u".into(), channel: ChannelName::new("chat:1").unwrap() },
        ] {
            assert_eq!(decode_control(encode_control(&c).as_bytes()), Some(c));
        }
        assert_eq!(decode_control(b"{\"op\":\"unsubscribe\",\"user\":\"u\",\"channel\":\"bad name\"}"), None);
        assert_eq!(decode_control(b"nope"), None);
        let r = NodeReport {
            id: "n1".into(),
            version: "0.1.0".into(),
            uptime_s: 3,
            connections: 2,
            subscriptions: 5,
            channels: vec![("a".into(), 3), ("b".into(), 2)],
            channel_count: 2,
        };
        assert_eq!(decode_report(encode_report(&r).as_bytes()), Some(r));
    }
}
