//! The HTTP transport: `POST /api/publish` and `/api/broadcast` on a node's internal
//! listener, over a pooled keep-alive hyper client.

use std::time::Duration;

use bytes::Bytes;
use fanout_protocol::Encoding;
use http::{
    header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE},
    HeaderValue, Request, StatusCode, Uri,
};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};

use crate::{body, PublishError};

/// Error bodies are a few dozen bytes; anything far larger is not the gateway talking.
const MAX_RESPONSE_BODY: usize = 64 * 1024;

/// A history answer holds publications: up to 100,000 of them in principle.
const MAX_HISTORY_BODY: usize = 256 << 20;

pub(crate) struct HttpTransport {
    client: Client<HttpConnector, Full<Bytes>>,
    publish_uri: Uri,
    broadcast_uri: Uri,
    batch_uri: Uri,
    history_uri: Uri,
    /// `http://authority/prefix`, for the server API's paths.
    base: String,
    auth: Option<HeaderValue>,
    timeout: Duration,
}

impl HttpTransport {
    pub(crate) fn new(base_url: &str, api_key: Option<&str>, timeout: Duration) -> Result<Self, PublishError> {
        let base: Uri = base_url.parse().map_err(|e| PublishError::Config(format!("base URL {base_url:?}: {e}")))?;
        match base.scheme_str() {
            Some("http") => {}
            Some(other) => {
                return Err(PublishError::Config(format!("base URL scheme {other:?} is not supported (only http)")))
            }
            None => {
                return Err(PublishError::Config(format!("base URL {base_url:?} has no scheme (http://host:port)")))
            }
        }
        let authority =
            base.authority().ok_or_else(|| PublishError::Config(format!("base URL {base_url:?} has no host")))?;
        let prefix = base.path().trim_end_matches('/');
        let uri = |path: &str| -> Result<Uri, PublishError> {
            format!("http://{authority}{prefix}{path}")
                .parse()
                .map_err(|e| PublishError::Config(format!("base URL {base_url:?}: {e}")))
        };
        let auth = api_key
            .map(|k| {
                HeaderValue::from_str(&format!("Bearer {k}"))
                    .map_err(|_| PublishError::Config("API key is not a valid header value".into()))
            })
            .transpose()?
            .map(|mut v| {
                v.set_sensitive(true);
                v
            });
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let client = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(60)).build(connector);
        Ok(Self {
            client,
            publish_uri: uri("/api/publish")?,
            broadcast_uri: uri("/api/broadcast")?,
            batch_uri: uri("/api/publish_batch")?,
            history_uri: uri("/api/history")?,
            base: format!("http://{authority}{prefix}"),
            auth,
            timeout,
        })
    }

    pub(crate) fn publish(&self, enc: Encoding, channel: &str, data: &[u8], key: Option<&str>) -> Body {
        let bytes = Bytes::from(body::publish_body(enc, channel, data, key));
        Body { uri: self.publish_uri.clone(), enc, bytes, get: false, large: false }
    }

    /// A `POST /api/history` request (always JSON).
    pub(crate) fn history(&self, request: &serde_json::Value) -> Body {
        let bytes = Bytes::from(request.to_string());
        Body { uri: self.history_uri.clone(), enc: Encoding::Json, bytes, get: false, large: true }
    }

    /// A server API request: `POST path` with a JSON body, or `GET path` without.
    pub(crate) fn api(&self, path: &str, request: Option<&serde_json::Value>) -> Result<Body, PublishError> {
        let uri: Uri =
            format!("{}{path}", self.base).parse().map_err(|e| PublishError::Config(format!("{path}: {e}")))?;
        let bytes = request.map(|r| Bytes::from(r.to_string())).unwrap_or_default();
        Ok(Body { uri, enc: Encoding::Json, bytes, get: request.is_none(), large: true })
    }

    /// A `POST /api/publish_batch` of publications all encoded as `enc`.
    pub(crate) fn batch(&self, enc: Encoding, items: &[(&str, &[u8])]) -> Body {
        let bytes = Bytes::from(body::batch_body(enc, items));
        Body { uri: self.batch_uri.clone(), enc, bytes, get: false, large: true }
    }

    pub(crate) fn broadcast(&self, enc: Encoding, channels: &[&str], data: &[u8]) -> Body {
        let bytes = Bytes::from(body::broadcast_body(enc, channels, data));
        Body { uri: self.broadcast_uri.clone(), enc, bytes, get: false, large: false }
    }

    /// One attempt: sends `body` and classifies the answer.
    pub(crate) async fn send(&self, body: &Body) -> Result<(), PublishError> {
        self.exchange(body).await.map(drop)
    }

    /// One attempt: sends `body` and returns the success answer's content type and body.
    pub(crate) async fn exchange(&self, body: &Body) -> Result<(Option<String>, Bytes), PublishError> {
        let builder = if body.get { Request::get(body.uri.clone()) } else { Request::post(body.uri.clone()) };
        let mut req = builder
            .header(CONTENT_TYPE, body::content_type(body.enc))
            .header(ACCEPT, body::content_type(body.enc))
            .body(Full::new(body.bytes.clone()))
            .map_err(|e| PublishError::Config(e.to_string()))?;
        if let Some(auth) = &self.auth {
            req.headers_mut().insert(AUTHORIZATION, auth.clone());
        }
        let attempt = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| PublishError::Unavailable { status: None, reason: chain(&e) })?;
            let status = resp.status();
            let content_type = resp.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
            if status.is_success() {
                // Read to the end, which also returns the connection to the pool. History
                // answers can be large; anything else is a few bytes.
                let limit = if body.large { MAX_HISTORY_BODY } else { MAX_RESPONSE_BODY };
                let bytes = match Limited::new(resp.into_body(), limit).collect().await {
                    Ok(b) => b.to_bytes(),
                    Err(_) => Bytes::new(),
                };
                return Ok((content_type, bytes));
            }
            let bytes = match Limited::new(resp.into_body(), MAX_RESPONSE_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => Bytes::new(),
            };
            Err(classify(status, content_type.as_deref(), &bytes))
        };
        tokio::time::timeout(self.timeout, attempt).await.map_err(|_| PublishError::Timeout(self.timeout))?
    }
}

/// A request body kept for retries: cloning `Bytes` shares it.
pub(crate) struct Body {
    uri: Uri,
    enc: Encoding,
    bytes: Bytes,
    get: bool,
    /// The answer may be large (history, listings).
    large: bool,
}

fn classify(status: StatusCode, content_type: Option<&str>, body: &[u8]) -> PublishError {
    let (code, message) = body::error_of(status.as_u16(), content_type, body);
    match status {
        StatusCode::SERVICE_UNAVAILABLE
        | StatusCode::TOO_MANY_REQUESTS
        | StatusCode::BAD_GATEWAY
        | StatusCode::GATEWAY_TIMEOUT => {
            PublishError::Unavailable { status: Some(status.as_u16()), reason: format!("{code}: {message}") }
        }
        _ => PublishError::Rejected { status: Some(status.as_u16()), code, message },
    }
}

/// hyper's errors say little at the top level ("client error (Connect)"); the cause
/// ("Connection refused") is further down the chain.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classification() {
        assert!(classify(StatusCode::SERVICE_UNAVAILABLE, None, b"").is_retryable());
        assert!(classify(StatusCode::BAD_GATEWAY, None, b"").is_retryable());
        for s in [
            StatusCode::BAD_REQUEST,
            StatusCode::UNAUTHORIZED,
            StatusCode::PAYLOAD_TOO_LARGE,
            StatusCode::INTERNAL_SERVER_ERROR,
        ] {
            let e = classify(s, Some("application/json"), br#"{"error":{"code":"x","message":"y"}}"#);
            assert!(!e.is_retryable(), "{s}");
            assert!(matches!(e, PublishError::Rejected { status: Some(_), ref code, .. } if code == "x"));
        }
    }

    #[test]
    fn urls() {
        let t = HttpTransport::new("http://127.0.0.1:9090", None, Duration::from_secs(1)).unwrap();
        assert_eq!(t.publish_uri, "http://127.0.0.1:9090/api/publish");
        let t = HttpTransport::new("http://gw.internal:9090/prefix/", Some("k"), Duration::from_secs(1)).unwrap();
        assert_eq!(t.broadcast_uri, "http://gw.internal:9090/prefix/api/broadcast");
        assert!(t.auth.as_ref().unwrap().is_sensitive());
        for bad in ["https://x", "127.0.0.1:9090", "http://", "not a url"] {
            assert!(
                matches!(HttpTransport::new(bad, None, Duration::from_secs(1)), Err(PublishError::Config(_))),
                "{bad}"
            );
        }
        assert!(HttpTransport::new("http://x", Some("bad\nkey"), Duration::from_secs(1)).is_err());
    }
}
