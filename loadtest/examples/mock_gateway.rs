//! A minimal single-node stand-in for the gateway, for measuring the load generator's
//! own ceiling: it speaks just enough of the protocol (subscribe, publish, message) and
//! coalesces each connection's frames for `--flush-us` before one write, so it can feed
//! the generator far more deliveries per second than a real node on one core.
//!
//!   taskset -c 0 target/release/examples/mock_gateway 127.0.0.1:7000 1000 &
//!   taskset -c 1 target/release/fanout-loadtest run broadcast --url ws://127.0.0.1:7000/ws -n 500 -r 2000

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code: a failed assumption should fail loudly")]

use std::{cell::RefCell, collections::HashMap, rc::Rc, time::Duration};

use base64::Engine as _;
use fanout_protocol::{frame, now_micros, OpCode};
use sha1::{Digest, Sha1};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Notify,
};

struct Conn {
    out: RefCell<Vec<u8>>,
    wake: Notify,
}

#[derive(Default)]
struct Hub {
    conns: RefCell<Vec<Rc<Conn>>>,
    channels: RefCell<HashMap<Vec<u8>, Vec<Rc<Conn>>>>,
}

fn field<'a>(cmd: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let key = format!("\"{name}\":");
    let at = memchr::memmem::find(cmd, key.as_bytes())? + key.len();
    let rest = &cmd[at..];
    if let Some(body) = rest.strip_prefix(b"\"") {
        let end = memchr::memchr(b'"', body)?;
        Some(&body[..end])
    } else {
        let end = rest.iter().position(|c| *c == b',' || *c == b'}').unwrap_or(rest.len());
        Some(&rest[..end])
    }
}

/// The raw `data` value of our publish commands: everything between `"data":` and `,"id":`.
fn data(cmd: &[u8]) -> Option<&[u8]> {
    let start = memchr::memmem::find(cmd, b"\"data\":")? + 7;
    let end = memchr::memmem::rfind(cmd, b",\"id\":").filter(|e| *e > start).unwrap_or(cmd.len() - 1);
    Some(&cmd[start..end])
}

fn push(conn: &Conn, bytes: &[u8]) {
    let mut out = conn.out.borrow_mut();
    if out.is_empty() {
        conn.wake.notify_one();
    }
    out.extend_from_slice(bytes);
}

async fn serve(stream: TcpStream, hub: Rc<Hub>, flush: Duration) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let head_end = loop {
        let n = rd.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = memchr::memmem::find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let key = head
        .lines()
        .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: ").or_else(|| l.strip_prefix("sec-websocket-key: ")))
        .unwrap_or("")
        .trim()
        .to_owned();
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let accept = base64::engine::general_purpose::STANDARD.encode(sha.finalize());
    let protocol = if head.to_ascii_lowercase().contains("sec-websocket-protocol:") {
        "Sec-WebSocket-Protocol: fanout.v1.json\r\n"
    } else {
        ""
    };
    let response = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n{protocol}\r\n");
    wr.write_all(response.as_bytes()).await?;
    buf.drain(..head_end);

    let conn = Rc::new(Conn { out: RefCell::new(Vec::new()), wake: Notify::new() });
    hub.conns.borrow_mut().push(conn.clone());
    let writer = {
        let conn = conn.clone();
        tokio::task::spawn_local(async move {
            loop {
                conn.wake.notified().await;
                if flush.is_zero() {
                    tokio::task::yield_now().await;
                } else {
                    tokio::time::sleep(flush).await;
                }
                let out = std::mem::take(&mut *conn.out.borrow_mut());
                if wr.write_all(&out).await.is_err() {
                    return;
                }
            }
        })
    };
    loop {
        // Client frames: masked, small, never fragmented by our generator.
        while buf.len() >= 6 {
            let len7 = (buf[1] & 0x7f) as usize;
            let (len, hdr) = match len7 {
                126 if buf.len() >= 8 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                127 if buf.len() >= 14 => (u64::from_be_bytes(buf[2..10].try_into().unwrap_or_default()) as usize, 10),
                126 | 127 => break,
                n => (n, 2),
            };
            if buf.len() < hdr + 4 + len {
                break;
            }
            let opcode = buf[0] & 0x0f;
            let mask = [buf[hdr], buf[hdr + 1], buf[hdr + 2], buf[hdr + 3]];
            let mut payload: Vec<u8> = buf[hdr + 4..hdr + 4 + len].to_vec();
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i & 3];
            }
            buf.drain(..hdr + 4 + len);
            match opcode {
                0x8 => {
                    writer.abort();
                    return Ok(());
                }
                0x1 => handle(&hub, &conn, &payload),
                _ => {}
            }
        }
        let n = rd.read(&mut chunk).await?;
        if n == 0 {
            writer.abort();
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn handle(hub: &Hub, conn: &Rc<Conn>, cmd: &[u8]) {
    let id = field(cmd, "id").unwrap_or(b"null");
    let Some(channel) = field(cmd, "channel") else { return };
    match field(cmd, "op") {
        Some(b"subscribe") => {
            hub.channels.borrow_mut().entry(channel.to_vec()).or_default().push(conn.clone());
            let reply = format!(
                r#"{{"op":"subscribed","channel":"{}","id":{}}}"#,
                String::from_utf8_lossy(channel),
                String::from_utf8_lossy(id)
            );
            push(conn, &frame(OpCode::Text, reply.as_bytes()));
        }
        Some(b"publish") => {
            let Some(data) = data(cmd) else { return };
            let mut msg = Vec::with_capacity(data.len() + 96);
            msg.extend_from_slice(b"{\"op\":\"message\",\"channel\":\"");
            msg.extend_from_slice(channel);
            msg.extend_from_slice(b"\",\"data\":");
            msg.extend_from_slice(data);
            msg.extend_from_slice(format!(",\"ts\":{}}}", now_micros()).as_bytes());
            let framed = frame(OpCode::Text, &msg);
            if let Some(subs) = hub.channels.borrow().get(channel) {
                for s in subs {
                    push(s, &framed);
                }
            }
            push(
                conn,
                &frame(
                    OpCode::Text,
                    format!(r#"{{"op":"published","id":{}}}"#, String::from_utf8_lossy(id)).as_bytes(),
                ),
            );
        }
        _ => {}
    }
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:0".into());
    let flush = Duration::from_micros(args.next().and_then(|v| v.parse().ok()).unwrap_or(1000));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let listener = TcpListener::bind(&addr).await?;
        eprintln!("listening public={} internal=none", listener.local_addr()?);
        let hub = Rc::new(Hub::default());
        loop {
            let (stream, _) = listener.accept().await?;
            tokio::task::spawn_local(serve(stream, hub.clone(), flush));
        }
    })
}
