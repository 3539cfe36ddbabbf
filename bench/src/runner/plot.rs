//! The latency percentile plot: one line per variant, latency (log scale) against percentile
//! (spaced by nines, so the tail gets room), written as a self-contained SVG.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use hdrhistogram::Histogram;

const WIDTH: f64 = 860.0;
const HEIGHT: f64 = 480.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 230.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLOURS: [&str; 10] = [
    "#555555", "#1f77b4", "#2ca02c", "#17becf", "#9467bd", "#8c564b", "#e377c2", "#d62728",
    "#ff7f0e", "#bcbd22",
];
const PERCENTILES: [f64; 17] = [
    0.0, 25.0, 50.0, 75.0, 90.0, 95.0, 97.0, 98.0, 99.0, 99.5, 99.7, 99.8, 99.9, 99.95, 99.97,
    99.98, 99.99,
];

/// Nines: 0 at p0, 1 at p90, 2 at p99, 3 at p99.9, 4 at p99.99.
fn nines(percentile: f64) -> f64 {
    -(1.0 - percentile / 100.0).max(1e-4).log10()
}

/// Writes the plot of `histograms` (nanoseconds), in `order`, to `path`.
pub fn write(
    path: &Path,
    order: &[String],
    histograms: &BTreeMap<String, Histogram<u64>>,
) -> std::io::Result<()> {
    std::fs::write(path, svg(order, histograms))
}

fn svg(order: &[String], histograms: &BTreeMap<String, Histogram<u64>>) -> String {
    let series: Vec<(&String, Vec<(f64, f64)>)> = order
        .iter()
        .filter_map(|label| {
            let histogram = histograms.get(label).filter(|h| !h.is_empty())?;
            let points = PERCENTILES
                .iter()
                .map(|&p| {
                    let micros = histogram.value_at_percentile(p) as f64 / 1000.0;
                    (nines(p), micros.max(1.0))
                })
                .collect();
            Some((label, points))
        })
        .collect();
    let (low, high) = series
        .iter()
        .flat_map(|(_, points)| points.iter().map(|&(_, y)| y))
        .fold((f64::INFINITY, 0.0f64), |(lo, hi), y| {
            (lo.min(y), hi.max(y))
        });
    let (low, high) = if low.is_finite() {
        (
            low.log10().floor(),
            high.log10().ceil().max(low.log10().floor() + 1.0),
        )
    } else {
        (0.0, 1.0)
    };
    let plot_width = WIDTH - LEFT - RIGHT;
    let plot_height = HEIGHT - TOP - BOTTOM;
    let x = |n: f64| LEFT + n / 4.0 * plot_width;
    let y = |micros: f64| TOP + (high - micros.log10()) / (high - low) * plot_height;

    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{LEFT}" y="24" font-size="15">Latency by percentile, concurrency 1, zero-delay mock</text>"#
    );
    for decade in (low as i32)..=(high as i32) {
        let micros = 10f64.powi(decade);
        let label = if micros >= 1000.0 {
            format!("{} ms", micros / 1000.0)
        } else {
            format!("{micros} us")
        };
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" x2="{:.1}" y1="{py:.1}" y2="{py:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{label}</text>"##,
            LEFT + plot_width,
            LEFT - 6.0,
            y(micros) + 4.0,
            py = y(micros),
        );
    }
    for (n, label) in [
        (0.0, "p0"),
        (1.0, "p90"),
        (2.0, "p99"),
        (3.0, "p99.9"),
        (4.0, "p99.99"),
    ] {
        let _ = writeln!(
            out,
            r##"<line x1="{px:.1}" x2="{px:.1}" y1="{TOP}" y2="{:.1}" stroke="#ddd"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{label}</text>"##,
            TOP + plot_height,
            TOP + plot_height + 18.0,
            px = x(n),
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">percentile</text>"#,
        LEFT + plot_width / 2.0,
        HEIGHT - 10.0
    );
    for (index, (label, points)) in series.iter().enumerate() {
        let colour = COLOURS[index % COLOURS.len()];
        let path: Vec<String> = points
            .iter()
            .map(|&(n, micros)| format!("{:.1},{:.1}", x(n), y(micros)))
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        let legend_y = TOP + 10.0 + index as f64 * 20.0;
        let legend_x = LEFT + plot_width + 16.0;
        let _ = writeln!(
            out,
            r#"<line x1="{legend_x:.1}" x2="{:.1}" y1="{legend_y:.1}" y2="{legend_y:.1}" stroke="{colour}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            legend_x + 22.0,
            legend_x + 28.0,
            legend_y + 4.0,
            escape(label),
        );
    }
    out.push_str("</svg>\n");
    out
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plot_has_a_line_per_variant_with_samples() {
        let mut histograms = BTreeMap::new();
        let mut direct = crate::load::histogram();
        for ns in [40_000u64, 50_000, 60_000, 400_000] {
            let _ = direct.record(ns);
        }
        histograms.insert("direct".to_owned(), direct);
        histograms.insert("empty".to_owned(), crate::load::histogram());
        let order = vec!["direct".to_owned(), "empty".to_owned()];
        let svg = svg(&order, &histograms);
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert!(svg.contains(">direct</text>"));
        assert!(svg.ends_with("</svg>\n"));
    }
}
