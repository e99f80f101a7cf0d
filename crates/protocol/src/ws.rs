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

/// Appends a masked client frame (what a browser sends) to `out`: the one encoder the
/// test kit, the property tests and the load tester share. `mask` need not be random
/// there; a real client's must be (RFC 6455 §5.3).
pub fn write_client_frame(out: &mut Vec<u8>, fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(if fin { 0x80 } else { 0 } | (opcode & 0x0F));
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    for (i, b) in out[start..].iter_mut().enumerate() {
        *b ^= mask[i & 3];
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

/// A server frame as a client reads it, borrowed from the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct ServerFrame<'a> {
    pub fin: bool,
    pub opcode: u8,
    pub payload: &'a [u8],
}

/// The server broke RFC 6455 (a masked frame, an absurd length).
#[derive(Debug, PartialEq, Eq)]
pub struct ServerFrameError(pub &'static str);

/// Parses the first complete frame of `buf`: `Ok(Some((frame, consumed)))`, or `Ok(None)`
/// when more bytes are needed.
pub fn parse_server_frame(
    buf: &[u8],
    max_payload: usize,
) -> Result<Option<(ServerFrame<'_>, usize)>, ServerFrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b1 & 0x80 != 0 {
        return Err(ServerFrameError("server sent a masked frame"));
    }
    let (len, header) = match b1 & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        n => (n as u64, 2),
    };
    if len > max_payload as u64 {
        return Err(ServerFrameError("frame larger than the configured maximum"));
    }
    let end = usize::try_from(len).map_or(usize::MAX, |len| len.saturating_add(header));
    if buf.len() < end {
        return Ok(None);
    }
    Ok(Some((ServerFrame { fin: b0 & 0x80 != 0, opcode: b0 & 0x0f, payload: &buf[header..end] }, end)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_frames_have_the_right_length_form_and_unmask_to_the_payload() {
        for (len, header) in [(0, 2), (125, 2), (126, 4), (65_535, 4), (65_536, 10), (70_000, 10)] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mask = [1, 2, 3, 4];
            let mut out = Vec::new();
            write_client_frame(&mut out, len % 2 == 0, 0x2, &payload, mask);
            assert_eq!(out[0], if len % 2 == 0 { 0x82 } else { 0x02 });
            assert_eq!(out[1] & 0x80, 0x80, "client frames are masked");
            let announced = match out[1] & 0x7F {
                126 => u64::from(u16::from_be_bytes([out[2], out[3]])),
                127 => u64::from_be_bytes(out[2..10].try_into().unwrap()),
                n => u64::from(n),
            };
            assert_eq!((announced, out.len()), (len as u64, header + 4 + len), "{len}");
            let unmasked: Vec<u8> = out[header + 4..].iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect();
            assert_eq!(unmasked, payload);
        }
    }

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
