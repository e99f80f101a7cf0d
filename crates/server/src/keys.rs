//! Key material for connection tokens: reading the PEM public key and the JWKS file (size-
//! bounded, symmetric keys refused), which algorithm families they can verify, and
//! watching the JWKS file to reload it on change. Token verification itself is `auth.rs`.

use std::{
    path::{Path, PathBuf},
    str::FromStr as _,
    sync::Arc,
    time::{Duration, SystemTime},
};

use jsonwebtoken::{jwk::JwkSet, Algorithm, AlgorithmFamily, DecodingKey};
use tokio_util::sync::CancellationToken;

use crate::auth::{AuthSettings, Verifier};

/// A JWKS file larger than this is refused (it is read on every change).
const MAX_JWKS_BYTES: u64 = 1 << 20;
/// Keys kept from a JWKS file: a token without `kid` is tried against each matching one.
const MAX_JWKS_KEYS: usize = 32;

/// A key source that cannot be used; at start-up this is a configuration error.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// One key from the JWKS file.
pub(crate) struct JwksKey {
    pub(crate) kid: Option<String>,
    /// The key's own `alg`, when it names one: the token must use exactly that.
    pub(crate) alg: Option<Algorithm>,
    pub(crate) key: DecodingKey,
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
pub(crate) fn load_jwks(path: &Path) -> Result<Vec<JwksKey>, KeyError> {
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

/// Polls the JWKS file's modification time and size every `interval`, reloading when
/// either changes, until `stop`.
pub async fn watch_jwks(
    verifier: Arc<Verifier>,
    interval: Duration,
    stop: CancellationToken,
    reloads: crate::metrics::Reloads,
) {
    let Some(path) = verifier.jwks_file().map(Path::to_path_buf) else { return };
    let stamp = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
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
        match verifier.reload_jwks() {
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
