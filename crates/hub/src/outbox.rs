//! One connection's outbound queue: many producers (the fan-out, the session's own
//! replies), one consumer (the session task that writes the socket), bounded in bytes.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, OnceLock, PoisonError,
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use fanout_protocol::Encoding;
use futures_util::task::AtomicWaker;

use crate::wakeups::{WakeState, Wakeups};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A framed WebSocket frame waiting to be written.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub frame: Bytes,
    /// The publication's `ts` (µs since the epoch) for `message` frames, 0 otherwise;
    /// lets the writer measure end-to-end latency without decoding the frame.
    pub ts: u64,
}

/// What happened to a pushed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// This push would have exceeded the byte bound: the outbox is now overflowed, the
    /// frame was dropped, and the session is woken to disconnect with 4008. Returned once.
    Overflow,
    /// The outbox no longer accepts frames (overflowed earlier, or closed).
    Refused,
}

/// The outbox's lifecycle as seen by its consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Open,
    /// The node is draining: queued frames are still handed out, new ones are refused.
    Draining,
    Overflowed,
    Closed,
}

struct State {
    queue: VecDeque<Outgoing>,
    status: Status,
    /// What the backend asked of this connection (server API), for its session to act on.
    orders: Vec<Order>,
}

/// Something the backend asks a connection's session to do (`POST /api/disconnect`,
/// `POST /api/unsubscribe`), delivered through the outbox the session already polls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Order {
    /// Close with 4009.
    Disconnect,
    /// Leave this channel and say `unsubscribed` with `reason:"server"`.
    Unsubscribe(fanout_protocol::ChannelName),
}

/// A byte-bounded multi-producer queue of frames for one connection.
///
/// The lock is held only to push or swap the queue, never across an `.await`, and is only
/// ever shared by the session and the one task delivering to it, so it is uncontended in
/// practice; the consumer is woken only when the queue goes from empty to non-empty.
pub struct Outbox {
    id: u64,
    format: Encoding,
    limit: usize,
    /// Bytes pushed and not yet reported written: queued here plus held by the writer.
    in_flight: AtomicUsize,
    state: Mutex<State>,
    waker: AtomicWaker,
    /// A replay waits here for room under the bound (see [`Outbox::wait_room`]); the
    /// writer only notifies while someone waits, one relaxed load per write otherwise.
    room: tokio::sync::Notify,
    room_waiters: AtomicUsize,
    /// Whether the registry's wake queue holds this outbox, or woke it (see `wakeups`).
    wake_state: WakeState,
    /// That queue, once a fan-out has used it: told when the session takes its frames.
    pacer: OnceLock<Arc<Wakeups>>,
    /// The session is doing something other than waiting on this outbox (see
    /// [`Self::set_busy`]).
    busy: AtomicBool,
}

impl Outbox {
    pub fn new(format: Encoding, limit: usize) -> Self {
        Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            format,
            limit,
            in_flight: AtomicUsize::new(0),
            state: Mutex::new(State { queue: VecDeque::new(), status: Status::Open, orders: Vec::new() }),
            waker: AtomicWaker::new(),
            room: tokio::sync::Notify::new(),
            room_waiters: AtomicUsize::new(0),
            wake_state: WakeState::default(),
            pacer: OnceLock::new(),
            busy: AtomicBool::new(false),
        }
    }

    /// Unique for the life of the process; identifies the subscriber in the registry.
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn format(&self) -> Encoding {
        self.format
    }

    /// The byte bound.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Room left under the byte bound.
    pub fn room(&self) -> usize {
        self.limit.saturating_sub(self.in_flight())
    }

    /// Marks the outbox overflowed, as a push past the bound would: the session is woken
    /// to disconnect with 4008.
    pub fn overflow(&self) {
        let mut state = self.lock();
        if matches!(state.status, Status::Open | Status::Draining) {
            state.status = Status::Overflowed;
            state.queue.clear();
        }
        drop(state);
        self.waker.wake();
        self.wake_room();
    }

    /// Bytes queued or being written.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a frame unless that would exceed the byte bound. Refused once the outbox is
    /// draining: a drain lets no new publication in.
    pub fn push(&self, frame: Bytes, ts: u64) -> Push {
        self.wake_if(self.push_if(frame, ts, Status::Open))
    }

    /// [`Self::push`] that leaves the wake to the caller (the fan-out, through the
    /// registry's wake queue): true when the consumer must be woken (the queue was empty).
    pub(crate) fn push_quiet(&self, frame: Bytes, ts: u64) -> (Push, bool) {
        self.push_if(frame, ts, Status::Open)
    }

    /// Wakes the consumer.
    pub(crate) fn wake(&self) {
        self.waker.wake();
    }

    /// The consumer says it is busy elsewhere (awaiting a command's reply) and will not
    /// take frames until it says it is not: the fan-out's wake queue then does not wait
    /// for it before waking the sessions queued behind it.
    pub fn set_busy(&self, busy: bool) {
        self.busy.store(busy, Ordering::Release);
        if busy {
            self.end_wake();
        }
    }

    pub(crate) fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }

    /// A wake the pump counts is over: the session took its frames or turned elsewhere.
    fn end_wake(&self) {
        if self.wake_state.taken() {
            if let Some(pacer) = self.pacer.get() {
                pacer.ran();
            }
        }
    }

    /// This outbox's place in the registry's wake queue.
    pub(crate) fn wake_state(&self) -> &WakeState {
        &self.wake_state
    }

    /// The wake queue to tell when the session takes its frames (one registry's, always).
    pub(crate) fn set_pacer(&self, wakeups: &Arc<Wakeups>) {
        self.pacer.get_or_init(|| wakeups.clone());
    }

    /// Queues the session's own answer to something the client asked (a command reply, a
    /// Pong): accepted while draining too, because an answer that is due must go out
    /// before the 1001 (a `publish` the broker took and never acknowledged would be retried
    /// by the client as a duplicate).
    pub fn push_reply(&self, frame: Bytes) -> Push {
        self.wake_if(self.push_if(frame, 0, Status::Draining))
    }

    fn wake_if(&self, (push, wake): (Push, bool)) -> Push {
        if wake {
            self.waker.wake();
        }
        push
    }

    fn push_if(&self, frame: Bytes, ts: u64, also: Status) -> (Push, bool) {
        let len = frame.len();
        let mut state = self.lock();
        if state.status != Status::Open && state.status != also {
            return (Push::Refused, false);
        }
        if self.in_flight.load(Ordering::Relaxed) + len > self.limit {
            state.status = Status::Overflowed;
            state.queue.clear();
            drop(state);
            self.waker.wake();
            self.wake_room();
            return (Push::Overflow, false);
        }
        self.in_flight.fetch_add(len, Ordering::Relaxed);
        let was_empty = state.queue.is_empty();
        state.queue.push_back(Outgoing { frame, ts });
        drop(state);
        (Push::Queued, was_empty)
    }

    /// Moves everything queued into `into` (swapping buffers when `into` is empty, so the
    /// steady state allocates nothing). Ready when frames were moved or the outbox left
    /// the `Open` state; otherwise registers the waker.
    pub fn poll_take(&self, cx: &mut Context<'_>, into: &mut VecDeque<Outgoing>) -> Poll<Status> {
        if let Some(status) = self.take_now(into) {
            return Poll::Ready(status);
        }
        self.waker.register(cx.waker());
        match self.take_now(into) {
            Some(status) => Poll::Ready(status),
            None => Poll::Pending,
        }
    }

    /// Non-blocking take: `None` when open and empty.
    pub fn take_now(&self, into: &mut VecDeque<Outgoing>) -> Option<Status> {
        self.end_wake();
        let mut state = self.lock();
        match state.status {
            Status::Open if state.queue.is_empty() && state.orders.is_empty() => return None,
            Status::Open | Status::Draining => {}
            other => return Some(other),
        }
        if into.is_empty() {
            std::mem::swap(&mut state.queue, into);
        } else {
            into.extend(state.queue.drain(..));
        }
        Some(state.status)
    }

    /// Queues an order for the session and wakes it (at most 64 wait; more are dropped:
    /// the session acts on them at its next pass, and a flood of orders is not news).
    pub fn order(&self, order: Order) {
        let mut state = self.lock();
        if state.orders.len() < 64 {
            state.orders.push(order);
        }
        drop(state);
        self.waker.wake();
    }

    /// The orders queued since the last call.
    pub fn take_orders(&self) -> Vec<Order> {
        std::mem::take(&mut self.lock().orders)
    }

    /// Future form of [`Self::poll_take`].
    pub async fn take(&self, into: &mut VecDeque<Outgoing>) -> Status {
        std::future::poll_fn(|cx| self.poll_take(cx, into)).await
    }

    /// The writer reports `n` bytes handed to the socket.
    pub fn written(&self, n: usize) {
        self.in_flight.fetch_sub(n, Ordering::Relaxed);
        if self.room_waiters.load(Ordering::Relaxed) > 0 {
            self.room.notify_waiters();
        }
    }

    /// Waits until `n` more bytes fit under the bound: true then, false once the outbox
    /// no longer takes publications (closed, overflowed, draining). For a replay that
    /// feeds the outbox at the pace the socket drains it.
    pub async fn wait_room(&self, n: usize) -> bool {
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.room_waiters.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(&self.room_waiters);
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            // Registered before the checks, so a write between them still wakes us.
            notified.as_mut().enable();
            if self.status() != Status::Open {
                return false;
            }
            if self.room() >= n {
                return true;
            }
            notified.await;
        }
    }

    fn wake_room(&self) {
        self.room.notify_waiters();
    }

    /// Asks the consumer to finish: frames already queued can still be taken, new ones
    /// are refused, and the consumer sees [`Status::Draining`].
    pub fn drain(&self) {
        let mut state = self.lock();
        if state.status == Status::Open {
            state.status = Status::Draining;
        }
        drop(state);
        self.waker.wake();
        self.wake_room();
    }

    /// Stops accepting frames; what is queued stays takeable only while `Open`, so
    /// callers drain before closing.
    pub fn close(&self) {
        let mut state = self.lock();
        if matches!(state.status, Status::Open | Status::Draining) {
            state.status = Status::Closed;
        }
        state.queue = VecDeque::new();
        drop(state);
        self.waker.wake();
        self.wake_room();
    }

    pub fn status(&self) -> Status {
        self.lock().status
    }
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("id", &self.id)
            .field("format", &self.format)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_in_bytes_and_overflow_reported_once() {
        let o = Outbox::new(Encoding::Json, 10);
        assert_eq!(o.push(Bytes::from_static(b"12345"), 0), Push::Queued);
        assert_eq!(o.push(Bytes::from_static(b"12345"), 0), Push::Queued);
        assert_eq!(o.push(Bytes::from_static(b"1"), 0), Push::Overflow);
        assert_eq!(o.push(Bytes::from_static(b"1"), 0), Push::Refused);
        assert_eq!(o.status(), Status::Overflowed);
    }

    #[test]
    fn written_bytes_free_room() {
        let o = Outbox::new(Encoding::Json, 10);
        let mut q = VecDeque::new();
        assert_eq!(o.push(Bytes::from_static(b"1234567890"), 7), Push::Queued);
        let waker = futures_util::task::noop_waker();
        assert_eq!(o.poll_take(&mut Context::from_waker(&waker), &mut q), Poll::Ready(Status::Open));
        assert_eq!((q.len(), q[0].ts), (1, 7));
        // Taken but not yet written still counts against the bound.
        assert_eq!(o.push(Bytes::from_static(b"1"), 0), Push::Overflow);
        let o = Outbox::new(Encoding::Json, 10);
        o.push(Bytes::from_static(b"1234567890"), 0);
        q.clear();
        assert!(o.poll_take(&mut Context::from_waker(&waker), &mut q).is_ready());
        o.written(10);
        assert_eq!(o.push(Bytes::from_static(b"1234567890"), 0), Push::Queued);
        assert!(o.poll_take(&mut Context::from_waker(&waker), &mut q).is_ready());
        assert_eq!(q.len(), 2);
        assert!(o.poll_take(&mut Context::from_waker(&waker), &mut q).is_pending());
    }

    #[test]
    fn drain_hands_out_what_is_queued_then_refuses() {
        let o = Outbox::new(Encoding::Json, 100);
        o.push(Bytes::from_static(b"a"), 0);
        o.drain();
        assert_eq!(o.push(Bytes::from_static(b"b"), 0), Push::Refused);
        assert_eq!(o.push_reply(Bytes::from_static(b"reply")), Push::Queued);
        let mut q = VecDeque::new();
        assert_eq!(o.take_now(&mut q), Some(Status::Draining));
        assert_eq!(q.len(), 2);
        assert_eq!(o.take_now(&mut q), Some(Status::Draining));
        assert_eq!(q.len(), 2);
        o.close();
        assert_eq!(o.push_reply(Bytes::from_static(b"late")), Push::Refused);
    }

    #[tokio::test]
    async fn take_wakes_on_push_and_close() {
        let o = std::sync::Arc::new(Outbox::new(Encoding::MsgPack, 100));
        let o2 = o.clone();
        let h = tokio::spawn(async move {
            let mut q = VecDeque::new();
            let s1 = o2.take(&mut q).await;
            let s2 = o2.take(&mut VecDeque::new()).await;
            (s1, q.len(), s2)
        });
        tokio::task::yield_now().await;
        o.push(Bytes::from_static(b"x"), 0);
        tokio::task::yield_now().await;
        o.close();
        assert_eq!(h.await.unwrap(), (Status::Open, 1, Status::Closed));
        assert_eq!(o.push(Bytes::from_static(b"x"), 0), Push::Refused);
    }
}
