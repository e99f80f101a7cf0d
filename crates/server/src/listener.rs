//! The accept loop both listeners share: a permit before each accept (so a connection
//! flood queues in the kernel backlog instead of in our memory), per-address accounting of
//! connections that have not finished their request, shedding of the oldest silent ones
//! when the pool is full, one HTTP/1.1 connection task per socket, and graceful shutdown
//! of connections that are still plain HTTP.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn, Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub type Body = Full<Bytes>;

static REFUSED_LOG: fanout_hub::LogLimiter = fanout_hub::LogLimiter::new(10_000);
static ACCEPT_LOG: fanout_hub::LogLimiter = fanout_hub::LogLimiter::new(10_000);

/// `accept` failed because the process (EMFILE) or the system (ENFILE) has no descriptor
/// left: the numbers POSIX systems share, which std names no `ErrorKind` for.
fn out_of_descriptors(e: &std::io::Error) -> bool {
    const ENFILE: i32 = 23;
    const EMFILE: i32 = 24;
    matches!(e.raw_os_error(), Some(EMFILE | ENFILE))
}

/// Serves requests of one listener.
pub trait Handler: Send + Sync + 'static {
    fn handle(self: Arc<Self>, req: Request<Incoming>, peer: SocketAddr)
        -> impl Future<Output = Response<Body>> + Send;
}

/// Settings of one accept loop.
pub struct Accept {
    pub name: &'static str,
    /// Concurrent HTTP connections (before any upgrade).
    pub max_connections: usize,
    pub header_timeout: Duration,
    /// Peers exempt from the per-address share (proxies carry many clients' connections).
    pub trusted_proxies: crate::limit::TrustedProxies,
}

impl Accept {
    /// Connections one address (IPv6: one /64) may hold before its request is complete: a
    /// tenth of the pool, so no single address can fill it and lock everyone else out.
    pub fn per_address(&self) -> usize {
        (self.max_connections / 10).max(1)
    }
}

/// The listener's connections that have not yet completed a request: how many per
/// address, and the silent ones (no request yet) by age, to shed the oldest.
#[derive(Default)]
struct Pending {
    per_address: HashMap<IpAddr, usize>,
    /// Connection number → how to drop it. Numbers grow, so the first is the oldest.
    silent: BTreeMap<u64, CancellationToken>,
    next: u64,
}

/// Shared by the accept loop and its connection tasks.
struct Table {
    pending: Mutex<Pending>,
    refused_per_address: metrics::Counter,
    shed: metrics::Counter,
}

impl Table {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a connection from `key` unless that address is over its share.
    fn admit(self: &Arc<Self>, key: IpAddr, limit: Option<usize>) -> Option<Entry> {
        let mut p = self.lock();
        let count = p.per_address.entry(key).or_default();
        if limit.is_some_and(|l| *count >= l) {
            return None;
        }
        *count += 1;
        let id = p.next;
        p.next += 1;
        let cancel = CancellationToken::new();
        p.silent.insert(id, cancel.clone());
        Some(Entry { table: self.clone(), key, id, cancel })
    }

    /// Drops the oldest connection that has not sent a request; false if there is none.
    fn shed_oldest(&self) -> bool {
        let Some((_, cancel)) = self.lock().silent.pop_first() else { return false };
        cancel.cancel();
        self.shed.increment(1);
        true
    }
}

/// One admitted connection; leaves the table when dropped.
struct Entry {
    table: Arc<Table>,
    key: IpAddr,
    id: u64,
    cancel: CancellationToken,
}

impl Entry {
    /// The connection sent a request: it is no longer a silent one to shed.
    fn spoke(&self) {
        self.table.lock().silent.remove(&self.id);
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        let mut p = self.table.lock();
        p.silent.remove(&self.id);
        if let Some(count) = p.per_address.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                p.per_address.remove(&self.key);
            }
        }
    }
}

/// Accepts until `stop` is cancelled, then asks open HTTP connections to finish their
/// current request and close. Upgraded connections are not tracked here: they belong to
/// their session once the upgrade is done.
pub async fn accept_loop<H: Handler>(
    listener: TcpListener,
    settings: Accept,
    handler: Arc<H>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let permits = Arc::new(Semaphore::new(settings.max_connections));
    let dropped = |reason: &'static str| metrics::counter!("fanout_listener_connections_dropped_total", "listener" => settings.name, "reason" => reason);
    let table = Arc::new(Table {
        pending: Mutex::default(),
        refused_per_address: dropped("per_address"),
        shed: dropped("shed"),
    });
    let accept_error = |kind: &'static str| metrics::counter!("fanout_listener_accept_errors_total", "listener" => settings.name, "kind" => kind);
    let (no_descriptors, other_accept_error) = (accept_error("descriptors"), accept_error("other"));
    let per_address = settings.per_address();
    loop {
        let (permit, accepted) = match permits.clone().try_acquire_owned() {
            Ok(permit) => (permit, None),
            // The pool is full. Wait for a slot; but when a new client arrives first, make
            // room by shedding the oldest connection that never sent a request, rather
            // than making every newcomer wait behind idle sockets.
            Err(_) => tokio::select! {
                _ = stop.cancelled() => break,
                p = permits.clone().acquire_owned() => match p { Ok(p) => (p, None), Err(_) => break },
                r = listener.accept() => {
                    table.shed_oldest();
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        p = permits.clone().acquire_owned() => match p { Ok(p) => (p, Some(r)), Err(_) => break },
                    }
                }
            },
        };
        let accepted = match accepted {
            Some(r) => r,
            None => tokio::select! {
                _ = stop.cancelled() => break,
                r = listener.accept() => r,
            },
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Typically EMFILE: back off instead of spinning; the backlog holds the rest,
                // and every failed try is counted, so a node out of descriptors shows on
                // its dashboard while its log says so once every ten seconds.
                let descriptors = out_of_descriptors(&e);
                if descriptors { &no_descriptors } else { &other_accept_error }.increment(1);
                if let Some(suppressed) = ACCEPT_LOG.check() {
                    if descriptors {
                        tracing::error!(listener = settings.name, error = %e, suppressed, "accept failed: no file descriptor left; new connections wait in the backlog (raise the open-file limit or lower max_connections)");
                    } else {
                        tracing::warn!(listener = settings.name, error = %e, suppressed, "accept failed");
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let key = crate::limit::IpRateLimiter::key(peer.ip());
        let limit = (!settings.trusted_proxies.trusts(peer.ip())).then_some(per_address);
        let Some(entry) = table.admit(key, limit) else {
            table.refused_per_address.increment(1);
            if let Some(suppressed) = REFUSED_LOG.check() {
                tracing::info!(listener = settings.name, %peer, per_address, suppressed, "refused a connection: its address holds its share of pending connections");
            }
            continue;
        };
        let handler = handler.clone();
        let stop = stop.clone();
        let timeout = settings.header_timeout;
        tracker.spawn(async move {
            let _permit = permit;
            let entry = Arc::new(entry);
            let cancel = entry.cancel.clone();
            let service = service_fn(move |req| {
                let handler = handler.clone();
                entry.spoke();
                async move { Ok::<_, Infallible>(handler.handle(req, peer).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(timeout)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                // Shed: the pool was full and this was the oldest connection still silent.
                _ = cancel.cancelled() => {}
                _ = stop.cancelled() => {
                    // Let an upgrade whose 101 is already on the wire complete, so its
                    // session can close it properly, before asking the rest to finish.
                    if tokio::time::timeout(Duration::from_millis(500), conn.as_mut()).await.is_err() {
                        conn.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
                    }
                }
            }
        });
    }
}

/// A response with a body and content type.
pub fn respond(status: hyper::StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    r
}

/// A plain-text response.
pub fn text(status: hyper::StatusCode, body: &'static str) -> Response<Body> {
    respond(status, "text/plain; charset=utf-8", Bytes::from_static(body.as_bytes()))
}
