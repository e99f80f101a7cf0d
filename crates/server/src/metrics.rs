//! The Prometheus recorder and the server's metric handles, registered once at start-up
//! so the hot path only touches atomics.

use std::sync::OnceLock;

use fanout_protocol::ErrorCode;
use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Bucket bounds (seconds) resolving 100 µs to 10 s for every latency histogram.
pub const LATENCY_BUCKETS: [f64; 17] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder (once; later calls return the same handle).
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            // Refused only for an empty bucket list, which LATENCY_BUCKETS is not; the
            // exporter's default buckets would still serve.
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new())
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (tests embedding the server); the
            // handle then renders an empty exposition, which is still valid.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter as c, describe_gauge as g, describe_histogram as h, Unit};
    g!("fanout_connections", "Open WebSocket connections");
    c!("fanout_connections_opened_total", "WebSocket connections accepted");
    c!("fanout_connections_closed_total", "WebSocket connections closed, by reason");
    c!("fanout_upgrade_rejections_total", "Upgrade requests refused before the handshake, by reason");
    g!("fanout_subscriptions", "Client subscriptions on this node");
    g!("fanout_broker_channels", "Channels this node holds a broker subscription for");
    c!("fanout_publications_total", "Publications accepted, by where they entered (ws, http)");
    c!("fanout_idempotent_duplicates_total", "Publications suppressed because their idempotency_key was seen");
    c!(
        "fanout_server_api_calls_total",
        "Server API calls (disconnect, unsubscribe, channels, nodes), by endpoint and outcome"
    );
    c!("fanout_broker_control_messages_total", "Control messages (server API actions) this node received");
    c!("fanout_history_reads_total", "History reads by clients (history op, POST /api/history), by where");
    c!("fanout_recoveries_total", "Subscriptions with since, by outcome (recovered, not_recovered)");
    c!("fanout_publications_replayed_total", "Publications delivered to recovering subscribers from history");
    c!("fanout_resyncs_total", "Times a history channel's subscribers were told to resync (possible loss)");
    c!("fanout_broker_catch_ups_total", "Catch-ups of history channels after a pub/sub reconnect");
    c!(
        "fanout_broker_catch_up_publications_total",
        "Publications a node delivered from history after a reconnect or a gap"
    );
    c!("fanout_broker_history_gaps_total", "Gaps found in a history channel's live publications");
    c!("fanout_broker_history_duplicates_dropped_total", "Stored publications that reached the node twice (dropped)");
    c!(
        "fanout_history_unstored_publications_total",
        "Plain PUBLISHes into a history namespace: delivered without offset, not stored"
    );
    g!("fanout_history_bytes", Unit::Bytes, "History held by the embedded broker");
    g!("fanout_presence_entries", "Presence entries this node holds and refreshes");
    c!("fanout_presence_events_total", "Join/leave events received from Redis and sent to local subscribers");
    c!("fanout_presence_events_dropped_total", "Join/leave events not sent: their channel was over its event rate");
    c!("fanout_presence_updates_dropped_total", "Presence changes dropped: the node's queue to Redis was full");
    c!("fanout_broker_publications_received_total", "Publications received from the broker");
    c!("fanout_deliveries_total", "Message frames written to client sockets");
    c!("fanout_sent_bytes_total", Unit::Bytes, "Bytes written to client sockets");
    c!("fanout_publications_dropped_total", "Publications not delivered, by reason");
    c!(
        "fanout_slow_consumer_disconnects_total",
        "Connections closed with 4008 because their outbound queue overflowed"
    );
    c!("fanout_command_errors_total", "Client commands answered with an error, by code");
    h!(
        "fanout_delivery_latency_seconds",
        Unit::Seconds,
        "Publication ts to frame written to the socket (sampled once per socket write)"
    );
    h!(
        "fanout_broadcast_duration_seconds",
        Unit::Seconds,
        "Node-local fan-out: publication received to queued for every local subscriber"
    );
    g!("fanout_broker_up", "1 while the broker connection is up");
    g!("fanout_broker_publishes_in_flight", "Publications handed to the broker and not yet answered");
    g!("fanout_broker_backlog_bytes", Unit::Bytes, "Bytes read from Redis and not yet fanned out");
    c!(
        "fanout_listener_connections_dropped_total",
        "Connections dropped before their request completed, by listener and reason (per_address, shed)"
    );
    c!(
        "fanout_listener_accept_errors_total",
        "Failed accepts, by listener and kind (descriptors: the process or system had no file descriptor left; other)"
    );
    c!("fanout_broker_reconnects_total", "Broker reconnections");
    c!("fanout_broker_errors_total", "Broker command errors, by operation");
    h!(
        "fanout_broker_resubscribe_duration_seconds",
        Unit::Seconds,
        "Time to resubscribe every channel after a reconnect"
    );
    g!("fanout_ready", "1 while /readyz answers 200");
    c!("fanout_token_refreshes_total", "refresh commands, by result (ok, rejected)");
    c!("fanout_jwks_reloads_total", "JWKS file reloads after a change, by result (ok, error)");
    g!("fanout_rate_limited_ips", "Client addresses the per-IP connection rate limiter is tracking");
    g!("fanout_build_info", "Build information");
}

/// Why a WebSocket connection ended; each has its own counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent a Close frame.
    Client,
    /// The socket ended or failed without a Close frame.
    Disconnected,
    ProtocolError,
    InvalidUtf8,
    TooLarge,
    SlowConsumer,
    Draining,
    IdleTimeout,
    AuthExpired,
    /// The client kept sending commands far over its rate limit.
    RateLimited,
    /// The backend asked for it (`POST /api/disconnect`): 4009.
    Kicked,
}

impl CloseReason {
    pub const ALL: [CloseReason; 11] = [
        CloseReason::Client,
        CloseReason::Disconnected,
        CloseReason::ProtocolError,
        CloseReason::InvalidUtf8,
        CloseReason::TooLarge,
        CloseReason::SlowConsumer,
        CloseReason::Draining,
        CloseReason::IdleTimeout,
        CloseReason::AuthExpired,
        CloseReason::RateLimited,
        CloseReason::Kicked,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            CloseReason::Client => "client",
            CloseReason::Disconnected => "disconnected",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::InvalidUtf8 => "invalid_utf8",
            CloseReason::TooLarge => "too_large",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::Draining => "draining",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::AuthExpired => "auth_expired",
            CloseReason::RateLimited => "rate_limited",
            CloseReason::Kicked => "kicked",
        }
    }

    /// The close code the server sends, if it sends one.
    pub const fn code(self) -> Option<u16> {
        match self {
            CloseReason::Client | CloseReason::Disconnected => None,
            CloseReason::ProtocolError => Some(1002),
            CloseReason::InvalidUtf8 => Some(1007),
            CloseReason::TooLarge => Some(1009),
            CloseReason::SlowConsumer => Some(4008),
            CloseReason::Draining | CloseReason::IdleTimeout => Some(1001),
            CloseReason::AuthExpired | CloseReason::RateLimited => Some(1008),
            CloseReason::Kicked => Some(4009),
        }
    }
}

/// Why an upgrade was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Draining,
    NotWebSocket,
    BadSubprotocol,
    Unauthorized,
    Forbidden,
    TooManyConnections,
    RateLimited,
}

impl Rejection {
    pub const ALL: [Rejection; 7] = [
        Rejection::Draining,
        Rejection::NotWebSocket,
        Rejection::BadSubprotocol,
        Rejection::Unauthorized,
        Rejection::Forbidden,
        Rejection::TooManyConnections,
        Rejection::RateLimited,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Rejection::Draining => "draining",
            Rejection::NotWebSocket => "not_websocket",
            Rejection::BadSubprotocol => "bad_subprotocol",
            Rejection::Unauthorized => "unauthorized",
            Rejection::Forbidden => "forbidden",
            Rejection::TooManyConnections => "too_many_connections",
            Rejection::RateLimited => "rate_limited",
        }
    }
}

/// Every handle the server touches after start-up.
pub struct NodeMetrics {
    pub connections: Gauge,
    pub opened: Counter,
    closed: [Counter; CloseReason::ALL.len()],
    rejected: [Counter; Rejection::ALL.len()],
    command_errors: [Counter; ErrorCode::ALL.len()],
    pub publications_ws: Counter,
    pub publications_http: Counter,
    /// Publications not published again because their idempotency key was seen.
    pub idempotent_duplicates: Counter,
    pub history_reads_ws: Counter,
    /// Server API calls by endpoint and outcome, registered once.
    server_api: std::collections::HashMap<(&'static str, &'static str), Counter>,
    pub history_reads_http: Counter,
    pub deliveries: Counter,
    pub sent_bytes: Counter,
    pub slow_consumers: Counter,
    pub latency: Histogram,
    pub ready: Gauge,
    pub refreshes_ok: Counter,
    pub refreshes_rejected: Counter,
    pub jwks_reloads: Reloads,
    pub rate_limited_ips: Gauge,
}

/// Outcomes of reloading a key file.
#[derive(Clone)]
pub struct Reloads {
    pub ok: Counter,
    pub failed: Counter,
}

impl NodeMetrics {
    /// The counter of server API calls to `endpoint` that ended in `outcome`.
    pub fn server_api(&self, endpoint: &'static str, outcome: &'static str) -> &Counter {
        static NONE: OnceLock<Counter> = OnceLock::new();
        self.server_api.get(&(endpoint, outcome)).unwrap_or_else(|| NONE.get_or_init(Counter::noop))
    }

    pub fn new() -> Self {
        let build_info = metrics::gauge!("fanout_build_info", "version" => env!("CARGO_PKG_VERSION"));
        build_info.set(1.0);
        Self {
            connections: metrics::gauge!("fanout_connections"),
            opened: metrics::counter!("fanout_connections_opened_total"),
            closed: CloseReason::ALL
                .map(|r| metrics::counter!("fanout_connections_closed_total", "reason" => r.as_str())),
            rejected: Rejection::ALL
                .map(|r| metrics::counter!("fanout_upgrade_rejections_total", "reason" => r.as_str())),
            command_errors: ErrorCode::ALL
                .map(|c| metrics::counter!("fanout_command_errors_total", "code" => c.as_str())),
            publications_ws: metrics::counter!("fanout_publications_total", "source" => "ws"),
            publications_http: metrics::counter!("fanout_publications_total", "source" => "http"),
            idempotent_duplicates: metrics::counter!("fanout_idempotent_duplicates_total"),
            history_reads_ws: metrics::counter!("fanout_history_reads_total", "via" => "ws"),
            server_api: ["disconnect", "unsubscribe", "channels", "nodes"]
                .into_iter()
                .flat_map(|e| ["ok", "bad_request", "unavailable"].map(|o| (e, o)))
                .map(|(e, o)| {
                    ((e, o), metrics::counter!("fanout_server_api_calls_total", "endpoint" => e, "outcome" => o))
                })
                .collect(),
            history_reads_http: metrics::counter!("fanout_history_reads_total", "via" => "http"),
            deliveries: metrics::counter!("fanout_deliveries_total"),
            sent_bytes: metrics::counter!("fanout_sent_bytes_total"),
            slow_consumers: metrics::counter!("fanout_slow_consumer_disconnects_total"),
            latency: metrics::histogram!("fanout_delivery_latency_seconds"),
            ready: metrics::gauge!("fanout_ready"),
            refreshes_ok: metrics::counter!("fanout_token_refreshes_total", "result" => "ok"),
            refreshes_rejected: metrics::counter!("fanout_token_refreshes_total", "result" => "rejected"),
            jwks_reloads: Reloads {
                ok: metrics::counter!("fanout_jwks_reloads_total", "result" => "ok"),
                failed: metrics::counter!("fanout_jwks_reloads_total", "result" => "error"),
            },
            rate_limited_ips: metrics::gauge!("fanout_rate_limited_ips"),
        }
    }

    pub fn closed(&self, reason: CloseReason) -> &Counter {
        &self.closed[CloseReason::ALL.iter().position(|r| *r == reason).unwrap_or(0)]
    }

    pub fn rejected(&self, reason: Rejection) -> &Counter {
        &self.rejected[Rejection::ALL.iter().position(|r| *r == reason).unwrap_or(0)]
    }

    pub fn command_error(&self, code: ErrorCode) -> &Counter {
        &self.command_errors[ErrorCode::ALL.iter().position(|c| *c == code).unwrap_or(0)]
    }
}

impl Default for NodeMetrics {
    fn default() -> Self {
        Self::new()
    }
}
