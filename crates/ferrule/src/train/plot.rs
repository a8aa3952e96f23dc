//! `loss.svg` beside a run's `metrics.jsonl`: train loss (and eval loss, where the run
//! evaluated) against the optimizer step, the learning rate on a second axis. The trainer
//! writes it at the end of a run; `ferrule plot RUN_DIR` redraws it from the log at any time.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;
use serde_json::Value;

use super::metrics::METRICS_FILE;

/// File name of the plot inside the run folder.
pub const PLOT_FILE: &str = "loss.svg";

/// The series of one `metrics.jsonl`: `(step, value)` in file order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Curves {
    pub train_loss: Vec<(u64, f64)>,
    pub eval_loss: Vec<(u64, f64)>,
    pub lr: Vec<(u64, f64)>,
}

impl Curves {
    /// Reads a metrics log: step records (`loss`, `lr`) and eval records (`eval_loss`). A line
    /// that is not JSON is an error naming `file:line`, except a torn last line (a run killed
    /// mid-write), which is skipped as `MetricsLog::resume` skips it.
    pub fn read(path: &Path) -> Result<Curves> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let lines: Vec<&str> = text.lines().collect();
        let mut c = Curves::default();
        for (i, line) in lines
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let v: Value = match serde_json::from_str(line) {
                Ok(v) => v,
                Err(_) if i + 1 == lines.len() => break,
                Err(e) => bail!(
                    "{}:{}: not a JSON metrics record: {e}",
                    path.display(),
                    i + 1
                ),
            };
            let Some(step) = v.get("step").and_then(Value::as_u64) else {
                continue;
            };
            let num = |k: &str| v.get(k).and_then(Value::as_f64).filter(|x| x.is_finite());
            if let Some(loss) = num("eval_loss") {
                c.eval_loss.push((step, loss));
            } else if let (Some(loss), Some(lr)) = (num("loss"), num("lr")) {
                c.train_loss.push((step, loss));
                c.lr.push((step, lr));
            }
        }
        Ok(c)
    }
}

/// Draws `run_dir/metrics.jsonl` into `out` (default `run_dir/loss.svg`), written atomically.
/// Errors when the log is missing, malformed, or holds no step yet.
pub fn write_loss_plot(run_dir: &Path, out: Option<&Path>) -> Result<PathBuf> {
    let metrics = run_dir.join(METRICS_FILE);
    ensure_file(&metrics, run_dir)?;
    let curves = Curves::read(&metrics)?;
    if curves.train_loss.is_empty() {
        bail!(
            "{}: no training step logged yet, nothing to plot",
            metrics.display()
        )
    }
    let svg = render_svg(&curves, &run_dir.display().to_string())?;
    let out = out.map_or_else(|| run_dir.join(PLOT_FILE), Path::to_path_buf);
    crate::util::atomic::write_bytes_atomic(&out, svg.as_bytes())
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(out)
}

fn ensure_file(metrics: &Path, run_dir: &Path) -> Result<()> {
    if !run_dir.is_dir() {
        bail!(
            "{}: no such run folder (expected the --output folder of a ferrule train run)",
            run_dir.display()
        )
    }
    if !metrics.is_file() {
        bail!(
            "{}: no {METRICS_FILE} here (expected the --output folder of a ferrule train run)",
            run_dir.display()
        )
    }
    Ok(())
}

/// `[lo, hi]` padded by 5% (a flat series gets a band around its value).
pub(crate) fn padded(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let pad = if hi > lo {
        0.05 * (hi - lo)
    } else {
        0.05 * lo.abs().max(1e-3)
    };
    (lo - pad, hi + pad)
}

/// The chart as an SVG document (900 × 500). `title` goes in the caption.
pub fn render_svg(c: &Curves, title: &str) -> Result<String> {
    let plot_err = |e: &dyn std::fmt::Display| anyhow!("drawing the loss plot: {e}");
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 500)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(&e))?;
        let steps = c.train_loss.iter().chain(&c.eval_loss).map(|p| p.0);
        let (first, last) = steps.fold((u64::MAX, 0), |(lo, hi), s| (lo.min(s), hi.max(s)));
        let x = first..last.max(first + 1);
        let (y_lo, y_hi) = padded(c.train_loss.iter().chain(&c.eval_loss).map(|p| p.1));
        let lr_hi = c.lr.iter().map(|p| p.1).fold(0.0, f64::max);
        let lr_hi = if lr_hi > 0.0 { lr_hi * 1.05 } else { 1.0 };
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("loss: {title}"), ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .right_y_label_area_size(70)
            .build_cartesian_2d(x.clone(), y_lo..y_hi)
            .map_err(|e| plot_err(&e))?
            .set_secondary_coord(x, 0.0..lr_hi);
        chart
            .configure_mesh()
            .x_desc("optimizer step")
            .y_desc("loss")
            .draw()
            .map_err(|e| plot_err(&e))?;
        chart
            .configure_secondary_axes()
            .y_desc("learning rate")
            .y_label_formatter(&|v| format!("{v:.1e}"))
            .draw()
            .map_err(|e| plot_err(&e))?;
        let train = ShapeStyle::from(&BLUE).stroke_width(2);
        chart
            .draw_series(LineSeries::new(c.train_loss.iter().copied(), train))
            .map_err(|e| plot_err(&e))?
            .label("train loss")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], train));
        if !c.eval_loss.is_empty() {
            let eval = ShapeStyle::from(&RED).stroke_width(2);
            chart
                .draw_series(LineSeries::new(c.eval_loss.iter().copied(), eval).point_size(3))
                .map_err(|e| plot_err(&e))?
                .label("eval loss")
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], eval));
        }
        let lr = ShapeStyle::from(&GREEN.mix(0.8)).stroke_width(1);
        chart
            .draw_secondary_series(LineSeries::new(c.lr.iter().copied(), lr))
            .map_err(|e| plot_err(&e))?
            .label("learning rate (right axis)")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], lr));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| plot_err(&e))?;
        root.present().map_err(|e| plot_err(&e))?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = r#"{"step":1,"loss":2.5,"lr":0.0001,"grad_norm":1.0}
{"step":2,"loss":2.0,"lr":0.0002,"grad_norm":1.0}
{"step":2,"eval_loss":2.2,"eval_perplexity":9.0,"eval_accuracy":null,"eval_records":4}
{"step":3,"loss":1.5,"lr":0.0001,"grad_norm":1.0}
{"step":4,"loss":1.0,"lr":0.0,"grad_norm":1.0}
{"step":4,"eval_loss":1.8,"eval_perplexity":6.0,"eval_accuracy":null,"eval_records":4}
{"step":5,"loss":0.9,"#;

    #[test]
    fn reads_the_series_and_skips_a_torn_last_line() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join(METRICS_FILE), LOG).unwrap();
        let c = Curves::read(&t.path().join(METRICS_FILE)).unwrap();
        assert_eq!(c.train_loss, vec![(1, 2.5), (2, 2.0), (3, 1.5), (4, 1.0)]);
        assert_eq!(c.eval_loss, vec![(2, 2.2), (4, 1.8)]);
        assert_eq!(c.lr, vec![(1, 1e-4), (2, 2e-4), (3, 1e-4), (4, 0.0)]);
        let broken = LOG.replacen("{\"step\":3", "{step:3", 1);
        std::fs::write(t.path().join(METRICS_FILE), broken).unwrap();
        let err = Curves::read(&t.path().join(METRICS_FILE))
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with(&format!(
                "{}:4: not a JSON metrics record: key must be a string at line 1 column 2",
                t.path().join(METRICS_FILE).display()
            )),
            "{err}"
        );
    }

    /// The file is well-formed SVG with one polyline per series, each with a point per record.
    #[test]
    fn writes_a_valid_svg_with_every_series() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join(METRICS_FILE), LOG).unwrap();
        let out = write_loss_plot(t.path(), None).unwrap();
        assert_eq!(out, t.path().join(PLOT_FILE));
        let text = std::fs::read_to_string(&out).unwrap();
        let doc = roxmltree::Document::parse(&text).expect("well-formed XML");
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        // The first line of each series' colour is the series (its legend mark comes later).
        let points = |stroke: &str| {
            let line = doc
                .descendants()
                .find(|n| n.has_tag_name("polyline") && n.attribute("stroke") == Some(stroke));
            line.map(|n| n.attribute("points").unwrap().split_whitespace().count())
        };
        assert_eq!(
            [points("#0000FF"), points("#FF0000"), points("#00FF00")],
            [Some(4), Some(2), Some(4)],
            "train, eval, learning rate"
        );
        for label in [
            "train loss",
            "eval loss",
            "learning rate (right axis)",
            "optimizer step",
        ] {
            assert!(
                doc.descendants()
                    .any(|n| n.has_tag_name("text") && n.text().map(str::trim) == Some(label)),
                "no {label:?} text"
            );
        }
        // The eval points are marked.
        assert_eq!(
            doc.descendants()
                .filter(|n| n.has_tag_name("circle"))
                .count(),
            2
        );
    }

    #[test]
    fn a_folder_without_a_run_is_an_error_naming_it() {
        let t = tempfile::tempdir().unwrap();
        let err = write_loss_plot(t.path(), None).unwrap_err().to_string();
        assert!(err.contains("no metrics.jsonl here"), "{err}");
        std::fs::write(t.path().join(METRICS_FILE), "").unwrap();
        let err = write_loss_plot(t.path(), None).unwrap_err().to_string();
        assert!(err.contains("no training step logged yet"), "{err}");
        assert!(!t.path().join(PLOT_FILE).exists());
    }
}
