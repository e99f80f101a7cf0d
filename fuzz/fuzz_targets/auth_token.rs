//! Connection tokens and channel patterns: arbitrary tokens never panic the verifier and
//! never verify without the key; patterns compiled with an arbitrary `sub` only grant
//! channels that are a pattern with `sub` put in.
#![no_main]

use std::{sync::OnceLock, time::Duration};

use fanout_protocol::{namespace_of, ChannelName};
use fanout_server::auth::{AuthSettings, Patterns, Verifier};
use jsonwebtoken::Algorithm;
use libfuzzer_sys::fuzz_target;

fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| {
        let settings = AuthSettings {
            algorithms: vec![Algorithm::HS256, Algorithm::HS512],
            hmac_secret: Some("fuzzing-secret-fuzzing-secret-fuzz".into()),
            public_key_file: None,
            jwks_file: None,
            leeway: Duration::from_secs(5),
            audience: None,
            issuer: None,
        };
        Verifier::new(&settings).expect("HMAC-only settings load")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // Forging an HMAC by chance is not going to happen: anything that verifies is a bug.
    assert!(verifier().verify(text).is_err(), "a fuzzed token verified");

    // "sub\npattern\npattern...\nchannel"
    let mut lines: Vec<&str> = text.split('\n').collect();
    if lines.len() < 3 {
        return;
    }
    let sub = lines.remove(0);
    let channel = lines.pop().unwrap_or_default();
    // The server only ever asks about validated names.
    if ChannelName::validate(channel).is_err() {
        return;
    }
    let patterns: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
    let compiled = Patterns::compile(&patterns, Some(sub));
    if compiled.allows(channel) {
        let granted = patterns.iter().any(|p| {
            let p = p.replace("{sub}", sub);
            p == channel || p.strip_suffix(":*").is_some_and(|ns| ns == namespace_of(channel))
        });
        assert!(granted, "{channel:?} allowed by {patterns:?} with sub {sub:?}");
        // `{sub}` only ever completes a name: a sub that is not one grants nothing.
        if patterns.iter().all(|p| p.contains("{sub}")) {
            assert!(ChannelName::validate(sub).is_ok(), "sub {sub:?} granted {channel:?}");
        }
    }
});
