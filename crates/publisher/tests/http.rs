//! The HTTP transport against a scripted in-test server: request shape, retry on 503 and
//! connection failures, no retry on 4xx, timeouts.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code: a failed assumption should fail loudly")]

use std::{
    collections::VecDeque,
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use fanout_publisher::{Encoding, Outgoing, PublishError, Publisher, RetryPolicy};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    content_type: Option<String>,
    accept: Option<String>,
    authorization: Option<String>,
    body: Bytes,
}

struct Reply {
    status: u16,
    body: &'static str,
    delay: Duration,
}

fn reply(status: u16, body: &'static str) -> Reply {
    Reply { status, body, delay: Duration::ZERO }
}

#[derive(Default)]
struct Script {
    replies: VecDeque<Reply>,
    seen: Vec<Seen>,
}

/// A server answering with `replies` in order (then 200), recording every request.
async fn server(replies: Vec<Reply>) -> (String, Arc<Mutex<Script>>) {
    let script = Arc::new(Mutex::new(Script { replies: replies.into(), seen: Vec::new() }));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let s = script.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let s = s.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let s = s.clone();
                    async move {
                        let header = |name: &str| req.headers().get(name).map(|v| v.to_str().unwrap().to_owned());
                        let (method, path) = (req.method().to_string(), req.uri().path().to_owned());
                        let (content_type, accept, authorization) =
                            (header("content-type"), header("accept"), header("authorization"));
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let next = {
                            let mut s = s.lock().unwrap();
                            s.seen.push(Seen { method, path, content_type, accept, authorization, body });
                            s.replies.pop_front().unwrap_or_else(|| reply(200, r#"{"ok":true}"#))
                        };
                        tokio::time::sleep(next.delay).await;
                        let resp = Response::builder()
                            .status(next.status)
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from_static(next.body.as_bytes())))
                            .unwrap();
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    (format!("http://{addr}"), script)
}

fn fast_retry(max_retries: u32) -> RetryPolicy {
    RetryPolicy { max_retries, initial_backoff: Duration::from_millis(1), max_backoff: Duration::from_millis(5) }
}

fn seen(script: &Arc<Mutex<Script>>) -> Vec<Seen> {
    script.lock().unwrap().seen.clone()
}

#[tokio::test]
async fn publish_sends_the_documented_json_request() {
    let (url, script) = server(vec![]).await;
    let p = Publisher::http(&url).api_key("k3y").build().unwrap();
    p.publish("chat:room-1", &serde_json::json!({"text": "hi"})).await.unwrap();
    let seen = seen(&script);
    assert_eq!(seen.len(), 1);
    let r = &seen[0];
    assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/api/publish"));
    assert_eq!(r.content_type.as_deref(), Some("application/json"));
    assert_eq!(r.accept.as_deref(), Some("application/json"));
    assert_eq!(r.authorization.as_deref(), Some("Bearer k3y"));
    assert_eq!(&r.body[..], br#"{"channel":"chat:room-1","data":{"text":"hi"}}"#);
}

#[tokio::test]
async fn broadcast_in_msgpack_without_api_key() {
    let (url, script) = server(vec![]).await;
    let p = Publisher::http(format!("{url}/")).encoding(Encoding::MsgPack).build().unwrap();
    p.broadcast(&["a", "b:c"], &serde_json::json!({"n": 1})).await.unwrap();
    let r = &seen(&script)[0];
    assert_eq!(r.path, "/api/broadcast");
    assert_eq!(r.content_type.as_deref(), Some("application/msgpack"));
    assert_eq!(r.authorization, None);
    use rmpv::Value as V;
    let v = rmpv::decode::read_value(&mut &r.body[..]).unwrap();
    assert_eq!(
        v,
        V::Map(vec![
            (V::from("channels"), V::Array(vec![V::from("a"), V::from("b:c")])),
            (V::from("data"), V::Map(vec![(V::from("n"), V::from(1))]))
        ])
    );
}

#[tokio::test]
async fn raw_bytes_are_sent_verbatim() {
    let (url, script) = server(vec![]).await;
    let p = Publisher::http(&url).build().unwrap();
    p.publish_raw("c", Encoding::Json, Bytes::from_static(br#"{"s":1, "t":2}"#)).await.unwrap();
    assert_eq!(&seen(&script)[0].body[..], br#"{"channel":"c","data":{"s":1, "t":2}}"#);
}

#[tokio::test]
async fn retries_on_503_then_succeeds() {
    let unavailable = r#"{"error":{"code":"unavailable","message":"broker down"}}"#;
    let (url, script) = server(vec![reply(503, unavailable), reply(503, unavailable)]).await;
    let p = Publisher::http(&url).retry(fast_retry(3)).build().unwrap();
    p.publish("c", &1).await.unwrap();
    let seen = seen(&script);
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|r| &r.body[..] == br#"{"channel":"c","data":1}"#));
}

#[tokio::test]
async fn gives_up_after_max_retries_with_a_retryable_error() {
    let unavailable = r#"{"error":{"code":"unavailable","message":"broker down"}}"#;
    let (url, script) = server((0..5).map(|_| reply(503, unavailable)).collect()).await;
    let p = Publisher::http(&url).retry(fast_retry(2)).build().unwrap();
    let e = p.publish("c", &1).await.unwrap_err();
    assert!(
        matches!(e, PublishError::Unavailable { status: Some(503), ref reason } if reason.contains("broker down")),
        "{e}"
    );
    assert!(e.is_retryable());
    assert_eq!(seen(&script).len(), 3);
}

#[tokio::test]
async fn no_retry_on_client_errors() {
    for (status, code) in [(400, "bad_request"), (401, "unauthorized"), (413, "message_too_large")] {
        let body: &'static str =
            Box::leak(format!(r#"{{"error":{{"code":"{code}","message":"m"}}}}"#).into_boxed_str());
        let (url, script) = server(vec![reply(status, body)]).await;
        let p = Publisher::http(&url).retry(fast_retry(3)).build().unwrap();
        let e = p.publish("c", &1).await.unwrap_err();
        match &e {
            PublishError::Rejected { status: s, code: c, message } => {
                assert_eq!((*s, c.as_str(), message.as_str()), (Some(status), code, "m"));
            }
            other => panic!("{status}: {other}"),
        }
        assert!(!e.is_retryable());
        assert_eq!(seen(&script).len(), 1, "{status} must not be retried");
    }
}

#[tokio::test]
async fn times_out_and_retries_timeouts() {
    let slow = || Reply { status: 200, body: r#"{"ok":true}"#, delay: Duration::from_millis(400) };
    let (url, script) = server(vec![slow(), slow()]).await;
    let p = Publisher::http(&url).timeout(Duration::from_millis(100)).retry(fast_retry(1)).build().unwrap();
    let e = p.publish("c", &1).await.unwrap_err();
    assert!(matches!(e, PublishError::Timeout(d) if d == Duration::from_millis(100)), "{e}");
    assert_eq!(seen(&script).len(), 2);
}

#[tokio::test]
async fn connection_refused_is_unavailable_and_retried() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let p = Publisher::http(format!("http://{addr}")).retry(fast_retry(2)).build().unwrap();
    let started = std::time::Instant::now();
    let e = p.publish("c", &1).await.unwrap_err();
    assert!(
        matches!(e, PublishError::Unavailable { status: None, ref reason } if reason.to_lowercase().contains("refused")),
        "{e}"
    );
    assert!(started.elapsed() >= Duration::from_millis(1), "backed off between attempts");
}

#[tokio::test]
async fn batch_is_one_request_in_order() {
    let (url, script) = server(vec![]).await;
    let p = Publisher::http(&url).build().unwrap();
    let mut batch: Vec<_> =
        (0..50).map(|i| Outgoing::new(format!("ch:{}", i % 5), Encoding::Json, format!("{i}"))).collect();
    batch.push(Outgoing::new("mp", Encoding::MsgPack, vec![0x07]));
    p.publish_batch(&batch).await.unwrap();
    let seen = seen(&script);
    let paths: Vec<(&str, Option<&str>)> = seen.iter().map(|r| (r.path.as_str(), r.content_type.as_deref())).collect();
    assert_eq!(
        paths,
        [("/api/publish_batch", Some("application/json")), ("/api/publish_batch", Some("application/msgpack"))],
        "one request per encoding"
    );
    let elements: Vec<String> = (0..50).map(|i| format!(r#"{{"channel":"ch:{}","data":{i}}}"#, i % 5)).collect();
    assert_eq!(std::str::from_utf8(&seen[0].body).unwrap(), format!(r#"{{"publications":[{}]}}"#, elements.join(",")));
    let mp: rmpv::Value = rmpv::decode::read_value(&mut &seen[1].body[..]).unwrap();
    assert_eq!(mp.to_string(), r#"{"publications": [{"channel": "mp", "data": 7}]}"#);
}

#[tokio::test]
async fn batch_to_a_node_without_the_endpoint_publishes_one_by_one() {
    let (url, script) = server(vec![reply(404, "not found\n")]).await;
    let p = Publisher::http(&url).build().unwrap();
    let batch: Vec<_> = (0..5).map(|i| Outgoing::new("c", Encoding::Json, format!("{i}"))).collect();
    p.publish_batch(&batch).await.unwrap();
    let seen = seen(&script);
    assert_eq!(seen[0].path, "/api/publish_batch");
    let mut singles: Vec<String> =
        seen[1..].iter().map(|r| format!("{} {}", r.path, String::from_utf8_lossy(&r.body))).collect();
    singles.sort();
    let expected: Vec<String> = (0..5).map(|i| format!(r#"/api/publish {{"channel":"c","data":{i}}}"#)).collect();
    assert_eq!(singles, expected);
}
