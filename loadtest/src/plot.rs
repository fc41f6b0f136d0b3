//! Pictures of a report, as SVG (no fonts or native libraries needed): a layer × expert
//! heatmap of tokens, each worker's share of tokens, and latency CDFs.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::LoadtestError;
use crate::report::Report;

fn out_err(path: &Path, e: impl std::fmt::Display) -> LoadtestError {
    LoadtestError::Output {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// Cold (white) to hot (dark red).
fn heat(v: f64) -> RGBColor {
    let v = v.clamp(0.0, 1.0);
    let g = (255.0 * (1.0 - v)) as u8;
    let r = (255.0 - 100.0 * v) as u8;
    RGBColor(r, g, (g as f64 * 0.8) as u8)
}

/// Writes every plot the report supports into `dir`; returns the files written.
pub fn write_all(report: &Report, dir: &Path) -> Result<Vec<PathBuf>, LoadtestError> {
    std::fs::create_dir_all(dir).map_err(|e| out_err(dir, e))?;
    let mut files = Vec::new();
    if let Some(u) = &report.expert_utilisation {
        let path = dir.join("expert_heatmap.svg");
        heatmap(
            &u.counts,
            &u.layers.iter().map(|l| l.layer).collect::<Vec<_>>(),
            &path,
        )
        .map_err(|e| out_err(&path, e))?;
        files.push(path);
        let path = dir.join("worker_tokens.svg");
        let shares: Vec<(String, f64)> = u
            .worker_share
            .iter()
            .map(|(w, &s)| (w.clone(), s))
            .collect();
        workers(&shares, &path).map_err(|e| out_err(&path, e))?;
        files.push(path);
    }
    let path = dir.join("latency_cdf.svg");
    let ok = report.per_request.iter().filter(|r| r.error.is_none());
    let ttft: Vec<f64> = ok.clone().filter_map(|r| r.ttft_ms).collect();
    let e2e: Vec<f64> = ok.map(|r| r.e2e_ms).collect();
    cdfs(&[("time to first token", ttft), ("end to end", e2e)], &path)
        .map_err(|e| out_err(&path, e))?;
    files.push(path);
    Ok(files)
}

type PlotResult = Result<(), Box<dyn std::error::Error>>;

fn heatmap(counts: &[Vec<u64>], layers: &[usize], path: &Path) -> PlotResult {
    let experts = counts.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let rows = counts.len().max(1);
    let max = counts.iter().flatten().copied().max().unwrap_or(0).max(1) as f64;
    let width = (120 + experts * 8).clamp(480, 2400) as u32;
    let height = (100 + rows * 16).clamp(240, 1400) as u32;
    let root = SVGBackend::new(path, (width, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("tokens per expert (row: MoE layer)", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0..experts, 0..rows)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("expert")
        .y_desc("layer")
        .y_label_formatter(&|i| layers.get(*i).map_or_else(String::new, |l| l.to_string()))
        .draw()?;
    chart.draw_series(counts.iter().enumerate().flat_map(|(row, layer)| {
        layer.iter().enumerate().map(move |(e, &t)| {
            Rectangle::new([(e, row), (e + 1, row + 1)], heat(t as f64 / max).filled())
        })
    }))?;
    root.present()?;
    Ok(())
}

fn workers(shares: &[(String, f64)], path: &Path) -> PlotResult {
    let root = SVGBackend::new(path, (640, 360)).into_drawing_area();
    root.fill(&WHITE)?;
    let n = shares.len().max(1);
    let top = shares.iter().map(|s| s.1).fold(0.0, f64::max).max(0.01) * 1.15 * 100.0;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "share of (token, expert) assignments per worker",
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0..n, 0.0..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc("worker")
        .y_desc("% of tokens")
        .x_label_formatter(&|i| shares.get(*i).map_or_else(String::new, |s| s.0.clone()))
        .draw()?;
    chart.draw_series(shares.iter().enumerate().map(|(i, (_, s))| {
        Rectangle::new([(i, 0.0), (i + 1, s * 100.0)], BLUE.mix(0.6).filled())
    }))?;
    root.present()?;
    Ok(())
}

fn cdfs(series: &[(&str, Vec<f64>)], path: &Path) -> PlotResult {
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.05;
    let mut chart = ChartBuilder::on(&root)
        .caption("latency CDF", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..max, 0.0..1.0)?;
    chart
        .configure_mesh()
        .x_desc("milliseconds")
        .y_desc("fraction of requests")
        .draw()?;
    for (i, (name, values)) in series.iter().enumerate() {
        let mut v = values.clone();
        v.sort_by(f64::total_cmp);
        let n = v.len().max(1) as f64;
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                v.iter().enumerate().map(|(j, &x)| (x, (j + 1) as f64 / n)),
                color.stroke_width(2),
            ))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
