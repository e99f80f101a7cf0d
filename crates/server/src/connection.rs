//! One WebSocket connection's framing, as mini-redis splits `Connection` from its handler:
//! reading client frames off the socket, writing queued server frames with vectored
//! writes, answering Pings within a bound, and the closing handshake. What the frames mean
//! is the session's business (`session.rs`).

use std::{
    collections::VecDeque,
    io::{self, IoSlice},
    net::SocketAddr,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes};
use fanout_hub::{Outbox, Outgoing, Push};
use fanout_protocol::{frame, now_micros, OpCode};
use tokio::{net::TcpStream, time::Instant};

use crate::{
    metrics::NodeMetrics,
    wsframe::{FrameDecoder, FrameError, Incoming},
};

/// One in this many deliveries of a connection records a delivery-latency sample.
const LATENCY_SAMPLE_EVERY: u32 = 8;
/// IoSlices per vectored write (well under IOV_MAX).
const MAX_IOV: usize = 64;
/// Pongs a client that does not read can have queued; past it, only the latest Ping is
/// remembered, so a pinger that never reads pins a few hundred bytes, not a queue.
const MAX_UNSENT_PONGS: u8 = 16;
/// The header byte of a server Pong frame (FIN + opcode 0xA); nothing else starts so.
const PONG_HEADER: u8 = 0x8A;

/// What one read from the socket gave.
pub enum Read {
    /// Bytes arrived: complete frames may be waiting in [`Connection::next_frame`].
    Data,
    /// Nothing (readiness is edge-triggered; every burst ends so).
    Nothing,
    /// The peer closed the TCP connection, or it failed.
    Gone,
}

/// Waits for the socket to be readable or writable. poll_*_ready keep one waker slot per
/// direction instead of queueing a waiter per pass, which the readable()/writable() futures
/// would; both are cancel-safe.
pub struct Readiness<'a>(&'a TcpStream);

impl Readiness<'_> {
    pub fn poll_read(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.poll_read_ready(cx)
    }

    pub fn poll_write(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.poll_write_ready(cx)
    }
}

pub struct Connection {
    stream: TcpStream,
    decoder: FrameDecoder,
    /// Frames taken from the outbox and not yet fully written.
    pending: VecDeque<Outgoing>,
    /// The front of `pending` was partly written: it must be finished before any other
    /// frame (such as a Close) can follow.
    mid_frame: bool,
    /// The front of `pending`, partly written, is a Pong (its header is already gone).
    mid_frame_is_pong: bool,
    /// Publications delivered, for latency sampling (wrapping: 2^32 is a multiple of
    /// the sampling period, so the count may wrap without a glitch).
    delivered_total: u32,
    /// Pongs queued and not yet fully written.
    pongs_unsent: u8,
    /// The latest Ping that arrived while [`MAX_UNSENT_PONGS`] Pongs were unwritten: only
    /// it gets an answer (RFC 6455 §5.5.3 allows answering the most recent only).
    /// Boxed: only a client that pings without reading ever has one.
    latest_ping: Option<Box<Bytes>>,
    last_seen: Instant,
    /// When a flush last emptied `pending`: a connection written to less often than
    /// [`QUIET`] gives the queue's memory back after each write.
    last_drained: Instant,
}

/// A connection whose writes are further apart than this is quiet: its write queue is
/// freed once drained (one allocation per write is nothing at that rate), instead of
/// holding a few hundred bytes per idle connection for its whole life.
const QUIET: std::time::Duration = std::time::Duration::from_secs(1);

/// Latency samples owed by a write of `delivered` publications after `total` earlier ones:
/// one for each multiple of [`LATENCY_SAMPLE_EVERY`] among the deliveries' indices
/// `total..total + delivered` (so the very first delivery is sampled).
fn latency_samples(total: u32, delivered: u64) -> u64 {
    let every = u64::from(LATENCY_SAMPLE_EVERY);
    let total = u64::from(total);
    (total + delivered).div_ceil(every) - total.div_ceil(every)
}

impl Connection {
    /// `leftover`: bytes the HTTP layer read past the upgrade request.
    pub fn new(stream: TcpStream, leftover: Bytes, max_message: usize) -> Self {
        let _ = stream.set_nodelay(true);
        Self {
            stream,
            decoder: FrameDecoder::new(leftover, max_message),
            pending: VecDeque::new(),
            mid_frame: false,
            mid_frame_is_pong: false,
            delivered_total: 0,
            pongs_unsent: 0,
            latest_ping: None,
            last_seen: Instant::now(),
            // Quiet until proven busy: the first reply's queue is freed at once.
            last_drained: Instant::now().checked_sub(QUIET).unwrap_or_else(Instant::now),
        }
    }

    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.stream.peer_addr().ok()
    }

    /// Where the outbox hands over frames to write.
    pub fn pending(&mut self) -> &mut VecDeque<Outgoing> {
        &mut self.pending
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Bytes the client sent before any frame was decoded (with its upgrade request).
    pub fn has_buffered(&self) -> bool {
        self.decoder.has_buffered()
    }

    /// How long the client has sent nothing at all.
    pub fn silent_for(&self) -> Duration {
        self.last_seen.elapsed()
    }

    /// The queue the outbox hands frames into and the socket's readiness, borrowed
    /// together: the session's `select!` waits on all of them at once.
    pub fn split(&mut self) -> (&mut VecDeque<Outgoing>, Readiness<'_>) {
        (&mut self.pending, Readiness(&self.stream))
    }

    /// Reads what the socket has into the frame decoder.
    pub fn read(&mut self) -> Read {
        match self.stream.try_read_buf(self.decoder.read_buf()) {
            Ok(0) => Read::Gone,
            Ok(_) => {
                self.last_seen = Instant::now();
                Read::Data
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // The room reserved for this read must not stay allocated while idle.
                self.decoder.shrink_if_idle();
                Read::Nothing
            }
            Err(_) => Read::Gone,
        }
    }

    /// The next complete client frame, `Ok(None)` when more bytes are needed (and then the
    /// read buffer is released if nothing is pending in it).
    pub fn next_frame(&mut self) -> Result<Option<Incoming>, FrameError> {
        let item = self.decoder.next_item();
        if matches!(item, Ok(None)) {
            self.decoder.shrink_if_idle();
        }
        item
    }

    /// Answers a Ping, keeping at most [`MAX_UNSENT_PONGS`] Pongs unwritten.
    pub fn pong(&mut self, outbox: &Outbox, payload: Bytes) {
        if self.pongs_unsent >= MAX_UNSENT_PONGS {
            self.latest_ping = Some(Box::new(payload));
            return;
        }
        if outbox.push_reply(frame(OpCode::Pong, &payload)) == Push::Queued {
            self.pongs_unsent += 1;
        }
    }

    /// Writes as much of `pending` as the socket takes now, in vectored writes, reporting
    /// the bytes to `outbox` (they no longer count against its bound) and to metrics.
    pub fn flush(&mut self, outbox: &Outbox, m: &NodeMetrics) -> io::Result<()> {
        let mut delivered = 0u64;
        let mut oldest_ts = 0u64;
        let mut pongs_written = 0u8;
        while !self.pending.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            let mut count = 0;
            for (slot, out) in slices.iter_mut().zip(self.pending.iter()) {
                *slot = IoSlice::new(&out.frame);
                count += 1;
            }
            let mut written = match self.stream.try_write_vectored(&slices[..count]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            };
            outbox.written(written);
            m.sent_bytes.increment(written as u64);
            while written > 0 {
                let Some(front) = self.pending.front_mut() else { break };
                if front.frame.len() > written {
                    if !self.mid_frame {
                        self.mid_frame_is_pong = front.frame.first() == Some(&PONG_HEADER);
                    }
                    front.frame.advance(written);
                    self.mid_frame = true;
                    break;
                }
                let was_pong =
                    if self.mid_frame { self.mid_frame_is_pong } else { front.frame.first() == Some(&PONG_HEADER) };
                if was_pong {
                    pongs_written += 1;
                }
                written -= front.frame.len();
                if front.ts != 0 {
                    delivered += 1;
                    if oldest_ts == 0 {
                        oldest_ts = front.ts;
                    }
                }
                self.mid_frame = false;
                self.pending.pop_front();
            }
        }
        if self.pending.is_empty() && self.pending.capacity() > 0 {
            let now = Instant::now();
            // A burst grew the queue, or the connection is quiet: do not keep its memory.
            if self.pending.capacity() > 1024 || now.duration_since(self.last_drained) >= QUIET {
                self.pending = VecDeque::new();
            }
            self.last_drained = now;
        }
        if delivered > 0 {
            m.deliveries.increment(delivered);
            // A histogram sample costs more than everything else the write path does in
            // user space (see hub's fanout bench), so a connection samples one delivery in
            // LATENCY_SAMPLE_EVERY (its first among them). Counted in deliveries, not
            // writes: a write that carries 16 frames has waited longest, and one sample per
            // write would weigh it like a write of one, so quantiles would understate the
            // tail exactly when the node batches under load. Each sample is the oldest frame
            // of its write, the one that waited longest.
            let samples = latency_samples(self.delivered_total, delivered);
            if samples > 0 {
                let latency = now_micros().saturating_sub(oldest_ts) as f64 / 1e6;
                m.latency.record_many(latency, samples as usize);
            }
            self.delivered_total = self.delivered_total.wrapping_add(delivered as u32);
        }
        if pongs_written > 0 {
            self.pongs_unsent = self.pongs_unsent.saturating_sub(pongs_written);
            if let Some(payload) = self.latest_ping.take() {
                self.pong(outbox, *payload);
            }
        }
        Ok(())
    }

    /// Writes everything pending, waiting for the socket as needed.
    pub async fn flush_all(&mut self, outbox: &Outbox, m: &NodeMetrics) -> io::Result<()> {
        loop {
            self.flush(outbox, m)?;
            if self.pending.is_empty() {
                return Ok(());
            }
            self.stream.writable().await?;
        }
    }

    /// Drops what the client never read, except a frame already partly on the wire (a
    /// slow consumer's queue is not worth flushing).
    pub fn drop_unsent(&mut self) {
        let keep = usize::from(self.mid_frame);
        self.pending.truncate(keep);
    }

    /// Sends `close` after what is pending (within `grace`), then, when the server is the
    /// one closing, waits up to `client_grace` for the client's Close: then the handshake is
    /// complete and dropping the connection closes TCP (RFC 6455 §7.1.1). Reading until then
    /// also keeps unread input from turning our close into a reset that could discard the
    /// Close frame.
    pub async fn close(
        &mut self,
        outbox: &Outbox,
        m: &NodeMetrics,
        close: Bytes,
        grace: Duration,
        client_grace: Option<Duration>,
    ) {
        self.pending.push_back(Outgoing { frame: close, ts: 0 });
        let sent = tokio::time::timeout(grace, self.flush_all(outbox, m)).await.is_ok_and(|r| r.is_ok());
        if let (true, Some(wait)) = (sent, client_grace) {
            let _ = tokio::time::timeout(wait, self.await_client_close()).await;
        }
    }

    /// Reads and discards input until the client's Close frame or EOF.
    async fn await_client_close(&mut self) {
        loop {
            if self.decoder.client_closed() {
                return;
            }
            if self.stream.readable().await.is_err() {
                return;
            }
            match self.stream.try_read_buf(self.decoder.read_buf()) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{latency_samples, LATENCY_SAMPLE_EVERY};

    #[test]
    fn latency_samples_are_one_per_period_of_deliveries_however_they_are_batched() {
        let every = u64::from(LATENCY_SAMPLE_EVERY);
        for batch in [1u64, 3, 8, 16, 61] {
            let (mut total, mut samples) = (0u32, 0u64);
            while u64::from(total) < 1000 * every {
                samples += latency_samples(total, batch);
                total += batch as u32;
            }
            // One per multiple of `every` below the final count, the first delivery included.
            assert_eq!(samples, u64::from(total).div_ceil(every), "batch {batch}");
        }
        assert_eq!(latency_samples(0, 1), 1, "the first delivery is sampled");
        assert_eq!(latency_samples(1, 1), 0);
        assert_eq!(latency_samples(1, 16), 2, "a batch of 16 weighs twice");
        assert_eq!(latency_samples(u32::MAX, 1), 0, "no glitch where the count wraps");
        assert_eq!(latency_samples(0u32.wrapping_add(u32::MAX).wrapping_add(1), 1), 1);
    }
}
