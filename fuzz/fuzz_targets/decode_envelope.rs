//! Redis envelopes as any backend (or attacker with Redis access) may publish them.
#![no_main]

use fanout_protocol::{decode_envelope, encode_envelope};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((ts, enc, payload)) = decode_envelope(data) {
        // What decodes re-encodes to an envelope that decodes the same.
        let again = encode_envelope(ts, enc, payload);
        let (ts2, enc2, payload2) = decode_envelope(&again).expect("re-encoded envelope decodes");
        assert_eq!((ts, enc, payload), (ts2, enc2, payload2));
    }
});
