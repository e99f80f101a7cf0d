//! The broker's metric handles, registered once when the broker starts so nothing on the
//! message path ever looks a metric up by name.

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};

pub(crate) struct BrokerMetrics {
    pub up: Gauge,
    /// Channels currently subscribed in Redis on the live connection.
    pub channels: Gauge,
    pub reconnects: Counter,
    pub resubscribe_seconds: Histogram,
    pub received: Counter,
    pub invalid_envelope: Counter,
    pub dropped_too_large: Counter,
    pub dropped_backlog: Counter,
    /// Bytes read from Redis and not yet fanned out.
    pub backlog_bytes: Gauge,
    /// History channels: stored publications that arrived twice (the catch-up or a gap
    /// fill delivered them first), gaps found in live traffic, resyncs sent, publications
    /// delivered from history by catch-ups and gap fills, catch-ups after reconnects.
    pub duplicates_dropped: Counter,
    pub gaps: Counter,
    pub resyncs: Counter,
    pub caught_up: Counter,
    pub catch_ups: Counter,
    pub catch_up_seconds: Histogram,
    /// Plain `PUBLISH`es into a history namespace: delivered, but not stored.
    pub unstored: Counter,
    /// Messages read from the control channel (server API).
    pub control_received: Counter,
    pub presence_events_dropped: Counter,
    pub presence_ops_dropped: Counter,
    pub presence_entries: Gauge,
    pub presence_events_delivered: Counter,
    pub errors: Errors,
}

pub(crate) struct Errors {
    pub publish: Counter,
    pub subscribe: Counter,
    pub unsubscribe: Counter,
    pub ping: Counter,
    pub connect: Counter,
}

impl BrokerMetrics {
    /// `shard` labels the series of one Redis connection: `"0"` with a single Redis, the
    /// shard's index with `redis_shards`. Bounded: one value per configured shard.
    pub(crate) fn new(shard: &str) -> Self {
        let errors = |op: &'static str| counter!("fanout_broker_errors_total", "op" => op, "shard" => shard.to_owned());
        let m = Self {
            up: gauge!("fanout_broker_up", "shard" => shard.to_owned()),
            channels: gauge!("fanout_broker_channels", "shard" => shard.to_owned()),
            reconnects: counter!("fanout_broker_reconnects_total", "shard" => shard.to_owned()),
            resubscribe_seconds: histogram!("fanout_broker_resubscribe_duration_seconds", "shard" => shard.to_owned()),
            received: counter!("fanout_broker_publications_received_total", "shard" => shard.to_owned()),
            invalid_envelope: counter!("fanout_publications_dropped_total", "reason" => "invalid_envelope"),
            dropped_too_large: counter!("fanout_publications_dropped_total", "reason" => "too_large"),
            dropped_backlog: counter!("fanout_publications_dropped_total", "reason" => "broker_backlog"),
            backlog_bytes: gauge!("fanout_broker_backlog_bytes", "shard" => shard.to_owned()),
            duplicates_dropped: counter!("fanout_broker_history_duplicates_dropped_total"),
            gaps: counter!("fanout_broker_history_gaps_total"),
            resyncs: counter!("fanout_resyncs_total"),
            caught_up: counter!("fanout_broker_catch_up_publications_total"),
            catch_ups: counter!("fanout_broker_catch_ups_total"),
            catch_up_seconds: histogram!("fanout_broker_catch_up_duration_seconds"),
            unstored: counter!("fanout_history_unstored_publications_total"),
            control_received: counter!("fanout_broker_control_messages_total"),
            presence_events_dropped: counter!("fanout_presence_events_dropped_total"),
            presence_ops_dropped: counter!("fanout_presence_updates_dropped_total"),
            presence_entries: gauge!("fanout_presence_entries"),
            presence_events_delivered: counter!("fanout_presence_events_total"),
            errors: Errors {
                publish: errors("publish"),
                subscribe: errors("subscribe"),
                unsubscribe: errors("unsubscribe"),
                ping: errors("ping"),
                connect: errors("connect"),
            },
        };
        // Exported from the start, so a dashboard sees 0 rather than a missing series
        // while the first connection is still being made.
        m.up.set(0.0);
        m.channels.set(0.0);
        m
    }
}
