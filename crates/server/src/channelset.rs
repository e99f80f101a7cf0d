//! The set of channels one session is subscribed to, sized for the common case.
//!
//! Every open connection pays for its set for as long as it is open, and most hold a
//! handful of channels: a std `HashSet` costs 48 bytes inline plus an 84-byte table for a
//! single channel. Up to [`FEW`] channels live in a plain `Vec` (24 bytes inline, 16 per
//! channel, searched linearly, which at that size costs no more than hashing the name);
//! past that the set moves into a boxed `HashSet`, so a client allowed thousands of
//! subscriptions still gets constant-time operations.

use std::collections::HashSet;

use fanout_protocol::ChannelName;

/// Channels held in the `Vec` before the set becomes a hash set.
const FEW: usize = 8;

pub enum ChannelSet {
    Few(Vec<ChannelName>),
    Many(Box<HashSet<ChannelName>>),
}

impl Default for ChannelSet {
    fn default() -> Self {
        ChannelSet::Few(Vec::new())
    }
}

impl ChannelSet {
    pub fn len(&self) -> usize {
        match self {
            ChannelSet::Few(v) => v.len(),
            ChannelSet::Many(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, channel: &ChannelName) -> bool {
        match self {
            ChannelSet::Few(v) => v.contains(channel),
            ChannelSet::Many(s) => s.contains(channel),
        }
    }

    /// Adds `channel`; false if it was already there.
    pub fn insert(&mut self, channel: ChannelName) -> bool {
        match self {
            ChannelSet::Few(v) if v.contains(&channel) => false,
            ChannelSet::Few(v) if v.len() < FEW => {
                v.push(channel);
                true
            }
            ChannelSet::Few(v) => {
                let mut set: HashSet<ChannelName> = v.drain(..).collect();
                set.insert(channel);
                *self = ChannelSet::Many(Box::new(set));
                true
            }
            ChannelSet::Many(s) => s.insert(channel),
        }
    }

    /// Removes `channel`; false if it was not there.
    pub fn remove(&mut self, channel: &ChannelName) -> bool {
        match self {
            ChannelSet::Few(v) => match v.iter().position(|c| c == channel) {
                Some(i) => {
                    v.swap_remove(i);
                    true
                }
                None => false,
            },
            ChannelSet::Many(s) => s.remove(channel),
        }
    }

    pub fn iter(&self) -> Box<dyn Iterator<Item = &ChannelName> + '_> {
        match self {
            ChannelSet::Few(v) => Box::new(v.iter()),
            ChannelSet::Many(s) => Box::new(s.iter()),
        }
    }

    /// Empties the set, handing back what it held.
    pub fn take(&mut self) -> Vec<ChannelName> {
        match std::mem::take(self) {
            ChannelSet::Few(v) => v,
            ChannelSet::Many(s) => s.into_iter().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(i: usize) -> ChannelName {
        ChannelName::new(&format!("c{i}")).unwrap()
    }

    #[test]
    fn behaves_as_a_set_across_the_switch_to_a_hash_set() {
        let mut set = ChannelSet::default();
        for i in 0..3 * FEW {
            assert!(set.insert(name(i)), "{i} is new");
            assert!(!set.insert(name(i)), "{i} is there already");
            assert_eq!(set.len(), i + 1);
        }
        assert!(matches!(set, ChannelSet::Many(_)));
        for i in (0..3 * FEW).step_by(2) {
            assert!(set.remove(&name(i)));
            assert!(!set.remove(&name(i)));
        }
        for i in 0..3 * FEW {
            assert_eq!(set.contains(&name(i)), i % 2 == 1, "{i}");
        }
        let mut left: Vec<String> = set.iter().map(|c| c.as_str().to_owned()).collect();
        left.sort();
        let mut taken: Vec<String> = set.take().iter().map(|c| c.as_str().to_owned()).collect();
        taken.sort();
        assert_eq!(left, taken);
        assert_eq!(taken.len(), 3 * FEW / 2);
        assert_eq!(set.len(), 0);
        assert!(matches!(set, ChannelSet::Few(_)), "an emptied set is small again");
    }

    #[test]
    fn a_few_channels_stay_in_the_vec() {
        let mut set = ChannelSet::default();
        for i in 0..FEW {
            set.insert(name(i));
        }
        assert!(matches!(set, ChannelSet::Few(_)));
        assert!(set.remove(&name(0)) && set.contains(&name(FEW - 1)) && !set.contains(&name(0)));
        assert_eq!(set.len(), FEW - 1);
    }
}
