//! A raw WebSocket client that writes exactly the bytes a test gives it, for frames no
//! well-behaved library would send (unmasked, bad UTF-8, oversized, bad fragments).

use std::time::Duration;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

pub struct RawWs {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

/// A server frame as received: opcode and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// The close code of a Close frame.
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == 8 && self.payload.len() >= 2).then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

/// A masked client frame.
pub fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    fanout_protocol::write_client_frame(&mut out, fin, opcode, payload, [0x37, 0xfa, 0x21, 0x3d]);
    out
}

impl RawWs {
    /// Performs the HTTP upgrade by hand (JSON subprotocol).
    pub async fn connect(addr: std::net::SocketAddr) -> Self {
        Self::connect_from(addr, None, &[]).await
    }

    /// A TCP connection from `source` (any loopback address works on Linux), or the
    /// default address; nothing sent.
    pub async fn tcp_from(addr: std::net::SocketAddr, source: Option<std::net::IpAddr>) -> TcpStream {
        match source {
            None => TcpStream::connect(addr).await.expect("connect"),
            Some(ip) => {
                let socket = tokio::net::TcpSocket::new_v4().expect("socket");
                socket.bind((ip, 0).into()).expect("bind the source address");
                socket.connect(addr).await.expect("connect")
            }
        }
    }

    /// The upgrade from `source`, with `first` (frames, say) sent in the same write as the
    /// request, as a client that does not wait for the 101 would.
    pub async fn connect_from(addr: std::net::SocketAddr, source: Option<std::net::IpAddr>, first: &[u8]) -> Self {
        let mut stream = Self::tcp_from(addr, source).await;
        let req = format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: fanout.v1.json\r\n\r\n"
        );
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(first);
        stream.write_all(&bytes).await.expect("write");
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).await.expect("handshake response");
            buf.push(byte[0]);
        }
        assert!(buf.starts_with(b"HTTP/1.1 101"), "upgrade refused: {}", String::from_utf8_lossy(&buf));
        Self { stream, buf: Vec::new() }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        // The server may close early on a bad header; a failed write is then expected.
        let _ = self.stream.write_all(bytes).await;
    }

    /// The next server frame; None on EOF, reset or timeout.
    pub async fn frame(&mut self, timeout: Duration) -> Option<RawFrame> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match fanout_protocol::parse_server_frame(&self.buf, usize::MAX) {
                Ok(Some((f, used))) => {
                    let frame = RawFrame { opcode: f.opcode, payload: f.payload.to_vec() };
                    self.buf.drain(..used);
                    return Some(frame);
                }
                Ok(None) => {}
                Err(e) => panic!("the server broke RFC 6455: {}", e.0),
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                _ => return None,
            }
        }
    }

    /// Reads frames until a Close arrives and returns its code.
    pub async fn close_code(&mut self) -> Option<u16> {
        while let Some(f) = self.frame(Duration::from_secs(5)).await {
            if f.opcode == 8 {
                return f.close_code();
            }
        }
        None
    }

    /// The next text frame, parsed.
    pub async fn json(&mut self) -> serde_json::Value {
        loop {
            let f = self.frame(Duration::from_secs(5)).await.expect("no frame");
            if f.opcode == 1 {
                return serde_json::from_slice(&f.payload).expect("JSON");
            }
        }
    }
}
