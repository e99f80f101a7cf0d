//! The fan-out's wake queue: the sessions a fan-out gave frames are woken in the order they
//! got them, one chunk at a time, the next chunk once the last has run.
//!
//! Why not wake each session as its outbox fills: tokio keeps up to 256 runnable tasks
//! per worker and, when a wake finds that queue full, moves its oldest half to the global
//! queue, which a busy worker serves only one task in every few dozen. A fan-out to 1,000
//! sessions therefore ran the sessions it woke first last, while sessions the next
//! publication woke again went ahead of them, and every task woken by I/O (a publisher's
//! read, the Redis reader) waited behind up to a thousand sessions: at 1M deliveries/s on
//! one core the end-to-end p99 was 80–180 ms while the median was 20 (docs/benchmarks.md,
//! session 6). Woken here, at most one chunk of sessions is runnable at a time and they run
//! in the order they became ready, so every session is written once per round, in the same
//! order each round, and an I/O-woken task waits behind one chunk at most.
//!
//! Bounded: an outbox is in the queue at most once (its wake state says whether it is), so
//! the queue never holds more entries than the node has connections.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering},
        Arc, Mutex, OnceLock, PoisonError,
    },
};

use tokio::sync::Notify;

use crate::outbox::Outbox;

/// Sessions woken at once per runtime worker (measured at 1M deliveries/s on one worker:
/// 32 wakes too slowly, 96 or 128 already let a publisher's reads wait; docs/benchmarks.md).
const CHUNK_PER_WORKER: usize = 64;

/// At most this many at once, however many workers: the pump's worker takes the whole
/// chunk into its own run queue (256 tasks, the rest spills into the global queue), and
/// the others steal from there, so a chunk stays at half that queue.
const MAX_CHUNK: usize = 128;

/// How many times the pump yields waiting for a chunk to run before it wakes the next
/// anyway. A session that is busy elsewhere (awaiting a command's Redis reply) says so
/// ([`Outbox::set_busy`]) and is not waited for; this bounds the rest (a session that
/// became busy just as it was woken, one that ended). A yield lasts until the worker next
/// polls for I/O, a few dozen task polls, so this is a few hundred polls at most.
const MAX_WAIT_YIELDS: usize = 8;

/// An outbox's place in the wake queue ([`Outbox`] keeps it).
#[derive(Debug, Default)]
pub(crate) struct WakeState(AtomicU8);

const IDLE: u8 = 0;
/// In the queue, not woken yet.
const QUEUED: u8 = 1;
/// Woken by the pump and not yet taken its frames: counted in the chunk that runs.
const WOKEN: u8 = 2;

impl WakeState {
    /// The outbox goes into the queue: false when it is there already, or woken and about
    /// to take (that take gets the new frame too).
    fn enqueue(&self) -> bool {
        self.0.compare_exchange(IDLE, QUEUED, Ordering::AcqRel, Ordering::Relaxed).is_ok()
    }

    /// Woken by the pump; `counted` when the pump waits for this session to take.
    fn woken(&self, counted: bool) {
        self.0.store(if counted { WOKEN } else { IDLE }, Ordering::Release);
    }

    /// The session takes its frames, or turns to other work: true when this ends a wake
    /// the pump counts.
    pub(crate) fn taken(&self) -> bool {
        self.0.load(Ordering::Relaxed) == WOKEN
            && self.0.compare_exchange(WOKEN, IDLE, Ordering::AcqRel, Ordering::Relaxed).is_ok()
    }
}

/// One registry's wake queue and its pump task.
#[derive(Default)]
pub(crate) struct Wakeups {
    queue: Mutex<VecDeque<Arc<Outbox>>>,
    /// Something was queued while the pump waited for work.
    queued: Notify,
    /// Sessions of the current chunk that have not taken their frames yet.
    running: AtomicUsize,
    /// The pump, spawned on the runtime of the first fan-out that needs it.
    pump: OnceLock<()>,
    /// The registry is gone: the pump ends.
    stopped: AtomicBool,
}

impl Wakeups {
    /// Starts collecting the wakes one fan-out owes; they are queued when it is dropped.
    pub(crate) fn batch(self: &Arc<Self>) -> Batch<'_> {
        Batch { wakeups: self, outboxes: Vec::new() }
    }

    /// A session of the current chunk took its frames.
    pub(crate) fn ran(&self) {
        // Saturating: a session of an earlier chunk that runs late must not wrap the count
        // of this one (it only lets this chunk end a little early).
        let _ = self.running.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Ends the pump (the registry is dropped; nothing will be queued again).
    pub(crate) fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.queued.notify_one();
    }

    /// Sessions woken and not yet run (for tests).
    #[cfg(test)]
    pub(crate) fn running(&self) -> usize {
        self.running.load(Ordering::Acquire)
    }

    async fn pump(self: Arc<Self>, chunk: usize) {
        let mut woken = Vec::with_capacity(chunk);
        loop {
            let queued = self.queued.notified();
            {
                let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
                let n = queue.len().min(chunk);
                woken.extend(queue.drain(..n));
            }
            if woken.is_empty() {
                if self.stopped.load(Ordering::Acquire) {
                    return;
                }
                queued.await;
                continue;
            }
            self.running.store(0, Ordering::Release);
            for outbox in woken.drain(..) {
                // A busy session takes its frames when its command is done: nothing to
                // wait for. The others are counted before the wake, so one that runs at
                // once counts down.
                let counted = !outbox.is_busy();
                if counted {
                    self.running.fetch_add(1, Ordering::AcqRel);
                }
                outbox.wake_state().woken(counted);
                outbox.wake();
            }
            for _ in 0..MAX_WAIT_YIELDS {
                tokio::task::yield_now().await;
                if self.running.load(Ordering::Acquire) == 0 {
                    break;
                }
            }
        }
    }

    fn spawn_pump(self: &Arc<Self>, runtime: &tokio::runtime::Handle) {
        self.pump.get_or_init(|| {
            let chunk = (CHUNK_PER_WORKER * runtime.metrics().num_workers().max(1)).min(MAX_CHUNK);
            runtime.spawn(self.clone().pump(chunk));
        });
    }
}

/// The wakes one fan-out owes, handed to the queue in one lock when dropped.
pub(crate) struct Batch<'a> {
    wakeups: &'a Arc<Wakeups>,
    outboxes: Vec<Arc<Outbox>>,
}

impl Batch<'_> {
    /// `outbox` went from empty to non-empty: its session is to be woken.
    pub(crate) fn add(&mut self, outbox: &Arc<Outbox>) {
        if outbox.wake_state().enqueue() {
            outbox.set_pacer(self.wakeups);
            self.outboxes.push(outbox.clone());
        }
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        if self.outboxes.is_empty() {
            return;
        }
        // Outside a runtime (a benchmark, a unit test) there is no pump: wake at once.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            for outbox in self.outboxes.drain(..) {
                outbox.wake_state().woken(false);
                outbox.wake();
            }
            return;
        };
        self.wakeups.spawn_pump(&runtime);
        self.wakeups.queue.lock().unwrap_or_else(PoisonError::into_inner).extend(self.outboxes.drain(..));
        self.wakeups.queued.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::VecDeque,
        sync::atomic::AtomicUsize,
        task::{Context, Poll},
    };

    use bytes::Bytes;
    use fanout_protocol::{ChannelName, Encoding, Publication};

    use super::*;
    use crate::Registry;

    fn channel() -> ChannelName {
        ChannelName::new("c").unwrap()
    }

    fn publication(n: u8) -> Publication {
        Publication::new(channel(), 1, Encoding::Json, Bytes::from(vec![b'0' + n]))
    }

    /// `n` subscribers of "c", each with a task that waits for frames and reports its index
    /// and how many woken sessions had not run yet when it took them.
    async fn subscribers(
        registry: &Arc<Registry>,
        n: usize,
        skip: Option<usize>,
    ) -> (Vec<Arc<Outbox>>, Arc<Mutex<Vec<(usize, usize)>>>, Vec<tokio::task::JoinHandle<()>>) {
        let outboxes: Vec<_> = (0..n).map(|_| Arc::new(Outbox::new(Encoding::Json, 1 << 20))).collect();
        let taken = Arc::new(Mutex::new(Vec::new()));
        let waiting = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for (i, outbox) in outboxes.iter().enumerate() {
            registry.insert(&channel(), outbox);
            if Some(i) == skip {
                // Registers a waker that nobody acts on: woken, this session never takes.
                let waker = futures_util::task::noop_waker();
                let _ = outbox.poll_take(&mut Context::from_waker(&waker), &mut VecDeque::new());
                waiting.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            let (outbox, taken, waiting, registry) = (outbox.clone(), taken.clone(), waiting.clone(), registry.clone());
            tasks.push(tokio::spawn(async move {
                let mut queue = VecDeque::new();
                for _ in 0..2 {
                    let mut first = true;
                    std::future::poll_fn(|cx| {
                        let poll = outbox.poll_take(cx, &mut queue);
                        if std::mem::take(&mut first) && poll.is_pending() {
                            waiting.fetch_add(1, Ordering::SeqCst);
                        }
                        poll
                    })
                    .await;
                    taken.lock().unwrap().push((i, registry.wakeups().running()));
                    queue.clear();
                }
            }));
        }
        while waiting.load(Ordering::SeqCst) < n {
            tokio::task::yield_now().await;
        }
        (outboxes, taken, tasks)
    }

    #[tokio::test]
    async fn sessions_are_woken_in_the_order_they_got_frames_a_chunk_at_a_time() {
        let registry = Arc::new(Registry::new());
        let (_outboxes, taken, tasks) = subscribers(&registry, 200, None).await;
        registry.deliver(&publication(1));
        while taken.lock().unwrap().len() < 200 {
            tokio::task::yield_now().await;
        }
        let taken = std::mem::take(&mut *taken.lock().unwrap());
        let order: Vec<usize> = taken.iter().map(|&(i, _)| i).collect();
        assert_eq!(order, (0..200).collect::<Vec<_>>(), "woken in the order the fan-out reached them");
        let most = taken.iter().map(|&(_, running)| running).max().unwrap();
        // The first of each chunk to run sees the rest of its chunk still waiting: one
        // chunk at a time (and a pump, not wakes straight from the fan-out, which count 0).
        assert_eq!(most, CHUNK_PER_WORKER - 1, "at most one chunk woken at a time");
        for t in tasks {
            t.abort();
        }
    }

    #[tokio::test]
    async fn a_woken_session_that_does_not_run_holds_up_no_one() {
        let registry = Arc::new(Registry::new());
        let (_outboxes, taken, tasks) = subscribers(&registry, 200, Some(0)).await;
        let everyone = async {
            registry.deliver(&publication(1));
            while taken.lock().unwrap().len() < 199 {
                tokio::task::yield_now().await;
            }
            // The stuck one still has its first frame queued: it is not queued twice.
            registry.deliver(&publication(2));
            for t in tasks {
                t.await.unwrap();
            }
        };
        // A guard against a hang, not a measurement: without the bounded wait the pump
        // would wait for the stuck session forever.
        tokio::time::timeout(std::time::Duration::from_secs(60), everyone).await.expect("every other session ran");
        assert_eq!(taken.lock().unwrap().len(), 2 * 199);
        assert_eq!(registry.wakeups().queue.lock().unwrap().len(), 0);
    }

    #[tokio::test]
    async fn a_session_busy_elsewhere_is_not_waited_for() {
        let registry = Arc::new(Registry::new());
        // Two subscribers whose sessions never take (their wakers do nothing); the first
        // says it is busy.
        let outboxes: Vec<_> = (0..2).map(|_| Arc::new(Outbox::new(Encoding::Json, 1 << 20))).collect();
        let waker = futures_util::task::noop_waker();
        for o in &outboxes {
            registry.insert(&channel(), o);
            let _ = o.poll_take(&mut Context::from_waker(&waker), &mut VecDeque::new());
        }
        outboxes[0].set_busy(true);
        registry.deliver(&publication(1));
        while !registry.wakeups().queue.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        // Woken, and only the idle one is waited for.
        assert_eq!(registry.wakeups().running(), 1);
        // Turning busy ends a counted wake too.
        outboxes[1].set_busy(true);
        assert_eq!(registry.wakeups().running(), 0);
    }

    #[tokio::test]
    async fn the_pump_ends_with_its_registry() {
        let registry = Arc::new(Registry::new());
        let (outboxes, taken, tasks) = subscribers(&registry, 1, None).await;
        registry.deliver(&publication(1));
        while taken.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        let wakeups = Arc::downgrade(registry.wakeups());
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
        drop((outboxes, registry));
        // The pump holds the last strong reference (outboxes hold one too, while they
        // live); it lets go once it has seen the stop. Without the stop this never ends,
        // and the test's guard fails it.
        let gone = async {
            while wakeups.strong_count() > 0 {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(60), gone).await.expect("the pump ended");
    }

    #[test]
    fn outside_a_runtime_the_fan_out_wakes_at_once() {
        struct Count(AtomicUsize);
        impl futures_util::task::ArcWake for Count {
            fn wake_by_ref(me: &Arc<Self>) {
                me.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let registry = Registry::new();
        let outbox = Arc::new(Outbox::new(Encoding::Json, 1 << 20));
        registry.insert(&channel(), &outbox);
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = futures_util::task::waker(count.clone());
        let mut queue = VecDeque::new();
        assert!(outbox.poll_take(&mut Context::from_waker(&waker), &mut queue).is_pending());
        registry.deliver(&publication(1));
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert!(matches!(outbox.poll_take(&mut Context::from_waker(&waker), &mut queue), Poll::Ready(_)));
        assert_eq!(queue.len(), 1);
    }
}
