//! Why a Redis broker could not be started.

/// The configuration cannot work; nothing about whether Redis is reachable (that is only
/// ever known at run time, and reported through [`crate::RedisBroker::status`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedisBrokerError {
    #[error("no Redis URL configured")]
    NoUrl,
    /// `url` is shown with its credentials masked.
    #[error("invalid Redis URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("invalid Redis broker setting: {0}")]
    InvalidConfig(&'static str),
    #[error("the Redis broker must be started from inside a Tokio runtime")]
    NoRuntime,
}
