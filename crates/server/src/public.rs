//! The public listener: `GET /ws` upgrades into a session, `GET /healthz`, and with `--demo`
//! the demo page (`GET /demo`) and the JavaScript client it loads.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use bytes::Bytes;
use fanout_protocol::Encoding;
use http_body_util::Full;
use hyper::{body::Incoming, header, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, sync::Semaphore};
use tokio_util::task::TaskTracker;

use fanout_hub::LogLimiter;

use crate::{
    auth::{self, Identity},
    limit::{IpRateLimiter, IpVerdict, TrustedProxies},
    listener::{respond, text, Body, Handler},
    metrics::Rejection,
    session::{self, SessionContext},
};

static REFUSED_TOKEN_LOG: LogLimiter = LogLimiter::new(10_000);

pub const SUBPROTOCOL_JSON: &str = "fanout.v1.json";
pub const SUBPROTOCOL_MSGPACK: &str = "fanout.v1.msgpack";

pub struct Public {
    pub shared: Arc<SessionContext>,
    pub draining: Arc<AtomicBool>,
    /// One permit per open WebSocket connection.
    pub sessions: Arc<Semaphore>,
    pub tracker: TaskTracker,
    pub allowed_origins: Vec<String>,
    /// With a verifier configured: whether upgrades without a token are refused (true) or
    /// become anonymous connections.
    pub auth_required: bool,
    /// New connections per client address; None when the limit is off.
    pub ip_limiter: Option<IpRateLimiter>,
    /// Whose `X-Forwarded-For` names the client address the limiter charges.
    pub trusted_proxies: TrustedProxies,
    /// Serve the demo page and the JavaScript client at `/demo`.
    pub demo: bool,
}

/// The demo page and the client bundle it imports, built from `clients/js` (the built
/// bundle is committed, so nothing is built at run time).
const DEMO_PAGE: &str = include_str!("../../../clients/js/demo/index.html");
const DEMO_CLIENT: &str = include_str!("../../../clients/js/dist/index.js");

impl Handler for Public {
    async fn handle(self: Arc<Self>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
            (&Method::GET, "/demo" | "/demo/") if self.demo => {
                respond(StatusCode::OK, "text/html; charset=utf-8", Bytes::from_static(DEMO_PAGE.as_bytes()))
            }
            (&Method::GET, "/demo/fanout.js" | "/fanout.js") if self.demo => {
                respond(StatusCode::OK, "text/javascript; charset=utf-8", Bytes::from_static(DEMO_CLIENT.as_bytes()))
            }
            (&Method::GET, "/ws") => self.upgrade(req, peer).unwrap_or_else(|(status, reason, message)| {
                self.shared.metrics.rejected(reason).increment(1);
                let mut response = text(status, message);
                match reason {
                    Rejection::Unauthorized => {
                        response
                            .headers_mut()
                            .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
                    }
                    Rejection::RateLimited => {
                        let wait = self.ip_limiter.as_ref().map_or(1, |l| l.retry_after().as_secs());
                        response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from(wait));
                    }
                    _ => {}
                }
                response
            }),
            (_, "/ws" | "/healthz") => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}

type Rejected = (StatusCode, Rejection, &'static str);

/// None of the subprotocols a client offered is ours.
#[derive(Debug, PartialEq, Eq)]
pub struct UnknownSubprotocol;

/// Picks the wire format from `Sec-WebSocket-Protocol`: `Ok(None)` when the header is
/// absent (JSON, and no header in the response), an error when nothing offered is known.
pub fn negotiate(headers: &header::HeaderMap) -> Result<Option<(Encoding, &'static str)>, UnknownSubprotocol> {
    let mut offered = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("").split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .peekable();
    if offered.peek().is_none() {
        return Ok(None);
    }
    offered
        .find_map(|p| match p {
            SUBPROTOCOL_JSON => Some((Encoding::Json, SUBPROTOCOL_JSON)),
            SUBPROTOCOL_MSGPACK => Some((Encoding::MsgPack, SUBPROTOCOL_MSGPACK)),
            _ => None,
        })
        .map(Some)
        .ok_or(UnknownSubprotocol)
}

impl Public {
    fn upgrade(&self, mut req: Request<Incoming>, peer: SocketAddr) -> Result<Response<Body>, Rejected> {
        if self.draining.load(Ordering::Relaxed) {
            return Err((StatusCode::SERVICE_UNAVAILABLE, Rejection::Draining, "node is draining\n"));
        }
        // Before anything that costs work (above all a signature check) for this client.
        if let Some(limiter) = &self.ip_limiter {
            let client = self.trusted_proxies.client_ip(peer.ip(), req.headers());
            let verdict = limiter.check(client, std::time::Instant::now());
            self.shared.metrics.rate_limited_ips.set(limiter.tracked() as f64);
            if verdict == IpVerdict::Limited {
                return Err((
                    StatusCode::TOO_MANY_REQUESTS,
                    Rejection::RateLimited,
                    "too many connections from your address\n",
                ));
            }
        }
        if !fastwebsockets::upgrade::is_upgrade_request(&req) {
            return Err((StatusCode::UPGRADE_REQUIRED, Rejection::NotWebSocket, "expected a WebSocket upgrade\n"));
        }
        let negotiated = negotiate(req.headers()).map_err(|UnknownSubprotocol| {
            (
                StatusCode::BAD_REQUEST,
                Rejection::BadSubprotocol,
                "unsupported subprotocol: use fanout.v1.json or fanout.v1.msgpack\n",
            )
        })?;
        if !self.allowed_origins.is_empty() {
            if let Some(origin) = req.headers().get(header::ORIGIN) {
                let allowed = origin.to_str().is_ok_and(|o| self.allowed_origins.iter().any(|a| a == o));
                if !allowed {
                    return Err((StatusCode::FORBIDDEN, Rejection::Forbidden, "origin not allowed\n"));
                }
            }
        }
        let permit =
            self.sessions.clone().try_acquire_owned().map_err(|_| {
                (StatusCode::SERVICE_UNAVAILABLE, Rejection::TooManyConnections, "too many connections\n")
            })?;
        let identity = self.identify(&req)?;
        let (response, upgrade) = fastwebsockets::upgrade::upgrade(&mut req)
            .map_err(|_| (StatusCode::BAD_REQUEST, Rejection::NotWebSocket, "invalid WebSocket handshake\n"))?;
        let (mut parts, _) = response.into_parts();
        let format = match negotiated {
            Some((format, name)) => {
                parts.headers.insert(header::SEC_WEBSOCKET_PROTOCOL, header::HeaderValue::from_static(name));
                format
            }
            None => Encoding::Json,
        };
        let shared = self.shared.clone();
        let tracker = self.tracker.clone();
        // This task only waits for hyper to hand the connection over; the session is a task
        // of its own, so none of this future's state stays with every open connection.
        self.tracker.spawn(async move {
            let ws = match upgrade.await {
                Ok(ws) => ws,
                Err(e) => return tracing::debug!(error = %e, "upgrade did not complete"),
            };
            // Take the raw TCP stream back: the session reads and writes it directly.
            match ws.into_inner().into_inner().downcast::<TokioIo<TcpStream>>() {
                Ok(io) => {
                    tracker.spawn(session::start(io.io.into_inner(), io.read_buf, format, shared, identity, permit));
                }
                Err(_) => tracing::error!("upgraded connection is not a TCP stream"),
            }
        });
        Ok(Response::from_parts(parts, Full::new(Bytes::new())))
    }

    /// Who the upgrading client is, from its token.
    fn identify(&self, req: &Request<Incoming>) -> Result<Identity, Rejected> {
        let Some(verifier) = &self.shared.verifier else { return Ok(Identity::Open) };
        let unauthorized = |e: auth::TokenError| {
            if let Some(suppressed) = REFUSED_TOKEN_LOG.check() {
                tracing::info!(error = %e, suppressed, "refused an upgrade's token");
            }
            (StatusCode::UNAUTHORIZED, Rejection::Unauthorized, e.http_message())
        };
        match auth::token_from_request(req.headers(), req.uri().query()).map_err(unauthorized)? {
            // A token that is present is checked even where tokens are optional: a bad one
            // is a client bug to surface, not a reason to continue anonymously.
            Some(token) => verifier.verify(&token).map(|g| Identity::Token(Box::new(g))).map_err(unauthorized),
            None if self.auth_required => {
                Err((StatusCode::UNAUTHORIZED, Rejection::Unauthorized, "unauthorized: a token is required\n"))
            }
            None => Ok(Identity::Anonymous),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> header::HeaderMap {
        let mut h = header::HeaderMap::new();
        for v in values {
            h.append(header::SEC_WEBSOCKET_PROTOCOL, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn subprotocol_negotiation() {
        assert_eq!(negotiate(&headers(&[])), Ok(None));
        assert_eq!(negotiate(&headers(&["fanout.v1.msgpack"])), Ok(Some((Encoding::MsgPack, SUBPROTOCOL_MSGPACK))));
        assert_eq!(negotiate(&headers(&["chat, fanout.v1.json"])), Ok(Some((Encoding::Json, SUBPROTOCOL_JSON))));
        assert_eq!(
            negotiate(&headers(&["x", "fanout.v1.msgpack"])),
            Ok(Some((Encoding::MsgPack, SUBPROTOCOL_MSGPACK)))
        );
        assert_eq!(negotiate(&headers(&["graphql-ws"])), Err(UnknownSubprotocol));
    }
}
