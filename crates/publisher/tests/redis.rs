//! The Redis transport against a real `redis-server`: a plain SUBSCRIBE receives exactly
//! the envelope bytes, batches are pipelined in order, and a restarted server is reconnected.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code: a failed assumption should fail loudly")]

use std::time::Duration;

use bytes::Bytes;
use fanout_protocol::{decode_envelope, encode_envelope, now_micros, Encoding};
use fanout_publisher::{Outgoing, PublishError, Publisher, RetryPolicy};
use fanout_testkit::{free_port, RedisServer};
use futures_util::StreamExt;

async fn subscriber(url: &str, channels: &[&str]) -> redis::aio::PubSub {
    let mut pubsub = redis::Client::open(url).unwrap().get_async_pubsub().await.unwrap();
    for c in channels {
        pubsub.subscribe(*c).await.unwrap();
    }
    pubsub
}

async fn next(stream: &mut (impl futures_util::Stream<Item = redis::Msg> + Unpin)) -> (String, Vec<u8>) {
    let msg = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.expect("a message within 5s").unwrap();
    (msg.get_channel_name().to_owned(), msg.get_payload_bytes().to_vec())
}

/// Checks that `payload` is byte for byte the workspace's envelope of `(enc, data)`,
/// stamped between `before` and now.
fn assert_envelope(payload: &[u8], before: u64, enc: Encoding, data: &[u8]) {
    let e = decode_envelope(payload).unwrap();
    let (ts, got_enc, got_data) = (e.ts, e.enc, e.data);
    assert!(ts >= before && ts <= now_micros(), "ts {ts} stamped at publish time");
    assert_eq!((got_enc, got_data), (enc, data));
    assert_eq!(payload, encode_envelope(ts, enc, data), "exactly the protocol crate's envelope");
}

#[tokio::test]
async fn subscriber_receives_exactly_the_envelope() {
    let redis = RedisServer::start();
    let mut sub = subscriber(&redis.url(), &["fanout:chat:room-1"]).await;
    let mut stream = sub.on_message();
    let p = Publisher::redis(redis.url()).connect().await.unwrap();
    let before = now_micros();
    #[derive(serde::Serialize)]
    struct Chat {
        text: &'static str,
        n: [u8; 2],
    }
    p.publish("chat:room-1", &Chat { text: "hi", n: [1, 2] }).await.unwrap();
    let (channel, payload) = next(&mut stream).await;
    assert_eq!(channel, "fanout:chat:room-1");
    assert_envelope(&payload, before, Encoding::Json, br#"{"text":"hi","n":[1,2]}"#);
}

#[tokio::test]
async fn msgpack_raw_and_custom_prefix() {
    let redis = RedisServer::start();
    let mut sub = subscriber(&redis.url(), &["app/x"]).await;
    let mut stream = sub.on_message();
    let p = Publisher::redis(redis.url()).prefix("app/").encoding(Encoding::MsgPack).connect().await.unwrap();
    let before = now_micros();
    let raw = Bytes::from_static(&[0x92, 0x01, 0xa1, b'z']);
    p.publish_raw("x", Encoding::MsgPack, raw.clone()).await.unwrap();
    assert_envelope(&next(&mut stream).await.1, before, Encoding::MsgPack, &raw);
    p.publish("x", &("a", 2)).await.unwrap();
    let (_, payload) = next(&mut stream).await;
    let e = decode_envelope(&payload).unwrap();
    assert_eq!((e.enc, e.data), (Encoding::MsgPack, &[0x92, 0xa1, b'a', 0x02][..]));
}

#[tokio::test]
async fn batches_are_pipelined_in_order_and_broadcast_reaches_every_channel() {
    let redis = RedisServer::start();
    let mut sub = subscriber(&redis.url(), &["fanout:a", "fanout:b", "fanout:c"]).await;
    let mut stream = sub.on_message();
    let p = Publisher::redis(redis.url()).connect().await.unwrap();
    let batch: Vec<_> =
        (0..200).map(|i| Outgoing::new(if i % 2 == 0 { "a" } else { "b" }, Encoding::Json, format!("{i}"))).collect();
    let before = now_micros();
    p.publish_batch(&batch).await.unwrap();
    for i in 0..200 {
        let (channel, payload) = next(&mut stream).await;
        assert_eq!(channel, if i % 2 == 0 { "fanout:a" } else { "fanout:b" });
        assert_envelope(&payload, before, Encoding::Json, format!("{i}").as_bytes());
    }
    p.broadcast(&["a", "b", "c"], &"all").await.unwrap();
    let mut got: Vec<String> = Vec::new();
    let mut stamps = Vec::new();
    for _ in 0..3 {
        let (channel, payload) = next(&mut stream).await;
        assert_envelope(&payload, before, Encoding::Json, br#""all""#);
        stamps.push(fanout_protocol::decode_envelope(&payload).unwrap().ts);
        got.push(channel);
    }
    got.sort();
    assert_eq!(got, ["fanout:a", "fanout:b", "fanout:c"]);
    // One publication: the same ts on every channel, as through the HTTP API.
    assert!(stamps.windows(2).all(|w| w[0] == w[1]), "{stamps:?}");
}

#[tokio::test]
async fn unavailable_while_down_and_reconnects_after_restart() {
    let redis = RedisServer::start();
    let port = redis.port();
    let p = Publisher::redis(redis.url())
        .timeout(Duration::from_secs(1))
        .retry(RetryPolicy {
            max_retries: 1,
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(10),
        })
        .connect()
        .await
        .unwrap();
    p.publish("c", &1).await.unwrap();
    drop(redis);
    let e = p.publish("c", &2).await.unwrap_err();
    assert!(e.is_retryable(), "{e}");
    assert!(matches!(e, PublishError::Unavailable { status: None, .. } | PublishError::Timeout(_)), "{e}");

    let redis = RedisServer::start_on(port);
    let mut sub = subscriber(&redis.url(), &["fanout:c"]).await;
    let mut stream = sub.on_message();
    let before = now_micros();
    p.publish("c", &3).await.unwrap();
    assert_envelope(&next(&mut stream).await.1, before, Encoding::Json, b"3");
}

#[tokio::test]
async fn connect_fails_fast_when_nothing_listens() {
    let port = free_port();
    let e = match Publisher::redis(format!("redis://127.0.0.1:{port}")).connect().await {
        Ok(_) => panic!("connected to nothing"),
        Err(e) => e,
    };
    assert!(e.is_retryable(), "{e}");
}
