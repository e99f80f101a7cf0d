//! Incremental RFC 6455 decoding of client frames with a bounded message size.
//!
//! fastwebsockets' reader allocates an 8 KiB buffer per connection at handshake and its
//! `FragmentCollector` does not bound reassembly; with tens of thousands of mostly idle
//! connections both matter, so the session reads with this decoder: its buffer is empty
//! (unallocated) between bursts and a message may never exceed `max_message` bytes, even
//! across fragments. Upgrades and unmasking still go through fastwebsockets.

use bytes::{Buf, Bytes, BytesMut};

/// A complete unit of client input.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A whole (reassembled) data message; text messages are valid UTF-8.
    Message {
        binary: bool,
        payload: Bytes,
    },
    Ping(Bytes),
    Pong,
    /// The client's Close frame: the code it sent (if any).
    Close(Option<u16>),
}

/// A violation that ends the connection with the given close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    #[error("invalid UTF-8 in a text message")]
    InvalidUtf8,
    #[error("message larger than the configured maximum")]
    TooLarge,
}

impl FrameError {
    pub fn close_code(self) -> u16 {
        match self {
            FrameError::Protocol(_) => 1002,
            FrameError::InvalidUtf8 => 1007,
            FrameError::TooLarge => 1009,
        }
    }
}

/// A parsed frame header.
struct Header {
    fin: bool,
    opcode: u8,
    header_len: usize,
    payload_len: usize,
    mask: [u8; 4],
}

/// Buffers bytes read from the socket and yields [`Incoming`] items.
pub struct FrameDecoder {
    buf: BytesMut,
    max_message: usize,
    /// A fragmented message being reassembled: (is binary, payload so far). Boxed: few
    /// clients fragment, and every connection would pay for the room.
    partial: Option<Box<(bool, BytesMut)>>,
    /// While closing: bytes of the current frame still to be discarded.
    skip: u64,
    /// The client has sent a Close frame (a valid one or not): the closing handshake needs
    /// nothing more from it.
    peer_closed: bool,
}

/// Socket reads ask for at least this much room; small enough to keep idle connections
/// cheap, large enough that a burst of commands is one syscall.
pub const READ_CHUNK: usize = 4096;

impl FrameDecoder {
    pub fn new(leftover: Bytes, max_message: usize) -> Self {
        Self { buf: BytesMut::from(&leftover[..]), max_message, partial: None, skip: 0, peer_closed: false }
    }

    /// The buffer to read into, with room for at least `READ_CHUNK` more bytes.
    pub fn read_buf(&mut self) -> &mut BytesMut {
        self.buf.reserve(READ_CHUNK);
        &mut self.buf
    }

    /// Releases the buffer when nothing is pending, so an idle connection holds no memory.
    pub fn shrink_if_idle(&mut self) {
        if self.buf.is_empty() && self.partial.is_none() && self.buf.capacity() > 0 {
            self.buf = BytesMut::new();
        }
    }

    /// Whether bytes read from the client before any frame was decoded are waiting.
    pub fn has_buffered(&self) -> bool {
        !self.buf.is_empty()
    }

    /// After the server sent its Close: discards frames until the client's Close, which
    /// ends the closing handshake (RFC 6455 §7.1.1: the server then closes the TCP
    /// connection). Lenient on purpose, because it also runs after a protocol error: only
    /// frame lengths are read, payloads are skipped without being buffered.
    pub fn client_closed(&mut self) -> bool {
        loop {
            if self.peer_closed {
                return true;
            }
            if self.skip > 0 {
                let n = self.skip.min(self.buf.len() as u64);
                self.buf.advance(n as usize);
                self.skip -= n;
                if self.skip > 0 {
                    return false;
                }
            }
            let b = &self.buf[..];
            if b.len() < 2 {
                return false;
            }
            let (ext, len7) = match b[1] & 0x7F {
                126 => (2, None),
                127 => (8, None),
                n => (0, Some(u64::from(n))),
            };
            let header_len = 2 + ext + if b[1] & 0x80 != 0 { 4 } else { 0 };
            if b.len() < header_len {
                return false;
            }
            if b[0] & 0x0F == 0x8 {
                self.peer_closed = true;
                return true;
            }
            let len = match len7 {
                Some(n) => n,
                None if ext == 2 => u64::from(u16::from_be_bytes([b[2], b[3]])),
                None => u64::from_be_bytes(b[2..10].try_into().unwrap_or_default()),
            };
            self.buf.advance(header_len);
            self.skip = len;
        }
    }

    /// The next complete item, `Ok(None)` when more bytes are needed.
    pub fn next_item(&mut self) -> Result<Option<Incoming>, FrameError> {
        loop {
            let Some(Header { fin, opcode, header_len, payload_len, mask }) = self.header()? else { return Ok(None) };
            // No room is reserved for the announced payload: a 14-byte header followed by a
            // trickle must not pin the whole message's worth of memory. `read_buf` grows
            // the buffer as bytes actually arrive (BytesMut doubles, so this stays amortised).
            if self.buf.len() < header_len + payload_len {
                return Ok(None);
            }
            self.buf.advance(header_len);
            let mut payload = self.buf.split_to(payload_len);
            fastwebsockets::unmask(&mut payload, mask);
            if let Some(item) = self.frame(fin, opcode, payload)? {
                return Ok(Some(item));
            }
        }
    }

    /// Parses the header at the front of the buffer. Rejects oversized payloads before any of them is buffered.
    fn header(&self) -> Result<Option<Header>, FrameError> {
        let b = &self.buf[..];
        if b.len() < 2 {
            return Ok(None);
        }
        let fin = b[0] & 0x80 != 0;
        if b[0] & 0x70 != 0 {
            return Err(FrameError::Protocol("reserved bits set"));
        }
        let opcode = b[0] & 0x0F;
        if !matches!(opcode, 0x0 | 0x1 | 0x2 | 0x8 | 0x9 | 0xA) {
            return Err(FrameError::Protocol("unknown opcode"));
        }
        if b[1] & 0x80 == 0 {
            return Err(FrameError::Protocol("client frames must be masked"));
        }
        let (ext, len7) = match b[1] & 0x7F {
            126 => (2, None),
            127 => (8, None),
            n => (0, Some(n as u64)),
        };
        let header_len = 2 + ext + 4;
        if b.len() < header_len {
            return Ok(None);
        }
        let len = match len7 {
            Some(n) => n,
            None if ext == 2 => u16::from_be_bytes([b[2], b[3]]) as u64,
            None => u64::from_be_bytes(b[2..10].try_into().unwrap_or_default()),
        };
        let control = opcode >= 0x8;
        if control && (!fin || len > 125) {
            return Err(FrameError::Protocol("control frames must be final and at most 125 bytes"));
        }
        let already = self.partial.as_ref().map_or(0, |p| p.1.len() as u64);
        // Saturating: a 64-bit length after a first fragment must not wrap past the bound.
        if !control && already.saturating_add(len) > self.max_message as u64 {
            return Err(FrameError::TooLarge);
        }
        let mask = b[header_len - 4..header_len].try_into().unwrap_or_default();
        Ok(Some(Header { fin, opcode, header_len, payload_len: len as usize, mask }))
    }

    fn frame(&mut self, fin: bool, opcode: u8, payload: BytesMut) -> Result<Option<Incoming>, FrameError> {
        match opcode {
            0x1 | 0x2 => {
                if self.partial.is_some() {
                    return Err(FrameError::Protocol("new data frame inside a fragmented message"));
                }
                let binary = opcode == 0x2;
                if fin {
                    return message(binary, payload.freeze()).map(Some);
                }
                self.partial = Some(Box::new((binary, payload)));
                Ok(None)
            }
            0x0 => {
                let Some(mut partial) = self.partial.take() else {
                    return Err(FrameError::Protocol("continuation frame without a message"));
                };
                partial.1.extend_from_slice(&payload);
                if fin {
                    let (binary, so_far) = *partial;
                    return message(binary, so_far.freeze()).map(Some);
                }
                self.partial = Some(partial);
                Ok(None)
            }
            0x8 => {
                self.peer_closed = true;
                close_payload(&payload)
            }
            0x9 => Ok(Some(Incoming::Ping(payload.freeze()))),
            _ => Ok(Some(Incoming::Pong)),
        }
    }
}

/// A Close frame's payload: its code, when it has a valid one.
fn close_payload(payload: &[u8]) -> Result<Option<Incoming>, FrameError> {
    match payload.len() {
        0 => Ok(Some(Incoming::Close(None))),
        1 => Err(FrameError::Protocol("close frame with a 1-byte payload")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if std::str::from_utf8(&payload[2..]).is_err() {
                return Err(FrameError::InvalidUtf8);
            }
            if !fastwebsockets::CloseCode::from(code).is_allowed() {
                return Err(FrameError::Protocol("invalid close code"));
            }
            Ok(Some(Incoming::Close(Some(code))))
        }
    }
}

fn message(binary: bool, payload: Bytes) -> Result<Incoming, FrameError> {
    if !binary && std::str::from_utf8(&payload).is_err() {
        return Err(FrameError::InvalidUtf8);
    }
    Ok(Incoming::Message { binary, payload })
}

#[cfg(test)]
mod tests {
    use fanout_testkit::client_frame;

    use super::*;

    fn decoder(bytes: &[u8], max: usize) -> FrameDecoder {
        FrameDecoder::new(Bytes::copy_from_slice(bytes), max)
    }

    #[test]
    fn whole_frames_byte_by_byte() {
        let mut wire = client_frame(true, 1, b"hello");
        wire.extend(client_frame(true, 2, &[0xff; 300]));
        wire.extend(client_frame(true, 9, b"p"));
        let mut d = FrameDecoder::new(Bytes::new(), 1000);
        let mut got = Vec::new();
        for b in wire {
            d.read_buf().extend_from_slice(&[b]);
            while let Some(item) = d.next_item().unwrap() {
                got.push(item);
            }
        }
        assert_eq!(
            got,
            vec![
                Incoming::Message { binary: false, payload: Bytes::from_static(b"hello") },
                Incoming::Message { binary: true, payload: Bytes::from(vec![0xff; 300]) },
                Incoming::Ping(Bytes::from_static(b"p")),
            ]
        );
        d.shrink_if_idle();
        assert_eq!(d.buf.capacity(), 0);
    }

    #[test]
    fn fragments_are_reassembled_and_bounded() {
        let mut wire = client_frame(false, 1, b"he");
        wire.extend(client_frame(true, 10, b""));
        wire.extend(client_frame(false, 0, b"ll"));
        wire.extend(client_frame(true, 0, b"o"));
        let mut d = decoder(&wire, 5);
        assert_eq!(d.next_item(), Ok(Some(Incoming::Pong)));
        assert_eq!(d.next_item(), Ok(Some(Incoming::Message { binary: false, payload: Bytes::from_static(b"hello") })));
        let mut wire = client_frame(false, 1, b"hel");
        wire.extend(client_frame(true, 0, b"lo!"));
        assert_eq!(decoder(&wire, 5).next_item(), Err(FrameError::TooLarge));
    }

    #[test]
    fn oversized_frame_rejected_from_its_header() {
        // Only the header is present: the decoder must not wait for (or buffer) the body.
        let frame = client_frame(true, 1, &vec![b'a'; 70_000]);
        assert_eq!(decoder(&frame[..14], 65_536).next_item(), Err(FrameError::TooLarge));
        let mut huge = vec![0x81, 0x80 | 127];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        huge.extend_from_slice(&[0; 4]);
        assert_eq!(decoder(&huge, 65_536).next_item(), Err(FrameError::TooLarge));
        // The same length on a continuation frame, after a first fragment (found by fuzzing).
        let mut wire = client_frame(false, 1, b"ab");
        wire.extend_from_slice(&[0x00, 0x80 | 127]);
        wire.extend_from_slice(&u64::MAX.to_be_bytes());
        wire.extend_from_slice(&[0; 4]);
        let mut d = decoder(&wire, 65_536);
        assert_eq!(d.next_item(), Err(FrameError::TooLarge));
    }

    #[test]
    fn violations() {
        let cases: Vec<(Vec<u8>, FrameError)> = vec![
            (vec![0x81, 0x00], FrameError::Protocol("client frames must be masked")),
            (client_frame(true, 3, b""), FrameError::Protocol("unknown opcode")),
            (
                {
                    let mut f = client_frame(true, 1, b"x");
                    f[0] |= 0x40;
                    f
                },
                FrameError::Protocol("reserved bits set"),
            ),
            (client_frame(false, 9, b""), FrameError::Protocol("control frames must be final and at most 125 bytes")),
            (
                client_frame(true, 9, &[0; 126]),
                FrameError::Protocol("control frames must be final and at most 125 bytes"),
            ),
            (client_frame(true, 0, b"x"), FrameError::Protocol("continuation frame without a message")),
            (
                [client_frame(false, 1, b"x"), client_frame(true, 1, b"y")].concat(),
                FrameError::Protocol("new data frame inside a fragmented message"),
            ),
            (client_frame(true, 1, &[0xc3, 0x28]), FrameError::InvalidUtf8),
            ([client_frame(false, 1, &[0xe2, 0x82]), client_frame(true, 0, &[0x28])].concat(), FrameError::InvalidUtf8),
            (client_frame(true, 8, &[3]), FrameError::Protocol("close frame with a 1-byte payload")),
            (client_frame(true, 8, &[0x03, 0xed]), FrameError::Protocol("invalid close code")),
            (client_frame(true, 8, &[0x03, 0xe8, 0xff]), FrameError::InvalidUtf8),
        ];
        for (wire, want) in cases {
            let mut d = decoder(&wire, 1000);
            let got = loop {
                match d.next_item() {
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("no error for {wire:?}"),
                    Err(e) => break e,
                }
            };
            assert_eq!(got, want, "{wire:?}");
        }
        assert_eq!(
            decoder(&client_frame(true, 8, &[0x03, 0xe8]), 10).next_item(),
            Ok(Some(Incoming::Close(Some(1000))))
        );
    }

    #[test]
    fn a_header_and_a_trickle_pin_only_what_arrived() {
        // The header announces 60,000 bytes; only 10 of them arrive.
        let frame = client_frame(true, 2, &[7; 60_000]);
        let mut d = FrameDecoder::new(Bytes::new(), 65_536);
        d.read_buf().extend_from_slice(&frame[..14 + 10]);
        assert_eq!(d.next_item(), Ok(None));
        assert!(d.buf.capacity() < 3 * READ_CHUNK, "reserved {} bytes for a trickle", d.buf.capacity());
        // The rest arriving in read-sized pieces still completes the message.
        for chunk in frame[24..].chunks(READ_CHUNK) {
            d.read_buf().extend_from_slice(chunk);
        }
        assert_eq!(d.next_item(), Ok(Some(Incoming::Message { binary: true, payload: Bytes::from(vec![7; 60_000]) })));
    }

    #[test]
    fn closing_skips_to_the_clients_close_whatever_precedes_it() {
        // An unmasked frame with reserved bits (what made the server close), a big masked
        // frame arriving in pieces, then the client's Close.
        let mut wire = vec![0xf1, 0x02, b'h', b'i'];
        wire.extend(client_frame(true, 2, &[1; 70_000]));
        wire.extend(client_frame(true, 8, &[0x03, 0xe8]));
        let mut d = FrameDecoder::new(Bytes::new(), 1000);
        let mut seen = false;
        for chunk in wire.chunks(1000) {
            assert!(!seen, "Close found before it arrived");
            d.read_buf().extend_from_slice(chunk);
            seen = d.client_closed();
            assert!(d.buf.len() <= 2000, "closing buffered {} bytes", d.buf.len());
        }
        assert!(seen);
        assert!(!FrameDecoder::new(Bytes::from_static(&[0x81, 0x85]), 10).client_closed());
    }

    #[test]
    fn utf8_split_across_fragments_is_fine() {
        let mut wire = client_frame(false, 1, &[0xe2, 0x82]);
        wire.extend(client_frame(true, 0, &[0xac]));
        assert_eq!(
            decoder(&wire, 10).next_item(),
            Ok(Some(Incoming::Message { binary: false, payload: Bytes::from("€") }))
        );
    }
}
