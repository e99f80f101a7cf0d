//! The gateway's own view of a run: its Prometheus `/metrics` scraped before and after,
//! reduced to deltas of the delivery counters and a latency estimate from histogram buckets.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use serde::Serialize;

pub(crate) const DELIVERIES: &str = "fanout_deliveries_total";
pub(crate) const SLOW_CONSUMER: &str = "fanout_slow_consumer_disconnects_total";
pub(crate) const LATENCY: &str = "fanout_delivery_latency_seconds";
pub(crate) const CONNECTIONS: &str = "fanout_connections";

/// One scrape, summed over label sets (a node reports one series per label combination,
/// and the run cares about the node's total).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Scrape {
    pub deliveries: f64,
    pub slow_consumer: f64,
    pub connections: f64,
    /// Cumulative `(le, count)` of the latency histogram, sorted by `le`.
    pub buckets: Vec<(f64, f64)>,
    /// `(quantile, seconds)` when the exporter renders the latency as a summary instead.
    pub quantiles: Vec<(f64, f64)>,
}

/// Splits a sample line into `(name, labels, value)`.
fn sample(line: &str) -> Option<(&str, &str, f64)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' ', '\t'])?;
    let name = &line[..name_end];
    let (labels, rest) = if line[name_end..].starts_with('{') {
        let mut in_quotes = false;
        let mut escaped = false;
        let mut close = None;
        for (i, c) in line[name_end..].char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if in_quotes => escaped = true,
                '"' => in_quotes = !in_quotes,
                '}' if !in_quotes => {
                    close = Some(name_end + i);
                    break;
                }
                _ => {}
            }
        }
        let close = close?;
        (&line[name_end + 1..close], &line[close + 1..])
    } else {
        ("", &line[name_end..])
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some((name, labels, value))
}

fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    let needle = format!("{key}=\"");
    let start = labels.match_indices(&needle).find(|(i, _)| *i == 0 || labels[..*i].ends_with(','))?.0 + needle.len();
    let end = labels[start..].find('"')?;
    Some(&labels[start..start + end])
}

fn bound(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" | "inf" => Some(f64::INFINITY),
        v => v.parse().ok(),
    }
}

pub(crate) fn parse(text: &str) -> Scrape {
    let mut s = Scrape::default();
    let bucket_name = format!("{LATENCY}_bucket");
    for (name, labels, value) in text.lines().filter_map(sample) {
        if name == DELIVERIES {
            s.deliveries += value;
        } else if name == SLOW_CONSUMER {
            s.slow_consumer += value;
        } else if name == CONNECTIONS {
            s.connections += value;
        } else if name == bucket_name {
            if let Some(le) = label(labels, "le").and_then(bound) {
                match s.buckets.iter_mut().find(|(b, _)| *b == le) {
                    Some((_, count)) => *count += value,
                    None => s.buckets.push((le, value)),
                }
            }
        } else if name == LATENCY {
            if let Some(q) = label(labels, "quantile").and_then(|q| q.parse::<f64>().ok()) {
                // Several label sets: keep the worst, the honest summary of a summary.
                match s.quantiles.iter_mut().find(|(b, _)| *b == q) {
                    Some((_, v)) => *v = v.max(value),
                    None => s.quantiles.push((q, value)),
                }
            }
        }
    }
    s.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    s.quantiles.sort_by(|a, b| a.0.total_cmp(&b.0));
    s
}

/// Bucket counts of `after` minus `before` (same bounds; a bound missing before counts as 0).
pub(crate) fn bucket_delta(before: &[(f64, f64)], after: &[(f64, f64)]) -> Vec<(f64, f64)> {
    after
        .iter()
        .map(|(le, n)| {
            let was = before.iter().find(|(b, _)| b == le).map_or(0.0, |(_, c)| *c);
            (*le, (n - was).max(0.0))
        })
        .collect()
}

/// Adds bucket counts of another node into `into`.
pub(crate) fn bucket_merge(into: &mut Vec<(f64, f64)>, other: &[(f64, f64)]) {
    for (le, n) in other {
        match into.iter_mut().find(|(b, _)| b == le) {
            Some((_, c)) => *c += n,
            None => into.push((*le, *n)),
        }
    }
    into.sort_by(|a, b| a.0.total_cmp(&b.0));
}

/// Prometheus' `histogram_quantile`: finds the bucket holding rank `q × total` and
/// interpolates linearly inside it. `None` without observations; the highest finite
/// bound when the rank falls in the `+Inf` bucket.
pub(crate) fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut prev_le, mut prev_count) = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(prev_le);
            }
            let in_bucket = count - prev_count;
            let frac = if in_bucket > 0.0 { (rank - prev_count) / in_bucket } else { 1.0 };
            return Some(prev_le + (le - prev_le) * frac);
        }
        (prev_le, prev_count) = (le, count);
    }
    Some(prev_le)
}

pub(crate) struct Scraper {
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl Default for Scraper {
    fn default() -> Self {
        Self { client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()) }
    }
}

impl Scraper {
    pub(crate) async fn scrape(&self, url: &str) -> Result<Scrape, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        let fetch = async {
            let resp = self.client.get(uri).await.map_err(|e| format!("{url}: {e}"))?;
            if !resp.status().is_success() {
                return Err(format!("{url}: HTTP {}", resp.status()));
            }
            let body =
                Limited::new(resp.into_body(), 64 << 20).collect().await.map_err(|e| format!("{url}: {e}"))?.to_bytes();
            Ok(parse(&String::from_utf8_lossy(&body)))
        };
        tokio::time::timeout(Duration::from_secs(5), fetch).await.map_err(|_| format!("{url}: no answer within 5s"))?
    }
}

/// One node's figures for the run, for the report.
#[derive(Debug, Clone, Serialize, Default)]
pub(crate) struct NodeView {
    pub url: String,
    /// `None` when a scrape failed (the node was down before or after).
    pub deliveries: Option<f64>,
    pub slow_consumer_disconnects: Option<f64>,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP fanout_deliveries_total Deliveries.
# TYPE fanout_deliveries_total counter
fanout_deliveries_total{format="json"} 100
fanout_deliveries_total{format="msgpack"} 5
fanout_slow_consumer_disconnects_total 2
fanout_connections 10
fanout_delivery_latency_seconds_bucket{le="0.001"} 50
fanout_delivery_latency_seconds_bucket{le="0.005"} 90
fanout_delivery_latency_seconds_bucket{le="+Inf"} 100
fanout_delivery_latency_seconds_sum 0.2
fanout_delivery_latency_seconds_count 100
other_metric{a="x y}",le="0.001"} 7
"#;

    #[test]
    fn parses_counters_and_buckets() {
        let s = parse(TEXT);
        assert_eq!((s.deliveries, s.slow_consumer, s.connections), (105.0, 2.0, 10.0));
        assert_eq!(s.buckets, vec![(0.001, 50.0), (0.005, 90.0), (f64::INFINITY, 100.0)]);
        assert!(s.quantiles.is_empty());
        assert_eq!(sample(r#"m{a="q\"}",b="2"} 3 1700000000"#), Some(("m", r#"a="q\"}",b="2""#, 3.0)));
        assert_eq!(label(r#"xle="9",le="0.5""#, "le"), Some("0.5"));
    }

    #[test]
    fn summaries_are_read_too() {
        let s = parse("fanout_delivery_latency_seconds{quantile=\"0.99\"} 0.004\nfanout_delivery_latency_seconds{quantile=\"0.5\"} 0.001\n");
        assert_eq!(s.quantiles, vec![(0.5, 0.001), (0.99, 0.004)]);
    }

    #[test]
    fn quantiles_interpolate_like_prometheus() {
        let b = vec![(0.001, 50.0), (0.005, 90.0), (f64::INFINITY, 100.0)];
        assert!((quantile(&b, 0.5).unwrap() - 0.001).abs() < 1e-12);
        assert!((quantile(&b, 0.7).unwrap() - 0.003).abs() < 1e-12);
        assert_eq!(quantile(&b, 0.99), Some(0.005));
        assert!((quantile(&b, 0.25).unwrap() - 0.0005).abs() < 1e-12);
        assert_eq!(quantile(&[(0.1, 0.0), (f64::INFINITY, 0.0)], 0.5), None);
    }

    #[test]
    fn deltas_and_merges() {
        let before = vec![(0.001, 10.0), (f64::INFINITY, 20.0)];
        let after = vec![(0.001, 30.0), (0.01, 5.0), (f64::INFINITY, 50.0)];
        let d = bucket_delta(&before, &after);
        assert_eq!(d, vec![(0.001, 20.0), (0.01, 5.0), (f64::INFINITY, 30.0)]);
        let mut m = d.clone();
        bucket_merge(&mut m, &[(0.001, 1.0), (0.002, 1.0)]);
        assert_eq!(m, vec![(0.001, 21.0), (0.002, 1.0), (0.01, 5.0), (f64::INFINITY, 30.0)]);
    }
}
