//! The node-local half of fanout: who is subscribed to what on this node (the
//! [`Registry`]), each connection's byte-bounded [`Outbox`], the [`Broker`] trait that
//! carries publications between nodes, and the [`EmbeddedBroker`] for a single node.
//!
//! Nothing here does network I/O; the server owns sockets and the broker crates own Redis.

mod broker;
mod embedded;
mod history;
mod hub;
mod loglimit;
mod outbox;
mod presence;
mod registry;
mod wakeups;

pub use broker::{BoxFuture, Broker, BrokerError, Control, NodeReport, NodeSelf, Published, MAX_REPORTED_CHANNELS};
pub use embedded::EmbeddedBroker;
pub use history::{Histories, HistoryPolicy};
pub use hub::{Hub, Replay, Subscription};
pub use loglimit::LogLimiter;
pub use outbox::{Order, Outbox, Outgoing, Push, Status};
pub use presence::{EventBudget, LocalPresence, PresencePolicy, Presences, EVENTS_PER_SECOND};
pub use registry::{DeliveryReport, Registry};
