//! The internal listener: the HTTP publish and history API, the server API (disconnect,
//! unsubscribe, channels, nodes), `/metrics`, `/healthz` and `/readyz`.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use bytes::Bytes;
use fanout_hub::{Hub, LogLimiter};
use fanout_protocol::{
    decode_api_batch, decode_api_history, decode_api_publish, decode_api_user, encode_api_batch, encode_api_error,
    encode_api_history, encode_api_ok, encode_api_published, now_micros, BatchResult, Encoding, ErrorCode, Publication,
};
use http_body_util::{BodyExt, Limited};
use hyper::{body::Incoming, header, HeaderMap, Method, Request, Response, StatusCode};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::{
    listener::{respond, text, Body, Handler},
    metrics::NodeMetrics,
};

pub struct Internal {
    pub hub: Hub,
    pub metrics: Arc<NodeMetrics>,
    pub prometheus: PrometheusHandle,
    /// Process metrics (memory, CPU, file descriptors) are read at scrape time.
    pub process: metrics_process::Collector,
    pub draining: Arc<AtomicBool>,
    pub api_key: Option<String>,
    pub max_body: usize,
    /// Longest time a request body may take to arrive (408 beyond).
    pub body_timeout: std::time::Duration,
    pub max_message_size: usize,
    /// Which namespaces track presence.
    pub presences: Arc<fanout_hub::Presences>,
}

static BAD_REQUEST_LOG: LogLimiter = LogLimiter::new(10_000);
static BROKER_ERROR_LOG: LogLimiter = LogLimiter::new(10_000);

impl Handler for Internal {
    async fn handle(self: Arc<Self>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
            (&Method::GET, "/readyz") => {
                let ready = self.is_ready();
                self.metrics.ready.set(if ready { 1.0 } else { 0.0 });
                if ready {
                    match &self.hub.shards_down()[..] {
                        [] => text(StatusCode::OK, "ready\n"),
                        // Ready: the other shards' channels are served. Said, for whoever looks.
                        down => {
                            let list: Vec<String> = down.iter().map(usize::to_string).collect();
                            let body = format!("ready; Redis shards down: {}\n", list.join(", "));
                            crate::listener::respond(StatusCode::OK, "text/plain; charset=utf-8", Bytes::from(body))
                        }
                    }
                } else if self.draining.load(Ordering::Relaxed) {
                    text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "broker unavailable\n")
                }
            }
            (&Method::GET, "/metrics") => {
                self.metrics.ready.set(if self.is_ready() { 1.0 } else { 0.0 });
                self.process.collect();
                respond(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", self.prometheus.render())
            }
            (&Method::POST, "/api/publish") => self.publish(req, false, peer).await,
            (&Method::POST, "/api/broadcast") => self.publish(req, true, peer).await,
            (&Method::POST, "/api/publish_batch") => self.publish_batch(req, peer).await,
            (&Method::POST, "/api/history") => self.history(req, peer).await,
            (&Method::POST, "/api/presence") => self.presence(req, false, peer).await,
            (&Method::POST, "/api/presence_stats") => self.presence(req, true, peer).await,
            (&Method::POST, "/api/disconnect") => self.control(req, false, peer).await,
            (&Method::POST, "/api/unsubscribe") => self.control(req, true, peer).await,
            (&Method::GET, "/api/channels") => self.listing(req, false, peer).await,
            (&Method::GET, "/api/nodes") => self.listing(req, true, peer).await,
            (
                _,
                "/healthz"
                | "/readyz"
                | "/metrics"
                | "/api/publish"
                | "/api/broadcast"
                | "/api/publish_batch"
                | "/api/history"
                | "/api/disconnect"
                | "/api/unsubscribe"
                | "/api/channels"
                | "/api/nodes"
                | "/api/presence"
                | "/api/presence_stats",
            ) => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}

/// Compares in time independent of the inputs, so response timing reveals neither how much
/// of a guessed key was right nor how long the key is: both sides are hashed to a fixed
/// size first, then compared with `subtle`.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    Sha256::digest(a).ct_eq(&Sha256::digest(b)).into()
}

fn media(value: Option<&header::HeaderValue>) -> Option<Encoding> {
    let v = value?.to_str().ok()?.to_ascii_lowercase();
    if v.contains("application/msgpack") || v.contains("application/x-msgpack") || v.contains("application/vnd.msgpack")
    {
        Some(Encoding::MsgPack)
    } else if v.contains("application/json") || v.contains("*/*") {
        Some(Encoding::Json)
    } else {
        None
    }
}

/// Request and response formats from `Content-Type` and `Accept`. A missing Content-Type
/// means JSON; the response follows Accept, else the request's format.
fn formats(headers: &HeaderMap) -> Result<(Encoding, Encoding), ()> {
    let request = match headers.get(header::CONTENT_TYPE) {
        None => Encoding::Json,
        Some(v) => media(Some(v)).ok_or(())?,
    };
    let response = match headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) {
        Some(a) if a.contains("application/msgpack") || a.contains("application/x-msgpack") => Encoding::MsgPack,
        Some(a) if a.contains("application/json") => Encoding::Json,
        _ => request,
    };
    Ok((request, response))
}

fn api_response(format: Encoding, status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let ct = match format {
        Encoding::Json => "application/json",
        Encoding::MsgPack => "application/msgpack",
    };
    respond(status, ct, Bytes::from(body))
}

fn api_error(format: Encoding, status: StatusCode, code: ErrorCode, message: &str) -> Response<Body> {
    api_response(format, status, encode_api_error(format, code, message))
}

impl Internal {
    fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::Relaxed) && self.hub.broker_up()
    }

    /// [`Self::read_request`], then its body decoded by `decode`: the response format and
    /// the request, or the response that refuses it (400 for a body `decode` refuses).
    async fn read_decoded<T>(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        decode: impl FnOnce(Encoding, &[u8]) -> Result<T, fanout_protocol::CommandError>,
    ) -> Result<(Encoding, T), Response<Body>> {
        let (request_format, format, body) = self.read_request(req).await?;
        decode(request_format, &body)
            .map(|t| (format, t))
            .map_err(|e| self.bad_request(format, peer, e.code, &e.message))
    }

    /// The formats, the API key check and the body, bounded in size and time; or the
    /// response that refuses the request.
    async fn read_request(&self, req: Request<Incoming>) -> Result<(Encoding, Encoding, Bytes), Response<Body>> {
        let Ok((request_format, format)) = formats(req.headers()) else {
            return Err(api_error(
                Encoding::Json,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ErrorCode::BadRequest,
                "Content-Type must be application/json or application/msgpack",
            ));
        };
        if !self.authorized(&req) {
            return Err(api_error(
                format,
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                "missing or wrong API key",
            ));
        }
        // Bounded in time as well as size: a body that never finishes must not hold the
        // connection (and its slot in the listener's pool) forever.
        let collected = tokio::time::timeout(self.body_timeout, Limited::new(req.into_body(), self.max_body).collect());
        match collected.await {
            Err(_) => Err(api_error(
                format,
                StatusCode::REQUEST_TIMEOUT,
                ErrorCode::BadRequest,
                "the request body did not arrive in time",
            )),
            Ok(Ok(b)) => Ok((request_format, format, b.to_bytes())),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(api_error(
                format,
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::MessageTooLarge,
                "request body exceeds max_http_body",
            )),
            Ok(Err(_)) => Err(api_error(
                format,
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                "could not read the request body",
            )),
        }
    }

    /// The caller learns that the broker failed, not how (no addresses or Redis text); a
    /// 503 means the outcome is unknown (docs/protocol.md).
    fn broker_failed(
        &self,
        format: Encoding,
        peer: SocketAddr,
        what: &str,
        e: &fanout_hub::BrokerError,
    ) -> Response<Body> {
        if let Some(suppressed) = BROKER_ERROR_LOG.check() {
            tracing::warn!(%peer, error = %e, suppressed, "broker failed an API {what}");
        }
        api_error(format, StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, e.client_message())
    }

    fn bad_request(&self, format: Encoding, peer: SocketAddr, code: ErrorCode, message: &str) -> Response<Body> {
        if let Some(suppressed) = BAD_REQUEST_LOG.check() {
            tracing::info!(%peer, error = %message, suppressed, "bad API request");
        }
        api_error(format, StatusCode::BAD_REQUEST, code, message)
    }

    /// The API key check, for every endpoint under `/api`.
    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let Some(key) = &self.api_key else { return true };
        let given =
            req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(crate::auth::bearer);
        given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes()))
    }

    /// `POST /api/disconnect` `{"user":U}` and `POST /api/unsubscribe` `{"user":U,"channel":C}`:
    /// 200 once every node connected to the broker has been told (a user with no
    /// connection anywhere is not an error: nothing is done).
    async fn control(&self, req: Request<Incoming>, unsubscribe: bool, peer: SocketAddr) -> Response<Body> {
        let endpoint = if unsubscribe { "unsubscribe" } else { "disconnect" };
        let (request_format, format, body) = match self.read_request(req).await {
            Ok(r) => r,
            Err(response) => return response,
        };
        let (user, channel) = match decode_api_user(request_format, &body, unsubscribe) {
            Ok(r) => r,
            Err(e) => {
                self.metrics.server_api(endpoint, "bad_request").increment(1);
                return self.bad_request(format, peer, e.code, &e.message);
            }
        };
        let control = match channel {
            Some(channel) => fanout_hub::Control::Unsubscribe { user, channel },
            None => fanout_hub::Control::Disconnect { user },
        };
        match self.hub.control(&control).await {
            Ok(()) => {
                self.metrics.server_api(endpoint, "ok").increment(1);
                api_response(format, StatusCode::OK, encode_api_ok(format))
            }
            Err(e) => {
                self.metrics.server_api(endpoint, "unavailable").increment(1);
                self.broker_failed(format, peer, endpoint, &e)
            }
        }
    }

    /// `GET /api/channels[?namespace=NS]` and `GET /api/nodes`, from every live node's
    /// report (refreshed every second). Always JSON.
    async fn listing(&self, req: Request<Incoming>, nodes: bool, peer: SocketAddr) -> Response<Body> {
        let endpoint = if nodes { "nodes" } else { "channels" };
        if !self.authorized(&req) {
            return api_error(
                Encoding::Json,
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                "missing or wrong API key",
            );
        }
        let namespace = req.uri().query().and_then(|q| {
            form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "namespace").map(|(_, v)| v.into_owned())
        });
        let reports = match self.hub.nodes().await {
            Ok(r) => r,
            Err(e) => {
                self.metrics.server_api(endpoint, "unavailable").increment(1);
                return self.broker_failed(Encoding::Json, peer, endpoint, &e);
            }
        };
        self.metrics.server_api(endpoint, "ok").increment(1);
        let body = if nodes {
            let nodes: Vec<serde_json::Value> = reports
                .iter()
                .map(|r| {
                    serde_json::json!({"id": r.id, "version": r.version, "uptime_s": r.uptime_s,
                        "connections": r.connections, "subscriptions": r.subscriptions, "channels": r.channel_count})
                })
                .collect();
            serde_json::json!({ "nodes": nodes })
        } else {
            let mut merged: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
            for r in &reports {
                for (channel, n) in &r.channels {
                    if namespace.as_deref().is_none_or(|ns| fanout_protocol::namespace_of(channel) == ns) {
                        *merged.entry(channel.as_str()).or_default() += n;
                    }
                }
            }
            let mut channels: Vec<(&str, u64)> = merged.into_iter().collect();
            channels.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
            let truncated = reports.iter().any(|r| r.channel_count > r.channels.len() as u64);
            let list: Vec<serde_json::Value> =
                channels.iter().map(|(c, n)| serde_json::json!({"channel": c, "subscribers": n})).collect();
            let mut body = serde_json::json!({ "channels": list });
            if truncated {
                body["truncated"] = true.into();
            }
            body
        };
        respond(StatusCode::OK, "application/json", Bytes::from(body.to_string()))
    }

    /// `POST /api/presence` and `POST /api/presence_stats` `{"channel":C}`.
    async fn presence(&self, req: Request<Incoming>, stats: bool, peer: SocketAddr) -> Response<Body> {
        let (format, (channel, _)) = match self.read_decoded(req, peer, decode_api_history).await {
            Ok(r) => r,
            Err(response) => return response,
        };
        if self.presences.of(channel.as_str()).is_none() {
            return self.bad_request(
                format,
                peer,
                ErrorCode::BadRequest,
                "this channel's namespace does not track presence",
            );
        }
        let body = if stats {
            self.hub.presence_stats(&channel).await.map(|s| fanout_protocol::encode_api_presence_stats(format, s))
        } else {
            self.hub.presence(&channel).await.map(|l| fanout_protocol::encode_api_presence(format, &l))
        };
        match body {
            Ok(body) => api_response(format, StatusCode::OK, body),
            Err(e) => self.broker_failed(format, peer, "presence", &e),
        }
    }

    /// `POST /api/history`.
    async fn history(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let (format, (channel, query)) = match self.read_decoded(req, peer, decode_api_history).await {
            Ok(r) => r,
            Err(response) => return response,
        };
        if !self.hub.keeps_history(channel.as_str()) {
            return self.bad_request(format, peer, ErrorCode::BadRequest, "this channel's namespace keeps no history");
        }
        self.metrics.history_reads_http.increment(1);
        match self.hub.history(&channel, &query).await {
            Ok(page) => match encode_api_history(format, &page) {
                Ok(body) => api_response(format, StatusCode::OK, body),
                Err(_) => api_error(
                    format,
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ErrorCode::Internal,
                    "history could not be encoded",
                ),
            },
            Err(e) => self.broker_failed(format, peer, "history read", &e),
        }
    }

    /// `POST /api/publish_batch`: many publications in one request, handed to the broker
    /// at once (with Redis: one pipeline per Redis), publications of one channel in batch
    /// order. Answers 200 when every one was published, 503 otherwise; either way with each
    /// one's result, so a client retries only the failed ones (with idempotency keys,
    /// safely).
    async fn publish_batch(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let (format, batch) = match self.read_decoded(req, peer, decode_api_batch).await {
            Ok(r) => r,
            Err(response) => return response,
        };
        if let Some(i) = batch.iter().position(|p| p.data.len() > self.max_message_size) {
            let message = format!("publications[{i}]: data exceeds max_message_size");
            return api_error(format, StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::MessageTooLarge, &message);
        }
        let ts = now_micros();
        let publications: Vec<(Publication, Option<String>)> = batch
            .into_iter()
            .flat_map(|p| {
                let (enc, data, key) = (p.enc, p.data, p.idempotency_key);
                p.channels.into_iter().map(move |c| (Publication::new(c, ts, enc, data.clone()), key.clone()))
            })
            .collect();
        let outcomes = self.hub.publish_batch(&publications).await;
        let mut failed = None;
        let results: Vec<BatchResult<'_>> = outcomes
            .iter()
            .map(|o| match o {
                Ok(published) => {
                    self.count(published);
                    BatchResult::Published(published.position.as_ref())
                }
                Err(e) => {
                    failed.get_or_insert(e);
                    BatchResult::Failed(ErrorCode::Unavailable, e.client_message())
                }
            })
            .collect();
        let status = match &failed {
            None => StatusCode::OK,
            Some(error) => {
                if let Some(suppressed) = BROKER_ERROR_LOG.check() {
                    tracing::warn!(%peer, %error, suppressed, "broker failed publications of an API batch");
                }
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        api_response(format, status, encode_api_batch(format, &results))
    }

    /// Counts a publication the broker took: published, or suppressed as a duplicate.
    fn count(&self, published: &fanout_hub::Published) {
        if published.duplicate {
            self.metrics.idempotent_duplicates.increment(1);
        } else {
            self.metrics.publications_http.increment(1);
        }
    }

    async fn publish(&self, req: Request<Incoming>, broadcast: bool, peer: SocketAddr) -> Response<Body> {
        let decode = |enc, body: &[u8]| decode_api_publish(enc, body, broadcast);
        let (format, request) = match self.read_decoded(req, peer, decode).await {
            Ok(r) => r,
            Err(response) => return response,
        };
        if request.data.len() > self.max_message_size {
            return api_error(
                format,
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::MessageTooLarge,
                "data exceeds max_message_size",
            );
        }
        let ts = now_micros();
        // A broadcast's channels go to the broker together (one pipeline with Redis).
        let key = request.idempotency_key;
        let batch: Vec<(Publication, Option<String>)> = request
            .channels
            .into_iter()
            .map(|channel| (Publication::new(channel, ts, request.enc, request.data.clone()), key.clone()))
            .collect();
        let mut position = None;
        for outcome in self.hub.publish_batch(&batch).await {
            match outcome {
                Ok(published) => {
                    self.count(&published);
                    position = published.position;
                }
                Err(e) => return self.broker_failed(format, peer, "publish", &e),
            }
        }
        // A broadcast answers {"ok":true} alone: its channels each have their own offset.
        if broadcast {
            return api_response(format, StatusCode::OK, encode_api_ok(format));
        }
        api_response(format, StatusCode::OK, encode_api_published(format, position.as_ref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_compare() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn format_negotiation() {
        let mut h = HeaderMap::new();
        assert_eq!(formats(&h), Ok((Encoding::Json, Encoding::Json)));
        h.insert(header::CONTENT_TYPE, "application/msgpack".parse().unwrap());
        assert_eq!(formats(&h), Ok((Encoding::MsgPack, Encoding::MsgPack)));
        h.insert(header::ACCEPT, "application/json".parse().unwrap());
        assert_eq!(formats(&h), Ok((Encoding::MsgPack, Encoding::Json)));
        h.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        assert_eq!(formats(&h), Err(()));
    }
}
