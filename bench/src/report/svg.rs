//! The charts, drawn as plain SVG: latency (`latency.svg`: p50, p99 and
//! p99.9 against the offered rate) and the scale scenarios' drain rates as
//! the work grows (`history.svg`, `distance.svg`).

use crate::scenarios::Latency;

/// A chart line: its name, colour and which percentile it plots.
type Series = (&'static str, &'static str, fn(&Latency) -> f64);

/// A chart's size and margins, in pixels.
struct Frame {
    w: f64,
    h: f64,
    left: f64,
    bottom: f64,
    top: f64,
    right: f64,
}

impl Frame {
    /// The opening of the SVG: the title, both axes with their labels, and
    /// five grid lines from 0 to `y_max`, labelled with `decimals` places.
    fn header(
        &self,
        title: &str,
        x_label: &str,
        y_label: &str,
        y_max: f64,
        decimals: usize,
    ) -> String {
        let Self {
            w,
            h,
            left,
            bottom,
            top,
            right,
        } = *self;
        let y = |v: f64| self.y(v, y_max);
        let mut svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"{}\" y=\"18\" text-anchor=\"middle\" font-size=\"14\">{title}</text>\n\
             <line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
             <line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"black\"/>\n\
             <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{x_label}</text>\n\
             <text x=\"15\" y=\"{}\" transform=\"rotate(-90 15 {})\" text-anchor=\"middle\">{y_label}</text>\n",
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
            let v = y_max * f64::from(i) / 4.0;
            svg += &format!(
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{v:.decimals$}</text><line x1=\"{left}\" y1=\"{y0}\" x2=\"{}\" y2=\"{y0}\" stroke=\"#ddd\"/>\n",
                left - 5.0,
                y(v) + 4.0,
                w - right,
                y0 = y(v)
            );
        }
        svg
    }

    /// The height of `v` on a y axis from 0 to `y_max`.
    fn y(&self, v: f64, y_max: f64) -> f64 {
        self.h - self.bottom - v / y_max * (self.h - self.bottom - self.top)
    }

    /// The `i`th entry of the legend, right of the plot: a stroke of the
    /// line's `color` (and `dash` attribute) and its `name`.
    fn legend(&self, i: usize, color: &str, dash: &str, name: &str) -> String {
        let edge = self.w - self.right;
        let ly = self.top + 20.0 * i as f64 + 10.0;
        format!(
            "<line x1=\"{}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"2\"{dash}/><text x=\"{}\" y=\"{}\">{name}</text>\n",
            edge + 15.0,
            edge + 35.0,
            edge + 40.0,
            ly + 4.0
        )
    }
}

/// A line chart of p50 / p99 / p99.9 latency against the offered rate.
pub(crate) fn latency_chart(latency: &[Latency]) -> String {
    let (w, h, left, bottom, top, right) = (640.0, 360.0, 60.0, 40.0, 30.0, 130.0);
    let max_rate = latency
        .iter()
        .map(|l| f64::from(l.offered))
        .fold(1.0, f64::max);
    let max_ms = latency.iter().map(|l| l.p999).fold(1.0, f64::max).ceil();
    let x = |r: f64| left + r / max_rate * (w - left - right);
    let frame = Frame {
        w,
        h,
        left,
        bottom,
        top,
        right,
    };
    let mut svg = frame.header(
        "Relay latency, producer commit to consumer receipt",
        "offered rate (events/s)",
        "latency (ms)",
        max_ms,
        1,
    );
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
            .map(|l| {
                format!(
                    "{:.1},{:.1}",
                    x(f64::from(l.offered)),
                    frame.y(pick(l), max_ms)
                )
            })
            .collect();
        svg += &format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n",
            points.join(" ")
        );
        for p in &points {
            let (px, py) = p.split_once(',').unwrap_or(("0", "0"));
            svg += &format!("<circle cx=\"{px}\" cy=\"{py}\" r=\"3\" fill=\"{color}\"/>\n");
        }
        svg += &frame.legend(i, color, "", name);
    }
    svg + "</svg>\n"
}

/// A chart line: its name, colour, whether dashed, and a value per tick.
pub(crate) struct Line {
    pub(crate) name: String,
    pub(crate) color: &'static str,
    pub(crate) dashed: bool,
    pub(crate) values: Vec<f64>,
}

/// A line chart of `lines` over evenly spaced categories (`ticks`), the
/// y axis from zero: how a figure moves as the work grows.
pub(crate) fn steps_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    ticks: &[String],
    lines: &[Line],
) -> String {
    let (w, h, left, bottom, top, right) = (660.0, 360.0, 70.0, 40.0, 30.0, 180.0);
    let max = lines
        .iter()
        .flat_map(|l| l.values.iter().copied())
        .filter(|v| v.is_finite())
        .fold(1.0, f64::max);
    // A round top: 1, 2 or 5 times a power of ten, above the largest value.
    let magnitude = 10f64.powf(max.log10().floor());
    let y_max = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|&top| top >= max)
        .unwrap_or(max);
    let step = (w - left - right) / ticks.len().max(1) as f64;
    let x = |i: usize| left + step * (i as f64 + 0.5);
    let frame = Frame {
        w,
        h,
        left,
        bottom,
        top,
        right,
    };
    let mut svg = frame.header(title, x_label, y_label, y_max, 0);
    for (i, tick) in ticks.iter().enumerate() {
        svg += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{tick}</text>\n",
            x(i),
            h - bottom + 15.0,
        );
    }
    for (i, line) in lines.iter().enumerate() {
        let dash = if line.dashed {
            " stroke-dasharray=\"6 4\""
        } else {
            ""
        };
        let points: Vec<(f64, f64)> = line
            .values
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(i, &v)| (x(i), frame.y(v, y_max)))
            .collect();
        let path: Vec<String> = points
            .iter()
            .map(|(px, py)| format!("{px:.1},{py:.1}"))
            .collect();
        svg += &format!(
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\"{dash} points=\"{}\"/>\n",
            line.color,
            path.join(" ")
        );
        for (px, py) in &points {
            svg += &format!(
                "<circle cx=\"{px:.1}\" cy=\"{py:.1}\" r=\"3\" fill=\"{}\"/>\n",
                line.color
            );
        }
        svg += &frame.legend(i, line.color, dash, &line.name);
    }
    svg + "</svg>\n"
}
