//! RFC 6455 framing of server-to-client frames. Server frames are never masked, so a frame
//! is a pure function of opcode and payload and one framed `Bytes` can be shared by every
//! subscriber of a publication.

use bytes::{BufMut, Bytes, BytesMut};

/// Largest header a server frame can have (no mask): 2 + 8 bytes.
pub const MAX_FRAME_HEADER: usize = 10;

/// Frame opcodes a server sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

/// Writes the header of a final, unmasked frame; returns the used length.
pub fn frame_header(op: OpCode, payload_len: usize, out: &mut [u8; MAX_FRAME_HEADER]) -> usize {
    out[0] = 0x80 | op as u8;
    if payload_len < 126 {
        out[1] = payload_len as u8;
        2
    } else if payload_len <= u16::MAX as usize {
        out[1] = 126;
        out[2..4].copy_from_slice(&(payload_len as u16).to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(payload_len as u64).to_be_bytes());
        10
    }
}

/// A complete final frame: header followed by `payload`.
pub fn frame(op: OpCode, payload: &[u8]) -> Bytes {
    let mut head = [0u8; MAX_FRAME_HEADER];
    let n = frame_header(op, payload.len(), &mut head);
    let mut buf = BytesMut::with_capacity(n + payload.len());
    buf.put_slice(&head[..n]);
    buf.put_slice(payload);
    buf.freeze()
}

/// A Close frame with `code` and a reason (cut to fit the 125-byte control frame limit
/// on a character boundary).
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    frame(OpCode::Close, &payload)
}

/// Frames `payload` that was encoded after `MAX_FRAME_HEADER` reserved bytes at the start
/// of `buf`, so the body is never copied: the header is written right before it.
pub(crate) fn frame_in_place(op: OpCode, mut buf: Vec<u8>) -> Bytes {
    let payload_len = buf.len() - MAX_FRAME_HEADER;
    let mut head = [0u8; MAX_FRAME_HEADER];
    let n = frame_header(op, payload_len, &mut head);
    let start = MAX_FRAME_HEADER - n;
    buf[start..MAX_FRAME_HEADER].copy_from_slice(&head[..n]);
    let mut bytes = Bytes::from(buf);
    let _ = bytes.split_to(start);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_lengths() {
        let mut h = [0u8; MAX_FRAME_HEADER];
        assert_eq!(frame_header(OpCode::Text, 0, &mut h), 2);
        assert_eq!(&h[..2], &[0x81, 0]);
        assert_eq!(frame_header(OpCode::Binary, 125, &mut h), 2);
        assert_eq!(&h[..2], &[0x82, 125]);
        assert_eq!(frame_header(OpCode::Text, 126, &mut h), 4);
        assert_eq!(&h[..4], &[0x81, 126, 0, 126]);
        assert_eq!(frame_header(OpCode::Text, 65535, &mut h), 4);
        assert_eq!(frame_header(OpCode::Text, 65536, &mut h), 10);
        assert_eq!(&h[..10], &[0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
    }

    #[test]
    fn in_place_matches_copying_frame() {
        for len in [0usize, 5, 125, 126, 300, 70_000] {
            let payload = vec![b'x'; len];
            let mut buf = vec![0u8; MAX_FRAME_HEADER];
            buf.extend_from_slice(&payload);
            assert_eq!(frame_in_place(OpCode::Text, buf), frame(OpCode::Text, &payload));
        }
    }

    #[test]
    fn close_reason_is_cut_on_char_boundary() {
        let f = close_frame(4008, &"é".repeat(100));
        assert_eq!(f[0], 0x88);
        let len = f[1] as usize;
        assert!(len <= 125);
        assert_eq!(&f[2..4], &4008u16.to_be_bytes());
        assert!(std::str::from_utf8(&f[4..]).is_ok());
    }
}
