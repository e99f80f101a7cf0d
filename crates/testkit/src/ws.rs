//! A WebSocket test client (tokio-tungstenite) speaking either wire format.

use std::time::Duration;

use fanout_protocol::{transcode, Encoding};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::{
    tungstenite::{client::IntoClientRequest, http::HeaderValue, Message},
    MaybeTlsStream, WebSocketStream,
};

/// What the client saw next.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A text frame, parsed as JSON.
    Json(serde_json::Value),
    /// A binary frame, parsed as MessagePack and shown as JSON for easy assertions.
    MsgPack(serde_json::Value),
    /// A Close frame with its code (1005 when none), or the stream ending (None).
    Close(Option<u16>),
    Timeout,
}

impl Event {
    /// The JSON view of a data frame, whichever format it came in.
    pub fn value(&self) -> serde_json::Value {
        match self {
            Event::Json(v) | Event::MsgPack(v) => v.clone(),
            other => panic!("expected a data frame, got {other:?}"),
        }
    }
}

pub struct WsClient {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub msgpack: bool,
}

/// MessagePack → JSON for assertions (binary becomes an array of numbers).
pub(crate) fn msgpack_to_json(bytes: &[u8]) -> serde_json::Value {
    let json = transcode(Encoding::MsgPack, Encoding::Json, bytes).expect("server sent invalid MessagePack");
    serde_json::from_slice(&json).expect("transcoded JSON parses")
}

/// JSON → MessagePack bytes.
pub(crate) fn json_to_msgpack(v: &serde_json::Value) -> Vec<u8> {
    transcode(Encoding::Json, Encoding::MsgPack, v.to_string().as_bytes()).expect("JSON transcodes to MessagePack")
}

impl WsClient {
    /// Connects offering `subprotocol` (None: no header, which means JSON).
    pub async fn connect(url: &str, subprotocol: Option<&str>) -> Result<Self, u16> {
        let mut req = url.into_client_request().expect("valid URL");
        if let Some(p) = subprotocol {
            req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_str(p).expect("header"));
        }
        Self::connect_request(req, subprotocol == Some("fanout.v1.msgpack")).await
    }

    /// Connects with a prepared request, returning the HTTP status on refusal (0 when the
    /// TCP connection itself failed).
    pub async fn connect_request(
        req: tokio_tungstenite::tungstenite::handshake::client::Request,
        msgpack: bool,
    ) -> Result<Self, u16> {
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, _)) => Ok(Self { ws, msgpack }),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
            Err(tokio_tungstenite::tungstenite::Error::Io(_)) => Err(0),
            Err(e) => panic!("connect failed: {e}"),
        }
    }

    pub async fn json(url: &str) -> Self {
        Self::connect(url, Some("fanout.v1.json")).await.expect("upgrade refused")
    }

    pub async fn msgpack(url: &str) -> Self {
        Self::connect(url, Some("fanout.v1.msgpack")).await.expect("upgrade refused")
    }

    /// Sends a command in the connection's format.
    pub async fn send(&mut self, cmd: serde_json::Value) {
        let msg = if self.msgpack {
            Message::Binary(json_to_msgpack(&cmd).into())
        } else {
            Message::Text(cmd.to_string().into())
        };
        self.ws.send(msg).await.expect("send");
    }

    pub async fn send_raw(&mut self, msg: Message) {
        self.ws.send(msg).await.expect("send");
    }

    /// The next frame, skipping Ping/Pong.
    pub async fn recv_timeout(&mut self, timeout: Duration) -> Event {
        loop {
            let next = match tokio::time::timeout(timeout, self.ws.next()).await {
                Err(_) => return Event::Timeout,
                Ok(next) => next,
            };
            return match next {
                None | Some(Err(_)) => Event::Close(None),
                Some(Ok(Message::Text(t))) => Event::Json(serde_json::from_str(&t).expect("server sent invalid JSON")),
                Some(Ok(Message::Binary(b))) => Event::MsgPack(msgpack_to_json(&b)),
                Some(Ok(Message::Close(f))) => Event::Close(Some(f.map_or(1005, |f| u16::from(f.code)))),
                Some(Ok(_)) => continue,
            };
        }
    }

    pub async fn recv(&mut self) -> Event {
        self.recv_timeout(Duration::from_secs(5)).await
    }

    /// The next data frame as JSON; panics on anything else.
    pub async fn next_value(&mut self) -> serde_json::Value {
        self.recv().await.value()
    }

    /// Subscribes and waits for the confirmation.
    pub async fn subscribe(&mut self, channel: &str) {
        self.send(serde_json::json!({"op":"subscribe","channel":channel,"id":1})).await;
        let mut reply = self.next_value().await;
        // In a namespace that keeps history the reply also carries the channel's position.
        if let Some(fields) = reply.as_object_mut() {
            fields.remove("offset");
            fields.remove("epoch");
        }
        assert_eq!(reply, serde_json::json!({"op":"subscribed","channel":channel,"id":1}), "subscribe {channel}");
    }

    /// Publishes and waits for the confirmation.
    pub async fn publish(&mut self, channel: &str, data: serde_json::Value) {
        self.send(serde_json::json!({"op":"publish","channel":channel,"data":data,"id":2})).await;
        let reply = self.next_value().await;
        assert_eq!(reply, serde_json::json!({"op":"published","id":2}), "publish {channel}");
    }

    /// Asserts nothing arrives for `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        let e = self.recv_timeout(wait).await;
        assert_eq!(e, Event::Timeout, "expected nothing, got {e:?}");
    }
}
