//! The fanout gateway node: configuration, the public WebSocket listener and its
//! sessions, the internal HTTP API and metrics, and the drain on shutdown.
//!
//! `main` parses and validates a [`Config`], installs logging, and calls [`run`] with a
//! future that resolves when the node should drain.

pub mod api;
pub mod auth;
pub mod channelset;
pub mod cli;
pub mod config;
pub mod connection;
pub mod keys;
pub mod limit;
pub mod listener;
pub mod metrics;
pub mod policy;
pub mod public;
pub mod session;
pub mod wsframe;

use std::{
    future::Future,
    sync::{atomic::AtomicBool, Arc},
    time::Duration,
};

use anyhow::Context as _;
use fanout_hub::{Broker, EmbeddedBroker, Hub, Registry};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use config::{Config, ConfigError};

/// A node id unique in the cluster for its lifetime: the process id and start time hashed
/// with std's `RandomState`, whose keys come from the OS's randomness (no random crate
/// needed for 64 bits nobody else will have).
fn node_id() -> String {
    use std::hash::{BuildHasher, RandomState};
    let seed = (std::process::id(), fanout_protocol::now_micros());
    format!("{:016x}", RandomState::new().hash_one(seed))
}

/// Connections the kernel may hold completed but not yet accepted (capped by
/// `net.core.somaxconn`). A reconnect storm (every client of a drained node arriving at
/// once) overflows a small backlog, and a dropped SYN costs its client a 1 s retransmit.
const LISTEN_BACKLOG: u32 = 65_535;

/// A listening socket with [`LISTEN_BACKLOG`] (std and tokio ask for 128 / 1024).
fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    // As std does on Unix: a restarted node can bind while old connections linger in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Runs a node until `shutdown` resolves, then drains: `/readyz` turns 503, new upgrades
/// are refused, every session closes with 1001, and this returns once they are gone or
/// `drain_timeout` has passed.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let prometheus = metrics::install();
    let m = Arc::new(metrics::NodeMetrics::new());
    let background = CancellationToken::new();
    let _stop_background = background.clone().drop_guard();

    // Everything that reads files or can refuse the configuration happens before any port
    // is bound, and fails as a configuration error (exit 64).
    let verifier = match config.auth_settings() {
        Some(settings) => Some(Arc::new(
            auth::Verifier::new(&settings).map_err(|e| ConfigError::Invalid { key: "auth", message: e.to_string() })?,
        )),
        None => None,
    };
    let registry = Arc::new(Registry::new());
    let histories = Arc::new(config.histories());
    let presences = Arc::new(config.presences());
    let broker: Arc<dyn Broker> = match config.redis_config() {
        None => Arc::new(
            EmbeddedBroker::with_history(registry.clone(), histories.clone(), config.history_max_bytes)
                .with_presence(presences.clone()),
        ),
        Some(redis) => fanout_broker_redis::start(
            redis,
            registry.clone(),
            histories.clone(),
            presences.clone(),
            background.child_token(),
        )
        .map_err(|e| ConfigError::Invalid { key: "redis_url", message: e.to_string() })?,
    };
    let node_id = node_id();
    let hub = Hub::with_history(registry, broker, histories, config.broker_timeout);
    spawn_upkeep(prometheus.clone(), background.clone());

    let public =
        bind(config.public_addr).with_context(|| format!("binding the public listener on {}", config.public_addr))?;
    let internal = bind(config.internal_addr)
        .with_context(|| format!("binding the internal listener on {}", config.internal_addr))?;
    let (public_addr, internal_addr) = (public.local_addr()?, internal.local_addr()?);
    if config.api_key.is_none() && !internal_addr.ip().is_loopback() {
        tracing::warn!(%internal_addr, "no api_key is set and the internal listener is not on loopback: anyone who can reach it can publish");
    }
    if let Some(verifier) = &verifier {
        if config.jwt_hmac_secret.as_ref().is_some_and(|s| s.len() < 32) {
            tracing::warn!("jwt_hmac_secret is shorter than 32 bytes: HS256 secrets that short can be brute-forced");
        }
        tokio::spawn(keys::watch_jwks(
            verifier.clone(),
            config.auth.jwks_reload_interval,
            background.child_token(),
            m.jwks_reloads.clone(),
        ));
        tracing::info!(algorithms = ?config.auth.algorithms, required = config.auth.required, "connection tokens are verified");
    }

    let draining = Arc::new(AtomicBool::new(false));
    let sessions = TaskTracker::new();
    let http = TaskTracker::new();
    let stop_public = CancellationToken::new();
    let stop_internal = CancellationToken::new();

    let session_shared = Arc::new(session::SessionContext {
        hub: hub.clone(),
        live: session::Live::default(),
        metrics: m.clone(),
        limits: session::Limits {
            max_message_size: config.max_message_size,
            outbound_queue_bytes: config.outbound_queue_bytes,
            max_subscriptions: config.max_subscriptions,
            ping_interval: config.ping_interval,
            idle_timeout: config.idle_timeout,
            command_rate: (config.command_rate > 0.0)
                .then(|| limit::Rate::new(config.command_rate, config.command_burst)),
        },
        policy: policy::Policy::new(&config.namespaces, config.max_message_size),
        verifier,
        presences,
        node_id: node_id.clone().into(),
    });
    let public_handler = Arc::new(public::Public {
        shared: session_shared.clone(),
        draining: draining.clone(),
        sessions: Arc::new(Semaphore::new(config.max_connections)),
        tracker: sessions.clone(),
        allowed_origins: config.allowed_origins.clone(),
        demo: config.demo,
        auth_required: config.auth.required,
        ip_limiter: (config.max_connections_per_ip_per_second > 0.0)
            .then(|| limit::IpRateLimiter::new(config.max_connections_per_ip_per_second, config.connection_rate_burst)),
        trusted_proxies: limit::TrustedProxies::new(config.proxies.clone()),
    });
    // The server API: this node's report, and what to do with a control message.
    tracing::info!(node = %node_id, "node id");
    let started = std::time::Instant::now();
    let (registry, live_for_report, live_for_control) =
        (hub.registry().clone(), session_shared.clone(), session_shared.clone());
    hub.set_node(fanout_hub::NodeSelf {
        report: Arc::new(move || {
            let (channels, channel_count, subscriptions) = registry.channel_counts(fanout_hub::MAX_REPORTED_CHANNELS);
            fanout_hub::NodeReport {
                id: node_id.clone(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                uptime_s: started.elapsed().as_secs(),
                connections: live_for_report.live.connections() as u64,
                subscriptions,
                channels,
                channel_count,
            }
        }),
        control: Arc::new(move |control| {
            live_for_control.live.apply(control);
        }),
    });
    let internal_handler = Arc::new(api::Internal {
        hub,
        metrics: m.clone(),
        prometheus,
        process: {
            let collector = metrics_process::Collector::default();
            collector.describe();
            collector
        },
        draining: draining.clone(),
        api_key: config.api_key.clone(),
        max_body: config.max_http_body,
        body_timeout: config.handshake_timeout,
        max_message_size: config.max_message_size,
        presences: session_shared.presences.clone(),
    });
    let accept = |name, header_timeout| listener::Accept {
        name,
        max_connections: config.max_pending_connections,
        header_timeout,
        trusted_proxies: limit::TrustedProxies::new(config.proxies.clone()),
    };
    let public_loop = tokio::spawn(listener::accept_loop(
        public,
        accept("public", config.handshake_timeout),
        public_handler,
        stop_public.clone(),
        http.clone(),
    ));
    let internal_loop = tokio::spawn(listener::accept_loop(
        internal,
        accept("internal", config.handshake_timeout),
        internal_handler,
        stop_internal.clone(),
        http.clone(),
    ));

    tracing::info!("listening public={public_addr} internal={internal_addr}");
    shutdown.await;

    tracing::info!(drain_timeout = ?config.drain_timeout, "draining");
    let deadline = tokio::time::Instant::now() + config.drain_timeout;
    draining.store(true, std::sync::atomic::Ordering::SeqCst);
    m.ready.set(0.0);
    stop_public.cancel();
    session_shared.live.drain_all();
    sessions.close();
    let _ = public_loop.await;
    if tokio::time::timeout_at(deadline, sessions.wait()).await.is_err() {
        tracing::warn!(open = sessions.len(), "drain timeout reached with sessions still open");
    }
    stop_internal.cancel();
    let _ = internal_loop.await;
    http.close();
    let _ = tokio::time::timeout_at(deadline, http.wait()).await;
    tracing::info!("drained");
    Ok(())
}

/// The Prometheus recorder needs periodic upkeep (histogram maintenance) when it is not
/// running its own HTTP listener.
fn spawn_upkeep(handle: metrics_exporter_prometheus::PrometheusHandle, stop: CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => handle.run_upkeep(),
            }
        }
    });
}
