//! Node configuration: command-line flags, `FANOUT_*` environment variables and a TOML
//! file, merged in that order of precedence and validated before anything is bound.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, str::FromStr as _, time::Duration};

use clap::{Args, Parser, Subcommand};
use jsonwebtoken::{Algorithm, AlgorithmFamily};
use serde::Deserialize;

use crate::{
    auth::{self, AuthSettings},
    limit::IpNet,
};

/// A configuration problem; `main` prints it and exits with code 64 (EX_USAGE).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid setting {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, message: message.into() }
}

#[derive(Debug, Parser)]
#[command(name = "fanout", version, about = "fanout: a horizontally scaled WebSocket pub/sub gateway")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a gateway node.
    Serve(Box<ServeArgs>),
    /// Publish to channels through a node's HTTP API or straight into Redis.
    Publish(crate::cli::PublishArgs),
    /// Subscribe to channels on a node and print what arrives as JSON lines.
    Subscribe(crate::cli::SubscribeArgs),
}

/// Every setting is optional here: unset flags fall back to the environment (handled by
/// clap), then to the config file, then to the built-in default.
#[derive(Debug, Default, Args)]
pub struct ServeArgs {
    /// TOML file holding any of the settings below (flags and environment win over it), plus
    /// the `[auth]` table (algorithms, public_key_file, jwks_file, required, leeway, audience,
    /// issuer) and `[namespaces.NAME]` tables (anonymous_subscribe, client_publish,
    /// max_message_size, publish_rate, publish_burst); see docs/security.md.
    #[arg(long, env = "FANOUT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Public listener: `GET /ws` and `GET /healthz` [default: 0.0.0.0:8080]
    #[arg(long, env = "FANOUT_PUBLIC_ADDR", value_name = "ADDR")]
    pub public_addr: Option<SocketAddr>,

    /// Internal listener: HTTP publish API, `/metrics`, `/healthz`, `/readyz` [default: 0.0.0.0:9090]
    #[arg(long, env = "FANOUT_INTERNAL_ADDR", value_name = "ADDR")]
    pub internal_addr: Option<SocketAddr>,

    /// Redis URL (`redis://`, `rediss://`), or a comma-separated list of Redis Cluster
    /// nodes. Unset: the embedded single-node broker.
    #[arg(long, env = "FANOUT_REDIS_URL", value_name = "URL")]
    pub redis_url: Option<String>,

    /// Redis password (overrides one in the URL).
    #[arg(long, env = "FANOUT_REDIS_PASSWORD", value_name = "PASSWORD", hide_env_values = true)]
    pub redis_password: Option<String>,

    /// Prefix of the Redis channel a fanout channel maps to [default: fanout:]
    #[arg(long, env = "FANOUT_REDIS_PREFIX", value_name = "PREFIX")]
    pub redis_prefix: Option<String>,

    /// Log filter, RUST_LOG syntax [default: info]
    #[arg(long, env = "FANOUT_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,

    /// Log format: text or json [default: text]
    #[arg(long, env = "FANOUT_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// How long a draining node waits for connections to close before exiting [default: 30s]
    #[arg(long, env = "FANOUT_DRAIN_TIMEOUT", value_name = "DURATION")]
    pub drain_timeout: Option<humantime::Duration>,

    /// Maximum WebSocket connections; further upgrades get 503 [default: 100000]
    #[arg(long, env = "FANOUT_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,

    /// Largest accepted client message (one frame, or all fragments together), bytes; larger closes with 1009 [default: 65536]
    #[arg(long, env = "FANOUT_MAX_MESSAGE_SIZE", value_name = "BYTES")]
    pub max_message_size: Option<usize>,

    /// Per-connection outbound queue bound, bytes; overflow closes with 4008 [default: 1048576]
    #[arg(long, env = "FANOUT_OUTBOUND_QUEUE_BYTES", value_name = "BYTES")]
    pub outbound_queue_bytes: Option<usize>,

    /// Maximum subscriptions per connection [default: 1000]
    #[arg(long, env = "FANOUT_MAX_SUBSCRIPTIONS", value_name = "N")]
    pub max_subscriptions: Option<usize>,

    /// Time allowed for a client to send its HTTP upgrade request [default: 10s]
    #[arg(long, env = "FANOUT_HANDSHAKE_TIMEOUT", value_name = "DURATION")]
    pub handshake_timeout: Option<humantime::Duration>,

    /// Interval of server Ping frames [default: 25s]
    #[arg(long, env = "FANOUT_PING_INTERVAL", value_name = "DURATION")]
    pub ping_interval: Option<humantime::Duration>,

    /// A connection that sends nothing (not even a Pong) for this long is closed [default: 60s]
    #[arg(long, env = "FANOUT_IDLE_TIMEOUT", value_name = "DURATION")]
    pub idle_timeout: Option<humantime::Duration>,

    /// Connections per listener that have not finished their HTTP request (upgrades and API
    /// calls in progress); one address may hold a tenth of them, and when they are all taken
    /// the oldest silent one is dropped for a newcomer [default: 10000]
    #[arg(long, env = "FANOUT_MAX_PENDING_CONNECTIONS", value_name = "N")]
    pub max_pending_connections: Option<usize>,

    /// Largest `data` accepted from Redis (backends publishing straight into it), bytes; larger
    /// publications are dropped and counted [default: 65536]
    #[arg(long, env = "FANOUT_MAX_PUBLICATION_SIZE", value_name = "BYTES")]
    pub max_publication_size: Option<usize>,

    /// Largest accepted HTTP API request body, bytes; larger gets 413 [default: 1048576]
    #[arg(long, env = "FANOUT_MAX_HTTP_BODY", value_name = "BYTES")]
    pub max_http_body: Option<usize>,

    /// How long a subscribe or publish may wait for the broker [default: 5s]
    #[arg(long, env = "FANOUT_BROKER_TIMEOUT", value_name = "DURATION")]
    pub broker_timeout: Option<humantime::Duration>,

    /// API key required as `Authorization: Bearer KEY` on the internal HTTP API.
    #[arg(long, env = "FANOUT_API_KEY", value_name = "KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// HS256 secret for connection tokens; turns authentication on (other algorithms and
    /// key files: the config file's `[auth]` table).
    #[arg(long, env = "FANOUT_JWT_HMAC_SECRET", value_name = "SECRET", hide_env_values = true)]
    pub jwt_hmac_secret: Option<String>,

    /// New WebSocket connections per second from one client address (IPv6: one /64); over it
    /// upgrades get 429. 0 turns the limit off [default: 100]
    #[arg(long, env = "FANOUT_MAX_CONNECTIONS_PER_IP_PER_SECOND", value_name = "RATE")]
    pub max_connections_per_ip_per_second: Option<f64>,

    /// Connections one client address may open in a burst before its per-second rate applies [default: 200]
    #[arg(long, env = "FANOUT_CONNECTION_RATE_BURST", value_name = "N")]
    pub connection_rate_burst: Option<u32>,

    /// Commands per second one connection may send; over it they get a rate_limited error, and
    /// a client sending over three times the rate is closed with 1008. 0 turns the limit off [default: 100]
    #[arg(long, env = "FANOUT_COMMAND_RATE", value_name = "RATE")]
    pub command_rate: Option<f64>,

    /// Commands one connection may send in a burst before its per-second rate applies; keep it at
    /// least max_subscriptions so a reconnecting client can resubscribe at once [default: 1000]
    #[arg(long, env = "FANOUT_COMMAND_BURST", value_name = "N")]
    pub command_burst: Option<u32>,

    /// Proxies (addresses or CIDR blocks, comma-separated) whose X-Forwarded-For names the
    /// client for the per-IP limit; connections from anyone else are charged to their own address.
    #[arg(long, env = "FANOUT_TRUSTED_PROXIES", value_name = "CIDRS", value_delimiter = ',')]
    pub trusted_proxies: Option<Vec<String>>,

    /// Allowed `Origin` values for browser upgrades, comma-separated (unset: any).
    #[arg(long, env = "FANOUT_ALLOWED_ORIGINS", value_name = "ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// The TOML file: the same keys as the flags, in snake_case.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub public_addr: Option<SocketAddr>,
    pub internal_addr: Option<SocketAddr>,
    pub redis_url: Option<String>,
    pub redis_password: Option<String>,
    pub redis_prefix: Option<String>,
    pub log_level: Option<String>,
    pub log_format: Option<LogFormat>,
    #[serde(default, with = "humantime_serde")]
    pub drain_timeout: Option<Duration>,
    pub max_connections: Option<usize>,
    pub max_message_size: Option<usize>,
    pub outbound_queue_bytes: Option<usize>,
    pub max_subscriptions: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub handshake_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub ping_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    pub max_http_body: Option<usize>,
    pub max_pending_connections: Option<usize>,
    pub max_publication_size: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub broker_timeout: Option<Duration>,
    pub api_key: Option<String>,
    pub jwt_hmac_secret: Option<String>,
    pub allowed_origins: Option<Vec<String>>,
    pub max_connections_per_ip_per_second: Option<f64>,
    pub connection_rate_burst: Option<u32>,
    pub command_rate: Option<f64>,
    pub command_burst: Option<u32>,
    pub trusted_proxies: Option<Vec<String>>,
    pub auth: Option<AuthFile>,
    #[serde(default)]
    pub namespaces: BTreeMap<String, NamespaceConfig>,
}

/// The `[auth]` table.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFile {
    /// Accepted `alg` values; default: what the configured keys can verify (HS256 for the
    /// secret, RS256, ES256 or EdDSA for public keys).
    pub algorithms: Option<Vec<String>>,
    /// PEM public key (RSA, EC or Ed25519).
    pub public_key_file: Option<PathBuf>,
    /// JWKS document, re-read when its modification time or size changes.
    pub jwks_file: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    pub jwks_reload_interval: Option<Duration>,
    /// Whether a token is required (default when a key is configured) or optional.
    pub required: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    pub leeway: Option<Duration>,
    pub audience: Option<String>,
    pub issuer: Option<String>,
}

/// A `[namespaces.NAME]` table. `NAME` is the part of a channel name before its first `:`;
/// `""` is the namespace of names without one, `"*"` applies to every namespace not listed.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceConfig {
    /// Anonymous connections (auth on, token optional, none given) may subscribe [default: false]
    pub anonymous_subscribe: Option<bool>,
    /// WebSocket clients may publish here at all (tokens still need a matching pattern) [default: true]
    pub client_publish: Option<bool>,
    /// Largest `data` a client may publish here, bytes (at most the global max_message_size).
    pub max_message_size: Option<usize>,
    /// Publications per second one connection may make here (token bucket).
    pub publish_rate: Option<f64>,
    /// Burst of that bucket [default: publish_rate rounded up].
    pub publish_burst: Option<u32>,
}

/// The rule of a namespace nobody configured.
pub const DEFAULT_NAMESPACE_RULE: NamespaceConfig = NamespaceConfig {
    anonymous_subscribe: None,
    client_publish: None,
    max_message_size: None,
    publish_rate: None,
    publish_burst: None,
};

/// Resolved `[auth]` settings (the HMAC secret stays in [`Config::jwt_hmac_secret`]).
#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub algorithms: Vec<Algorithm>,
    pub public_key_file: Option<PathBuf>,
    pub jwks_file: Option<PathBuf>,
    pub jwks_reload_interval: Duration,
    pub required: bool,
    pub leeway: Duration,
    pub audience: Option<String>,
    pub issuer: Option<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            algorithms: Vec::new(),
            public_key_file: None,
            jwks_file: None,
            jwks_reload_interval: Duration::from_secs(5),
            required: true,
            leeway: Duration::from_secs(5),
            audience: None,
            issuer: None,
        }
    }
}

/// A complete, validated node configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub public_addr: SocketAddr,
    pub internal_addr: SocketAddr,
    /// Empty: the embedded broker.
    pub redis_urls: Vec<String>,
    pub redis_password: Option<String>,
    pub redis_prefix: String,
    pub log_level: String,
    pub log_format: LogFormat,
    pub drain_timeout: Duration,
    pub max_connections: usize,
    pub max_message_size: usize,
    pub outbound_queue_bytes: usize,
    pub max_subscriptions: usize,
    pub handshake_timeout: Duration,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    pub max_http_body: usize,
    pub max_pending_connections: usize,
    pub max_publication_size: usize,
    pub broker_timeout: Duration,
    pub api_key: Option<String>,
    pub jwt_hmac_secret: Option<String>,
    pub allowed_origins: Vec<String>,
    /// 0: no per-IP limit.
    pub max_connections_per_ip_per_second: f64,
    pub connection_rate_burst: u32,
    /// 0: no per-connection command limit.
    pub command_rate: f64,
    pub command_burst: u32,
    pub trusted_proxies: Vec<IpNet>,
    pub auth: AuthConfig,
    pub namespaces: BTreeMap<String, NamespaceConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            public_addr: ([0, 0, 0, 0], 8080).into(),
            internal_addr: ([0, 0, 0, 0], 9090).into(),
            redis_urls: Vec::new(),
            redis_password: None,
            redis_prefix: "fanout:".into(),
            log_level: "info".into(),
            log_format: LogFormat::Text,
            drain_timeout: Duration::from_secs(30),
            max_connections: 100_000,
            max_message_size: 64 * 1024,
            outbound_queue_bytes: 1024 * 1024,
            max_subscriptions: 1000,
            handshake_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(60),
            max_http_body: 1024 * 1024,
            max_pending_connections: 10_000,
            max_publication_size: 64 * 1024,
            broker_timeout: Duration::from_secs(5),
            api_key: None,
            jwt_hmac_secret: None,
            allowed_origins: Vec::new(),
            max_connections_per_ip_per_second: 100.0,
            connection_rate_burst: 200,
            command_rate: 100.0,
            command_burst: 1000,
            trusted_proxies: Vec::new(),
            auth: AuthConfig::default(),
            namespaces: BTreeMap::new(),
        }
    }
}

impl Config {
    /// Merges flags/environment over the file over the defaults, then validates.
    pub fn load(args: ServeArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
                toml::from_str::<FileConfig>(&text)
                    .map_err(|e| ConfigError::Parse { path: path.clone(), message: e.to_string() })?
            }
            None => FileConfig::default(),
        };
        Self::merge(args, file)
    }

    pub fn merge(a: ServeArgs, f: FileConfig) -> Result<Self, ConfigError> {
        let d = Config::default();
        let dur = |x: Option<humantime::Duration>| x.map(Duration::from);
        let redis_url = a.redis_url.or(f.redis_url);
        let jwt_hmac_secret = a.jwt_hmac_secret.or(f.jwt_hmac_secret).filter(|s| !s.is_empty());
        let auth = resolve_auth(f.auth.unwrap_or_default(), jwt_hmac_secret.as_deref())?;
        let config = Config {
            public_addr: a.public_addr.or(f.public_addr).unwrap_or(d.public_addr),
            internal_addr: a.internal_addr.or(f.internal_addr).unwrap_or(d.internal_addr),
            redis_urls: redis_url
                .as_deref()
                .map(|s| s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect())
                .unwrap_or_default(),
            redis_password: a.redis_password.or(f.redis_password).filter(|s| !s.is_empty()),
            redis_prefix: a.redis_prefix.or(f.redis_prefix).unwrap_or(d.redis_prefix),
            log_level: a.log_level.or(f.log_level).unwrap_or(d.log_level),
            log_format: a.log_format.or(f.log_format).unwrap_or(d.log_format),
            drain_timeout: dur(a.drain_timeout).or(f.drain_timeout).unwrap_or(d.drain_timeout),
            max_connections: a.max_connections.or(f.max_connections).unwrap_or(d.max_connections),
            max_message_size: a.max_message_size.or(f.max_message_size).unwrap_or(d.max_message_size),
            outbound_queue_bytes: a.outbound_queue_bytes.or(f.outbound_queue_bytes).unwrap_or(d.outbound_queue_bytes),
            max_subscriptions: a.max_subscriptions.or(f.max_subscriptions).unwrap_or(d.max_subscriptions),
            handshake_timeout: dur(a.handshake_timeout).or(f.handshake_timeout).unwrap_or(d.handshake_timeout),
            ping_interval: dur(a.ping_interval).or(f.ping_interval).unwrap_or(d.ping_interval),
            idle_timeout: dur(a.idle_timeout).or(f.idle_timeout).unwrap_or(d.idle_timeout),
            max_http_body: a.max_http_body.or(f.max_http_body).unwrap_or(d.max_http_body),
            max_pending_connections: a
                .max_pending_connections
                .or(f.max_pending_connections)
                .unwrap_or(d.max_pending_connections),
            // Unset, it follows a smaller outbound queue down, so a small queue alone is valid.
            max_publication_size: a.max_publication_size.or(f.max_publication_size).unwrap_or_else(|| {
                let queue = a.outbound_queue_bytes.or(f.outbound_queue_bytes).unwrap_or(d.outbound_queue_bytes);
                d.max_publication_size.min(queue.saturating_sub(1024)).max(1)
            }),
            broker_timeout: dur(a.broker_timeout).or(f.broker_timeout).unwrap_or(d.broker_timeout),
            api_key: a.api_key.or(f.api_key).filter(|s| !s.is_empty()),
            jwt_hmac_secret,
            allowed_origins: a.allowed_origins.or(f.allowed_origins).unwrap_or_default(),
            max_connections_per_ip_per_second: a
                .max_connections_per_ip_per_second
                .or(f.max_connections_per_ip_per_second)
                .unwrap_or(d.max_connections_per_ip_per_second),
            connection_rate_burst: a
                .connection_rate_burst
                .or(f.connection_rate_burst)
                .unwrap_or(d.connection_rate_burst),
            command_rate: a.command_rate.or(f.command_rate).unwrap_or(d.command_rate),
            command_burst: a.command_burst.or(f.command_burst).unwrap_or(d.command_burst),
            trusted_proxies: a
                .trusted_proxies
                .or(f.trusted_proxies)
                .unwrap_or_default()
                .iter()
                .filter(|s| !s.trim().is_empty())
                .map(|s| s.parse::<IpNet>().map_err(|e| invalid("trusted_proxies", e)))
                .collect::<Result<_, _>>()?,
            auth,
            namespaces: f.namespaces,
        };
        config.validate()?;
        Ok(config)
    }

    /// The Redis broker's settings, or `None` for the embedded broker.
    pub fn redis_config(&self) -> Option<fanout_broker_redis::RedisConfig> {
        if self.redis_urls.is_empty() {
            return None;
        }
        Some(fanout_broker_redis::RedisConfig {
            urls: self.redis_urls.clone(),
            password: self.redis_password.clone(),
            prefix: self.redis_prefix.clone(),
            // The heartbeat and subscribe commands stay short whatever broker_timeout is, so
            // a dead Redis is noticed in seconds; a publish may take all of broker_timeout.
            command_timeout: self.broker_timeout.min(Duration::from_secs(2)),
            publish_timeout: self.broker_timeout,
            max_publication_size: self.max_publication_size,
            ..fanout_broker_redis::RedisConfig::default()
        })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        for url in &self.redis_urls {
            if !["redis://", "rediss://", "redis+unix://", "unix://"].iter().any(|s| url.starts_with(s)) {
                return Err(invalid("redis_url", format!("{url:?} is not a redis://, rediss:// or redis+unix:// URL")));
            }
        }
        // Everything the broker would refuse at start, refused here, before any port is bound.
        if let Some(redis) = self.redis_config() {
            redis.validate().map_err(|e| invalid("redis_url", e.to_string()))?;
        }
        if self.redis_urls.is_empty() && self.redis_password.is_some() {
            return Err(invalid("redis_password", "set without redis_url"));
        }
        if self.redis_prefix.len() > 64 || self.redis_prefix.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid("redis_prefix", "at most 64 characters, no whitespace"));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log_level).is_err() {
            return Err(invalid("log_level", format!("{:?} is not a valid filter", self.log_level)));
        }
        let nonzero = [
            ("drain_timeout", self.drain_timeout),
            ("handshake_timeout", self.handshake_timeout),
            ("ping_interval", self.ping_interval),
            ("idle_timeout", self.idle_timeout),
            ("broker_timeout", self.broker_timeout),
        ];
        for (key, d) in nonzero {
            if d.is_zero() {
                return Err(invalid(key, "must be greater than zero"));
            }
        }
        if self.idle_timeout <= self.ping_interval {
            return Err(invalid(
                "idle_timeout",
                "must be longer than ping_interval, or idle clients that answer pings are cut off",
            ));
        }
        if self.max_connections == 0 {
            return Err(invalid("max_connections", "must be at least 1"));
        }
        if !(128..=(64 << 20)).contains(&self.max_message_size) {
            return Err(invalid("max_message_size", "must be between 128 bytes and 64 MiB"));
        }
        if self.outbound_queue_bytes < self.max_message_size + 1024 {
            return Err(invalid(
                "outbound_queue_bytes",
                "must exceed max_message_size by at least 1 KiB, or one large message overflows the queue",
            ));
        }
        if self.max_subscriptions == 0 {
            return Err(invalid("max_subscriptions", "must be at least 1"));
        }
        if self.max_pending_connections == 0 {
            return Err(invalid("max_pending_connections", "must be at least 1"));
        }
        if self.max_publication_size == 0 || self.max_publication_size + 1024 > self.outbound_queue_bytes {
            return Err(invalid(
                "max_publication_size",
                "must be at least 1 and below outbound_queue_bytes by 1 KiB, or one publication overflows every subscriber's queue",
            ));
        }
        if self.max_http_body < 64 {
            return Err(invalid("max_http_body", "must be at least 64 bytes"));
        }
        if let Some(o) = self.allowed_origins.iter().find(|o| o.trim().is_empty() || o.contains(char::is_whitespace)) {
            return Err(invalid("allowed_origins", format!("{o:?} is not an origin")));
        }
        let rates = [
            ("max_connections_per_ip_per_second", self.max_connections_per_ip_per_second, self.connection_rate_burst),
            ("command_rate", self.command_rate, self.command_burst),
        ];
        for (key, rate, burst) in rates {
            if !rate.is_finite() || rate < 0.0 {
                return Err(invalid(key, "must be a number of at least 0 (0 turns the limit off)"));
            }
            if rate > 0.0 && burst == 0 {
                return Err(invalid(key, "its burst must be at least 1"));
            }
        }
        self.validate_auth()?;
        self.validate_namespaces()
    }

    /// The token verification settings, when authentication is on.
    pub fn auth_settings(&self) -> Option<AuthSettings> {
        let a = &self.auth;
        if self.jwt_hmac_secret.is_none() && a.public_key_file.is_none() && a.jwks_file.is_none() {
            return None;
        }
        Some(AuthSettings {
            algorithms: a.algorithms.clone(),
            hmac_secret: self.jwt_hmac_secret.clone(),
            public_key_file: a.public_key_file.clone(),
            jwks_file: a.jwks_file.clone(),
            leeway: a.leeway,
            audience: a.audience.clone(),
            issuer: a.issuer.clone(),
        })
    }

    fn validate_auth(&self) -> Result<(), ConfigError> {
        let Some(settings) = self.auth_settings() else { return Ok(()) };
        let families = auth::key_families(&settings).map_err(|e| invalid("auth", e.to_string()))?;
        if settings.algorithms.is_empty() {
            return Err(invalid("auth.algorithms", "must name at least one algorithm"));
        }
        for alg in &settings.algorithms {
            if !families.contains(&alg.family()) {
                return Err(invalid(
                    "auth.algorithms",
                    format!("{alg:?} is accepted but no configured key verifies it"),
                ));
            }
        }
        for family in &families {
            if !settings.algorithms.iter().any(|a| a.family() == *family) {
                return Err(invalid(
                    "auth.algorithms",
                    format!("a {family:?} key is configured but no algorithm uses it"),
                ));
            }
        }
        if self.auth.jwks_reload_interval.is_zero() {
            return Err(invalid("auth.jwks_reload_interval", "must be greater than zero"));
        }
        if self.auth.leeway > Duration::from_secs(300) {
            return Err(invalid("auth.leeway", "at most 5 minutes"));
        }
        Ok(())
    }

    fn validate_namespaces(&self) -> Result<(), ConfigError> {
        for (name, ns) in &self.namespaces {
            let ok_name = name == "*"
                || name.is_empty()
                || (!name.contains(':') && fanout_protocol::ChannelName::validate(name).is_ok());
            if !ok_name {
                return Err(invalid("namespaces", format!("{name:?} is not a namespace (channel characters, no ':')")));
            }
            if ns.max_message_size.is_some_and(|m| m == 0 || m > self.max_message_size) {
                return Err(invalid(
                    "namespaces.max_message_size",
                    format!(
                        "[namespaces.{name:?}]: must be between 1 and max_message_size ({})",
                        self.max_message_size
                    ),
                ));
            }
            if ns.publish_rate.is_some_and(|r| !r.is_finite() || r <= 0.0) {
                return Err(invalid("namespaces.publish_rate", format!("[namespaces.{name:?}]: must be above 0")));
            }
            if ns.publish_burst == Some(0) {
                return Err(invalid("namespaces.publish_burst", format!("[namespaces.{name:?}]: must be at least 1")));
            }
            if ns.publish_burst.is_some() && ns.publish_rate.is_none() {
                return Err(invalid(
                    "namespaces.publish_burst",
                    format!("[namespaces.{name:?}]: set without publish_rate"),
                ));
            }
        }
        Ok(())
    }
}

/// Resolves the `[auth]` table: algorithm names, and the defaults that depend on which
/// keys are configured.
fn resolve_auth(f: AuthFile, hmac_secret: Option<&str>) -> Result<AuthConfig, ConfigError> {
    let d = AuthConfig::default();
    let any_key = hmac_secret.is_some() || f.public_key_file.is_some() || f.jwks_file.is_some();
    let configured = f.algorithms.is_some()
        || f.required.is_some()
        || f.leeway.is_some()
        || f.audience.is_some()
        || f.issuer.is_some()
        || f.jwks_reload_interval.is_some();
    if configured && !any_key {
        return Err(invalid("auth", "set without a key: add jwt_hmac_secret, auth.public_key_file or auth.jwks_file"));
    }
    let algorithms = match f.algorithms {
        Some(names) => names
            .iter()
            .map(|n| match Algorithm::from_str(n) {
                Ok(a) if auth::SUPPORTED.contains(&a) => Ok(a),
                _ => Err(invalid("auth.algorithms", format!("{n:?} is not one of {:?}", auth::SUPPORTED))),
            })
            .collect::<Result<Vec<_>, _>>()?,
        None if any_key => {
            let settings = AuthSettings {
                algorithms: Vec::new(),
                hmac_secret: hmac_secret.map(String::from),
                public_key_file: f.public_key_file.clone(),
                jwks_file: f.jwks_file.clone(),
                leeway: Duration::ZERO,
                audience: None,
                issuer: None,
            };
            let families = auth::key_families(&settings).map_err(|e| invalid("auth", e.to_string()))?;
            let mut algorithms = Vec::new();
            for family in families {
                let alg = match family {
                    AlgorithmFamily::Hmac => Algorithm::HS256,
                    AlgorithmFamily::Rsa => Algorithm::RS256,
                    AlgorithmFamily::Ec => Algorithm::ES256,
                    AlgorithmFamily::Ed => Algorithm::EdDSA,
                };
                if !algorithms.contains(&alg) {
                    algorithms.push(alg);
                }
            }
            algorithms
        }
        None => Vec::new(),
    };
    Ok(AuthConfig {
        algorithms,
        public_key_file: f.public_key_file,
        jwks_file: f.jwks_file,
        jwks_reload_interval: f.jwks_reload_interval.unwrap_or(d.jwks_reload_interval),
        required: f.required.unwrap_or(d.required),
        leeway: f.leeway.unwrap_or(d.leeway),
        audience: f.audience,
        issuer: f.issuer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(toml_text: &str) -> FileConfig {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::merge(ServeArgs::default(), FileConfig::default()).unwrap();
        assert_eq!(c.public_addr.port(), 8080);
        assert_eq!(c.internal_addr.port(), 9090);
        assert!(c.redis_urls.is_empty());
        assert_eq!(c.max_message_size, 65536);
        assert_eq!(c.outbound_queue_bytes, 1 << 20);
    }

    #[test]
    fn flags_win_over_file() {
        let args = ServeArgs { max_subscriptions: Some(7), ..Default::default() };
        let f = file("max_subscriptions = 9\ndrain_timeout = \"2s\"\nredis_url = \"redis://a:1, redis://b:2\"");
        let c = Config::merge(args, f).unwrap();
        assert_eq!(c.max_subscriptions, 7);
        assert_eq!(c.drain_timeout, Duration::from_secs(2));
        assert_eq!(c.redis_urls, ["redis://a:1", "redis://b:2"]);
    }

    #[test]
    fn rejects_bad_values() {
        assert!(toml::from_str::<FileConfig>("no_such_key = 1").is_err());
        assert!(toml::from_str::<FileConfig>("drain_timeout = \"soon\"").is_err());
        for f in [
            "redis_url = \"http://x\"",
            "ping_interval = \"90s\"",
            "max_message_size = 10",
            "outbound_queue_bytes = 65536",
            "drain_timeout = \"0s\"",
            "max_connections = 0",
            "log_level = \"[[[\"",
            "redis_password = \"x\"",
        ] {
            assert!(Config::merge(ServeArgs::default(), file(f)).is_err(), "{f}");
        }
    }

    fn keys_dir() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/keys")
    }

    #[test]
    fn limits_and_auth_defaults() {
        let c = Config::merge(ServeArgs::default(), FileConfig::default()).unwrap();
        assert_eq!((c.max_connections_per_ip_per_second, c.connection_rate_burst), (100.0, 200));
        assert_eq!((c.command_rate, c.command_burst), (100.0, 1000));
        assert!(c.auth_settings().is_none());
        let args = ServeArgs { jwt_hmac_secret: Some("s".into()), command_rate: Some(0.0), ..Default::default() };
        let c = Config::merge(args, FileConfig::default()).unwrap();
        assert_eq!(c.auth.algorithms, [Algorithm::HS256]);
        assert!(c.auth.required);
        assert_eq!(c.auth.leeway, Duration::from_secs(5));
        assert_eq!(c.command_rate, 0.0);
    }

    #[test]
    fn auth_table_infers_algorithms_from_keys() {
        let rsa = keys_dir().join("rsa-public.pem");
        let ec = keys_dir().join("ec-public.pem");
        let f =
            file(&format!("[auth]\npublic_key_file = {:?}\nrequired = false\nleeway = \"0s\"", rsa.to_str().unwrap()));
        let c = Config::merge(ServeArgs::default(), f).unwrap();
        assert_eq!(c.auth.algorithms, [Algorithm::RS256]);
        assert!(!c.auth.required);
        let f = file(&format!("[auth]\npublic_key_file = {:?}", ec.to_str().unwrap()));
        assert_eq!(Config::merge(ServeArgs::default(), f).unwrap().auth.algorithms, [Algorithm::ES256]);
        let f = file(&format!(
            "jwt_hmac_secret = \"x\"\n[auth]\nalgorithms = [\"HS512\", \"RS256\"]\npublic_key_file = {rsa:?}"
        ));
        assert_eq!(
            Config::merge(ServeArgs::default(), f).unwrap().auth.algorithms,
            [Algorithm::HS512, Algorithm::RS256]
        );
    }

    #[test]
    fn rejects_bad_auth_and_namespaces() {
        let rsa = keys_dir().join("rsa-public.pem");
        let rsa = rsa.to_str().unwrap();
        for f in [
            "[auth]\nrequired = true".to_owned(),
            "jwt_hmac_secret = \"x\"\n[auth]\nalgorithms = [\"none\"]".into(),
            "jwt_hmac_secret = \"x\"\n[auth]\nalgorithms = [\"RS256\"]".into(),
            "jwt_hmac_secret = \"x\"\n[auth]\nalgorithms = []".into(),
            format!("[auth]\nalgorithms = [\"ES256\"]\npublic_key_file = {rsa:?}"),
            format!("jwt_hmac_secret = \"x\"\n[auth]\nalgorithms = [\"HS256\"]\npublic_key_file = {rsa:?}"),
            "[auth]\npublic_key_file = \"/nonexistent/key.pem\"".into(),
            format!("[auth]\njwks_file = {rsa:?}"),
            "jwt_hmac_secret = \"x\"\n[auth]\nleeway = \"1h\"".into(),
            "[namespaces.\"a:b\"]".into(),
            "[namespaces.\"a b\"]".into(),
            "[namespaces.x]\nmax_message_size = 0".into(),
            "[namespaces.x]\nmax_message_size = 100000".into(),
            "[namespaces.x]\npublish_rate = 0".into(),
            "[namespaces.x]\npublish_rate = 1\npublish_burst = 0".into(),
            "[namespaces.x]\npublish_burst = 3".into(),
            "[namespaces.x]\nno_such_rule = true".into(),
            "command_rate = -1".into(),
            "trusted_proxies = [\"10.0.0.0/40\"]".into(),
            "command_rate = 5\ncommand_burst = 0".into(),
            "max_connections_per_ip_per_second = 5\nconnection_rate_burst = 0".into(),
        ] {
            let parsed = toml::from_str::<FileConfig>(&f);
            assert!(parsed.is_err() || Config::merge(ServeArgs::default(), parsed.unwrap()).is_err(), "{f}");
        }
        let ok = file(
            "[namespaces.\"\"]\nclient_publish = false\n[namespaces.\"*\"]\n[namespaces.chat]\npublish_rate = 0.5",
        );
        assert_eq!(Config::merge(ServeArgs::default(), ok).unwrap().namespaces.len(), 3);
    }
}
