//! PNG plots of the reports, written next to their JSON.
//!
//! Text is drawn with a TrueType font read at run time (plotters' pure-Rust `ab_glyph` backend,
//! so no system graphics libraries): `HETKV_FONT` if set, else DejaVu Sans (Debian's
//! `fonts-dejavu-core`) or Liberation Sans.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::cache_bench::SweepReport;
use crate::compare::CompareReport;

const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/liberation2/LiberationSans-Regular.ttf",
];

fn font() -> Result<()> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let candidates: Vec<String> = std::env::var("HETKV_FONT")
                .into_iter()
                .chain(FONT_PATHS.iter().map(|s| s.to_string()))
                .collect();
            let path = candidates
                .iter()
                .find(|p| Path::new(p).exists())
                .ok_or_else(|| {
                    format!(
                        "no TrueType font for the plots: install fonts-dejavu-core or set HETKV_FONT (looked at {candidates:?})"
                    )
                })?;
            let bytes = std::fs::read(path).map_err(|e| format!("reading {path}: {e}"))?;
            // plotters keeps registered fonts for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| format!("{path} is not a usable TrueType font"))
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

fn fail<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing the plot: {e:?}")
}

/// One bar chart per panel: a value per system.
fn bars(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    title: &str,
    names: &[String],
    values: &[f64],
    color: RGBColor,
) -> Result<()> {
    let top = values.iter().cloned().fold(0.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..names.len() as f64, 0f64..top.max(1e-9))
        .map_err(fail)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(names.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 1e-6 && i < names.len() {
                names[i].clone()
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| {
            if *y >= 1e6 {
                format!("{:.1}M", y / 1e6)
            } else if *y >= 1e4 {
                format!("{:.0}k", y / 1e3)
            } else if *y >= 1e3 {
                format!("{:.1}k", y / 1e3)
            } else {
                format!("{y:.0}")
            }
        })
        .draw()
        .map_err(fail)?;
    chart
        .draw_series(values.iter().enumerate().map(|(i, &v)| {
            Rectangle::new(
                [(i as f64 + 0.15, 0.0), (i as f64 + 0.85, v)],
                color.filled(),
            )
        }))
        .map_err(fail)?;
    Ok(())
}

/// `compare`: rows/s delivered and bytes per sample, per system.
pub fn compare(r: &CompareReport, path: &Path) -> Result<()> {
    font()?;
    let names: Vec<String> = r
        .systems
        .iter()
        .map(|s| {
            if s.system.starts_with("redis") {
                "redis".to_string()
            } else if let Some(b) = s.system.split("bound ").nth(1) {
                format!("cache b{b}")
            } else {
                "no cache".to_string()
            }
        })
        .collect();
    let root = BitMapBackend::new(path, (1100, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(fail)?;
    let (left, right) = root.split_horizontally(550);
    let rows: Vec<f64> = r.systems.iter().map(|s| s.rows_per_s).collect();
    let bytes: Vec<f64> = r.systems.iter().map(|s| s.bytes_per_sample).collect();
    bars(
        &left,
        "rows/s delivered to the trainer",
        &names,
        &rows,
        BLUE,
    )?;
    bars(&right, "bytes on the wire per sample", &names, &bytes, RED)?;
    root.present().map_err(fail)?;
    Ok(())
}

/// `cache-sweep`: hit rate against cache size, a line per policy, with the two references.
pub fn sweep(r: &SweepReport, path: &Path) -> Result<()> {
    font()?;
    if r.sizes.is_empty() {
        bail!("no sizes to plot");
    }
    let xs: Vec<f64> = r.sizes.iter().map(|s| s.cache_fraction * 100.0).collect();
    let (x0, x1) = (xs[0], *xs.last().unwrap_or(&xs[0]));
    let lowest = r
        .sizes
        .iter()
        .flat_map(|s| {
            s.runs
                .iter()
                .map(|r| r.hit_rate)
                .chain([s.online_lfu_ceiling])
        })
        .fold(1.0, f64::min);
    let y0 = ((lowest * 100.0 - 5.0) / 10.0).floor().max(0.0) * 10.0;
    let root = BitMapBackend::new(path, (800, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(fail)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "hit rate against cache size (unique keys per batch)",
            ("sans-serif", 22),
        )
        .margin(14)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d((x0 - 0.5)..(x1 + 0.5), y0..100f64)
        .map_err(fail)?;
    chart
        .configure_mesh()
        .x_desc("cache size, % of the table")
        .y_desc("hit rate, %")
        .draw()
        .map_err(fail)?;
    let mut lines: Vec<(String, Vec<f64>)> = vec![
        (
            "static top-k (knows the distribution)".into(),
            r.sizes
                .iter()
                .map(|s| s.static_top_hit_rate * 100.0)
                .collect(),
        ),
        (
            "online ceiling (exact counts, learned from the stream)".into(),
            r.sizes
                .iter()
                .map(|s| s.online_lfu_ceiling * 100.0)
                .collect(),
        ),
    ];
    for (i, run) in r.sizes[0].runs.iter().enumerate() {
        lines.push((
            run.policy.clone(),
            r.sizes.iter().map(|s| s.runs[i].hit_rate * 100.0).collect(),
        ));
    }
    let colors = [
        BLACK,
        RGBColor(128, 128, 128),
        BLUE,
        RED,
        GREEN,
        MAGENTA,
        CYAN,
    ];
    for (i, (name, ys)) in lines.iter().enumerate() {
        let color = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(
                xs.iter().cloned().zip(ys.iter().cloned()),
                color.stroke_width(2),
            ))
            .map_err(fail)?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(
                xs.iter()
                    .cloned()
                    .zip(ys.iter().cloned())
                    .map(|p| Circle::new(p, 3, color.filled())),
            )
            .map_err(fail)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(fail)?;
    root.present().map_err(fail)?;
    Ok(())
}
