//! The contract between the hub and whatever carries publications between nodes.

use std::{future::Future, pin::Pin, sync::Arc};

use fanout_protocol::{ChannelName, HistoryPage, HistoryQuery, Position, PresenceList, PresenceStats, Publication};

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

/// A server-API action every node carries out on its own connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Close every connection of `user` with 4009.
    Disconnect { user: String },
    /// Remove `channel` from every connection of `user`.
    Unsubscribe { user: String, channel: ChannelName },
}

/// What a node reports about itself (`GET /api/nodes`, `GET /api/channels`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeReport {
    pub id: String,
    pub version: String,
    pub uptime_s: u64,
    pub connections: u64,
    pub subscriptions: u64,
    /// Channels with local subscribers and how many, largest first, at most
    /// [`MAX_REPORTED_CHANNELS`].
    pub channels: Vec<(String, u64)>,
    /// How many channels the node has, reported or not.
    pub channel_count: u64,
}

/// Channels one node reports at most (the largest): a report is refreshed every second.
pub const MAX_REPORTED_CHANNELS: usize = 10_000;

/// The node the broker runs in: who it is, how to read its figures, and what to do with a
/// [`Control`] message meant for its connections.
#[derive(Clone)]
pub struct NodeSelf {
    pub report: Arc<dyn Fn() -> NodeReport + Send + Sync>,
    pub control: Arc<dyn Fn(&Control) + Send + Sync>,
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

    /// Hands many publications (each with its idempotency key) to the broker at once; one
    /// result per publication, in order. Publications of one channel are published in the
    /// order given. The default publishes them one after the other; a broker that can send
    /// them together (one Redis pipeline) does.
    fn publish_batch<'a>(
        &'a self,
        batch: &'a [(Publication, Option<String>)],
    ) -> BoxFuture<'a, Vec<Result<Published, BrokerError>>> {
        Box::pin(async move {
            let mut results = Vec::with_capacity(batch.len());
            for (publication, key) in batch {
                results.push(self.publish(publication, key.as_deref()).await);
            }
            results
        })
    }

    /// Reads a channel's history: its top, and the publications the query asks for
    /// (none when `since` names another epoch). Only for channels that keep history.
    fn history<'a>(
        &'a self,
        channel: &'a ChannelName,
        query: &'a HistoryQuery,
    ) -> BoxFuture<'a, Result<HistoryPage, BrokerError>>;

    /// Client `client` of user `user` joined `channel` (a namespace with presence). Must
    /// not block: the broker records it in the background.
    fn presence_join(&self, channel: &ChannelName, client: &str, user: &str);

    /// Client `client` left `channel`. Must not block.
    fn presence_leave(&self, channel: &ChannelName, client: &str);

    /// Who is present on `channel`, cluster-wide (at most [`fanout_protocol::MAX_PRESENCE_LIST`]).
    fn presence<'a>(&'a self, channel: &'a ChannelName) -> BoxFuture<'a, Result<PresenceList, BrokerError>>;

    /// How many connections and distinct users are present on `channel`, cluster-wide.
    fn presence_stats<'a>(&'a self, channel: &'a ChannelName) -> BoxFuture<'a, Result<PresenceStats, BrokerError>>;

    /// Tells every node (this one included) to act on `control`. `Ok` means every node
    /// connected to the broker will: with Redis, the control channel's `PUBLISH` was taken.
    fn control<'a>(&'a self, control: &'a Control) -> BoxFuture<'a, Result<(), BrokerError>>;

    /// Every live node's report (a node that stopped reporting drops out within seconds).
    fn nodes(&self) -> BoxFuture<'_, Result<Vec<NodeReport>, BrokerError>>;

    /// Called once at start, before the node serves.
    fn set_node(&self, node: NodeSelf);

    /// The node now wants publications on `channel`. Must not block.
    fn add_interest(&self, channel: &ChannelName);

    /// The node no longer wants publications on `channel`. Must not block.
    fn remove_interest(&self, channel: &ChannelName);

    /// Resolves once publications on `channel` (previously added) reach this node.
    fn ready<'a>(&'a self, channel: &'a ChannelName) -> BoxFuture<'a, Result<(), BrokerError>>;

    /// Whether the broker can currently deliver (drives `/readyz`).
    fn is_up(&self) -> bool;

    /// Of several Redis shards, the indexes of those that are down while the broker as a
    /// whole is up (their channels alone are unavailable); `/readyz` names them.
    fn shards_down(&self) -> Vec<usize> {
        Vec::new()
    }
}
