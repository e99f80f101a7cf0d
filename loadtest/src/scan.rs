//! Reading the generator's own fields out of a JSON text frame by scanning bytes: the
//! sequence number `"s":` and intended send time `"t":` of a delivery, and the `op` of a
//! reply. Nothing is allocated and nothing else is parsed.

use memchr::memmem::Finder;

/// What a text frame from the gateway turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Incoming {
    /// A `message` carrying the generator's `{"s":SEQ,"t":MICROS,…}`.
    Delivery {
        seq: u64,
        sent_micros: u64,
    },
    /// A `message` whose data is not ours (another publisher on the channel).
    Foreign,
    Subscribed,
    Published,
    /// An `error` reply, with its `id` when it had one.
    Error {
        id: Option<u64>,
    },
    Other,
}

/// Precompiled searchers; one per worker thread.
pub(crate) struct Scanner {
    seq: Finder<'static>,
    time: Finder<'static>,
    op: Finder<'static>,
    id: Finder<'static>,
}

impl Default for Scanner {
    fn default() -> Self {
        Self {
            seq: Finder::new(b"\"s\":"),
            time: Finder::new(b"\"t\":"),
            op: Finder::new(b"\"op\":\""),
            id: Finder::new(b"\"id\":"),
        }
    }
}

/// The unsigned integer at the start of `b` (after optional spaces), and the index
/// just past its last digit.
fn number_at(b: &[u8]) -> Option<(u64, usize)> {
    let start = b.iter().position(|c| *c != b' ')?;
    let mut n: u64 = 0;
    let mut end = start;
    while let Some(&c) = b.get(end) {
        if !c.is_ascii_digit() {
            break;
        }
        n = n.checked_mul(10)?.checked_add((c - b'0') as u64)?;
        end += 1;
    }
    (end > start).then_some((n, end))
}

fn number(b: &[u8]) -> Option<u64> {
    number_at(b).map(|(n, _)| n)
}

impl Scanner {
    pub(crate) fn classify(&self, frame: &[u8]) -> Incoming {
        // `"s":` cannot occur in a channel name (no quotes allowed) nor inside `"ts":`,
        // so the first match is the generator's sequence number.
        if let Some(i) = self.seq.find(frame) {
            let rest = &frame[i + 4..];
            if let Some((seq, end)) = number_at(rest) {
                // The generator writes `"t":` right after the sequence number; only data
                // re-encoded by someone else needs the search.
                let after = &rest[end..];
                let time = match after.strip_prefix(b",\"t\":") {
                    Some(t) => number(t),
                    None => self.time.find(after).and_then(|j| number(&after[j + 4..])),
                };
                if let Some(sent_micros) = time {
                    return Incoming::Delivery { seq, sent_micros };
                }
            }
        }
        let Some(i) = self.op.find(frame) else { return Incoming::Other };
        let op = &frame[i + 6..];
        if op.starts_with(b"message\"") {
            Incoming::Foreign
        } else if op.starts_with(b"subscribed\"") {
            Incoming::Subscribed
        } else if op.starts_with(b"published\"") {
            Incoming::Published
        } else if op.starts_with(b"error\"") {
            Incoming::Error { id: self.id.find(frame).and_then(|j| number(&frame[j + 5..])) }
        } else {
            Incoming::Other
        }
    }
}

/// The `code` of an `error` reply (`rate_limited`, `forbidden`, …).
pub(crate) fn error_code(frame: &[u8]) -> Option<&str> {
    let at = memchr::memmem::find(frame, b"\"code\":\"")? + 8;
    let len = memchr::memchr(b'"', &frame[at..])?;
    std::str::from_utf8(&frame[at..at + len]).ok()
}

/// The data of publication `seq`: `{"s":SEQ,"t":SENT,"p":"xxx…"}` padded to `size`
/// bytes when `size` is larger than the bare fields.
pub(crate) fn payload(out: &mut Vec<u8>, seq: u64, sent_micros: u64, size: usize) {
    use std::io::Write as _;
    let start = out.len();
    let _ = write!(out, "{{\"s\":{seq},\"t\":{sent_micros},\"p\":\"");
    let used = out.len() - start + 2;
    out.resize(out.len() + size.saturating_sub(used), b'x');
    out.extend_from_slice(b"\"}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliveries_in_any_field_order() {
        let s = Scanner::default();
        let f = br#"{"op":"message","channel":"lt:0","data":{"s":42,"t":1700000000000123,"p":"xxxx"},"ts":1700000000000200}"#;
        assert_eq!(s.classify(f), Incoming::Delivery { seq: 42, sent_micros: 1_700_000_000_000_123 });
        let f = br#"{"ts":5,"data":{"s": 7, "t": 9},"channel":"a:b","op":"message"}"#;
        assert_eq!(s.classify(f), Incoming::Delivery { seq: 7, sent_micros: 9 });
    }

    #[test]
    fn replies_and_foreign_messages() {
        let s = Scanner::default();
        assert_eq!(s.classify(br#"{"op":"subscribed","channel":"a","id":1}"#), Incoming::Subscribed);
        assert_eq!(s.classify(br#"{"op":"published","id":3}"#), Incoming::Published);
        assert_eq!(
            s.classify(br#"{"op":"error","code":"bad_request","message":"m","id":12}"#),
            Incoming::Error { id: Some(12) }
        );
        assert_eq!(s.classify(br#"{"op":"error","code":"x","message":"m"}"#), Incoming::Error { id: None });
        assert_eq!(error_code(br#"{"op":"error","code":"rate_limited","message":"m"}"#), Some("rate_limited"));
        assert_eq!(error_code(br#"{"op":"pong"}"#), None);
        assert_eq!(s.classify(br#"{"op":"message","channel":"a","data":{"x":1},"ts":5}"#), Incoming::Foreign);
        assert_eq!(s.classify(br#"{"op":"message","channel":"a","data":{"s":"str","t":1},"ts":5}"#), Incoming::Foreign);
        assert_eq!(s.classify(br#"{"op":"pong"}"#), Incoming::Other);
        assert_eq!(s.classify(b"garbage"), Incoming::Other);
    }

    #[test]
    fn payloads_have_the_requested_size_and_scan_back() {
        let s = Scanner::default();
        for size in [0usize, 10, 64, 100, 4096] {
            let mut out = Vec::new();
            payload(&mut out, 123_456, 1_700_000_000_000_000, size);
            assert!(out.len() == size.max(out.len()) && (size < 40 || out.len() == size), "size {size}: {}", out.len());
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(v["s"], 123_456);
            let mut frame = br#"{"op":"message","channel":"c","data":"#.to_vec();
            frame.extend_from_slice(&out);
            frame.extend_from_slice(br#","ts":1}"#);
            assert_eq!(s.classify(&frame), Incoming::Delivery { seq: 123_456, sent_micros: 1_700_000_000_000_000 });
        }
    }

    #[test]
    fn numbers() {
        assert_eq!(number(b"123,"), Some(123));
        assert_eq!(number(b"  9}"), Some(9));
        assert_eq!(number(b"x"), None);
        assert_eq!(number(b"99999999999999999999999"), None);
        assert_eq!(number_at(b"12,\"t\""), Some((12, 2)));
    }
}
