//! Node-level continuity of history channels: the last position this node delivered on
//! each history channel it is subscribed to, and what it does when the next publication
//! does not follow it — drops a duplicate, fills a gap from the channel's history, or
//! tells subscribers to resync. After a pub/sub reconnect, [`BrokerState::catch_up`]
//! delivers what was published while the node was not subscribed, before live traffic.
//!
//! Why here and not in each session: a node's subscribers all share its one pub/sub
//! subscription, so they all miss the same publications when it breaks; one history read
//! per channel mends every one of them.

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
};

use fanout_hub::HistoryPolicy;
use fanout_protocol::{ChannelName, HistoryQuery, Position, Publication};
use futures_util::StreamExt;

use crate::broker::BrokerState;

/// Channels caught up at once after a reconnect (their history reads are in flight
/// together on the command connection; each channel's publications stay in order).
const CATCH_UP_CONCURRENCY: usize = 32;

#[derive(Default)]
struct Track {
    /// The last publication delivered on this node.
    delivered: Option<Position>,
    /// Before any delivery: the lowest top a local subscriber's history read returned.
    /// Everything after it is owed to some subscriber.
    observed: Option<Position>,
}

impl Track {
    fn expected(&self) -> Option<&Position> {
        self.delivered.as_ref().or(self.observed.as_ref())
    }

    fn deliver(&mut self, p: &Position) {
        self.delivered = Some(p.clone());
        self.observed = None;
    }
}

/// What to do with a stored publication arriving live.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Deliver,
    /// Already delivered (the catch-up or a gap fill got it first).
    Duplicate,
    /// Publications between the expected position and this one are missing.
    Gap(Position),
    /// The channel's history was lost: its epoch changed.
    NewEpoch,
}

/// The last position delivered on each history channel the node is subscribed to.
#[derive(Default)]
pub(crate) struct Positions {
    tracks: Mutex<HashMap<ChannelName, Track>>,
}

impl Positions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ChannelName, Track>> {
        self.tracks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A local subscriber's history read returned `top`.
    pub(crate) fn observe(&self, channel: &ChannelName, top: &Position) {
        let mut tracks = self.lock();
        let track = tracks.entry(channel.clone()).or_default();
        if track.delivered.is_some() {
            return;
        }
        match &track.observed {
            Some(o) if o.epoch == top.epoch && o.offset <= top.offset => {}
            _ => track.observed = Some(top.clone()),
        }
    }

    /// Judges `p` and, when it is to be delivered, records it as delivered.
    pub(crate) fn check(&self, channel: &ChannelName, p: &Position) -> Verdict {
        let mut tracks = self.lock();
        let track = tracks.entry(channel.clone()).or_default();
        let verdict = match track.expected() {
            None => Verdict::Deliver,
            Some(e) if e.epoch != p.epoch => Verdict::NewEpoch,
            Some(e) if p.offset <= e.offset => return Verdict::Duplicate,
            Some(e) if p.offset == e.offset + 1 => Verdict::Deliver,
            Some(e) => return Verdict::Gap(e.clone()),
        };
        track.deliver(p);
        verdict
    }

    /// Records `p` as delivered if it comes after what was; false when it does not.
    pub(crate) fn advance(&self, channel: &ChannelName, p: &Position) -> bool {
        let mut tracks = self.lock();
        let track = tracks.entry(channel.clone()).or_default();
        let after = track.expected().is_none_or(|e| e.epoch != p.epoch || p.offset > e.offset);
        if after {
            track.deliver(p);
        }
        after
    }

    /// Records `top` as delivered unconditionally (after a resync).
    pub(crate) fn reset(&self, channel: &ChannelName, top: &Position) {
        self.lock().entry(channel.clone()).or_default().deliver(top);
    }

    pub(crate) fn forget(&self, channel: &ChannelName) {
        self.lock().remove(channel);
    }

    pub(crate) fn retain(&self, keep: impl Fn(&ChannelName) -> bool) {
        self.lock().retain(|c, _| keep(c));
    }

    /// [`Self::expected`] of these channels only (those the node tracks).
    fn expected_of(&self, channels: &[ChannelName]) -> Vec<(ChannelName, Position)> {
        let tracks = self.lock();
        channels.iter().filter_map(|c| tracks.get(c)?.expected().map(|p| (c.clone(), p.clone()))).collect()
    }

    fn expected(&self) -> Vec<(ChannelName, Position)> {
        self.lock().iter().filter_map(|(c, t)| t.expected().map(|p| (c.clone(), p.clone()))).collect()
    }
}

impl BrokerState {
    /// Delivers a stored publication that arrived live, in order after what this node
    /// delivered on its channel.
    pub(crate) async fn sequence(&self, p: Publication, policy: HistoryPolicy) {
        let Some(position) = p.position.clone() else { return self.deliver_live(&p) };
        match self.positions.check(&p.channel, &position) {
            Verdict::Deliver => self.deliver_live(&p),
            Verdict::Duplicate => self.metrics.duplicates_dropped.increment(1),
            Verdict::NewEpoch => {
                let top = Position { offset: position.offset.saturating_sub(1), epoch: position.epoch.clone() };
                self.resync(&p.channel, &top);
                self.deliver_live(&p);
            }
            Verdict::Gap(expected) => {
                self.metrics.gaps.increment(1);
                if self.fill(&p.channel, &expected, policy).await.is_err() {
                    let top = Position { offset: position.offset.saturating_sub(1), epoch: position.epoch.clone() };
                    self.resync(&p.channel, &top);
                    self.positions.reset(&p.channel, &top);
                }
                if self.positions.advance(&p.channel, &position) {
                    self.deliver_live(&p);
                }
            }
        }
    }

    fn deliver_live(&self, p: &Publication) {
        self.registry.deliver(p);
    }

    fn resync(&self, channel: &ChannelName, top: &Position) {
        self.metrics.resyncs.increment(1);
        let told = self.registry.resync(channel, top);
        if let Some(suppressed) = self.resync_log.check() {
            tracing::warn!(%channel, epoch = %top.epoch, offset = top.offset, subscribers = told, suppressed,
                "publications on a history channel may have been lost; subscribers were told to resync");
        }
    }

    /// Reads `channel`'s history after `from` and delivers it. `Err(top)` when the gap
    /// cannot be filled (another epoch, publications trimmed or expired, Redis failed):
    /// nothing was delivered, and `top` is the channel's position when known.
    async fn fill(
        &self,
        channel: &ChannelName,
        from: &Position,
        policy: HistoryPolicy,
    ) -> Result<(), Option<Position>> {
        let query = HistoryQuery { since: Some(from.clone()), limit: None };
        let page = match self.publisher.history(self, channel, &query, policy).await {
            Ok(page) => page,
            Err(e) => {
                tracing::warn!(%channel, error = %e, "could not read a history channel's gap");
                return Err(None);
            }
        };
        self.deliver_page(channel, from, page)
    }

    fn deliver_page(
        &self,
        channel: &ChannelName,
        from: &Position,
        page: fanout_protocol::HistoryPage,
    ) -> Result<(), Option<Position>> {
        if !page.continues_from(from) {
            return Err(Some(page.top));
        }
        for p in &page.publications {
            if let Some(pos) = &p.position {
                if self.positions.advance(channel, pos) {
                    self.metrics.caught_up.increment(1);
                    self.registry.deliver(p);
                }
            }
        }
        Ok(())
    }

    /// After a pub/sub reconnect (every wanted channel subscribed again): for every history
    /// channel with local subscribers, delivers what was published since the node's last
    /// position, or tells its subscribers to resync when that is gone.
    /// `only`: just these channels (a cluster resubscribed them after losing their master).
    /// Returns the channels whose history could not be read.
    pub(crate) async fn catch_up(&self, only: Option<&[ChannelName]>) -> Vec<ChannelName> {
        let tracked = match only {
            None => self.positions.expected(),
            Some(only) => self.positions.expected_of(only),
        };
        let mut failed = Vec::new();
        let channels: Vec<(ChannelName, Position, HistoryPolicy)> = tracked
            .into_iter()
            .filter_map(|(c, p)| self.histories.of(c.as_str()).map(|policy| (c, p, policy)))
            .collect();
        if channels.is_empty() {
            return failed;
        }
        let started = std::time::Instant::now();
        let count = channels.len();
        let mut reads = futures_util::stream::iter(channels)
            .map(|(channel, from, policy)| async move {
                let query = HistoryQuery { since: Some(from.clone()), limit: None };
                let page = self.publisher.history(self, &channel, &query, policy).await;
                (channel, from, page)
            })
            .buffered(CATCH_UP_CONCURRENCY);
        while let Some((channel, from, page)) = reads.next().await {
            match page {
                Ok(page) => {
                    if let Err(Some(top)) = self.deliver_page(&channel, &from, page) {
                        self.resync(&channel, &top);
                        self.positions.reset(&channel, &top);
                    }
                }
                // The next live publication finds the gap and fills it.
                Err(e) => {
                    tracing::warn!(%channel, error = %e, "could not catch a history channel up");
                    failed.push(channel);
                }
            }
        }
        self.metrics.catch_ups.increment(1);
        self.metrics.catch_up_seconds.record(started.elapsed().as_secs_f64());
        tracing::info!(channels = count, elapsed = ?started.elapsed(), "caught history channels up after reconnecting");
        failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch() -> ChannelName {
        ChannelName::new("h:a").unwrap()
    }

    #[test]
    fn in_order_duplicates_gaps_and_epochs() {
        let p = Positions::default();
        assert_eq!(p.check(&ch(), &Position::new(5, "e")), Verdict::Deliver, "the first one sets the position");
        assert_eq!(p.check(&ch(), &Position::new(6, "e")), Verdict::Deliver);
        assert_eq!(p.check(&ch(), &Position::new(6, "e")), Verdict::Duplicate);
        assert_eq!(p.check(&ch(), &Position::new(3, "e")), Verdict::Duplicate);
        assert_eq!(p.check(&ch(), &Position::new(9, "e")), Verdict::Gap(Position::new(6, "e")));
        assert!(p.advance(&ch(), &Position::new(7, "e")));
        assert!(!p.advance(&ch(), &Position::new(7, "e")));
        assert_eq!(p.check(&ch(), &Position::new(1, "f")), Verdict::NewEpoch);
        assert_eq!(p.check(&ch(), &Position::new(2, "f")), Verdict::Deliver);
    }

    #[test]
    fn observed_tops_keep_the_lowest_until_a_delivery() {
        let p = Positions::default();
        p.observe(&ch(), &Position::new(12, "e"));
        p.observe(&ch(), &Position::new(10, "e"));
        p.observe(&ch(), &Position::new(11, "e"));
        assert_eq!(p.check(&ch(), &Position::new(13, "e")), Verdict::Gap(Position::new(10, "e")));
        assert_eq!(p.check(&ch(), &Position::new(11, "e")), Verdict::Deliver);
        p.observe(&ch(), &Position::new(5, "e"));
        assert_eq!(p.check(&ch(), &Position::new(12, "e")), Verdict::Deliver, "a delivery outranks reads");
    }
}
