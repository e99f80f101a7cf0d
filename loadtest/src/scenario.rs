//! Scenarios: the TOML files in `loadtest/scenarios/` (compiled in, so the binary runs
//! anywhere), the subscription layout they describe, and the expected-delivery arithmetic.

use std::{path::Path, time::Duration};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// How publications reach the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Transport {
    /// `{"op":"publish"}` frames on WebSocket publisher connections.
    #[default]
    Ws,
    /// `POST /api/publish` on a node's internal listener.
    Http,
    /// `PUBLISH` of envelopes straight into Redis.
    Redis,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Scenario {
    #[serde(default)]
    pub description: String,
    pub subscribers: usize,
    #[serde(default = "one")]
    pub channels: usize,
    #[serde(default = "one")]
    pub channels_per_subscriber: usize,
    /// Publications per second over all channels; 0 holds connections idle.
    #[serde(default)]
    pub rate: f64,
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// Size of each publication's `data` in bytes (padded; at least the bare fields).
    #[serde(default = "default_payload")]
    pub payload: usize,
    #[serde(default)]
    pub transport: Transport,
    /// Extra connections per second that connect, subscribe, hold and leave.
    #[serde(default)]
    pub churn_rate: f64,
    #[serde(default = "default_churn_hold", with = "humantime_serde")]
    pub churn_hold: Duration,
    /// Recovery scenario: each subscriber disconnects this often and comes back with
    /// `since` (needs a history namespace).
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub recover_every: Option<Duration>,
    /// How long a recovering subscriber stays away.
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub recover_away: Option<Duration>,
    /// Reconnect storm: every subscriber on the first node, which is then drained; they
    /// all move to the next node (see `storm.rs`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub storm: bool,
}

fn one() -> usize {
    1
}

fn default_payload() -> usize {
    64
}

fn default_churn_hold() -> Duration {
    Duration::from_secs(1)
}

const BUILTIN: &[(&str, &str)] = &[
    ("broadcast", include_str!("../scenarios/broadcast.toml")),
    ("rooms", include_str!("../scenarios/rooms.toml")),
    ("multi", include_str!("../scenarios/multi.toml")),
    ("idle", include_str!("../scenarios/idle.toml")),
    ("churn", include_str!("../scenarios/churn.toml")),
    ("recovery", include_str!("../scenarios/recovery.toml")),
    ("storm", include_str!("../scenarios/storm.toml")),
];

/// The compiled-in scenarios as `(name, description)`.
pub(crate) fn builtin() -> Vec<(&'static str, String)> {
    BUILTIN
        .iter()
        .map(|(name, text)| (*name, toml::from_str::<Scenario>(text).map(|s| s.description).unwrap_or_default()))
        .collect()
}

/// Loads a scenario by name (`DIR/NAME.toml` when `dir` is given and has it, else the
/// built-in one) or by path (anything ending in `.toml`).
pub(crate) fn load(name: &str, dir: Option<&Path>) -> anyhow::Result<Scenario> {
    let text = if name.ends_with(".toml") {
        std::fs::read_to_string(name).with_context(|| format!("reading scenario {name}"))?
    } else if let Some(path) = dir.map(|d| d.join(format!("{name}.toml"))).filter(|p| p.exists()) {
        std::fs::read_to_string(&path).with_context(|| format!("reading scenario {}", path.display()))?
    } else if let Some((_, text)) = BUILTIN.iter().find(|(n, _)| *n == name) {
        (*text).to_owned()
    } else {
        let names: Vec<_> = BUILTIN.iter().map(|(n, _)| *n).collect();
        bail!("unknown scenario {name:?}: built-in ones are {}, or give a path to a .toml file", names.join(", "));
    };
    toml::from_str(&text).with_context(|| format!("parsing scenario {name}"))
}

impl Scenario {
    pub(crate) fn validate(&self) -> anyhow::Result<()> {
        if self.channels == 0 {
            bail!("channels must be at least 1");
        }
        if self.channels_per_subscriber == 0 || self.channels_per_subscriber > self.channels {
            bail!("channels_per_subscriber must be between 1 and channels ({})", self.channels);
        }
        if !(self.rate >= 0.0 && self.rate.is_finite()) {
            bail!("rate must be a non-negative number");
        }
        if !(self.churn_rate >= 0.0 && self.churn_rate.is_finite()) {
            bail!("churn_rate must be a non-negative number");
        }
        Ok(())
    }

    /// Channel indices subscriber `i` subscribes to: `(i*K + k) % C` for `k < K`. With
    /// K = 1 this is room `i % C`; the K values are distinct because K ≤ C.
    pub(crate) fn channels_of(&self, i: usize) -> Vec<u32> {
        let (c, k) = (self.channels, self.channels_per_subscriber);
        (0..k).map(|j| ((i * k + j) % c) as u32).collect()
    }

    /// Publications in the run: `rate × duration`.
    pub(crate) fn publications(&self) -> u64 {
        (self.rate * self.duration.as_secs_f64()).round() as u64
    }

    /// The channel index publication `seq` goes to; subscribers rely on the same rule to
    /// know a delivery's channel without reading its name.
    pub(crate) fn channel_of_seq(seq: u64, channels: usize) -> u32 {
        (seq % channels as u64) as u32
    }

    /// Subscribers per channel index, from the layout.
    pub(crate) fn subscribers_per_channel(&self) -> Vec<u64> {
        let mut per = vec![0u64; self.channels];
        for i in 0..self.subscribers {
            for c in self.channels_of(i) {
                per[c as usize] += 1;
            }
        }
        per
    }
}

/// The wire name of channel index `c` in run `run`: its own namespace, and a run id so
/// runs against the same cluster do not hear each other.
pub(crate) fn channel_name(run: &str, c: u32) -> String {
    format!("loadtest:{run}:{c}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_parse_and_validate() {
        for (name, text) in BUILTIN {
            let s: Scenario = toml::from_str(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            s.validate().unwrap();
            assert!(!s.description.is_empty(), "{name}");
        }
        let b = load("broadcast", None).unwrap();
        assert_eq!((b.subscribers, b.channels, b.payload), (2000, 1, 64));
        let r = load("rooms", None).unwrap();
        assert_eq!((r.channels, r.subscribers / r.channels, r.rate), (200, 20, 1000.0));
        assert_eq!(load("idle", None).unwrap().rate, 0.0);
        assert!(load("churn", None).unwrap().churn_rate > 0.0);
        assert!(load("nope", None).is_err());
    }

    #[test]
    fn layouts() {
        let mut s = load("rooms", None).unwrap();
        assert_eq!(s.channels_of(0), [0]);
        assert_eq!(s.channels_of(201), [1]);
        assert!(s.subscribers_per_channel().iter().all(|n| *n == 20));
        s.channels = 10;
        s.channels_per_subscriber = 3;
        s.subscribers = 7;
        assert_eq!(s.channels_of(3), [9, 0, 1]);
        assert_eq!(s.subscribers_per_channel().iter().sum::<u64>(), 21);
        s.channels_per_subscriber = 11;
        assert!(s.validate().is_err());
    }

    #[test]
    fn unknown_fields_are_errors() {
        assert!(toml::from_str::<Scenario>("subscribers = 1\nduration = \"1s\"\nsubscriber = 2").is_err());
        let s: Scenario = toml::from_str("subscribers = 1\nduration = \"1s\"").unwrap();
        assert_eq!((s.channels, s.transport, s.publications()), (1, Transport::Ws, 0));
    }

    #[test]
    fn dir_overrides_builtin_and_paths_load() {
        let dir = std::env::temp_dir().join(format!("lt-scen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("broadcast.toml"), "subscribers = 3\nduration = \"2s\"\nrate = 5").unwrap();
        let s = load("broadcast", Some(&dir)).unwrap();
        assert_eq!((s.subscribers, s.publications()), (3, 10));
        let s = load(dir.join("broadcast.toml").to_str().unwrap(), None).unwrap();
        assert_eq!(s.subscribers, 3);
        assert_eq!(load("rooms", Some(&dir)).unwrap().channels, 200);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
