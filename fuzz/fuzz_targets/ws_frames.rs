//! The server's WebSocket frame decoder fed client bytes in arbitrary chunks: it yields
//! items or one error, never panics, and never returns a message over its bound.
#![no_main]

use bytes::Bytes;
use fanout_server::wsframe::{FrameDecoder, Incoming};
use libfuzzer_sys::fuzz_target;

const MAX_MESSAGE: usize = 1024;

fuzz_target!(|data: &[u8]| {
    // The first byte picks how the input is split into reads.
    let Some((&split, rest)) = data.split_first() else { return };
    let chunk = usize::from(split % 64) + 1;
    let mut decoder = FrameDecoder::new(Bytes::new(), MAX_MESSAGE);
    for piece in rest.chunks(chunk) {
        decoder.read_buf().extend_from_slice(piece);
        loop {
            match decoder.next_item() {
                Ok(Some(Incoming::Message { binary, payload })) => {
                    assert!(payload.len() <= MAX_MESSAGE);
                    if !binary {
                        assert!(std::str::from_utf8(&payload).is_ok());
                    }
                }
                Ok(Some(Incoming::Ping(payload))) => assert!(payload.len() <= 125),
                Ok(Some(_)) => {}
                Ok(None) => break,
                // The session closes the connection on the first error.
                Err(_) => return,
            }
        }
        decoder.shrink_if_idle();
    }
});
