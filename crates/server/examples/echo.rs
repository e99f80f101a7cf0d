//! A WebSocket echo server built from the gateway's own connection layer
//! (`fanout_server::connection`: frame decoding, outbox-fed writes, the Pong bound and the
//! closing handshake) and server framing (`fanout_protocol::frame`), so the
//! Autobahn|Testsuite fuzzingclient, which expects an echo, can grade every one of its
//! cases against exactly the code that reads and writes client frames in `fanout`
//! (scripts/autobahn.sh). Not part of the product.
//!
//! `cargo run --release --example echo -- 127.0.0.1:9001` (port 0 picks a free one; the
//! bound address is printed as `listening ADDR`).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code: a failed assumption should fail loudly")]

use std::{convert::Infallible, io, net::SocketAddr, time::Duration};

use bytes::Bytes;
use fanout_hub::Outbox;
use fanout_protocol::{close_frame, frame, Encoding, OpCode};
use fanout_server::{
    connection::{Connection, Read},
    metrics::NodeMetrics,
    wsframe::Incoming,
};
use http_body_util::Empty;
use hyper::{server::conn::http1, service::service_fn, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

/// The suite's largest messages are 16 MiB.
const MAX_MESSAGE: usize = 64 << 20;
/// How long to wait for the client's Close after sending ours (the gateway's own grace).
const CLOSE_GRACE: Duration = Duration::from_secs(2);

#[tokio::main]
async fn main() -> io::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9001".into())
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("address: {e}")))?;
    let listener = TcpListener::bind(addr).await?;
    println!("listening {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let service = service_fn(|mut req: Request<hyper::body::Incoming>| async move {
                let Ok((response, upgrade)) = fastwebsockets::upgrade::upgrade(&mut req) else {
                    return Ok::<_, Infallible>(
                        Response::builder().status(400).body(Empty::<Bytes>::new()).unwrap_or_default(),
                    );
                };
                tokio::spawn(async move {
                    let Ok(ws) = upgrade.await else { return };
                    if let Ok(io) = ws.into_inner().into_inner().downcast::<TokioIo<TcpStream>>() {
                        let _ = echo(io.io.into_inner(), io.read_buf).await;
                    }
                });
                let (parts, _) = response.into_parts();
                Ok(Response::from_parts(parts, Empty::new()))
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).with_upgrades().await;
        });
    }
}

async fn echo(stream: TcpStream, leftover: Bytes) -> io::Result<()> {
    let mut conn = Connection::new(stream, leftover, MAX_MESSAGE);
    // Replies go through an outbox exactly as a session's do; the bound only has to hold
    // the suite's largest echo.
    let outbox = Outbox::new(Encoding::Json, 2 * MAX_MESSAGE);
    let metrics = NodeMetrics::new();
    loop {
        loop {
            match conn.next_frame() {
                Ok(Some(Incoming::Message { binary, payload })) => {
                    let op = if binary { OpCode::Binary } else { OpCode::Text };
                    outbox.push_reply(frame(op, &payload));
                }
                Ok(Some(Incoming::Ping(payload))) => conn.pong(&outbox, payload),
                Ok(Some(Incoming::Pong)) => {}
                Ok(Some(Incoming::Close(code))) => {
                    let reply = match code {
                        Some(c) => close_frame(c, ""),
                        None => frame(OpCode::Close, &[]),
                    };
                    let _ = outbox.take_now(conn.pending());
                    conn.close(&outbox, &metrics, reply, CLOSE_GRACE, None).await;
                    return Ok(());
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = outbox.take_now(conn.pending());
                    conn.close(&outbox, &metrics, close_frame(e.close_code(), ""), CLOSE_GRACE, Some(CLOSE_GRACE))
                        .await;
                    return Ok(());
                }
            }
        }
        let _ = outbox.take_now(conn.pending());
        conn.flush_all(&outbox, &metrics).await?;
        std::future::poll_fn(|cx| conn.split().1.poll_read(cx)).await?;
        if let Read::Gone = conn.read() {
            return Ok(());
        }
    }
}
