//! `compare.svg`: on the left each method's train loss against the optimizer step (its best
//! run in a sweep), on the right its final loss (eval, else train) against its trainable
//! parameters on a log axis, the figure the PEFT surveys draw.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;

use super::report::Row;
use crate::train::metrics::METRICS_FILE;
use crate::train::plot::{padded, Curves};

/// File name of the plot in the comparison's folder.
pub const PLOT_FILE: &str = "compare.svg";

/// Draws the finished best runs of `rows` into `out/compare.svg`, written atomically. Runs
/// without a readable `metrics.jsonl` are left out of the curves.
pub fn write(out: &Path, rows: &[Row]) -> Result<()> {
    let runs: Vec<(&Row, Curves)> = rows
        .iter()
        .filter(|r| r.best)
        .filter_map(|r| {
            Curves::read(&Path::new(&r.output_dir).join(METRICS_FILE))
                .ok()
                .map(|c| (r, c))
        })
        .filter(|(_, c)| !c.train_loss.is_empty())
        .collect();
    let svg = render_svg(&runs)?;
    let path = out.join(PLOT_FILE);
    crate::util::atomic::write_bytes_atomic(&path, svg.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// The two panels as an SVG document (1200 × 500).
pub fn render_svg(runs: &[(&Row, Curves)]) -> Result<String> {
    let plot_err = |e: &dyn std::fmt::Display| anyhow!("drawing the comparison plot: {e}");
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1200, 500)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(&e))?;
        let (left, right) = root.split_horizontally(700);
        draw_curves(&left, runs).map_err(|e| plot_err(&e))?;
        draw_scatter(&right, runs).map_err(|e| plot_err(&e))?;
        root.present().map_err(|e| plot_err(&e))?;
    }
    Ok(svg)
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;
type DrawResult = Result<(), DrawingAreaErrorKind<std::io::Error>>;

fn draw_curves(area: &Area, runs: &[(&Row, Curves)]) -> DrawResult {
    let points = || runs.iter().flat_map(|(_, c)| c.train_loss.iter());
    let last = points().map(|p| p.0).max().unwrap_or(1).max(2);
    let (lo, hi) = padded(points().map(|p| p.1));
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let mut chart = ChartBuilder::on(area)
        .caption("train loss", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(1..last, lo..hi)?;
    chart
        .configure_mesh()
        .x_desc("optimizer step")
        .y_desc("loss")
        .draw()?;
    for (i, (row, c)) in runs.iter().enumerate() {
        let style = ShapeStyle::from(&Palette99::pick(i)).stroke_width(2);
        chart
            .draw_series(LineSeries::new(c.train_loss.iter().copied(), style))?
            .label(row.method.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    }
    if !runs.is_empty() {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    Ok(())
}

fn draw_scatter(area: &Area, runs: &[(&Row, Curves)]) -> DrawResult {
    let points: Vec<(usize, f64, f64, &str)> = runs
        .iter()
        .enumerate()
        .filter_map(|(i, (r, _))| {
            let loss = r.eval_loss.or(r.final_train_loss)?;
            Some((i, r.trainable_params? as f64, loss, r.method.as_str()))
        })
        .filter(|p| p.1 > 0.0 && p.2.is_finite())
        .collect();
    let (x_lo, x_hi) = points
        .iter()
        .fold((f64::MAX, 1.0f64), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
    let x = (x_lo.min(x_hi) / 2.0).max(1.0)..x_hi * 2.0;
    let (lo, hi) = padded(points.iter().map(|p| p.2));
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let mut chart = ChartBuilder::on(area)
        .caption("final loss (eval, else train) by size", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x.log_scale(), lo..hi)?;
    chart
        .configure_mesh()
        .x_desc("trainable parameters")
        .y_desc("loss")
        .x_label_formatter(&|v| format!("{v:.0e}"))
        .draw()?;
    for &(i, params, loss, name) in &points {
        let color = Palette99::pick(i);
        chart.draw_series([Circle::new((params, loss), 5, color.filled())])?;
        chart.draw_series([Text::new(
            name.to_string(),
            (params, loss),
            ("sans-serif", 13),
        )])?;
    }
    Ok(())
}
