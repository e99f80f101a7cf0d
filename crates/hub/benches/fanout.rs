//! Fan-out cost per delivery, with and without a Prometheus recorder behind the metric
//! handles: what the metrics cost on the hot path.
//!
//! One iteration delivers one publication to 2,000 subscribers and then does what each
//! session does after a write — take the frames, report the bytes written, count the
//! deliveries and sample the latency (one delivery in 8, as sessions do; here every write
//! carries one) — minus the syscall, which in a real node costs several times everything
//! measured here. The difference between the two runs is therefore an upper bound on what
//! the metrics add to each delivery.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code: a failed assumption should fail loudly")]

use std::{collections::VecDeque, sync::Arc};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fanout_hub::{Outbox, Registry};
use fanout_protocol::{now_micros, ChannelName, Encoding, Publication};

const SUBSCRIBERS: usize = 2000;

/// The per-write accounting a session does (see crates/server/src/session.rs `flush`).
struct SessionMetrics {
    deliveries: metrics::Counter,
    sent_bytes: metrics::Counter,
    latency: metrics::Histogram,
}

fn setup() -> (Registry, Vec<Arc<Outbox>>, SessionMetrics) {
    let registry = Registry::new();
    let channel = ChannelName::new("bench").unwrap();
    let outboxes: Vec<_> = (0..SUBSCRIBERS).map(|_| Arc::new(Outbox::new(Encoding::Json, 1 << 20))).collect();
    for o in &outboxes {
        registry.insert(&channel, o);
    }
    let m = SessionMetrics {
        deliveries: metrics::counter!("fanout_deliveries_total"),
        sent_bytes: metrics::counter!("fanout_sent_bytes_total"),
        latency: metrics::histogram!("fanout_delivery_latency_seconds"),
    };
    (registry, outboxes, m)
}

fn run_once(
    registry: &Registry,
    outboxes: &[Arc<Outbox>],
    m: &SessionMetrics,
    p: &Publication,
    q: &mut VecDeque<fanout_hub::Outgoing>,
    writes: &mut u32,
) {
    registry.deliver(p);
    for o in outboxes {
        o.take_now(q);
        let mut bytes = 0;
        let mut oldest = 0;
        for out in q.drain(..) {
            bytes += out.frame.len();
            oldest = out.ts;
        }
        o.written(bytes);
        m.sent_bytes.increment(bytes as u64);
        m.deliveries.increment(1);
        if writes.is_multiple_of(8) {
            m.latency.record(now_micros().saturating_sub(oldest) as f64 / 1e6);
        }
        *writes = writes.wrapping_add(1);
    }
}

fn bench(c: &mut Criterion) {
    let publication = Publication::new(
        ChannelName::new("bench").unwrap(),
        now_micros(),
        Encoding::Json,
        Bytes::from_static(
            br#"{"s":1,"t":1700000000000000,"p":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#,
        ),
    );
    let mut group = c.benchmark_group("fanout_2000_subscribers");
    group.throughput(Throughput::Elements(SUBSCRIBERS as u64));

    // No recorder: every handle is a no-op.
    let (registry, outboxes, m) = setup();
    let mut q = VecDeque::new();
    let mut writes = 0;
    group.bench_function("metrics_off", |b| {
        b.iter(|| run_once(&registry, &outboxes, &m, &publication, &mut q, &mut writes))
    });

    // The node's real recorder, with its histogram buckets.
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ])
        .unwrap()
        .build_recorder();
    let handle = recorder.handle();
    let (registry, outboxes, m) = metrics::with_local_recorder(&recorder, setup);
    group.bench_function("metrics_prometheus", |b| {
        b.iter(|| run_once(&registry, &outboxes, &m, &publication, &mut q, &mut writes));
        handle.run_upkeep();
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
