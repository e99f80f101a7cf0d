//! Channel names: the validation rule and the cheap-to-clone validated name.

use std::{borrow::Borrow, fmt, sync::Arc};

/// Longest channel name the contract allows, in bytes.
pub const MAX_CHANNEL_LEN: usize = 255;

/// Why a string is not a channel name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error("channel name is empty")]
    Empty,
    #[error("channel name is longer than {MAX_CHANNEL_LEN} bytes")]
    TooLong,
    #[error("channel name contains a character outside A-Z a-z 0-9 _ - . : @ / =")]
    BadChar,
}

/// A validated channel name. Cloning is a reference-count increment, so the registry, the
/// broker and every queued publication can hold one without copying the text.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelName(Arc<str>);

const fn allowed(b: u8) -> bool {
    matches!(b, b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' | b':' | b'@' | b'/' | b'=')
}

impl ChannelName {
    /// Checks `name` against the contract's rule without allocating.
    pub fn validate(name: &str) -> Result<(), ChannelError> {
        if name.is_empty() {
            return Err(ChannelError::Empty);
        }
        if name.len() > MAX_CHANNEL_LEN {
            return Err(ChannelError::TooLong);
        }
        if !name.bytes().all(allowed) {
            return Err(ChannelError::BadChar);
        }
        Ok(())
    }

    pub fn new(name: &str) -> Result<Self, ChannelError> {
        Self::validate(name)?;
        Ok(Self(Arc::from(name)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part before the first `:`; a name without `:` is in the empty namespace.
    pub fn namespace(&self) -> &str {
        namespace_of(&self.0)
    }
}

/// The namespace of a (not necessarily validated) channel name.
pub fn namespace_of(name: &str) -> &str {
    name.split_once(':').map_or("", |(ns, _)| ns)
}

impl fmt::Debug for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Borrow<str> for ChannelName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for ChannelName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for ChannelName {
    type Error = ChannelError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl std::str::FromStr for ChannelName {
    type Err = ChannelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_every_allowed_character() {
        let all = "AZaz09_-.:@/=";
        assert_eq!(ChannelName::new(all).unwrap().as_str(), all);
        assert!(ChannelName::new(&"x".repeat(255)).is_ok());
    }

    #[test]
    fn rejects_bad_names() {
        assert_eq!(ChannelName::new(""), Err(ChannelError::Empty));
        assert_eq!(ChannelName::new(&"x".repeat(256)), Err(ChannelError::TooLong));
        for bad in ["a b", "é", "a\"b", "a\\b", "a\0", "a*", "{x}", "a\n", "ä"] {
            assert_eq!(ChannelName::new(bad), Err(ChannelError::BadChar), "{bad:?}");
        }
    }

    #[test]
    fn namespace_is_before_first_colon() {
        assert_eq!(ChannelName::new("chat:room-1").unwrap().namespace(), "chat");
        assert_eq!(ChannelName::new("a:b:c").unwrap().namespace(), "a");
        assert_eq!(ChannelName::new("plain").unwrap().namespace(), "");
        assert_eq!(ChannelName::new(":x").unwrap().namespace(), "");
    }

    proptest::proptest! {
        #[test]
        fn never_panics_and_agrees_with_rule(s in ".{0,300}") {
            let ok = !s.is_empty() && s.len() <= 255 && s.bytes().all(allowed);
            proptest::prop_assert_eq!(ChannelName::new(&s).is_ok(), ok);
        }
    }
}
