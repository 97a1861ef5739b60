//! The comparison's chart as a standalone SVG: one panel per workload and network profile,
//! one horizontal bar per mode (median time to ready, with the range of the repetitions as a
//! whisker and the ratio to the overlayfs full pull as text).
//!
//! Written by hand rather than with a plotting crate: a few rectangles and labels do not
//! justify the build time, and the text stays diffable. It draws only what the report holds;
//! a mode without a figure is labelled as failed or as fallen back to a full pull.

use std::fmt::Write;

use super::compare::{Cell, CompareReport, Mode, ModeResults};

const WIDTH: f64 = 920.0;
/// Left column: mode names.
const LABELS: f64 = 200.0;
/// Right margin: the value text after the longest bar.
const VALUES: f64 = 170.0;
const BAR: f64 = 16.0;
const ROW: f64 = 22.0;
const TITLE: f64 = 30.0;
const AXIS: f64 = 26.0;
const GAP: f64 = 18.0;

fn colour(mode: Mode) -> &'static str {
    match mode {
        Mode::Overlay => "#8c8c8c",
        Mode::OverlayLocal => "#bdbdbd",
        Mode::OverlayHot => "#dedede",
        Mode::StargzLazy => "#f4b183",
        Mode::StargzOptimized => "#e07b39",
        Mode::BriskLazy => "#a6cbe6",
        Mode::BriskTrace => "#2f78b7",
        Mode::BriskBaked => "#1f5f99",
        Mode::BriskWarm => "#5aa0d4",
        Mode::BriskHot => "#0b3c6b",
        Mode::BriskEstargz => "#7e57c2",
    }
}

pub fn render(r: &CompareReport) -> String {
    let panel_height = TITLE + ROW * Mode::ALL.len() as f64 + AXIS;
    let height = 44.0 + r.cells.len() as f64 * (panel_height + GAP);
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r##"<rect width="100%" height="100%" fill="#ffffff"/>"##
    );
    let _ = writeln!(
        svg,
        r#"<text x="10" y="24" font-size="16" font-weight="bold">Time to ready (median of {} repetition(s); whisker: range; lower is better)</text>"#,
        r.repetitions
    );
    let mut y = 44.0;
    for cell in &r.cells {
        panel(&mut svg, r, cell, y);
        y += panel_height + GAP;
    }
    let _ = writeln!(svg, "</svg>");
    svg
}

fn panel(svg: &mut String, r: &CompareReport, cell: &Cell, top: f64) {
    let title = r
        .workloads
        .iter()
        .find(|w| w.workload.name == cell.workload)
        .map_or(cell.workload, |w| w.workload.title);
    let link = r
        .profiles
        .iter()
        .find(|p| p.name == cell.profile)
        .map_or(String::new(), |p| p.describe());
    let _ = writeln!(
        svg,
        r#"<text x="10" y="{}" font-size="14" font-weight="bold">{} — {} ({})</text>"#,
        top + 18.0,
        escape(title),
        escape(cell.profile),
        escape(&link)
    );
    let max = cell
        .modes
        .iter()
        .filter_map(|m| m.summary.ready_seconds.map(|s| s.max))
        .fold(0.0, f64::max);
    let (step, ticks) = axis(max);
    let scale = (WIDTH - LABELS - VALUES) / (step * ticks as f64);
    let bars_top = top + TITLE;
    let axis_y = bars_top + ROW * cell.modes.len() as f64;
    let _ = writeln!(
        svg,
        r##"<line x1="{LABELS}" y1="{bars_top}" x2="{LABELS}" y2="{axis_y}" stroke="#333"/>"##
    );
    for t in 0..=ticks {
        let v = step * t as f64;
        let x = LABELS + v * scale;
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="{bars_top}" x2="{x:.1}" y2="{axis_y}" stroke="#e3e3e3"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" fill="#555">{} s</text>"##,
            axis_y + 16.0,
            trim_float(v)
        );
    }
    // After the grid, so that bars and labels are drawn over its lines.
    for (i, m) in cell.modes.iter().enumerate() {
        bar(svg, m, bars_top + i as f64 * ROW, scale);
    }
}

fn bar(svg: &mut String, m: &ModeResults, y: f64, scale: f64) {
    let s = &m.summary;
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
        LABELS - 8.0,
        y + BAR - 4.0,
        escape(m.mode.title())
    );
    let Some(ready) = s.ready_seconds else {
        let why = if s.fell_back > 0 {
            "fell back to a full pull"
        } else {
            "failed"
        };
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" fill="#b00020">{why}</text>"##,
            LABELS + 6.0,
            y + BAR - 4.0
        );
        return;
    };
    let w = (ready.median * scale).max(1.0);
    let _ = writeln!(
        svg,
        r#"<rect x="{LABELS}" y="{y:.1}" width="{w:.1}" height="{BAR}" fill="{}"/>"#,
        colour(m.mode)
    );
    if ready.n > 1 {
        let (x0, x1) = (LABELS + ready.min * scale, LABELS + ready.max * scale);
        let mid = y + BAR / 2.0;
        let _ = writeln!(
            svg,
            r##"<path d="M{x0:.1} {mid:.1}H{x1:.1}M{x0:.1} {:.1}V{:.1}M{x1:.1} {:.1}V{:.1}" stroke="#222" fill="none"/>"##,
            mid - 4.0,
            mid + 4.0,
            mid - 4.0,
            mid + 4.0
        );
    }
    let mut text = format!("{:.2} s", ready.median);
    if let (Some(x), false) = (s.ratio_to_overlay, m.mode == Mode::Overlay) {
        text += &format!("  ({x:.2}× overlayfs)");
    }
    if s.fell_back > 0 {
        text += &format!(", {} fell back", s.fell_back);
    }
    let right = LABELS + ready.max.max(ready.median) * scale;
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
        right + 6.0,
        y + BAR - 4.0,
        escape(&text)
    );
}

/// A round step and how many of them cover `max` (at least one).
fn axis(max: f64) -> (f64, usize) {
    let max = if max > 0.0 { max } else { 1.0 };
    let steps = [
        0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0,
    ];
    let step = steps
        .iter()
        .copied()
        .find(|s| max / s <= 6.0)
        .unwrap_or(1000.0);
    (step, (max / step).ceil().max(1.0) as usize)
}

fn trim_float(v: f64) -> String {
    let text = format!("{v:.1}");
    text.strip_suffix(".0").map_or(text.clone(), str::to_owned)
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
    fn the_axis_covers_the_largest_value_in_round_steps() {
        assert_eq!(axis(0.0), (0.2, 5));
        assert_eq!(axis(7.3), (2.0, 4));
        assert_eq!(axis(12.0), (2.0, 6));
        assert_eq!(axis(95.0), (20.0, 5));
    }
}
