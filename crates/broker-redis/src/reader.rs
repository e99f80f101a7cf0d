//! The pub/sub reader: every message Redis pushes becomes a delivery to the local registry,
//! in the order Redis sent them; anything that is not a valid publication is dropped.

use std::{
    fmt::Display,
    sync::{Arc, PoisonError},
    time::{Duration, Instant},
};

use bytes::Bytes;
use fanout_protocol::{decode_envelope, ChannelName, Publication};
use futures_util::StreamExt;
use redis::aio::PubSubStream;

use crate::broker::Shared;

/// At most one warning per this long about invalid publications, so a misbehaving
/// backend cannot flood the log.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Reads until the connection closes. Delivering inline, rather than queueing for another
/// task, is what keeps publications in Redis order.
pub(crate) async fn run(shared: Arc<Shared>, mut stream: PubSubStream) {
    while let Some(msg) = stream.next().await {
        shared.on_message(msg.get_channel_name(), msg.get_payload_bytes());
    }
}

impl Shared {
    pub(crate) fn on_message(&self, redis_channel: &str, payload: &[u8]) {
        let Some(name) = redis_channel.strip_prefix(self.config.prefix.as_str()) else {
            return self.invalid(redis_channel, &"channel lacks the configured prefix");
        };
        let channel = match self.known_channel(name) {
            Some(c) => c,
            // Only for messages racing a SUBSCRIBE or UNSUBSCRIBE: validate and allocate.
            None => match ChannelName::new(name) {
                Ok(c) => c,
                Err(e) => return self.invalid(redis_channel, &e),
            },
        };
        let (ts, enc, data) = match decode_envelope(payload) {
            Ok(envelope) => envelope,
            Err(e) => return self.invalid(redis_channel, &e),
        };
        self.metrics.received.increment(1);
        self.registry.deliver(&Publication { channel, ts, enc, data: Bytes::copy_from_slice(data) });
    }

    /// The subscribed channel's name, shared rather than copied.
    fn known_channel(&self, name: &str) -> Option<ChannelName> {
        self.active.read().unwrap_or_else(PoisonError::into_inner).get(name).cloned()
    }

    fn invalid(&self, redis_channel: &str, reason: &dyn Display) {
        self.metrics.invalid_envelope.increment(1);
        let suppressed = self.invalid_log.lock().unwrap_or_else(PoisonError::into_inner).allow(Instant::now());
        if let Some(suppressed) = suppressed {
            let channel: String = redis_channel.chars().take(300).collect();
            tracing::warn!(channel, error = %reason, suppressed, "dropped an invalid publication from Redis");
        }
    }
}

/// Decides which warnings are logged: one per [`WARN_EVERY`], carrying how many were
/// suppressed since the last.
#[derive(Default)]
pub(crate) struct WarnLimiter {
    last: Option<Instant>,
    suppressed: u64,
}

impl WarnLimiter {
    /// `Some(suppressed since the last logged one)` if this one is to be logged.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        if self.last.is_some_and(|last| now.duration_since(last) < WARN_EVERY) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_warning_per_window_with_a_count() {
        let mut l = WarnLimiter::default();
        let t0 = Instant::now();
        assert_eq!(l.allow(t0), Some(0));
        for i in 1..=5 {
            assert_eq!(l.allow(t0 + Duration::from_secs(i)), None);
        }
        assert_eq!(l.allow(t0 + WARN_EVERY), Some(5));
        assert_eq!(l.allow(t0 + WARN_EVERY + Duration::from_secs(1)), None);
        assert_eq!(l.allow(t0 + WARN_EVERY * 3), Some(1));
    }
}
