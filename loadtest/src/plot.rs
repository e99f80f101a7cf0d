//! The latency percentile curve as a small hand-written SVG: x is the percentile on the
//! usual log scale of 1/(1-p) (so 99%, 99.9%, 99.99% are evenly spaced), y is latency.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

const W: f64 = 800.0;
const H: f64 = 450.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 45.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;

/// Percentile ticks on the x axis, as fractions.
const TICKS: [(f64, &str); 6] =
    [(0.0, "0%"), (0.9, "90%"), (0.99, "99%"), (0.999, "99.9%"), (0.9999, "99.99%"), (0.99999, "99.999%")];

fn x_of(q: f64) -> f64 {
    // log10(1/(1-q)): 0 at 0%, 1 at 90%, 2 at 99%, …, capped at 99.999%.
    let decades = (1.0 / (1.0 - q.min(0.99999))).log10();
    LEFT + (W - LEFT - RIGHT) * decades / 5.0
}

/// A round step giving about five ticks up to `max`.
fn nice_step(max: f64) -> f64 {
    let raw = (max / 5.0).max(1e-9);
    let pow = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * pow).find(|s| *s >= raw).unwrap_or(10.0 * pow)
}

/// Renders the curve of `hist` (microseconds) with `title`.
pub(crate) fn svg(hist: &Histogram<u64>, title: &str) -> String {
    let mut points: Vec<(f64, f64)> = Vec::new();
    if !hist.is_empty() {
        for v in hist.iter_quantiles(4) {
            let q = v.quantile_iterated_to();
            if q > 0.99999 {
                break;
            }
            points.push((q, hist.highest_equivalent(v.value_iterated_to()) as f64 / 1000.0));
        }
        points.push((0.99999, hist.max() as f64 / 1000.0));
    }
    let max_ms = points.iter().map(|p| p.1).fold(0.0, f64::max).max(0.001);
    let step = nice_step(max_ms);
    let top_ms = (max_ms / step).ceil() * step;
    let y_of = |ms: f64| TOP + (H - TOP - BOTTOM) * (1.0 - ms / top_ms);

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#, W / 2.0, escape(title));
    for (q, label) in TICKS {
        let x = x_of(q);
        let _ = writeln!(s, r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/>"##, H - BOTTOM);
        let _ = writeln!(s, r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{label}</text>"#, H - BOTTOM + 18.0);
    }
    let mut tick = 0.0;
    while tick <= top_ms + step / 2.0 {
        let y = y_of(tick);
        let _ = writeln!(s, r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/>"##, W - RIGHT);
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 6.0,
            y + 4.0,
            fmt_ms(tick, step)
        );
        tick += step;
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">percentile</text>"#,
        (LEFT + W - RIGHT) / 2.0,
        H - 12.0
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">latency (ms)</text>"#,
        (TOP + H - BOTTOM) / 2.0,
        (TOP + H - BOTTOM) / 2.0
    );
    let _ = writeln!(
        s,
        r#"<rect x="{LEFT}" y="{TOP}" width="{:.1}" height="{:.1}" fill="none" stroke="black"/>"#,
        W - LEFT - RIGHT,
        H - TOP - BOTTOM
    );
    if points.is_empty() {
        let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">no deliveries</text>"#, W / 2.0, H / 2.0);
    } else {
        let path: Vec<String> = points.iter().map(|(q, ms)| format!("{:.1},{:.1}", x_of(*q), y_of(*ms))).collect();
        let _ =
            writeln!(s, r##"<polyline fill="none" stroke="#1f6feb" stroke-width="2" points="{}"/>"##, path.join(" "));
    }
    s.push_str("</svg>\n");
    s
}

fn fmt_ms(v: f64, step: f64) -> String {
    // As many decimals as the step needs: 2.5 → 1, 0.02 → 2, 5 → 0.
    let decimals = (0..6).find(|d| {
        let scaled = step * 10f64.powi(*d);
        (scaled - scaled.round()).abs() < 1e-6
    });
    format!("{v:.*}", decimals.unwrap_or(6) as usize)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_curve_and_axis() {
        let mut h = crate::sub::new_histogram();
        for v in 1..=10_000u64 {
            h.record(100 + v).unwrap();
        }
        let svg = svg(&h, "broadcast <2000 subs>");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("<polyline") && svg.contains("99.9%") && svg.contains("&lt;2000 subs&gt;"));
        assert!(svg.len() < 20_000, "small: {} bytes", svg.len());
        let empty = super::svg(&crate::sub::new_histogram(), "none");
        assert!(empty.contains("no deliveries"));
    }

    #[test]
    fn ticks() {
        assert_eq!(nice_step(10.0), 2.0);
        assert_eq!(nice_step(0.7), 0.2);
        assert_eq!(nice_step(12.5), 2.5);
        assert_eq!(fmt_ms(0.4, 0.2), "0.4");
        assert_eq!(fmt_ms(7.5, 2.5), "7.5");
        assert_eq!(fmt_ms(4.0, 2.0), "4");
        assert!((x_of(0.99) - (LEFT + (W - LEFT - RIGHT) * 0.4)).abs() < 1e-9);
    }
}
