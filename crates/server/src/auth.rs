//! Connection tokens: verifying JWTs against the configured keys (an HMAC secret, a PEM
//! public key, a JWKS file reloaded when it changes), what a verified token grants, and
//! where a request carries its token. Reading key files is `keys.rs`; compiling channel
//! patterns is `policy.rs`.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::{
    keys::{load_jwks, load_public_key, JwksKey, KeyError},
    policy::Patterns,
};

/// Longest token accepted. Tokens travel in a header or the query string; anything longer
/// is refused before any parsing or signature work.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;
/// The most keys one token's signature is checked against (a token without `kid`, or a
/// `kid` several keys share). Key rotation keeps two or three keys live at once.
pub const MAX_KEYS_PER_TOKEN: usize = 3;

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

    /// The JWKS file the keys come from, if any.
    pub fn jwks_file(&self) -> Option<&Path> {
        self.jwks_file.as_deref()
    }

    /// Re-reads the JWKS file; on any problem the keys in use stay.
    pub fn reload_jwks(&self) -> Result<usize, KeyError> {
        let Some(path) = &self.jwks_file else { return Ok(0) };
        let keys = load_jwks(path)?;
        let n = keys.len();
        *self.jwks.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
        Ok(n)
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
}
