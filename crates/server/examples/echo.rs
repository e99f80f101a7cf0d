//! A WebSocket echo server built from the gateway's own frame decoder
//! (`fanout_server::wsframe`) and server framing (`fanout_protocol::frame`), so the
//! Autobahn|Testsuite fuzzingclient, which expects an echo, can grade every one of its
//! cases against exactly the code that reads and writes client frames in `fanout`
//! (scripts/autobahn.sh). Not part of the product.
//!
//! `cargo run --release --example echo -- 127.0.0.1:9001` (port 0 picks a free one; the
//! bound address is printed as `listening ADDR`).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code: a failed assumption should fail loudly")]

use std::{convert::Infallible, io, net::SocketAddr, time::Duration};

use bytes::Bytes;
use fanout_protocol::{close_frame, frame, OpCode};
use fanout_server::wsframe::{FrameDecoder, FrameError, Incoming};
use http_body_util::Empty;
use hyper::{server::conn::http1, service::service_fn, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
};

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

async fn echo(mut stream: TcpStream, leftover: Bytes) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut decoder = FrameDecoder::new(leftover, MAX_MESSAGE);
    loop {
        loop {
            match decoder.next_item() {
                Ok(Some(Incoming::Message { binary, payload })) => {
                    let op = if binary { OpCode::Binary } else { OpCode::Text };
                    stream.write_all(&frame(op, &payload)).await?;
                }
                Ok(Some(Incoming::Ping(payload))) => stream.write_all(&frame(OpCode::Pong, &payload)).await?,
                Ok(Some(Incoming::Pong)) => {}
                Ok(Some(Incoming::Close(code))) => {
                    let reply = match code {
                        Some(c) => close_frame(c, ""),
                        None => frame(OpCode::Close, &[]),
                    };
                    return stream.write_all(&reply).await;
                }
                Ok(None) => break,
                Err(e) => return fail(&mut stream, &mut decoder, e).await,
            }
        }
        stream.readable().await?;
        match stream.try_read_buf(decoder.read_buf()) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// Sends the violation's close code, then waits for the client's Close, as the gateway does.
async fn fail(stream: &mut TcpStream, decoder: &mut FrameDecoder, e: FrameError) -> io::Result<()> {
    stream.write_all(&close_frame(e.close_code(), "")).await?;
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while !decoder.client_closed() {
            stream.readable().await?;
            match stream.try_read_buf(decoder.read_buf()) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok::<_, io::Error>(())
    })
    .await;
    Ok(())
}
