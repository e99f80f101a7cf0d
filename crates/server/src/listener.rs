//! The accept loop both listeners share: a permit before each accept (so a connection
//! flood queues in the kernel backlog instead of in our memory), one HTTP/1.1 connection
//! task per socket, and graceful shutdown of connections that are still plain HTTP.

use std::{convert::Infallible, future::Future, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn, Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub type Body = Full<Bytes>;

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
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning; the backlog holds the rest.
                    tracing::warn!(listener = settings.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let handler = handler.clone();
        let stop = stop.clone();
        let timeout = settings.header_timeout;
        tracker.spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req| {
                let handler = handler.clone();
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
