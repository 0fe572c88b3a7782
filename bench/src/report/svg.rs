//! The latency chart (`latency.svg`): p50, p99 and p99.9 against the
//! offered rate, drawn as plain SVG.

use crate::scenarios::Latency;

/// A chart line: its name, colour and which percentile it plots.
type Series = (&'static str, &'static str, fn(&Latency) -> f64);

/// A line chart of p50 / p99 / p99.9 latency against the offered rate.
pub(crate) fn latency_chart(latency: &[Latency]) -> String {
    let (w, h, left, bottom, top, right) = (640.0, 360.0, 60.0, 40.0, 30.0, 130.0);
    let max_rate = latency
        .iter()
        .map(|l| f64::from(l.offered))
        .fold(1.0, f64::max);
    let max_ms = latency.iter().map(|l| l.p999).fold(1.0, f64::max).ceil();
    let x = |r: f64| left + r / max_rate * (w - left - right);
    let y = |ms: f64| h - bottom - ms / max_ms * (h - bottom - top);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"18\" text-anchor=\"middle\" font-size=\"14\">Relay latency, producer commit to consumer receipt</text>\n\
         <line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"black\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">offered rate (events/s)</text>\n\
         <text x=\"15\" y=\"{}\" transform=\"rotate(-90 15 {})\" text-anchor=\"middle\">latency (ms)</text>\n",
        (w - right + left) / 2.0,
        h - bottom,
        w - right,
        h - bottom,
        h - bottom,
        (w - right + left) / 2.0,
        h - 8.0,
        (h - bottom + top) / 2.0,
        (h - bottom + top) / 2.0,
    );
    for i in 0..=4 {
        let ms = max_ms * f64::from(i) / 4.0;
        svg += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{ms:.1}</text><line x1=\"{left}\" y1=\"{y0}\" x2=\"{}\" y2=\"{y0}\" stroke=\"#ddd\"/>\n",
            left - 5.0,
            y(ms) + 4.0,
            w - right,
            y0 = y(ms)
        );
    }
    for l in latency {
        svg += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
            x(f64::from(l.offered)),
            h - bottom + 15.0,
            l.offered
        );
    }
    let series: [Series; 3] = [
        ("p50", "#2a7", |l| l.p50),
        ("p99", "#d72", |l| l.p99),
        ("p99.9", "#a22", |l| l.p999),
    ];
    for (i, (name, color, pick)) in series.iter().enumerate() {
        let points: Vec<String> = latency
            .iter()
            .map(|l| format!("{:.1},{:.1}", x(f64::from(l.offered)), y(pick(l))))
            .collect();
        svg += &format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n",
            points.join(" ")
        );
        for p in &points {
            let (px, py) = p.split_once(',').unwrap_or(("0", "0"));
            svg += &format!("<circle cx=\"{px}\" cy=\"{py}\" r=\"3\" fill=\"{color}\"/>\n");
        }
        let ly = top + 20.0 * i as f64 + 10.0;
        svg += &format!(
            "<line x1=\"{}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"2\"/><text x=\"{}\" y=\"{}\">{name}</text>\n",
            w - right + 15.0,
            w - right + 35.0,
            w - right + 40.0,
            ly + 4.0
        );
    }
    svg + "</svg>\n"
}
