//! The contract between the hub and whatever carries publications between nodes.

use std::{future::Future, pin::Pin};

use fanout_protocol::{ChannelName, HistoryPage, HistoryQuery, Position, Publication};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why the broker could not do what was asked. Every variant means "the broker side
/// failed", never the client: callers map it to `unavailable` / HTTP 503.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    #[error("broker did not answer in time")]
    Timeout,
}

impl BrokerError {
    /// What an untrusted client may be told: no addresses, no Redis or ACL text (those go
    /// to the node's log). A timeout says the outcome is unknown, because it is: the
    /// broker may still deliver what it was handed.
    pub fn client_message(&self) -> &'static str {
        match self {
            BrokerError::Unavailable(_) => "broker unavailable; try again",
            BrokerError::Timeout => "broker did not answer in time; the outcome is unknown",
        }
    }
}

/// What [`Broker::publish`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Published {
    /// The idempotency key was seen on this channel within the window: nothing was
    /// published, and `position` is the first publication's.
    pub duplicate: bool,
    /// Where the publication was stored, in a namespace that keeps history.
    pub position: Option<Position>,
}

/// Carries publications between nodes and keeps the node subscribed to the channels its
/// clients want. Publications that arrive are handed to the [`crate::Registry`] the broker
/// was built with.
///
/// The hub calls `add_interest` when a channel gains its first local subscriber and
/// `remove_interest` when it loses its last, so a broker sees one interest per channel
/// per node however many clients share it.
pub trait Broker: Send + Sync + 'static {
    /// Hands a publication to the broker; `Ok` means the broker accepted it. In a namespace
    /// that keeps history the broker stores it and assigns its offset in the same atomic
    /// step that publishes it.
    ///
    /// With `key`, only if no publication with that key was made on the channel within
    /// [`fanout_protocol::IDEMPOTENCY_WINDOW`]: the check and the publish are one atomic
    /// step wherever the broker keeps its keys (cluster-wide with Redis), so a retry after
    /// a lost answer cannot deliver twice.
    fn publish<'a>(
        &'a self,
        publication: &'a Publication,
        key: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Published, BrokerError>>;

    /// Reads a channel's history: its top, and the publications the query asks for
    /// (none when `since` names another epoch). Only for channels that keep history.
    fn history<'a>(
        &'a self,
        channel: &'a ChannelName,
        query: &'a HistoryQuery,
    ) -> BoxFuture<'a, Result<HistoryPage, BrokerError>>;

    /// The node now wants publications on `channel`. Must not block.
    fn add_interest(&self, channel: &ChannelName);

    /// The node no longer wants publications on `channel`. Must not block.
    fn remove_interest(&self, channel: &ChannelName);

    /// Resolves once publications on `channel` (previously added) reach this node.
    fn ready<'a>(&'a self, channel: &'a ChannelName) -> BoxFuture<'a, Result<(), BrokerError>>;

    /// Whether the broker can currently deliver (drives `/readyz`).
    fn is_up(&self) -> bool;
}
