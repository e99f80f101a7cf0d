//! Node configuration: command-line flags, `FANOUT_*` environment variables and a TOML
//! file, merged in that order of precedence and validated before anything is bound.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    str::FromStr as _,
    time::Duration,
};

use clap::{parser::ValueSource, ArgMatches, Args, Command, FromArgMatches, Parser, Subcommand};
use jsonwebtoken::{Algorithm, AlgorithmFamily};
use serde::{Deserialize, Serialize};

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
    pub command: CliCommand,
}

/// What the `fanout` binary was asked to do.
#[derive(Debug, Subcommand)]
pub enum CliCommand {
    /// Run a gateway node.
    Serve(Box<ServeArgs>),
    /// Publish to channels through a node's HTTP API or straight into Redis.
    Publish(crate::cli::PublishArgs),
    /// Subscribe to channels on a node and print what arrives as JSON lines.
    Subscribe(crate::cli::SubscribeArgs),
    /// Read a channel's history through a node's HTTP API (its position, then one JSON line per publication).
    History(crate::cli::HistoryArgs),
    /// Who is subscribed to a channel (its namespace must track presence), one JSON line each.
    Presence(crate::cli::PresenceArgs),
    /// Close every connection of a user (a token's sub) on every node with 4009.
    Disconnect(crate::cli::DisconnectArgs),
    /// List the cluster's channels with their subscriber counts, one JSON line each.
    Channels(crate::cli::ChannelsArgs),
    /// List the cluster's live nodes, one JSON line each.
    Nodes(crate::cli::ApiArgs),
}

/// `fanout serve`'s arguments: the config file, and every setting.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// TOML file holding any of the settings below (flags and environment win over it), plus
    /// the `[auth]` table (algorithms, public_key_file, jwks_file, required, leeway, audience,
    /// issuer) and `[namespaces.NAME]` tables (anonymous_subscribe, client_publish,
    /// max_message_size, publish_rate, publish_burst, history_size, history_ttl); see
    /// docs/security.md and docs/delivery.md.
    #[arg(long, env = "FANOUT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(flatten)]
    pub settings: Settings,
}

fn duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

/// Every node setting, each declared once: its type, its default, its help text, its
/// flag and `FANOUT_*` variable (clap) and its TOML key (serde, the field name). Sources
/// merge flags > environment > file > default by clap's record of where each value came
/// from ([`Config::from_matches`]); `--help`, the README table and the chart are checked
/// against this by `tests/settings.rs`. Adding a setting means adding a field here (and
/// using it).
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Public listener: `GET /ws` and `GET /healthz`
    #[arg(long, env = "FANOUT_PUBLIC_ADDR", value_name = "ADDR", default_value = "0.0.0.0:8080")]
    pub public_addr: SocketAddr,

    /// Internal listener: HTTP publish API, `/metrics`, `/healthz`, `/readyz`
    #[arg(long, env = "FANOUT_INTERNAL_ADDR", value_name = "ADDR", default_value = "0.0.0.0:9090")]
    pub internal_addr: SocketAddr,

    /// Redis URL (`redis://`, `rediss://`), or a comma-separated list of Redis Cluster
    /// nodes. Unset: the embedded single-node broker.
    #[arg(long, env = "FANOUT_REDIS_URL", value_name = "URL")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,

    /// `redis_url` lists the seed nodes of a Redis Cluster: channels ride sharded pub/sub
    /// (SSUBSCRIBE / SPUBLISH) to the master that owns their slot.
    #[arg(long, env = "FANOUT_REDIS_CLUSTER", value_name = "BOOL", default_value = "false", num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub redis_cluster: bool,

    /// Independent Redis servers, comma-separated, used instead of redis_url: each channel
    /// lives on shard key_slot(prefix + channel) % count. Same list, same order, on every node.
    #[arg(long, env = "FANOUT_REDIS_SHARDS", value_name = "URLS", value_delimiter = ',')]
    #[serde(default)]
    pub redis_shards: Vec<String>,

    /// Redis password (overrides one in the URL).
    #[arg(long, env = "FANOUT_REDIS_PASSWORD", value_name = "PASSWORD", hide_env_values = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_password: Option<String>,

    /// Prefix of the Redis channel a fanout channel maps to
    #[arg(long, env = "FANOUT_REDIS_PREFIX", value_name = "PREFIX", default_value = "fanout:")]
    pub redis_prefix: String,

    /// Log filter, RUST_LOG syntax
    #[arg(long, env = "FANOUT_LOG_LEVEL", value_name = "FILTER", default_value = "info")]
    pub log_level: String,

    /// Log format: text or json
    #[arg(long, env = "FANOUT_LOG_FORMAT", value_name = "FORMAT", default_value = "text")]
    pub log_format: LogFormat,

    /// How long a draining node waits for connections to close before exiting
    #[arg(long, env = "FANOUT_DRAIN_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = duration)]
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,

    /// Maximum WebSocket connections; further upgrades get 503
    #[arg(long, env = "FANOUT_MAX_CONNECTIONS", value_name = "N", default_value = "100000")]
    pub max_connections: usize,

    /// Largest accepted client message (one frame, or all fragments together), bytes; larger closes with 1009
    #[arg(long, env = "FANOUT_MAX_MESSAGE_SIZE", value_name = "BYTES", default_value = "65536")]
    pub max_message_size: usize,

    /// Per-connection outbound queue bound, bytes; overflow closes with 4008
    #[arg(long, env = "FANOUT_OUTBOUND_QUEUE_BYTES", value_name = "BYTES", default_value = "1048576")]
    pub outbound_queue_bytes: usize,

    /// Maximum subscriptions per connection
    #[arg(long, env = "FANOUT_MAX_SUBSCRIPTIONS", value_name = "N", default_value = "1000")]
    pub max_subscriptions: usize,

    /// Time allowed for a client to send its HTTP upgrade request, or an API request its body (408)
    #[arg(long, env = "FANOUT_HANDSHAKE_TIMEOUT", value_name = "DURATION", default_value = "10s", value_parser = duration)]
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,

    /// Interval of server Ping frames
    #[arg(long, env = "FANOUT_PING_INTERVAL", value_name = "DURATION", default_value = "25s", value_parser = duration)]
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,

    /// A connection that sends nothing (not even a Pong) for this long is closed, at the next ping
    #[arg(long, env = "FANOUT_IDLE_TIMEOUT", value_name = "DURATION", default_value = "60s", value_parser = duration)]
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,

    /// Largest accepted HTTP API request body, bytes; larger gets 413
    #[arg(long, env = "FANOUT_MAX_HTTP_BODY", value_name = "BYTES", default_value = "1048576")]
    pub max_http_body: usize,

    /// Connections per listener that have not finished their HTTP request (upgrades and API
    /// calls in progress); one address may hold a tenth of them, and when they are all taken
    /// the oldest silent one is dropped for a newcomer
    #[arg(long, env = "FANOUT_MAX_PENDING_CONNECTIONS", value_name = "N", default_value = "10000")]
    pub max_pending_connections: usize,

    /// Largest `data` accepted from Redis (backends publishing straight into it), bytes; larger
    /// publications are dropped and counted. Unset: 65536, or less with a small outbound queue
    #[arg(long, env = "FANOUT_MAX_PUBLICATION_SIZE", value_name = "BYTES")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_publication_size: Option<usize>,

    /// Publications read from Redis and not yet fanned out that a node holds, bytes; beyond
    /// it newer ones are dropped and counted (reason broker_backlog)
    #[arg(long, env = "FANOUT_BROKER_BACKLOG_BYTES", value_name = "BYTES", default_value = "33554432")]
    pub broker_backlog_bytes: usize,

    /// History the embedded broker keeps in memory across all channels, bytes; past it the
    /// oldest publications are forgotten (recovering them gives recovered:false)
    #[arg(long, env = "FANOUT_HISTORY_MAX_BYTES", value_name = "BYTES", default_value = "67108864")]
    pub history_max_bytes: usize,

    /// Serve the demo (a chat and a counter on the JavaScript client) at GET /demo on the
    /// public listener; namespace `demo` then keeps history unless configured
    #[arg(long, env = "FANOUT_DEMO", value_name = "BOOL", default_value = "false", num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub demo: bool,

    /// How long a subscribe or publish may wait for the broker (then 503 / unavailable: outcome unknown)
    #[arg(long, env = "FANOUT_BROKER_TIMEOUT", value_name = "DURATION", default_value = "5s", value_parser = duration)]
    #[serde(with = "humantime_serde")]
    pub broker_timeout: Duration,

    /// API key required as `Authorization: Bearer KEY` on the internal HTTP API.
    #[arg(long, env = "FANOUT_API_KEY", value_name = "KEY", hide_env_values = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,

    /// HS256 secret for connection tokens; turns authentication on (other algorithms and
    /// key files: the config file's `[auth]` table).
    #[arg(long, env = "FANOUT_JWT_HMAC_SECRET", value_name = "SECRET", hide_env_values = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_hmac_secret: Option<String>,

    /// Allowed `Origin` values for browser upgrades, comma-separated (unset: any).
    #[arg(long, env = "FANOUT_ALLOWED_ORIGINS", value_name = "ORIGINS", value_delimiter = ',')]
    #[serde(default)]
    pub allowed_origins: Vec<String>,

    /// New WebSocket connections per second from one client address (IPv6: one /64); over it
    /// upgrades get 429. 0 turns the limit off
    #[arg(long, env = "FANOUT_MAX_CONNECTIONS_PER_IP_PER_SECOND", value_name = "RATE", default_value = "100")]
    pub max_connections_per_ip_per_second: f64,

    /// Connections one client address may open in a burst before its per-second rate applies
    #[arg(long, env = "FANOUT_CONNECTION_RATE_BURST", value_name = "N", default_value = "200")]
    pub connection_rate_burst: u32,

    /// Commands (and Ping/Pong frames) per second one connection may send; over it they get a
    /// rate_limited error, and a client sending over three times the rate is closed with 1008.
    /// 0 turns the limit off
    #[arg(long, env = "FANOUT_COMMAND_RATE", value_name = "RATE", default_value = "100")]
    pub command_rate: f64,

    /// Commands one connection may send in a burst before its per-second rate applies; keep it at
    /// least max_subscriptions so a reconnecting client can resubscribe at once
    #[arg(long, env = "FANOUT_COMMAND_BURST", value_name = "N", default_value = "1000")]
    pub command_burst: u32,

    /// Proxies (addresses or CIDR blocks, comma-separated) whose X-Forwarded-For names the
    /// client for the per-IP limit; connections from anyone else are charged to their own address.
    #[arg(long, env = "FANOUT_TRUSTED_PROXIES", value_name = "CIDRS", value_delimiter = ',')]
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
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
    /// Publications kept per channel for recovery and `history` (0: no history) [default: 0]
    pub history_size: Option<u64>,
    /// How long a channel's history lives after its last publication [default: 10m]
    #[serde(default, with = "humantime_serde")]
    pub history_ttl: Option<Duration>,
    /// Track who is subscribed to each channel (presence, presence_stats) [default: false]
    pub presence: Option<bool>,
    /// Send subscribers join and leave events (needs presence) [default: false]
    pub join_leave: Option<bool>,
    /// How long a presence entry outlives its node's last refresh [default: 60s]
    #[serde(default, with = "humantime_serde")]
    pub presence_ttl: Option<Duration>,
}

/// The namespace the demo page uses (`demo:chat`, `demo:counter`).
pub const DEMO_NAMESPACE: &str = "demo";

/// A namespace's history lives this long after its last publication unless it says.
pub const DEFAULT_HISTORY_TTL: Duration = Duration::from_secs(600);

/// The rule of a namespace nobody configured.
pub const DEFAULT_NAMESPACE_RULE: NamespaceConfig = NamespaceConfig {
    anonymous_subscribe: None,
    client_publish: None,
    max_message_size: None,
    publish_rate: None,
    publish_burst: None,
    history_size: None,
    history_ttl: None,
    presence: None,
    join_leave: None,
    presence_ttl: None,
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

/// A complete, validated node configuration: the merged [`Settings`] (reached through
/// `Deref`, so `config.max_connections` is the setting) and what is derived from them.
#[derive(Debug, Clone)]
pub struct Config {
    pub settings: Settings,
    /// `redis_url` split into its URLs, or `redis_shards`; empty: the embedded broker.
    pub redis_urls: Vec<String>,
    pub redis_topology: fanout_broker_redis::Topology,
    /// `max_publication_size`, or its default for this outbound queue.
    pub publication_limit: usize,
    /// `trusted_proxies`, parsed.
    pub proxies: Vec<IpNet>,
    pub auth: AuthConfig,
    pub namespaces: BTreeMap<String, NamespaceConfig>,
}

impl std::ops::Deref for Config {
    type Target = Settings;

    fn deref(&self) -> &Settings {
        &self.settings
    }
}

/// What a config file holds besides settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTables {
    #[serde(default)]
    auth: Option<AuthFile>,
    #[serde(default)]
    namespaces: BTreeMap<String, NamespaceConfig>,
}

impl Config {
    /// The configuration `fanout serve` was started with: `matches` are its parsed flags and
    /// environment; the file they name (if any) is read and merged under them.
    pub fn load(matches: &ArgMatches) -> Result<Self, ConfigError> {
        let args = ServeArgs::from_arg_matches(matches).map_err(|e| invalid("arguments", e.to_string()))?;
        let (file, path) = match &args.config {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
                let table = toml::from_str::<toml::Table>(&text)
                    .map_err(|e| ConfigError::Parse { path: path.clone(), message: e.to_string() })?;
                (table, path.clone())
            }
            None => (toml::Table::new(), PathBuf::new()),
        };
        Self::merge(&args.settings, matches, file, &path)
    }

    /// As [`Self::load`], from `fanout serve` arguments (`args`, the environment included)
    /// and a file's text: how tests build configurations.
    pub fn from_args(args: &[&str], file: Option<&str>) -> Result<Self, ConfigError> {
        let matches = ServeArgs::augment_args(Command::new("serve").no_binary_name(true))
            .try_get_matches_from(args)
            .map_err(|e| invalid("arguments", e.to_string()))?;
        let settings = ServeArgs::from_arg_matches(&matches).map_err(|e| invalid("arguments", e.to_string()))?.settings;
        let path = PathBuf::from("(test)");
        let table = toml::from_str::<toml::Table>(file.unwrap_or_default())
            .map_err(|e| ConfigError::Parse { path: path.clone(), message: e.to_string() })?;
        Self::merge(&settings, &matches, table, &path)
    }

    /// Flags and environment (`cli`, with clap's record in `matches` of where each value
    /// came from) over the file's settings over the defaults, then derived values, then
    /// validation. Generic over the settings: one serde map, each key taken from the file
    /// unless a flag or the environment gave it.
    fn merge(cli: &Settings, matches: &ArgMatches, mut file: toml::Table, path: &Path) -> Result<Self, ConfigError> {
        let parse = |e: toml::de::Error| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string() };
        let mut tables = toml::Table::new();
        for key in ["auth", "namespaces"] {
            if let Some(value) = file.remove(key) {
                tables.insert(key.into(), value);
            }
        }
        let tables: FileTables = tables.try_into().map_err(parse)?;
        let known: Vec<String> = ServeArgs::augment_args(Command::new("serve"))
            .get_arguments()
            .map(|a| a.get_id().as_str().to_owned())
            .collect();
        let mut merged =
            toml::Table::try_from(cli).map_err(|e| invalid("arguments", format!("cannot merge settings: {e}")))?;
        for (key, value) in file {
            if !known.contains(&key) || key == "config" {
                return Err(ConfigError::Parse {
                    path: path.to_path_buf(),
                    message: format!("unknown setting `{key}`"),
                });
            }
            let given = matches.value_source(&key).is_some_and(|s| s != ValueSource::DefaultValue);
            if !given {
                merged.insert(key, value);
            }
        }
        let mut settings: Settings = merged.try_into().map_err(parse)?;
        for secret in [&mut settings.api_key, &mut settings.jwt_hmac_secret, &mut settings.redis_password] {
            if secret.as_deref() == Some("") {
                *secret = None;
            }
        }
        let auth = resolve_auth(tables.auth.unwrap_or_default(), settings.jwt_hmac_secret.as_deref())?;
        let shards: Vec<String> =
            settings.redis_shards.iter().map(|s| s.trim()).filter(|s| !s.is_empty()).map(String::from).collect();
        if !shards.is_empty() && (settings.redis_url.is_some() || settings.redis_cluster) {
            return Err(invalid("redis_shards", "is used instead of redis_url and redis_cluster: set one of them"));
        }
        if settings.redis_cluster && settings.redis_url.is_none() {
            return Err(invalid("redis_cluster", "needs the cluster's seed nodes in redis_url"));
        }
        let config = Config {
            redis_topology: if !shards.is_empty() {
                fanout_broker_redis::Topology::Shards
            } else if settings.redis_cluster {
                fanout_broker_redis::Topology::Cluster
            } else {
                fanout_broker_redis::Topology::Single
            },
            redis_urls: if shards.is_empty() {
                settings
                    .redis_url
                    .as_deref()
                    .map(|s| s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect())
                    .unwrap_or_default()
            } else {
                shards
            },
            // Unset, it follows a smaller outbound queue down, so a small queue alone is valid.
            publication_limit: settings
                .max_publication_size
                .unwrap_or_else(|| (64 * 1024).min(settings.outbound_queue_bytes.saturating_sub(1024)).max(1)),
            proxies: settings
                .trusted_proxies
                .iter()
                .filter(|s| !s.trim().is_empty())
                .map(|s| s.parse::<IpNet>().map_err(|e| invalid("trusted_proxies", e)))
                .collect::<Result<_, _>>()?,
            auth,
            namespaces: tables.namespaces,
            settings,
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
            topology: self.redis_topology,
            password: self.redis_password.clone(),
            prefix: self.redis_prefix.clone(),
            // The heartbeat and subscribe commands stay short whatever broker_timeout is, so
            // a dead Redis is noticed in seconds; a publish may take all of broker_timeout.
            command_timeout: self.broker_timeout.min(Duration::from_secs(2)),
            publish_timeout: self.broker_timeout,
            max_publication_size: self.publication_limit,
            backlog_bytes: self.broker_backlog_bytes,
            ..fanout_broker_redis::RedisConfig::default()
        })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let urls_key =
            if self.redis_topology == fanout_broker_redis::Topology::Shards { "redis_shards" } else { "redis_url" };
        for url in &self.redis_urls {
            if !["redis://", "rediss://", "redis+unix://", "unix://"].iter().any(|s| url.starts_with(s)) {
                return Err(invalid(urls_key, format!("{url:?} is not a redis://, rediss:// or redis+unix:// URL")));
            }
        }
        // Everything the broker would refuse at start, refused here, before any port is bound.
        if let Some(redis) = self.redis_config() {
            redis.validate().map_err(|e| invalid(urls_key, e.to_string()))?;
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
        if self.publication_limit == 0 || self.publication_limit + 1024 > self.outbound_queue_bytes {
            return Err(invalid(
                "max_publication_size",
                "must be at least 1 and below outbound_queue_bytes by 1 KiB, or one publication overflows every subscriber's queue",
            ));
        }
        if self.broker_backlog_bytes < self.publication_limit {
            return Err(invalid("broker_backlog_bytes", "must hold at least one publication of max_publication_size"));
        }
        if self.history_max_bytes < 1024 {
            return Err(invalid("history_max_bytes", "must be at least 1024 bytes"));
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
        let families = crate::keys::key_families(&settings).map_err(|e| invalid("auth", e.to_string()))?;
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

    /// Which namespaces track presence, for the session and the brokers.
    pub fn presences(&self) -> fanout_hub::Presences {
        fanout_hub::Presences::new(self.namespaces.iter().map(|(name, ns)| {
            let policy = (ns.presence == Some(true)).then(|| fanout_hub::PresencePolicy {
                ttl: ns.presence_ttl.unwrap_or(Duration::from_secs(60)),
                join_leave: ns.join_leave.unwrap_or(false),
            });
            (name.clone(), policy)
        }))
    }

    /// Which namespaces keep history, for the hub and the brokers.
    pub fn histories(&self) -> fanout_hub::Histories {
        let mut namespaces: Vec<(String, fanout_hub::HistoryPolicy)> = self
            .namespaces
            .iter()
            .map(|(name, ns)| {
                let policy = fanout_hub::HistoryPolicy {
                    size: ns.history_size.unwrap_or(0),
                    ttl: ns.history_ttl.unwrap_or(DEFAULT_HISTORY_TTL),
                };
                (name.clone(), policy)
            })
            .collect();
        // The demo's chat recovers what a reconnecting page missed.
        if self.demo && !self.namespaces.contains_key(DEMO_NAMESPACE) {
            let ttl = Duration::from_secs(3600);
            namespaces.push((DEMO_NAMESPACE.into(), fanout_hub::HistoryPolicy { size: 100, ttl }));
        }
        fanout_hub::Histories::new(namespaces)
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
            if ns.history_size.is_some_and(|n| n > fanout_protocol::MAX_HISTORY_LIMIT) {
                return Err(invalid(
                    "namespaces.history_size",
                    format!("[namespaces.{name:?}]: at most {}", fanout_protocol::MAX_HISTORY_LIMIT),
                ));
            }
            if ns.history_ttl.is_some_and(|t| t < Duration::from_secs(1) || t > Duration::from_secs(30 * 86_400)) {
                return Err(invalid(
                    "namespaces.history_ttl",
                    format!("[namespaces.{name:?}]: between 1s and 30 days"),
                ));
            }
            if ns.history_ttl.is_some() && ns.history_size.unwrap_or(0) == 0 {
                return Err(invalid(
                    "namespaces.history_ttl",
                    format!("[namespaces.{name:?}]: set without history_size"),
                ));
            }
            if (ns.join_leave.is_some() || ns.presence_ttl.is_some()) && ns.presence != Some(true) {
                return Err(invalid(
                    "namespaces.presence",
                    format!("[namespaces.{name:?}]: join_leave and presence_ttl need presence = true"),
                ));
            }
            if ns.presence_ttl.is_some_and(|t| t < Duration::from_secs(2) || t > Duration::from_secs(86_400)) {
                return Err(invalid("namespaces.presence_ttl", format!("[namespaces.{name:?}]: between 2s and 1 day")));
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
            let families = crate::keys::key_families(&settings).map_err(|e| invalid("auth", e.to_string()))?;
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

    /// Defaults and a file's text, no flags.
    fn file(toml_text: &str) -> Result<Config, ConfigError> {
        Config::from_args(&[], Some(toml_text))
    }

    #[test]
    fn defaults_are_valid() {
        let c = file("").unwrap();
        assert_eq!(c.public_addr.port(), 8080);
        assert_eq!(c.internal_addr.port(), 9090);
        assert!(c.redis_urls.is_empty());
        assert_eq!(c.max_message_size, 65536);
        assert_eq!(c.outbound_queue_bytes, 1 << 20);
    }

    #[test]
    fn flags_win_over_file() {
        let f = "max_subscriptions = 9\ndrain_timeout = \"2s\"\nredis_url = \"redis://a:1, redis://b:2\"";
        let c = Config::from_args(&["--max-subscriptions", "7"], Some(f)).unwrap();
        assert_eq!(c.max_subscriptions, 7);
        assert_eq!(c.drain_timeout, Duration::from_secs(2));
        assert_eq!(c.redis_urls, ["redis://a:1", "redis://b:2"]);
        // A flag given with its default value still wins over the file.
        let c = Config::from_args(&["--max-subscriptions", "1000"], Some(f)).unwrap();
        assert_eq!(c.max_subscriptions, 1000);
        // Lists and secrets merge the same way.
        let c = Config::from_args(&["--trusted-proxies", "10.0.0.0/8,127.0.0.1"], Some("api_key = \"\"")).unwrap();
        assert_eq!((c.proxies.len(), c.api_key.as_deref()), (2, None));
    }

    #[test]
    fn picks_the_redis_topology() {
        use fanout_broker_redis::Topology;
        let c = file("redis_shards = [\"redis://a:1\", \"redis://b:2\"]").unwrap();
        assert_eq!((c.redis_topology, c.redis_urls.len()), (Topology::Shards, 2));
        let c = Config::from_args(&["--redis-shards", "redis://a:1,redis://b:2,redis://c:3"], None).unwrap();
        assert_eq!((c.redis_topology, c.redis_urls.len()), (Topology::Shards, 3));
        let c = Config::from_args(&["--redis-cluster", "--redis-url", "redis://a:1,redis://b:2"], None).unwrap();
        assert_eq!((c.redis_topology, c.redis_urls.len()), (Topology::Cluster, 2));
        assert_eq!(file("redis_url = \"redis://a:1\"").unwrap().redis_topology, Topology::Single);
        for (f, key) in [
            ("redis_cluster = true", "redis_cluster"),
            ("redis_shards = [\"redis://a:1\"]\nredis_url = \"redis://b:1\"", "redis_shards"),
            ("redis_shards = [\"http://a:1\"]", "redis_shards"),
        ] {
            assert!(matches!(file(f), Err(ConfigError::Invalid { key: k, .. }) if k == key), "{f}");
        }
    }

    #[test]
    fn rejects_bad_values() {
        for f in ["no_such_key = 1", "drain_timeout = \"soon\"", "config = \"x.toml\"", "[no_such_table]"] {
            assert!(matches!(file(f), Err(ConfigError::Parse { .. })), "{f}");
        }
        let e = file("max_conections = 5").unwrap_err().to_string();
        assert!(e.contains("max_conections"), "{e}");
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
            assert!(file(f).is_err(), "{f}");
        }
    }

    fn keys_dir() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/keys")
    }

    #[test]
    fn limits_and_auth_defaults() {
        let c = file("").unwrap();
        assert_eq!((c.max_connections_per_ip_per_second, c.connection_rate_burst), (100.0, 200));
        assert_eq!((c.command_rate, c.command_burst), (100.0, 1000));
        assert!(c.auth_settings().is_none());
        let c = Config::from_args(&["--jwt-hmac-secret", "s", "--command-rate", "0"], None).unwrap();
        assert_eq!(c.auth.algorithms, [Algorithm::HS256]);
        assert!(c.auth.required);
        assert_eq!(c.auth.leeway, Duration::from_secs(5));
        assert_eq!(c.command_rate, 0.0);
    }

    #[test]
    fn auth_table_infers_algorithms_from_keys() {
        let rsa = keys_dir().join("rsa-public.pem");
        let ec = keys_dir().join("ec-public.pem");
        let c =
            file(&format!("[auth]\npublic_key_file = {:?}\nrequired = false\nleeway = \"0s\"", rsa.to_str().unwrap()))
                .unwrap();
        assert_eq!(c.auth.algorithms, [Algorithm::RS256]);
        assert!(!c.auth.required);
        let c = file(&format!("[auth]\npublic_key_file = {:?}", ec.to_str().unwrap())).unwrap();
        assert_eq!(c.auth.algorithms, [Algorithm::ES256]);
        let c = file(&format!(
            "jwt_hmac_secret = \"x\"\n[auth]\nalgorithms = [\"HS512\", \"RS256\"]\npublic_key_file = {rsa:?}"
        ))
        .unwrap();
        assert_eq!(c.auth.algorithms, [Algorithm::HS512, Algorithm::RS256]);
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
            "[namespaces.x]\nhistory_size = 100001".into(),
            "[namespaces.x]\nhistory_size = 10\nhistory_ttl = \"0s\"".into(),
            "[namespaces.x]\nhistory_ttl = \"1m\"".into(),
            "[namespaces.x]\nno_such_rule = true".into(),
            "command_rate = -1".into(),
            "trusted_proxies = [\"10.0.0.0/40\"]".into(),
            "command_rate = 5\ncommand_burst = 0".into(),
            "max_connections_per_ip_per_second = 5\nconnection_rate_burst = 0".into(),
        ] {
            assert!(file(&f).is_err(), "{f}");
        }
        let ok = file(
            "[namespaces.\"\"]\nclient_publish = false\n[namespaces.\"*\"]\n[namespaces.chat]\npublish_rate = 0.5",
        );
        assert_eq!(ok.unwrap().namespaces.len(), 3);
    }
}
