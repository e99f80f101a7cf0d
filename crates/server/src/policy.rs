//! Namespace rules (may anonymous connections subscribe, may clients publish, how large and
//! how often) and the per-command permission checks that combine them with a connection's
//! identity. Lookups borrow the channel name: a check allocates nothing.

use std::collections::{BTreeMap, HashMap, HashSet};

use fanout_protocol::{namespace_of, ChannelName};

use crate::{
    auth::Identity,
    config::{NamespaceConfig, DEFAULT_NAMESPACE_RULE},
    limit::Rate,
};

/// The limits and permissions of one namespace.
#[derive(Debug, Clone, PartialEq)]
pub struct NamespaceRule {
    pub anonymous_subscribe: bool,
    pub client_publish: bool,
    pub max_message_size: usize,
    /// Publications per connection.
    pub publish_rate: Option<Rate>,
}

impl NamespaceRule {
    fn new(c: &NamespaceConfig, global_max: usize) -> Self {
        Self {
            anonymous_subscribe: c.anonymous_subscribe.unwrap_or(false),
            client_publish: c.client_publish.unwrap_or(true),
            max_message_size: c.max_message_size.unwrap_or(global_max).min(global_max),
            publish_rate: c
                .publish_rate
                .map(|r| Rate::new(r, c.publish_burst.unwrap_or_else(|| r.ceil().clamp(1.0, u32::MAX as f64) as u32))),
        }
    }
}

/// Why a command is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// `forbidden`, with the reason shown to the client.
    Forbidden(&'static str),
    /// `message_too_large`: over the namespace's `max_message_size`.
    TooLarge,
}

/// Every namespace's rule, and the fallback for namespaces without one.
#[derive(Debug)]
pub struct Policy {
    /// Configured namespaces in name order, then the fallback: a rule's position is its
    /// slot in per-connection state such as publish-rate buckets.
    rules: Vec<NamespaceRule>,
    index: HashMap<Box<str>, usize>,
}

impl Policy {
    /// `namespaces` may hold `"*"`, the rule of every namespace not listed.
    pub fn new(namespaces: &BTreeMap<String, NamespaceConfig>, global_max: usize) -> Self {
        let mut rules = Vec::new();
        let mut index = HashMap::new();
        for (name, c) in namespaces.iter().filter(|(n, _)| n.as_str() != "*") {
            index.insert(name.as_str().into(), rules.len());
            rules.push(NamespaceRule::new(c, global_max));
        }
        let fallback = namespaces.get("*").unwrap_or(&DEFAULT_NAMESPACE_RULE);
        rules.push(NamespaceRule::new(fallback, global_max));
        Self { rules, index }
    }

    /// Number of slots (`rule` returns one below this).
    pub fn slots(&self) -> usize {
        self.rules.len()
    }

    /// The rule in `slot` (as returned by [`Policy::rule`]).
    pub fn rule_at(&self, slot: usize) -> &NamespaceRule {
        &self.rules[slot.min(self.rules.len() - 1)]
    }

    /// The rule that applies to `channel` and its slot.
    pub fn rule(&self, channel: &str) -> (usize, &NamespaceRule) {
        let slot = self.index.get(namespace_of(channel)).copied().unwrap_or(self.rules.len() - 1);
        (slot, &self.rules[slot])
    }

    pub fn check_subscribe(&self, identity: &Identity, channel: &str) -> Result<(), Denied> {
        let (_, rule) = self.rule(channel);
        let allowed = match identity {
            Identity::Open => true,
            Identity::Anonymous => rule.anonymous_subscribe,
            // What anyone may read, a token holder may read too.
            Identity::Token(grant) => rule.anonymous_subscribe || grant.subscribe.allows(channel),
        };
        if allowed {
            Ok(())
        } else if matches!(identity, Identity::Anonymous) {
            Err(Denied::Forbidden("anonymous connections may not subscribe to this channel"))
        } else {
            Err(Denied::Forbidden("the token does not allow subscribing to this channel"))
        }
    }

    /// Checks a publish of `size` bytes; `Ok` carries the rule's slot for rate limiting.
    pub fn check_publish(&self, identity: &Identity, channel: &str, size: usize) -> Result<usize, Denied> {
        let (slot, rule) = self.rule(channel);
        if !rule.client_publish {
            return Err(Denied::Forbidden("clients may not publish in this namespace"));
        }
        match identity {
            Identity::Open => {}
            Identity::Anonymous => return Err(Denied::Forbidden("anonymous connections may not publish")),
            Identity::Token(grant) if !grant.publish.allows(channel) => {
                return Err(Denied::Forbidden("the token does not allow publishing to this channel"))
            }
            Identity::Token(_) => {}
        }
        if size > rule.max_message_size {
            return Err(Denied::TooLarge);
        }
        Ok(slot)
    }
}

/// Channel patterns compiled for lookups by `&str`: exact names and whole namespaces.
#[derive(Debug, Default, Clone)]
pub struct Patterns {
    exact: HashSet<Box<str>>,
    namespaces: HashSet<Box<str>>,
}

/// Whether `sub` can stand in for `{sub}`: non-empty and only channel-name characters
/// other than `*` (which is not one anyway), so substituting it can only ever name
/// channels, never widen a pattern.
fn usable_sub(sub: &str) -> bool {
    ChannelName::validate(sub).is_ok()
}

impl Patterns {
    /// Compiles `patterns`; ones that are not an exact channel name or `ns:*` after the
    /// `{sub}` substitution match nothing (failing closed).
    pub fn compile(patterns: &[String], sub: Option<&str>) -> Self {
        let mut p = Patterns::default();
        for raw in patterns {
            let substituted;
            let pattern = if raw.contains("{sub}") {
                match sub {
                    Some(sub) if usable_sub(sub) => {
                        substituted = raw.replace("{sub}", sub);
                        substituted.as_str()
                    }
                    _ => continue,
                }
            } else {
                raw.as_str()
            };
            if let Some(ns) = pattern.strip_suffix(":*") {
                // The namespace is everything before the first `:`, so `a:b:*` is not one.
                if ns.is_empty() || (!ns.contains(':') && ChannelName::validate(ns).is_ok()) {
                    p.namespaces.insert(ns.into());
                }
            } else if ChannelName::validate(pattern).is_ok() {
                p.exact.insert(pattern.into());
            }
        }
        p
    }

    /// Whether a pattern matches `channel`, which must be a valid channel name.
    pub fn allows(&self, channel: &str) -> bool {
        (!self.namespaces.is_empty() && self.namespaces.contains(namespace_of(channel))) || self.exact.contains(channel)
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.namespaces.is_empty()
    }
}

#[cfg(test)]
mod tests {
    fn pats(list: &[&str], sub: Option<&str>) -> Patterns {
        Patterns::compile(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>(), sub)
    }

    #[test]
    fn exact_namespace_and_sub_patterns() {
        let p = pats(&["news", "chat:*", "user:{sub}", "dm:{sub}:inbox", "{sub}:*"], Some("alice"));
        for ok in ["news", "chat:1", "chat:a:b", "chat:", "user:alice", "dm:alice:inbox", "alice:x"] {
            assert!(p.allows(ok), "{ok}");
        }
        for no in ["news2", "chat", "chatx:1", "user:bob", "user:alice2", "dm:bob:inbox", "bob:x", "other"] {
            assert!(!p.allows(no), "{no}");
        }
    }

    #[test]
    fn empty_namespace_pattern_matches_names_without_colon() {
        let p = pats(&[":*"], None);
        assert!(p.allows("plain") && p.allows(":x"));
        assert!(!p.allows("a:b"));
    }

    #[test]
    fn sub_substitution_cannot_widen() {
        let list = ["user:{sub}", "{sub}:*", "x{sub}"];
        for evil in ["*", "a*", "", "a b", "a/../*", "{sub}", "é", "a\0", &"x".repeat(300)] {
            let p = pats(&list, Some(evil));
            assert!(p.is_empty(), "{evil:?} produced {p:?}");
        }
        // A `:` in sub keeps exact patterns exact and invalidates namespace ones.
        let p = pats(&list, Some("a:b"));
        assert!(p.allows("user:a:b") && p.allows("xa:b"));
        assert!(!p.allows("a:c") && !p.allows("a:b:c") && !p.allows("user:a"));
        // No sub at all: `{sub}` patterns match nothing.
        assert!(pats(&list, None).is_empty());
    }

    #[test]
    fn malformed_patterns_match_nothing() {
        let p = pats(&["*", "a:b:*", "a*", "a:*x", "{other}", "", "a b", "*:*"], Some("s"));
        assert!(p.is_empty(), "{p:?}");
    }

    proptest::proptest! {
        #[test]
        fn any_sub_only_grants_channels_containing_it(sub in "\\PC{0,20}", channel in "[A-Za-z0-9_.:@/=*-]{1,30}") {
            let p = pats(&["user:{sub}", "{sub}:*"], Some(&sub));
            if p.allows(&channel) {
                let exact = format!("user:{sub}");
                proptest::prop_assert!(channel == exact || namespace_of(&channel) == sub);
            }
        }
    }

    use super::*;
    use crate::auth::Grant;

    fn ns(toml_text: &str) -> BTreeMap<String, NamespaceConfig> {
        toml::from_str(toml_text).unwrap()
    }

    fn token(subscribe: &[&str], publish: &[&str]) -> Identity {
        let list = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        Identity::Token(Box::new(Grant {
            sub: Some("u1".into()),
            exp: u64::MAX,
            subscribe: Patterns::compile(&list(subscribe), Some("u1")),
            publish: Patterns::compile(&list(publish), Some("u1")),
        }))
    }

    #[test]
    fn rules_by_namespace_with_fallbacks() {
        let p = Policy::new(
            &ns(r#"
                [public]
                anonymous_subscribe = true
                client_publish = false
                [chat]
                max_message_size = 100
                publish_rate = 2.5
                [""]
                max_message_size = 10
            "#),
            1000,
        );
        assert_eq!(p.slots(), 4);
        assert!(p.rule("public:x").1.anonymous_subscribe);
        assert_eq!(p.rule("chat:x").1.publish_rate, Some(Rate::new(2.5, 3)));
        assert_eq!(p.rule("plain").1.max_message_size, 10);
        assert_eq!(p.rule(":plain").1.max_message_size, 10);
        let (slot, other) = p.rule("other:x");
        assert_eq!((slot, other), (3, &NamespaceRule::new(&DEFAULT_NAMESPACE_RULE, 1000)));

        let star = Policy::new(&ns("[\"*\"]\nclient_publish = false\n[chat]\n"), 1000);
        assert_eq!(star.slots(), 2);
        assert!(!star.rule("x:y").1.client_publish);
        assert!(star.rule("chat:y").1.client_publish);
    }

    #[test]
    fn permission_checks() {
        let p = Policy::new(
            &ns("[public]\nanonymous_subscribe = true\n[ro]\nclient_publish = false\n[small]\nmax_message_size = 4"),
            1000,
        );
        let t = token(&["chat:*", "user:{sub}"], &["chat:*", "ro:x", "small:x"]);
        assert_eq!(p.check_subscribe(&Identity::Open, "any:thing"), Ok(()));
        assert_eq!(p.check_subscribe(&t, "chat:1"), Ok(()));
        assert_eq!(p.check_subscribe(&t, "user:u1"), Ok(()));
        assert_eq!(p.check_subscribe(&t, "public:news"), Ok(()));
        assert!(p.check_subscribe(&t, "user:u2").is_err());
        assert_eq!(p.check_subscribe(&Identity::Anonymous, "public:news"), Ok(()));
        assert!(p.check_subscribe(&Identity::Anonymous, "chat:1").is_err());

        assert!(p.check_publish(&Identity::Open, "chat:1", 10).is_ok());
        assert!(p.check_publish(&t, "chat:1", 10).is_ok());
        assert!(matches!(p.check_publish(&t, "public:news", 1), Err(Denied::Forbidden(_))));
        assert!(matches!(p.check_publish(&t, "ro:x", 1), Err(Denied::Forbidden(_))));
        assert!(matches!(p.check_publish(&Identity::Open, "ro:x", 1), Err(Denied::Forbidden(_))));
        assert!(matches!(p.check_publish(&Identity::Anonymous, "public:x", 1), Err(Denied::Forbidden(_))));
        assert_eq!(p.check_publish(&t, "small:x", 5), Err(Denied::TooLarge));
        assert!(p.check_publish(&t, "small:x", 4).is_ok());
        assert_eq!(p.check_publish(&Identity::Open, "chat:1", 1001), Err(Denied::TooLarge));
    }
}
