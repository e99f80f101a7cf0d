//! The direct-Redis transport: `PUBLISH {prefix}{channel} <envelope>` (or, for stored and
//! idempotent publishing, `FCALL fanout_publish`) on one multiplexed connection, replaced
//! after a connection-level failure.

use std::{sync::Mutex, time::Duration};

use fanout_protocol::{encode_envelope, now_micros, redis_channel, Encoding};
use redis::{aio::MultiplexedConnection, AsyncConnectionConfig, RetryMethod};

use crate::PublishError;

pub(crate) struct RedisTransport {
    client: redis::Client,
    /// `None` until the first use and after a failure that broke the connection; the
    /// connection itself is a cheap handle that many publishes share concurrently.
    conn: Mutex<Option<MultiplexedConnection>>,
    /// Serialises reconnects so a burst of failing publishes opens one connection, not many.
    connecting: tokio::sync::Mutex<()>,
    prefix: String,
    timeout: Duration,
}

impl RedisTransport {
    pub(crate) fn new(url: &str, prefix: String, timeout: Duration) -> Result<Self, PublishError> {
        let client = redis::Client::open(url).map_err(|e| PublishError::Config(format!("Redis URL: {e}")))?;
        Ok(Self { client, conn: Mutex::new(None), connecting: tokio::sync::Mutex::new(()), prefix, timeout })
    }

    fn cached(&self) -> Option<MultiplexedConnection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) async fn connection(&self) -> Result<MultiplexedConnection, PublishError> {
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let conn = self.client.get_multiplexed_async_connection_with_config(&config).await.map_err(|e| self.fail(e))?;
        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn.clone());
        Ok(conn)
    }

    /// One attempt at publishing every `(channel, enc, data)` in one pipeline, each in its
    /// own envelope, all stamped with one `ts` (a broadcast is one publication, entered at
    /// one moment, whichever channels carry it; the HTTP API stamps it the same way).
    pub(crate) async fn publish<'a>(
        &self,
        items: impl Iterator<Item = (&'a str, Encoding, &'a [u8])>,
    ) -> Result<(), PublishError> {
        let mut pipe = redis::pipe();
        let ts = now_micros();
        for (channel, enc, data) in items {
            pipe.cmd("PUBLISH").arg(redis_channel(&self.prefix, channel)).arg(encode_envelope(ts, enc, data)).ignore();
        }
        if pipe.is_empty() {
            return Ok(());
        }
        let attempt = async {
            let mut conn = self.connection().await?;
            pipe.query_async::<()>(&mut conn).await.map_err(|e| self.fail(e))
        };
        tokio::time::timeout(self.timeout, attempt).await.map_err(|_| {
            // A silent server may leave requests queued on the connection; start afresh.
            self.drop_connection();
            PublishError::Timeout(self.timeout)
        })?
    }

    /// One attempt at `FCALL fanout_publish 1 {prefix}{channel} ENVELOPE [KEY]`: stored in
    /// the channel's history when its namespace keeps one; the offset, 0 outside history.
    pub(crate) async fn publish_stored(
        &self,
        channel: &str,
        enc: Encoding,
        data: &[u8],
        key: Option<&str>,
    ) -> Result<u64, PublishError> {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg("fanout_publish").arg(1).arg(redis_channel(&self.prefix, channel)).arg(encode_envelope(
            now_micros(),
            enc,
            data,
        ));
        if let Some(key) = key {
            cmd.arg(key);
        }
        let attempt = async {
            let mut conn = self.connection().await?;
            cmd.query_async::<u64>(&mut conn).await.map_err(|e| self.fail(e))
        };
        tokio::time::timeout(self.timeout, attempt).await.map_err(|_| {
            self.drop_connection();
            PublishError::Timeout(self.timeout)
        })?
    }

    fn drop_connection(&self) {
        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn fail(&self, e: redis::RedisError) -> PublishError {
        if e.is_unrecoverable_error() || e.is_io_error() {
            self.drop_connection();
        }
        if e.is_timeout() {
            return PublishError::Timeout(self.timeout);
        }
        match e.retry_method() {
            RetryMethod::NoRetry => PublishError::Rejected {
                status: None,
                code: e.code().unwrap_or("ERR").to_owned(),
                message: e.detail().map_or_else(|| e.to_string(), str::to_owned),
            },
            _ => PublishError::Unavailable { status: None, reason: e.to_string() },
        }
    }
}
