//! Node configuration: command-line flags, `FANOUT_*` environment variables and a TOML
//! file, merged in that order of precedence and validated before anything is bound.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

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
    /// TOML file holding any of the settings below (flags and environment win over it).
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

    /// Largest accepted HTTP API request body, bytes; larger gets 413 [default: 1048576]
    #[arg(long, env = "FANOUT_MAX_HTTP_BODY", value_name = "BYTES")]
    pub max_http_body: Option<usize>,

    /// How long a subscribe or publish may wait for the broker [default: 5s]
    #[arg(long, env = "FANOUT_BROKER_TIMEOUT", value_name = "DURATION")]
    pub broker_timeout: Option<humantime::Duration>,

    /// API key required as `Authorization: Bearer KEY` on the internal HTTP API.
    #[arg(long, env = "FANOUT_API_KEY", value_name = "KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// HS256 secret for connection tokens; turns authentication on.
    #[arg(long, env = "FANOUT_JWT_HMAC_SECRET", value_name = "SECRET", hide_env_values = true)]
    pub jwt_hmac_secret: Option<String>,

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
    #[serde(default, with = "humantime_serde")]
    pub broker_timeout: Option<Duration>,
    pub api_key: Option<String>,
    pub jwt_hmac_secret: Option<String>,
    pub allowed_origins: Option<Vec<String>>,
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
    pub broker_timeout: Duration,
    pub api_key: Option<String>,
    pub jwt_hmac_secret: Option<String>,
    pub allowed_origins: Vec<String>,
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
            broker_timeout: Duration::from_secs(5),
            api_key: None,
            jwt_hmac_secret: None,
            allowed_origins: Vec::new(),
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
            broker_timeout: dur(a.broker_timeout).or(f.broker_timeout).unwrap_or(d.broker_timeout),
            api_key: a.api_key.or(f.api_key).filter(|s| !s.is_empty()),
            jwt_hmac_secret: a.jwt_hmac_secret.or(f.jwt_hmac_secret).filter(|s| !s.is_empty()),
            allowed_origins: a.allowed_origins.or(f.allowed_origins).unwrap_or_default(),
        };
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        for url in &self.redis_urls {
            if !["redis://", "rediss://", "redis+unix://", "unix://"].iter().any(|s| url.starts_with(s)) {
                return Err(invalid("redis_url", format!("{url:?} is not a redis://, rediss:// or redis+unix:// URL")));
            }
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
        if self.max_http_body < 64 {
            return Err(invalid("max_http_body", "must be at least 64 bytes"));
        }
        if let Some(o) = self.allowed_origins.iter().find(|o| o.trim().is_empty() || o.contains(char::is_whitespace)) {
            return Err(invalid("allowed_origins", format!("{o:?} is not an origin")));
        }
        Ok(())
    }
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
}
