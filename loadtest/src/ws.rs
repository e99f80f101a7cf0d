//! The load generator's own WebSocket client: a hand-written upgrade, a zero-copy parser
//! for server frames and masked client frames. Subscribers read thousands of frames per
//! second per connection, and a general-purpose client's per-message allocation and
//! JSON decoding would make the generator, not the gateway, the bottleneck.

use std::{fmt, net::SocketAddr, time::Duration};

use base64::Engine as _;
use sha1::{Digest, Sha1};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

pub(crate) const OP_CONTINUATION: u8 = 0x0;
pub(crate) const OP_TEXT: u8 = 0x1;
pub(crate) const OP_BINARY: u8 = 0x2;
pub(crate) const OP_CLOSE: u8 = 0x8;
pub(crate) const OP_PING: u8 = 0x9;
pub(crate) const OP_PONG: u8 = 0xA;

/// The subprotocol the generator speaks: its scanner reads JSON text frames.
pub(crate) const SUBPROTOCOL: &str = "fanout.v1.json";

/// A parsed `ws://host:port/path` target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WsUrl {
    /// `host:port` as written, for the `Host` header.
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl WsUrl {
    pub(crate) fn parse(url: &str) -> Result<Self, String> {
        let rest = url.strip_prefix("ws://").ok_or_else(|| format!("{url:?}: only ws:// URLs are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/ws"),
        };
        if authority.is_empty() {
            return Err(format!("{url:?}: no host"));
        }
        let port = match authority.rsplit_once(':') {
            Some((_, p)) if !authority.ends_with(']') => p.parse().map_err(|_| format!("{url:?}: bad port {p:?}"))?,
            _ => 80,
        };
        Ok(Self { host: authority.to_owned(), port, path: path.to_owned() })
    }

    /// `host:port` without IPv6 brackets, for the resolver.
    pub(crate) fn host_for_lookup(&self) -> String {
        let host = match self.host.rsplit_once(':') {
            Some((h, _)) if !self.host.ends_with(']') => h,
            _ => &self.host,
        };
        format!("{}:{}", host.trim_start_matches('[').trim_end_matches(']'), self.port)
    }

    pub(crate) async fn resolve(&self) -> Result<SocketAddr, String> {
        tokio::net::lookup_host(self.host_for_lookup())
            .await
            .map_err(|e| format!("resolving {}: {e}", self.host))?
            .next()
            .ok_or_else(|| format!("{} resolves to nothing", self.host))
    }
}

impl fmt::Display for WsUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ws://{}{}", self.host, self.path)
    }
}

/// Why an upgrade failed; `kind` is a short label for the report's error counts.
#[derive(Debug)]
pub(crate) struct HandshakeError {
    pub kind: &'static str,
    pub detail: String,
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.detail)
    }
}

fn herr(kind: &'static str, detail: impl Into<String>) -> HandshakeError {
    HandshakeError { kind, detail: detail.into() }
}

/// `Sec-WebSocket-Accept` for `key` (RFC 6455 section 4.2.2).
pub(crate) fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// Upgrades `stream` to a WebSocket. Returns bytes that arrived after the response
/// headers: the server may send frames right behind its 101.
pub(crate) async fn handshake(
    stream: &mut TcpStream,
    url: &WsUrl,
    rng: &mut Rng,
    timeout: Duration,
) -> Result<Vec<u8>, HandshakeError> {
    let mut nonce = [0u8; 16];
    nonce[..8].copy_from_slice(&rng.next().to_le_bytes());
    nonce[8..].copy_from_slice(&rng.next().to_le_bytes());
    let key = base64::engine::general_purpose::STANDARD.encode(nonce);
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {SUBPROTOCOL}\r\n\r\n",
        url.path, url.host
    );
    let exchange = async {
        stream.write_all(request.as_bytes()).await.map_err(|e| herr("io", e.to_string()))?;
        let mut buf = Vec::with_capacity(512);
        let mut chunk = [0u8; 1024];
        loop {
            let n = stream.read(&mut chunk).await.map_err(|e| herr("io", e.to_string()))?;
            if n == 0 {
                return Err(herr("closed", "connection closed during the upgrade"));
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = memchr::memmem::find(&buf, b"\r\n\r\n") {
                return Ok((buf, end + 4));
            }
            if buf.len() > 16 * 1024 {
                return Err(herr("bad_response", "response headers over 16 KiB"));
            }
        }
    };
    let (buf, end) =
        tokio::time::timeout(timeout, exchange).await.map_err(|_| herr("timeout", "no upgrade response"))??;
    check_response(&buf[..end], &accept_key(&key))?;
    Ok(buf[end..].to_vec())
}

fn check_response(head: &[u8], expected_accept: &str) -> Result<(), HandshakeError> {
    let text = std::str::from_utf8(head).map_err(|_| herr("bad_response", "response headers are not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line.split(' ').nth(1).unwrap_or_default();
    if status != "101" {
        let kind = match status {
            "400" => "http_400",
            "401" => "http_401",
            "403" => "http_403",
            "429" => "http_429",
            "503" => "http_503",
            _ => "http_other",
        };
        return Err(herr(kind, status_line.to_owned()));
    }
    let accept = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("sec-websocket-accept"))
        .map(|(_, v)| v.trim());
    if accept != Some(expected_accept) {
        return Err(herr("bad_accept", format!("Sec-WebSocket-Accept {accept:?}, expected {expected_accept:?}")));
    }
    Ok(())
}

// Server frames are parsed by the protocol crate's client-side parser, shared with the
// test kit.
pub(crate) use fanout_protocol::{parse_server_frame as parse_frame, ServerFrameError as FrameError};

/// Appends a final, masked client frame to `out` (the protocol crate's encoder).
pub(crate) fn client_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    fanout_protocol::write_client_frame(out, true, opcode, payload, mask);
}

/// A masked Close frame with a status code.
pub(crate) fn close_frame(out: &mut Vec<u8>, code: u16, mask: [u8; 4]) {
    client_frame(out, OP_CLOSE, &code.to_be_bytes(), mask);
}

/// The status code of a Close frame's payload; 1005 (none given) when it has none.
pub(crate) fn close_code(payload: &[u8]) -> u16 {
    if payload.len() >= 2 {
        u16::from_be_bytes([payload[0], payload[1]])
    } else {
        1005
    }
}

/// xorshift64*: masks and handshake nonces only need to differ, not to be secret, in a
/// load generator that talks to its own cluster.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub(crate) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub(crate) fn mask(&mut self) -> [u8; 4] {
        (self.next() as u32).to_le_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = WsUrl::parse("ws://127.0.0.1:8080/ws").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.path.as_str()), ("127.0.0.1:8080", 8080, "/ws"));
        assert_eq!(u.host_for_lookup(), "127.0.0.1:8080");
        assert_eq!(u.to_string(), "ws://127.0.0.1:8080/ws");
        let u = WsUrl::parse("ws://gw:9000").unwrap();
        assert_eq!((u.port, u.path.as_str()), (9000, "/ws"));
        let u = WsUrl::parse("ws://[::1]:81/ws?token=x").unwrap();
        assert_eq!((u.port, u.path.as_str(), u.host_for_lookup().as_str()), (81, "/ws?token=x", "::1:81"));
        assert_eq!(WsUrl::parse("ws://example").unwrap().port, 80);
        assert!(WsUrl::parse("wss://x").is_err());
        assert!(WsUrl::parse("ws://x:notaport/ws").is_err());
        assert!(WsUrl::parse("ws:///ws").is_err());
    }

    #[test]
    fn accept_key_matches_rfc_example() {
        assert_eq!(accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn response_checks() {
        let ok = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nsec-websocket-accept: abc\r\n\r\n";
        assert!(check_response(ok.as_bytes(), "abc").is_ok());
        assert_eq!(check_response(ok.as_bytes(), "xyz").unwrap_err().kind, "bad_accept");
        let e = check_response(b"HTTP/1.1 503 Service Unavailable\r\n\r\n", "abc").unwrap_err();
        assert_eq!(e.kind, "http_503");
    }

    #[test]
    fn parses_all_header_sizes_and_partial_input() {
        for len in [0usize, 5, 125, 126, 1000, 65535, 65536, 200_000] {
            let payload = vec![b'x'; len];
            let framed = fanout_protocol::frame(fanout_protocol::OpCode::Text, &payload);
            for cut in [0, 1, framed.len().min(3), framed.len().min(9), framed.len() - 1] {
                if cut < framed.len() {
                    assert_eq!(parse_frame(&framed[..cut], 1 << 20), Ok(None), "len {len} cut {cut}");
                }
            }
            let (f, used) = parse_frame(&framed, 1 << 20).unwrap().unwrap();
            assert_eq!((f.fin, f.opcode, f.payload.len(), used), (true, OP_TEXT, len, framed.len()));
        }
        let two = [
            fanout_protocol::frame(fanout_protocol::OpCode::Ping, b"a"),
            fanout_protocol::frame(fanout_protocol::OpCode::Text, b"bc"),
        ]
        .concat();
        let (f, used) = parse_frame(&two, 100).unwrap().unwrap();
        assert_eq!((f.opcode, f.payload), (OP_PING, &b"a"[..]));
        let (f, _) = parse_frame(&two[used..], 100).unwrap().unwrap();
        assert_eq!(f.payload, b"bc");
        assert!(parse_frame(&[0x81, 0x85, 0, 0, 0, 0, 1], 100).is_err(), "masked server frame");
        assert!(parse_frame(&fanout_protocol::frame(fanout_protocol::OpCode::Text, &[0; 300]), 100).is_err());
    }

    #[test]
    fn client_frames_are_masked_and_unmask_to_the_payload() {
        let mut rng = Rng::new(7);
        for len in [0usize, 3, 125, 126, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mask = rng.mask();
            let mut out = Vec::new();
            client_frame(&mut out, OP_TEXT, &payload, mask);
            assert_eq!(out[0], 0x81);
            assert_ne!(out[1] & 0x80, 0);
            let header = match len {
                0..=125 => 2,
                126..=65535 => 4,
                _ => 10,
            };
            assert_eq!(&out[header..header + 4], &mask);
            let unmasked: Vec<u8> = out[header + 4..].iter().enumerate().map(|(i, b)| b ^ mask[i & 3]).collect();
            assert_eq!(unmasked, payload);
        }
        let mut out = Vec::new();
        close_frame(&mut out, 1000, [0, 0, 0, 0]);
        assert_eq!(out, [0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8]);
        assert_eq!(close_code(&[0x0f, 0xa8]), 4008);
        assert_eq!(close_code(&[]), 1005);
    }
}
