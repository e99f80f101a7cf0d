//! Connection tokens: verifying JWTs against the configured keys (an HMAC secret, a PEM
//! public key, a JWKS file reloaded when it changes) and compiling their claims into
//! permission sets that each command checks without allocating.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    str::FromStr as _,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use fanout_protocol::{namespace_of, ChannelName};
use jsonwebtoken::{errors::ErrorKind, jwk::JwkSet, Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

/// Longest token accepted. Tokens travel in a header or the query string; anything longer
/// is refused before any parsing or signature work.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;
/// A JWKS file larger than this is refused (it is read on every change).
const MAX_JWKS_BYTES: u64 = 1 << 20;
/// The most keys one token's signature is checked against (a token without `kid`, or a
/// `kid` several keys share). Key rotation keeps two or three keys live at once.
pub const MAX_KEYS_PER_TOKEN: usize = 3;

/// Keys kept from a JWKS file: a token without `kid` is tried against each matching one.
const MAX_JWKS_KEYS: usize = 32;

/// Every algorithm a node can be configured to accept; `none` is not one of them.
pub const SUPPORTED: [Algorithm; 12] = [
    Algorithm::HS256,
    Algorithm::HS384,
    Algorithm::HS512,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// A key source that cannot be used; at start-up this is a configuration error.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Why a token was refused. The text is safe to show the client: it names the rule, never
/// a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is longer than {MAX_TOKEN_LEN} bytes")]
    TooLong,
    #[error("token is malformed")]
    Malformed,
    #[error("token algorithm {0:?} is not accepted")]
    Algorithm(Algorithm),
    #[error("no configured key matches the token")]
    NoKey,
    #[error("token signature is invalid")]
    Signature,
    #[error("token has expired")]
    Expired,
    #[error("token has no exp claim")]
    MissingExp,
    #[error("token audience or issuer is not accepted")]
    Audience,
    #[error("token claims are invalid")]
    Claims,
}

impl TokenError {
    /// The reply text for an HTTP 401 (a `'static` string: no per-request formatting).
    pub fn http_message(&self) -> &'static str {
        match self {
            TokenError::TooLong => "unauthorized: token too long\n",
            TokenError::Malformed => "unauthorized: malformed token\n",
            TokenError::Algorithm(_) => "unauthorized: token algorithm not accepted\n",
            TokenError::NoKey | TokenError::Signature => "unauthorized: invalid token signature\n",
            TokenError::Expired => "unauthorized: token expired\n",
            TokenError::MissingExp => "unauthorized: token has no exp\n",
            TokenError::Audience => "unauthorized: token audience or issuer not accepted\n",
            TokenError::Claims => "unauthorized: invalid token claims\n",
        }
    }

    fn from_jwt(e: &jsonwebtoken::errors::Error) -> Self {
        match e.kind() {
            ErrorKind::InvalidSignature => TokenError::Signature,
            ErrorKind::ExpiredSignature => TokenError::Expired,
            ErrorKind::MissingRequiredClaim(_) => TokenError::MissingExp,
            ErrorKind::InvalidAudience | ErrorKind::InvalidIssuer => TokenError::Audience,
            ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName | ErrorKind::MissingAlgorithm => {
                TokenError::Malformed
            }
            ErrorKind::InvalidClaimFormat(_) | ErrorKind::Json(_) => TokenError::Claims,
            ErrorKind::InvalidEcdsaKey | ErrorKind::InvalidEddsaKey | ErrorKind::InvalidRsaKey(_) => TokenError::NoKey,
            _ => TokenError::Malformed,
        }
    }
}

/// How tokens are verified; built from the `[auth]` settings.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    pub algorithms: Vec<Algorithm>,
    pub hmac_secret: Option<String>,
    pub public_key_file: Option<PathBuf>,
    pub jwks_file: Option<PathBuf>,
    pub leeway: Duration,
    pub audience: Option<String>,
    pub issuer: Option<String>,
}

/// The claims fanout reads; others are ignored.
#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    /// Optional here so a missing `exp` is reported as such by the validation.
    #[serde(default)]
    exp: Option<f64>,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
}

/// One key from the JWKS file.
struct JwksKey {
    kid: Option<String>,
    /// The key's own `alg`, when it names one: the token must use exactly that.
    alg: Option<Algorithm>,
    key: DecodingKey,
}

/// Verifies tokens. Shared by every upgrade and every `refresh`.
pub struct Verifier {
    algorithms: Vec<Algorithm>,
    /// One prepared validation per accepted algorithm, so verifying allocates nothing for it.
    validations: Vec<(Algorithm, Validation)>,
    hmac: Option<DecodingKey>,
    public_key: Option<DecodingKey>,
    jwks_file: Option<PathBuf>,
    jwks: RwLock<Arc<Vec<JwksKey>>>,
    leeway_secs: u64,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").field("algorithms", &self.algorithms).finish_non_exhaustive()
    }
}

fn read_file(path: &Path, limit: u64) -> Result<Vec<u8>, KeyError> {
    let read = |source| KeyError::Read { path: path.to_owned(), source };
    let len = std::fs::metadata(path).map_err(read)?.len();
    if len > limit {
        return Err(KeyError::Invalid { path: path.to_owned(), message: format!("larger than {limit} bytes") });
    }
    std::fs::read(path).map_err(read)
}

/// Reads a PEM public key, whichever family it is.
pub fn load_public_key(path: &Path) -> Result<DecodingKey, KeyError> {
    let pem = read_file(path, 64 * 1024)?;
    DecodingKey::from_rsa_pem(&pem)
        .or_else(|_| DecodingKey::from_ec_pem(&pem))
        .or_else(|_| DecodingKey::from_ed_pem(&pem))
        .map_err(|_| KeyError::Invalid {
            path: path.to_owned(),
            message: "not a PEM RSA, EC or Ed25519 public key".into(),
        })
}

/// Reads a JWKS file. Symmetric (`oct`) keys are refused: a JWKS file is public material,
/// and an HMAC key in it would let anyone who can read it mint tokens.
fn load_jwks(path: &Path) -> Result<Vec<JwksKey>, KeyError> {
    let invalid = |message: String| KeyError::Invalid { path: path.to_owned(), message };
    let text = read_file(path, MAX_JWKS_BYTES)?;
    let set: JwkSet = serde_json::from_slice(&text).map_err(|e| invalid(format!("not a JWKS document: {e}")))?;
    if set.keys.len() > MAX_JWKS_KEYS {
        return Err(invalid(format!("more than {MAX_JWKS_KEYS} keys")));
    }
    let mut keys = Vec::with_capacity(set.keys.len());
    for (i, jwk) in set.keys.iter().enumerate() {
        let key = DecodingKey::from_jwk(jwk).map_err(|e| invalid(format!("key {i}: {e}")))?;
        if key.family() == AlgorithmFamily::Hmac {
            return Err(invalid(format!("key {i}: symmetric keys do not belong in a JWKS file")));
        }
        let alg = match jwk.common.key_algorithm {
            Some(a) => Some(
                Algorithm::from_str(&a.to_string())
                    .map_err(|_| invalid(format!("key {i}: alg {a} is not a signature algorithm")))?,
            ),
            None => None,
        };
        if alg.is_some_and(|a| a.family() != key.family()) {
            return Err(invalid(format!("key {i}: alg does not match the key type")));
        }
        keys.push(JwksKey { kid: jwk.common.key_id.clone(), alg, key });
    }
    if keys.is_empty() {
        return Err(invalid("no keys".into()));
    }
    Ok(keys)
}

/// The algorithm families a set of keys can verify.
pub fn key_families(settings: &AuthSettings) -> Result<Vec<AlgorithmFamily>, KeyError> {
    let mut families = Vec::new();
    if settings.hmac_secret.is_some() {
        families.push(AlgorithmFamily::Hmac);
    }
    if let Some(path) = &settings.public_key_file {
        families.push(load_public_key(path)?.family());
    }
    if let Some(path) = &settings.jwks_file {
        families.extend(load_jwks(path)?.iter().map(|k| k.key.family()));
    }
    Ok(families)
}

impl Verifier {
    /// Loads every key; fails on any unreadable or invalid key source.
    pub fn new(settings: &AuthSettings) -> Result<Self, KeyError> {
        let hmac = settings.hmac_secret.as_ref().map(|s| DecodingKey::from_secret(s.as_bytes()));
        let public_key = settings.public_key_file.as_deref().map(load_public_key).transpose()?;
        let jwks = settings.jwks_file.as_deref().map(load_jwks).transpose()?.unwrap_or_default();
        let leeway_secs = settings.leeway.as_secs();
        let validations = settings
            .algorithms
            .iter()
            .map(|&alg| {
                let mut v = Validation::new(alg);
                v.leeway = leeway_secs;
                v.set_required_spec_claims(&["exp"]);
                match &settings.audience {
                    Some(aud) => v.set_audience(&[aud]),
                    // Without a configured audience the `aud` claim is not ours to judge.
                    None => v.validate_aud = false,
                }
                if let Some(iss) = &settings.issuer {
                    v.set_issuer(&[iss]);
                    v.required_spec_claims.insert("iss".into());
                }
                (alg, v)
            })
            .collect();
        Ok(Self {
            algorithms: settings.algorithms.clone(),
            validations,
            hmac,
            public_key,
            jwks_file: settings.jwks_file.clone(),
            jwks: RwLock::new(Arc::new(jwks)),
            leeway_secs,
        })
    }

    /// Seconds a token stays valid past its `exp`.
    pub fn leeway(&self) -> Duration {
        Duration::from_secs(self.leeway_secs)
    }

    /// Verifies a token and compiles its permissions.
    pub fn verify(&self, token: &str) -> Result<Grant, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        let alg = header.alg;
        let Some((_, validation)) = self.validations.iter().find(|(a, _)| *a == alg) else {
            return Err(TokenError::Algorithm(alg));
        };
        // A key is only ever used for its own family, whatever the token's header claims:
        // an RSA public key never becomes an HMAC secret.
        let family = alg.family();
        let jwks = self.jwks.read().unwrap_or_else(|e| e.into_inner()).clone();
        let fixed = [self.hmac.as_ref(), self.public_key.as_ref()];
        let candidates = fixed.into_iter().flatten().filter(|k| k.family() == family).chain(
            jwks.iter()
                .filter(|k| k.key.family() == family && k.alg.is_none_or(|a| a == alg))
                .filter(|k| header.kid.is_none() || k.kid == header.kid)
                .map(|k| &k.key),
        );
        let mut last = TokenError::NoKey;
        // Bounded: a token without `kid` would otherwise cost one signature check per key
        // of its family, and a client can make the node check a token per upgrade.
        for key in candidates.take(MAX_KEYS_PER_TOKEN) {
            match jsonwebtoken::decode::<Claims>(token, key, validation) {
                Ok(data) => return Ok(Grant::compile(data.claims)),
                // The signature did not match this key: try the next one.
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => last = TokenError::Signature,
                // The signature matched and the claims are wrong: no other key changes that.
                Err(e) => return Err(TokenError::from_jwt(&e)),
            }
        }
        Err(last)
    }

    /// Re-reads the JWKS file; on any problem the keys in use stay.
    pub fn reload_jwks(&self) -> Result<usize, KeyError> {
        let Some(path) = &self.jwks_file else { return Ok(0) };
        let keys = load_jwks(path)?;
        let n = keys.len();
        *self.jwks.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
        Ok(n)
    }

    /// Polls the JWKS file's modification time and size every `interval`, reloading when
    /// either changes, until `stop`.
    pub async fn watch_jwks(
        self: Arc<Self>,
        interval: Duration,
        stop: CancellationToken,
        reloads: crate::metrics::Reloads,
    ) {
        let Some(path) = self.jwks_file.clone() else { return };
        let stamp =
            |p: &Path| std::fs::metadata(p).ok().map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
        let mut seen = stamp(&path);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = stamp(&path);
            if now == seen {
                continue;
            }
            seen = now;
            match self.reload_jwks() {
                Ok(n) => {
                    reloads.ok.increment(1);
                    tracing::info!(path = %path.display(), keys = n, "reloaded the JWKS file");
                }
                Err(e) => {
                    reloads.failed.increment(1);
                    tracing::warn!(error = %e, "the JWKS file changed but cannot be used; keeping the previous keys");
                }
            }
        }
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

/// What a verified token lets its holder do, until `exp`.
#[derive(Debug, Clone)]
pub struct Grant {
    pub sub: Option<Box<str>>,
    /// Seconds since the Unix epoch.
    pub exp: u64,
    pub subscribe: Patterns,
    pub publish: Patterns,
}

impl Grant {
    fn compile(c: Claims) -> Self {
        let sub = c.sub.filter(|s| !s.is_empty());
        let exp = c.exp.filter(|e| e.is_finite() && *e > 0.0).map_or(0, |e| e as u64);
        Self {
            subscribe: Patterns::compile(&c.subscribe, sub.as_deref()),
            publish: Patterns::compile(&c.publish, sub.as_deref()),
            sub: sub.map(String::into_boxed_str),
            exp,
        }
    }

    /// Time left before the token (plus leeway) expires, capped at ten years so that any
    /// `exp` a token may carry can be added to the clock.
    pub fn remaining(&self, leeway: Duration) -> Duration {
        const CAP: Duration = Duration::from_secs(10 * 365 * 86_400);
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        Duration::from_secs(self.exp).saturating_add(leeway).saturating_sub(now).min(CAP)
    }
}

/// Who a connection is.
#[derive(Debug, Clone)]
pub enum Identity {
    /// Authentication is off: no token-based checks apply.
    Open,
    /// Authentication is on, tokens are optional, and this connection sent none.
    Anonymous,
    /// Boxed: most sessions of a node share one kind, and the others should not pay for
    /// the largest.
    Token(Box<Grant>),
}

/// The credentials of an `Authorization: Bearer …` value. The scheme is case-insensitive
/// (RFC 7235); both listeners read their bearer tokens through here.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The token of an upgrade request: `Authorization: Bearer` first, then the `token`
/// query parameter. `Err` when a token is present but not readable.
pub fn token_from_request(headers: &http::HeaderMap, query: Option<&str>) -> Result<Option<String>, TokenError> {
    if let Some(value) = headers.get(http::header::AUTHORIZATION) {
        let value = value.to_str().map_err(|_| TokenError::Malformed)?;
        if let Some(token) = bearer(value) {
            return Ok(Some(token.to_owned()));
        }
    }
    let Some(query) = query else { return Ok(None) };
    // Bounded before decoding: at most three bytes of escapes per token byte.
    if query.len() > MAX_TOKEN_LEN * 3 + 1024 {
        return Err(TokenError::TooLong);
    }
    // A JWT needs no escapes, but a client may escape anyway; a bad escape is kept as it
    // is and fails verification like any malformed token.
    Ok(form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == "token").map(|(_, v)| v.into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn remaining_time_never_overflows() {
        let grant = |exp| Grant { sub: None, exp, subscribe: Patterns::default(), publish: Patterns::default() };
        let ten_years = Duration::from_secs(10 * 365 * 86_400);
        assert_eq!(grant(u64::MAX).remaining(Duration::from_secs(300)), ten_years);
        assert_eq!(grant(0).remaining(Duration::from_secs(5)), Duration::ZERO);
        let in_a_minute = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() + 60;
        let left = grant(in_a_minute).remaining(Duration::ZERO);
        assert!(left > Duration::from_secs(58) && left <= Duration::from_secs(60), "{left:?}");
    }

    #[test]
    fn token_location() {
        let mut h = http::HeaderMap::new();
        assert_eq!(token_from_request(&h, None), Ok(None));
        assert_eq!(token_from_request(&h, Some("a=1&token=x.y.z")), Ok(Some("x.y.z".into())));
        assert_eq!(token_from_request(&h, Some("token=a%2Eb")), Ok(Some("a.b".into())));
        assert_eq!(token_from_request(&h, Some("token=%zz")), Ok(Some("%zz".into())));
        let long = format!("token={}", "a".repeat(MAX_TOKEN_LEN * 4));
        assert_eq!(token_from_request(&h, Some(&long)), Err(TokenError::TooLong));
        h.insert(http::header::AUTHORIZATION, "Bearer h.e.d".parse().unwrap());
        assert_eq!(token_from_request(&h, Some("token=q")), Ok(Some("h.e.d".into())));
        h.insert(http::header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(token_from_request(&h, Some("token=q")), Ok(Some("q".into())));
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
}
