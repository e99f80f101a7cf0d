//! Property tests over the server's decoders of untrusted input (the same ground the fuzz
//! targets in fuzz/ cover, in the regular suite): any bytes, split into reads anywhere,
//! never panic the frame decoder nor push a message past its bound, and a message split
//! across reads decodes the same as in one piece.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code: a failed assumption should fail loudly")]

use bytes::Bytes;
use fanout_server::wsframe::{FrameDecoder, Incoming};
use proptest::prelude::*;

const MAX_MESSAGE: usize = 512;

/// Feeds `input` in reads of `chunk` bytes; the items until the first error, and the error.
fn decode(input: &[u8], chunk: usize) -> (Vec<Incoming>, bool) {
    let mut decoder = FrameDecoder::new(Bytes::new(), MAX_MESSAGE);
    let mut items = Vec::new();
    for piece in input.chunks(chunk.max(1)) {
        decoder.read_buf().extend_from_slice(piece);
        loop {
            match decoder.next_item() {
                Ok(Some(item)) => items.push(item),
                Ok(None) => break,
                Err(_) => return (items, true),
            }
        }
        decoder.shrink_if_idle();
    }
    (items, false)
}

fn masked(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::new();
    fanout_protocol::write_client_frame(&mut out, fin, opcode, payload, mask);
    out
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_and_respect_the_bound(
        input in proptest::collection::vec(any::<u8>(), 0..2048),
        chunk in 1usize..300,
    ) {
        let (items, _) = decode(&input, chunk);
        for item in items {
            if let Incoming::Message { binary, payload } = item {
                prop_assert!(payload.len() <= MAX_MESSAGE);
                prop_assert!(binary || std::str::from_utf8(&payload).is_ok());
            }
        }
    }

    #[test]
    fn fragments_in_any_reads_reassemble(
        text in "[ -~]{0,400}",
        cuts in proptest::collection::vec(1usize..50, 1..6),
        chunk in 1usize..64,
        mask in any::<[u8; 4]>(),
    ) {
        // Split the message into fragments at the given lengths, with a ping in between.
        let bytes = text.as_bytes();
        let mut wire = Vec::new();
        let mut start = 0;
        for (i, cut) in cuts.iter().enumerate() {
            let end = (start + cut).min(bytes.len());
            let last = i == cuts.len() - 1;
            let end = if last { bytes.len() } else { end };
            wire.extend(masked(last, if i == 0 { 1 } else { 0 }, &bytes[start..end], mask));
            if i == 0 {
                wire.extend(masked(true, 9, b"p", mask));
            }
            start = end;
        }
        let (items, failed) = decode(&wire, chunk);
        prop_assert!(!failed);
        let messages: Vec<_> = items.into_iter().filter(|i| matches!(i, Incoming::Message { .. })).collect();
        prop_assert_eq!(messages, vec![Incoming::Message { binary: false, payload: Bytes::copy_from_slice(bytes) }]);
    }
}
