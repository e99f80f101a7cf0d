//! The publisher's error type and the retry classification callers rely on.

use std::time::Duration;

use fanout_protocol::ChannelError;

/// Why a publication was not accepted. [`PublishError::is_retryable`] tells whether trying
/// the same request again later can succeed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The channel name breaks the contract's rule; nothing was sent.
    #[error("invalid channel name {channel:?}: {source}")]
    InvalidChannel {
        channel: String,
        #[source]
        source: ChannelError,
    },
    /// The value could not be serialised; nothing was sent.
    #[error("cannot encode data as {enc}: {message}")]
    Encode { enc: &'static str, message: String },
    /// The gateway (or Redis) refused the request for a reason that the same request
    /// will meet again: malformed body, bad API key, too large, a Redis error reply.
    /// `status` is the HTTP status, `None` when Redis answered; `code` is the gateway's
    /// error code (`bad_request`, `unauthorized`, …) or Redis's (`NOAUTH`, …).
    #[error("{}", rejected(*status, code, message))]
    Rejected { status: Option<u16>, code: String, message: String },
    /// The gateway answered 503 (broker down, node draining) or 429/502/504, or the
    /// connection failed. `status` is `None` for connection-level failures.
    #[error("unavailable{}: {reason}", status.map(|s| format!(" (HTTP {s})")).unwrap_or_default())]
    Unavailable { status: Option<u16>, reason: String },
    /// No answer within the configured timeout. The publication may or may not have
    /// been accepted, so retrying it can deliver it twice.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The publisher was configured with something unusable (a malformed URL, say).
    #[error("invalid publisher configuration: {0}")]
    Config(String),
}

fn rejected(status: Option<u16>, code: &str, message: &str) -> String {
    match status {
        Some(status) => format!("rejected with HTTP {status}: {code}: {message}"),
        None => format!("rejected by Redis: {code}: {message}"),
    }
}

impl PublishError {
    /// True for failures that may pass on a later attempt (unavailability, timeouts);
    /// false for those that will fail the same way again.
    pub fn is_retryable(&self) -> bool {
        matches!(self, PublishError::Unavailable { .. } | PublishError::Timeout(_))
    }

    /// The HTTP status the gateway answered with, when there was one.
    pub fn status(&self) -> Option<u16> {
        match self {
            PublishError::Rejected { status, .. } | PublishError::Unavailable { status, .. } => *status,
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_classification() {
        let unavailable = PublishError::Unavailable { status: Some(503), reason: "unavailable: broker down".into() };
        assert!(unavailable.is_retryable());
        assert_eq!(unavailable.status(), Some(503));
        assert!(PublishError::Timeout(Duration::from_secs(1)).is_retryable());
        let rejected = PublishError::Rejected { status: Some(400), code: "bad_request".into(), message: "nope".into() };
        assert!(!rejected.is_retryable());
        assert_eq!(rejected.to_string(), "rejected with HTTP 400: bad_request: nope");
        assert!(!PublishError::InvalidChannel { channel: "a b".into(), source: ChannelError::BadChar }.is_retryable());
        assert!(!PublishError::Encode { enc: "json", message: "x".into() }.is_retryable());
        assert!(!PublishError::Config("x".into()).is_retryable());
        let redis = PublishError::Rejected { status: None, code: "NOAUTH".into(), message: "auth".into() };
        assert_eq!(redis.to_string(), "rejected by Redis: NOAUTH: auth");
        assert_eq!(
            PublishError::Unavailable { status: None, reason: "refused".into() }.to_string(),
            "unavailable: refused"
        );
    }
}
