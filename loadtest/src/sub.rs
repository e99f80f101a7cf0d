//! Subscriber connections: worker threads, each a single-threaded runtime owning a slice
//! of the connections, one latency histogram and one read buffer shared by all of its
//! connections. A connection keeps only its partial-frame tail and counters, so idle
//! connections cost a few hundred bytes here and 100k of them fit easily.

use std::{
    cell::RefCell,
    collections::BTreeMap,
    future::poll_fn,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    rc::Rc,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc,
    },
    task::Poll,
    time::{Duration, Instant},
};

use fanout_protocol::now_micros;
use hdrhistogram::Histogram;
use tokio::{
    io::{AsyncRead, AsyncWriteExt, ReadBuf},
    net::{TcpSocket, TcpStream},
    sync::{mpsc::UnboundedSender, Notify, Semaphore},
};

use crate::{
    scan::{Incoming, Scanner},
    scenario::Scenario,
    sys::clock_us,
    ws::{self, FrameError, Rng, WsUrl},
};

/// Latencies are recorded in microseconds up to an hour with 3 significant digits.
pub(crate) fn new_histogram() -> Histogram<u64> {
    #[allow(clippy::expect_used, reason = "an invariant of this code, not input: failing it is a bug")]
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// One read takes whatever the socket holds up to this; large enough that a connection
/// that fell behind catches up in a few syscalls.
const READ_BUF: usize = 256 * 1024;
/// How often a worker's probe timer asks to wake (tokio's timer ticks in milliseconds).
const LOOP_PROBE: Duration = Duration::from_millis(1);
/// Frames larger than this are a protocol error here: the generator's own publications
/// are small, and a runaway length must not make it allocate gigabytes.
const MAX_FRAME: usize = 16 << 20;

/// Where and how connection `index` connects.
#[derive(Debug, Clone)]
pub(crate) struct ConnSpec {
    pub index: usize,
    pub url: usize,
    pub source: Option<IpAddr>,
    pub channels: Vec<u32>,
}

/// Everything a worker needs that is the same for every connection.
pub(crate) struct Shared {
    pub urls: Vec<(WsUrl, SocketAddr)>,
    /// Wire names of the channel indices.
    pub channel_names: Vec<String>,
    pub channels: u32,
    pub connect_timeout: Duration,
    pub limiter: ConnectLimiter,
    pub stopping: AtomicBool,
    pub stop: Notify,
    /// Set while publications flow: churn clients come and go only then.
    pub churning: AtomicBool,
    pub churn: Option<ChurnSpec>,
    pub sources: Vec<IpAddr>,
    /// The workers spin while they wait instead of sleeping ([`spin`]).
    pub spin: bool,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct ChurnSpec {
    /// Connections per second per worker.
    pub rate: f64,
    pub hold: Duration,
}

/// Paces connection attempts over all workers: attempt `n` starts no earlier than
/// `n / rate` after the start, and at most `concurrency` handshakes are in flight.
pub(crate) struct ConnectLimiter {
    start: Instant,
    interval: Duration,
    next: AtomicU64,
    in_flight: Semaphore,
}

impl ConnectLimiter {
    pub(crate) fn new(rate: f64, concurrency: usize) -> Self {
        let interval = if rate > 0.0 { Duration::from_secs_f64(1.0 / rate) } else { Duration::ZERO };
        Self { start: Instant::now(), interval, next: AtomicU64::new(0), in_flight: Semaphore::new(concurrency.max(1)) }
    }

    async fn acquire(&self) -> tokio::sync::SemaphorePermit<'_> {
        let n = self.next.fetch_add(1, Relaxed);
        if !self.interval.is_zero() {
            tokio::time::sleep_until((self.start + self.interval.saturating_mul(n as u32)).into()).await;
        }
        #[allow(clippy::expect_used, reason = "an invariant of this code, not input: failing it is a bug")]
        self.in_flight.acquire().await.expect("the limiter's semaphore is never closed")
    }
}

/// Live counters one worker writes and the reporter reads. Aligned so two workers'
/// counters never share a cache line.
#[derive(Default)]
#[repr(align(128))]
pub(crate) struct Counters {
    pub ready: AtomicU64,
    pub connect_failed: AtomicU64,
    pub delivered: AtomicU64,
    pub disconnected: AtomicU64,
    pub churn_cycles: AtomicU64,
    pub churn_failed: AtomicU64,
    /// Time a spinning worker found nothing to do, ns ([`spin`]).
    pub spin_idle_ns: AtomicU64,
}

/// How a connection ended before the run stopped it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ended {
    /// The server sent a Close frame with this code.
    Close(u16),
    /// The TCP connection ended without a Close frame (reset, EOF, node killed).
    Eof,
    Protocol(&'static str),
}

/// One steady subscriber's account of the run.
#[derive(Debug, Clone)]
pub(crate) struct ConnResult {
    pub channels: Vec<u32>,
    pub ready: bool,
    pub connect_error: Option<String>,
    pub received: u64,
    pub reordered: u64,
    pub duplicates: u64,
    pub foreign: u64,
    pub ended: Option<Ended>,
}

/// What a worker sends to the reporter.
pub(crate) enum WorkerMsg {
    /// Latencies recorded since the previous interval.
    Interval(Histogram<u64>),
    Done(Box<WorkerDone>),
}

pub(crate) struct WorkerDone {
    pub conns: Vec<ConnResult>,
    pub latency: Histogram<u64>,
    pub connect_latency: Histogram<u64>,
    pub churn_connect_latency: Histogram<u64>,
    /// How late this worker's probe timer woke while publications flowed, µs.
    pub loop_lag: Histogram<u64>,
    pub connect_errors: BTreeMap<String, u64>,
    pub churn_errors: BTreeMap<String, u64>,
}

struct Worker {
    shared: Arc<Shared>,
    counters: Arc<Counters>,
    scanner: Scanner,
    scratch: RefCell<Vec<u8>>,
    latency: RefCell<Histogram<u64>>,
    connect_latency: RefCell<Histogram<u64>>,
    churn_connect_latency: RefCell<Histogram<u64>>,
    loop_lag: RefCell<Histogram<u64>>,
    connect_errors: RefCell<BTreeMap<String, u64>>,
    churn_errors: RefCell<BTreeMap<String, u64>>,
}

/// Runs worker `id` on the current thread until the run stops; sends its results on `tx`.
pub(crate) fn run_worker(
    id: usize,
    specs: Vec<ConnSpec>,
    shared: Arc<Shared>,
    counters: Arc<Counters>,
    tx: UnboundedSender<WorkerMsg>,
) {
    #[allow(clippy::expect_used, reason = "an invariant of this code, not input: failing it is a bug")]
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let w = Rc::new(Worker {
            shared: shared.clone(),
            counters,
            scanner: Scanner::default(),
            scratch: RefCell::new(vec![0; READ_BUF]),
            latency: RefCell::new(new_histogram()),
            connect_latency: RefCell::new(new_histogram()),
            churn_connect_latency: RefCell::new(new_histogram()),
            loop_lag: RefCell::new(new_histogram()),
            connect_errors: RefCell::default(),
            churn_errors: RefCell::default(),
        });
        let flusher = {
            let (w, tx) = (w.clone(), tx.clone());
            tokio::task::spawn_local(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let mut h = w.latency.borrow_mut();
                    if tx.send(WorkerMsg::Interval(h.clone())).is_err() {
                        return;
                    }
                    h.reset();
                }
            })
        };
        // A worker busy with other connections reads late, and every end-to-end latency
        // it records then includes that wait: the probe measures it, so a report can say
        // when its own figures are the generator's rather than the gateway's.
        let probe = {
            let w = w.clone();
            tokio::task::spawn_local(async move {
                loop {
                    let due = Instant::now() + LOOP_PROBE;
                    tokio::time::sleep_until(due.into()).await;
                    if w.shared.churning.load(Relaxed) {
                        let late = Instant::now().saturating_duration_since(due);
                        w.loop_lag.borrow_mut().saturating_record(late.as_micros().max(1) as u64);
                    }
                }
            })
        };
        let spinner = shared.spin.then(|| tokio::task::spawn_local(spin(w.counters.clone())));
        let churner = shared.churn.map(|spec| tokio::task::spawn_local(churn(w.clone(), spec, id as u64)));
        let tasks: Vec<_> =
            specs.into_iter().map(|spec| tokio::task::spawn_local(subscriber(w.clone(), spec))).collect();
        let mut conns = Vec::with_capacity(tasks.len());
        for t in tasks {
            if let Ok(r) = t.await {
                conns.push(r);
            }
        }
        if let Some(c) = churner {
            let _ = c.await;
        }
        flusher.abort();
        probe.abort();
        if let Some(s) = spinner {
            s.abort();
        }
        let done = WorkerDone {
            conns,
            latency: w.latency.borrow().clone(),
            connect_latency: w.connect_latency.borrow().clone(),
            churn_connect_latency: w.churn_connect_latency.borrow().clone(),
            loop_lag: w.loop_lag.borrow().clone(),
            connect_errors: w.connect_errors.take(),
            churn_errors: w.churn_errors.take(),
        };
        let _ = tx.send(WorkerMsg::Done(Box::new(done)));
    });
}

/// How often a spinning worker adds up its idle time ([`spin`]).
const SPIN_ACCOUNT_EVERY: Duration = Duration::from_millis(50);

/// Keeps the worker's thread running while it waits for data, so that it never blocks in
/// `epoll_wait`. On one machine a gateway's write to a socket whose reader sleeps also
/// wakes that reader, and waking a thread on another CPU is an interrupt sent from the
/// gateway's CPU (under a hypervisor, one the host delivers): clients on other machines
/// cost the gateway nothing of the kind (docs/benchmarks.md, session 10).
///
/// Each pass yields to tokio, which then polls for I/O without blocking before it runs the
/// task again, and to the kernel, so the other threads on this CPU (the publisher, the
/// clock) run as soon as they wake. A pass costs the spinner about the same whether other
/// tasks ran in it or not, and most passes of a worker with time to spare run nothing
/// else: so the quickest passes (the 5th percentile of each 50 ms) tell that cost, and the
/// pass count times it is the spinning's share of the CPU, which
/// [`Counters::spin_idle_ns`] takes off the generator's figures. (Counting passes shorter
/// than a fixed mark as idle instead read 27 % and 52 % for the same broadcast run twice:
/// a pass that reads one frame is short too.)
async fn spin(counters: Arc<Counters>) {
    #[allow(clippy::expect_used, reason = "an invariant of this code, not input: failing it is a bug")]
    let mut gaps = Histogram::<u64>::new_with_bounds(1, 1_000_000_000, 2).expect("valid histogram bounds");
    let mut last = Instant::now();
    let mut chunk = last;
    loop {
        tokio::task::yield_now().await;
        std::thread::yield_now();
        let now = Instant::now();
        gaps.saturating_record(now.duration_since(last).as_nanos() as u64);
        last = now;
        let span = now.duration_since(chunk);
        if span >= SPIN_ACCOUNT_EVERY {
            let idle = (gaps.len() * gaps.value_at_quantile(0.05)).min(span.as_nanos() as u64);
            counters.spin_idle_ns.fetch_add(idle, Relaxed);
            gaps.reset();
            chunk = now;
        }
    }
}

/// The per-connection protocol state: counters, per-channel last sequence, the partial
/// frame left over from the previous read, and bytes to write back (pongs, close).
pub(crate) struct ConnCore {
    pub channels: Vec<u32>,
    last: Vec<Option<u64>>,
    pub channel_count: u32,
    pub record: bool,
    pub received: u64,
    pub reordered: u64,
    pub duplicates: u64,
    pub foreign: u64,
    pub subscribed: usize,
    pub errors: usize,
    pub out: Vec<u8>,
    pub closed: Option<u16>,
    carry: Vec<u8>,
    fragments: Vec<u8>,
    fragment_op: u8,
    rng: Rng,
}

impl ConnCore {
    pub(crate) fn new(channels: Vec<u32>, channel_count: u32, record: bool, seed: u64) -> Self {
        let last = vec![None; channels.len()];
        Self {
            channels,
            last,
            channel_count,
            record,
            received: 0,
            reordered: 0,
            duplicates: 0,
            foreign: 0,
            subscribed: 0,
            errors: 0,
            out: Vec::new(),
            closed: None,
            carry: Vec::new(),
            fragments: Vec::new(),
            fragment_op: 0,
            rng: Rng::new(seed),
        }
    }

    /// Handles every complete frame in `buf` (received at `now_us`); returns how many
    /// bytes it consumed. Latencies go into `hist`.
    pub(crate) fn feed(
        &mut self,
        buf: &[u8],
        now_us: u64,
        scanner: &Scanner,
        hist: &mut Histogram<u64>,
    ) -> Result<usize, FrameError> {
        let mut pos = 0;
        while self.closed.is_none() {
            let Some((frame, used)) = ws::parse_frame(&buf[pos..], MAX_FRAME)? else { break };
            pos += used;
            match frame.opcode {
                ws::OP_TEXT | ws::OP_BINARY if frame.fin => {
                    self.message(frame.opcode, frame.payload, now_us, scanner, hist)
                }
                ws::OP_TEXT | ws::OP_BINARY => {
                    self.fragment_op = frame.opcode;
                    self.fragments.clear();
                    self.fragments.extend_from_slice(frame.payload);
                }
                ws::OP_CONTINUATION => {
                    self.fragments.extend_from_slice(frame.payload);
                    if self.fragments.len() > MAX_FRAME {
                        return Err(FrameError("fragmented message larger than the maximum"));
                    }
                    if frame.fin {
                        let whole = std::mem::take(&mut self.fragments);
                        self.message(self.fragment_op, &whole, now_us, scanner, hist);
                    }
                }
                ws::OP_PING => {
                    let mask = self.rng.mask();
                    ws::client_frame(&mut self.out, ws::OP_PONG, frame.payload, mask);
                }
                ws::OP_CLOSE => {
                    let code = ws::close_code(frame.payload);
                    self.closed = Some(code);
                    let mask = self.rng.mask();
                    ws::close_frame(&mut self.out, code.min(4999), mask);
                }
                ws::OP_PONG => {}
                _ => return Err(FrameError("unknown opcode")),
            }
        }
        Ok(pos)
    }

    fn message(&mut self, opcode: u8, payload: &[u8], now_us: u64, scanner: &Scanner, hist: &mut Histogram<u64>) {
        if opcode != ws::OP_TEXT {
            self.foreign += 1;
            return;
        }
        match scanner.classify(payload) {
            Incoming::Delivery { seq, sent_micros } => {
                let channel = Scenario::channel_of_seq(seq, self.channel_count as usize);
                let Some(k) = self.channels.iter().position(|c| *c == channel) else {
                    self.foreign += 1;
                    return;
                };
                self.received += 1;
                if self.record {
                    hist.saturating_record(now_us.saturating_sub(sent_micros).max(1));
                }
                match self.last[k] {
                    Some(last) if seq == last => self.duplicates += 1,
                    Some(last) if seq < last => self.reordered += 1,
                    _ => {}
                }
                self.last[k] = Some(seq);
            }
            Incoming::Foreign => self.foreign += 1,
            Incoming::Subscribed => self.subscribed += 1,
            Incoming::Error { .. } => self.errors += 1,
            Incoming::Published | Incoming::Other => {}
        }
    }
}

enum Read {
    Data,
    Eof,
}

/// Reads once into the worker's shared buffer (after the connection's leftover bytes)
/// and handles the frames inside the same poll, so the buffer is never held across an
/// await and idle connections own no read buffer at all.
async fn read_and_feed(stream: &mut TcpStream, core: &mut ConnCore, w: &Worker) -> io::Result<Read> {
    poll_fn(|cx| {
        let mut scratch = w.scratch.borrow_mut();
        let carried = core.carry.len();
        if scratch.len() < carried + READ_BUF / 2 {
            scratch.resize(carried + READ_BUF, 0);
        }
        scratch[..carried].copy_from_slice(&core.carry);
        let mut rb = ReadBuf::new(&mut scratch[carried..]);
        match Pin::new(&mut *stream).poll_read(cx, &mut rb) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                if n == 0 {
                    return Poll::Ready(Ok(Read::Eof));
                }
                let data = &scratch[..carried + n];
                let before = core.received;
                let used = {
                    let mut hist = w.latency.borrow_mut();
                    core.feed(data, clock_us(), &w.scanner, &mut hist)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.0))?
                };
                core.carry.clear();
                core.carry.extend_from_slice(&data[used..]);
                if core.carry.capacity() > 64 * 1024 && core.carry.len() < 1024 {
                    core.carry.shrink_to(1024);
                }
                if core.record {
                    w.counters.delivered.fetch_add(core.received - before, Relaxed);
                }
                Poll::Ready(Ok(Read::Data))
            }
        }
    })
    .await
}

fn error_kind(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "refused".into(),
        io::ErrorKind::ConnectionReset => "reset".into(),
        io::ErrorKind::AddrNotAvailable => "addr_not_available".into(),
        io::ErrorKind::TimedOut => "timeout".into(),
        _ if e.raw_os_error() == Some(24) => "too_many_open_files".into(),
        k => format!("io_{k:?}").to_lowercase(),
    }
}

/// TCP connect (from the spec's source address), upgrade and subscribe to every channel;
/// returns the stream once every `subscribed` reply arrived.
async fn connect_and_subscribe(
    w: &Worker,
    url: usize,
    source: Option<IpAddr>,
    core: &mut ConnCore,
) -> Result<TcpStream, String> {
    let (url, addr) = &w.shared.urls[url];
    let timeout = w.shared.connect_timeout;
    let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(|e| error_kind(&e))?;
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0)).map_err(|e| format!("bind_{}", error_kind(&e)))?;
    }
    let mut stream = match tokio::time::timeout(timeout, socket.connect(*addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(error_kind(&e)),
        Err(_) => return Err("connect_timeout".into()),
    };
    let _ = stream.set_nodelay(true);
    let early = ws::handshake(&mut stream, url, &mut core.rng, timeout).await.map_err(|e| e.kind.to_owned())?;
    let mut cmds = Vec::with_capacity(core.channels.len() * 64);
    for (i, c) in core.channels.iter().enumerate() {
        let cmd = format!(r#"{{"op":"subscribe","channel":"{}","id":{i}}}"#, w.shared.channel_names[*c as usize]);
        let mask = core.rng.mask();
        ws::client_frame(&mut cmds, ws::OP_TEXT, cmd.as_bytes(), mask);
    }
    stream.write_all(&cmds).await.map_err(|e| error_kind(&e))?;
    core.carry = early;
    let wanted = core.channels.len();
    let subscribe = async {
        // Frames that arrived with the 101 are in `carry`; feed them first.
        if !core.carry.is_empty() {
            let data = std::mem::take(&mut core.carry);
            let used =
                core.feed(&data, clock_us(), &w.scanner, &mut w.latency.borrow_mut()).map_err(|e| e.0.to_owned())?;
            core.carry.extend_from_slice(&data[used..]);
        }
        while core.subscribed + core.errors < wanted && core.closed.is_none() {
            match read_and_feed(&mut stream, core, w).await {
                Ok(Read::Data) => {}
                Ok(Read::Eof) => return Err("closed_while_subscribing".to_owned()),
                Err(e) => return Err(error_kind(&e)),
            }
            if !core.out.is_empty() {
                stream.write_all(&core.out).await.map_err(|e| error_kind(&e))?;
                core.out.clear();
            }
        }
        if core.closed.is_some() {
            return Err("closed_while_subscribing".to_owned());
        }
        if core.errors > 0 {
            return Err("subscribe_error".to_owned());
        }
        Ok(())
    };
    tokio::time::timeout(timeout, subscribe).await.map_err(|_| "subscribe_timeout".to_owned())??;
    Ok(stream)
}

async fn subscriber(w: Rc<Worker>, spec: ConnSpec) -> ConnResult {
    let stop = w.shared.stop.notified();
    tokio::pin!(stop);
    stop.as_mut().enable();
    let mut core = ConnCore::new(spec.channels, w.shared.channels, true, spec.index as u64 ^ now_micros());
    let mut result = ConnResult {
        channels: Vec::new(),
        ready: false,
        connect_error: None,
        received: 0,
        reordered: 0,
        duplicates: 0,
        foreign: 0,
        ended: None,
    };
    if w.shared.stopping.load(Relaxed) {
        result.channels = core.channels;
        return result;
    }
    let connected = {
        let _permit = tokio::select! {
            p = w.shared.limiter.acquire() => p,
            _ = &mut stop => { result.channels = core.channels; return result; }
        };
        let attempt_start = Instant::now();
        tokio::select! {
            r = connect_and_subscribe(&w, spec.url, spec.source, &mut core) => r.map(|s| (s, attempt_start.elapsed())),
            _ = &mut stop => Err("stopped".to_owned()),
        }
    };
    let mut stream = match connected {
        Ok((s, took)) => {
            w.connect_latency.borrow_mut().saturating_record(took.as_micros().max(1) as u64);
            w.counters.ready.fetch_add(1, Relaxed);
            result.ready = true;
            s
        }
        Err(kind) => {
            *w.connect_errors.borrow_mut().entry(kind.clone()).or_default() += 1;
            w.counters.connect_failed.fetch_add(1, Relaxed);
            result.connect_error = Some(kind);
            result.channels = core.channels;
            return result;
        }
    };
    let ended = loop {
        tokio::select! {
            biased;
            _ = &mut stop => {
                let mask = core.rng.mask();
                let mut bye = Vec::new();
                ws::close_frame(&mut bye, 1000, mask);
                let _ = tokio::time::timeout(Duration::from_millis(100), stream.write_all(&bye)).await;
                break None;
            }
            r = read_and_feed(&mut stream, &mut core, &w) => match r {
                Ok(Read::Data) => {
                    if !core.out.is_empty() {
                        let _ = stream.write_all(&core.out).await;
                        core.out.clear();
                    }
                    if let Some(code) = core.closed {
                        break Some(Ended::Close(code));
                    }
                }
                Ok(Read::Eof) => break Some(Ended::Eof),
                Err(e) if e.kind() == io::ErrorKind::InvalidData => break Some(Ended::Protocol("invalid frame")),
                Err(_) => break Some(Ended::Eof),
            },
        }
    };
    if ended.is_some() {
        w.counters.disconnected.fetch_add(1, Relaxed);
    }
    result.received = core.received;
    result.reordered = core.reordered;
    result.duplicates = core.duplicates;
    result.foreign = core.foreign;
    result.ended = ended;
    result.channels = core.channels;
    result
}

/// Churn clients on this worker: while publications flow, start one every `1/rate`
/// seconds; each connects, subscribes, holds, and leaves with a normal close.
async fn churn(w: Rc<Worker>, spec: ChurnSpec, seed: u64) {
    if spec.rate <= 0.0 {
        return;
    }
    let stop = w.shared.stop.notified();
    tokio::pin!(stop);
    stop.as_mut().enable();
    let mut rng = Rng::new(seed ^ 0x5eed);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / spec.rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut n: u64 = 0;
    let mut running = Vec::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {}
        }
        if w.shared.stopping.load(Relaxed) {
            break;
        }
        if !w.shared.churning.load(Relaxed) {
            continue;
        }
        n += 1;
        let channel = (rng.next() % w.shared.channels as u64) as u32;
        let url = (n as usize + seed as usize) % w.shared.urls.len();
        let source = (!w.shared.sources.is_empty()).then(|| w.shared.sources[n as usize % w.shared.sources.len()]);
        running.push(tokio::task::spawn_local(churn_once(w.clone(), url, source, channel, spec.hold, rng.next())));
        running.retain(|h: &tokio::task::JoinHandle<()>| !h.is_finished());
    }
    for h in running {
        let _ = h.await;
    }
}

async fn churn_once(w: Rc<Worker>, url: usize, source: Option<IpAddr>, channel: u32, hold: Duration, seed: u64) {
    let stop = w.shared.stop.notified();
    tokio::pin!(stop);
    stop.as_mut().enable();
    let mut core = ConnCore::new(vec![channel], w.shared.channels, false, seed);
    let started = Instant::now();
    let attempt = tokio::select! {
        r = connect_and_subscribe(&w, url, source, &mut core) => r,
        _ = &mut stop => return,
    };
    let mut stream = match attempt {
        Ok(s) => s,
        Err(kind) => {
            *w.churn_errors.borrow_mut().entry(kind).or_default() += 1;
            w.counters.churn_failed.fetch_add(1, Relaxed);
            return;
        }
    };
    w.churn_connect_latency.borrow_mut().saturating_record(started.elapsed().as_micros().max(1) as u64);
    let until = tokio::time::sleep(hold);
    tokio::pin!(until);
    loop {
        tokio::select! {
            _ = &mut until => break,
            _ = &mut stop => break,
            r = read_and_feed(&mut stream, &mut core, &w) => match r {
                Ok(Read::Data) if core.closed.is_none() => {
                    if !core.out.is_empty() {
                        let _ = stream.write_all(&core.out).await;
                        core.out.clear();
                    }
                }
                _ => {
                    *w.churn_errors.borrow_mut().entry("dropped_while_held".into()).or_default() += 1;
                    w.counters.churn_failed.fetch_add(1, Relaxed);
                    return;
                }
            },
        }
    }
    let mut bye = Vec::new();
    ws::close_frame(&mut bye, 1000, core.rng.mask());
    let _ = stream.write_all(&bye).await;
    w.counters.churn_cycles.fetch_add(1, Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use fanout_protocol::{frame, OpCode};

    fn delivery(channel: &str, seq: u64, t: u64) -> Vec<u8> {
        let body =
            format!(r#"{{"op":"message","channel":"{channel}","data":{{"s":{seq},"t":{t},"p":"xx"}},"ts":{t}}}"#);
        frame(OpCode::Text, body.as_bytes()).to_vec()
    }

    #[test]
    fn counts_latency_reorders_duplicates_and_partial_frames() {
        let scanner = Scanner::default();
        let mut hist = new_histogram();
        // Channels 1 and 3 of 4: sequences 1, 5, 9 … go to channel 1.
        let mut core = ConnCore::new(vec![1, 3], 4, true, 1);
        let mut stream = Vec::new();
        for (seq, t) in [(1u64, 900u64), (3, 800), (5, 700), (3, 600), (9, 500), (5, 400), (7, 300), (2, 0)] {
            stream.extend(delivery("c", seq, t));
        }
        stream.extend(frame(OpCode::Text, br#"{"op":"subscribed","channel":"c","id":0}"#).to_vec());
        stream.extend(frame(OpCode::Ping, b"hi").to_vec());
        // Feed in awkward pieces, carrying the tail like the reader does.
        let mut carry: Vec<u8> = Vec::new();
        for chunk in stream.chunks(7) {
            carry.extend_from_slice(chunk);
            let used = core.feed(&carry, 1000, &scanner, &mut hist).unwrap();
            carry.drain(..used);
        }
        assert!(carry.is_empty());
        // 1,5,9,5 on channel 1 (5 after 9 reordered); 3,3,7 on channel 3 (3 again = dup);
        // seq 2 is channel 2, not ours.
        assert_eq!((core.received, core.reordered, core.duplicates, core.foreign, core.subscribed), (7, 1, 1, 1, 1));
        assert_eq!(hist.len(), 7);
        assert_eq!(hist.max(), hist.highest_equivalent(700));
        assert_eq!(hist.min(), 100);
        // The ping was answered with a masked pong carrying the same payload.
        let (pong_head, mask) = (&core.out[..2], &core.out[2..6]);
        assert_eq!(pong_head, [0x8A, 0x82]);
        let payload: Vec<u8> = core.out[6..].iter().enumerate().map(|(i, b)| b ^ mask[i & 3]).collect();
        assert_eq!(payload, b"hi");
    }

    #[test]
    fn close_frames_stop_parsing_and_are_echoed() {
        let scanner = Scanner::default();
        let mut hist = new_histogram();
        let mut core = ConnCore::new(vec![0], 1, false, 2);
        let mut data = fanout_protocol::close_frame(4008, "slow consumer").to_vec();
        data.extend(delivery("c", 1, 1));
        let used = core.feed(&data, 5, &scanner, &mut hist).unwrap();
        assert_eq!(core.closed, Some(4008));
        assert!(used < data.len(), "frames after a close are not processed");
        assert_eq!(core.out[0], 0x88);
        assert_eq!(hist.len(), 0);
    }

    #[test]
    fn fragmented_messages_are_reassembled() {
        let scanner = Scanner::default();
        let mut hist = new_histogram();
        let mut core = ConnCore::new(vec![0], 1, true, 3);
        let body = br#"{"op":"message","channel":"c","data":{"s":4,"t":10},"ts":10}"#;
        let mut data = vec![0x01, 10];
        data.extend_from_slice(&body[..10]);
        data.push(0x80);
        data.push((body.len() - 10) as u8);
        data.extend_from_slice(&body[10..]);
        assert_eq!(core.feed(&data, 20, &scanner, &mut hist).unwrap(), data.len());
        assert_eq!(core.received, 1);
    }

    #[test]
    fn limiter_paces_attempts() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let l = ConnectLimiter::new(200.0, 4);
            let start = Instant::now();
            for _ in 0..11 {
                drop(l.acquire().await);
            }
            assert!(start.elapsed() >= Duration::from_millis(45), "{:?}", start.elapsed());
        });
    }
}
