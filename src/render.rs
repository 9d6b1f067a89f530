//! Human output: tables, times, durations and progress bars.

use anyhow::{Result, anyhow};
use chrono::TimeDelta;
use kiln_engine::model::{ProgressNode, ResultCode, Timestamp};

/// A plain text table with aligned columns.
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Self {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn print(&self) {
        for line in self.lines() {
            println!("{line}");
        }
    }

    /// The table as lines: borderless columns two spaces apart, aligned by display
    /// width (comfy-table: wide and combining characters count as the terminal shows
    /// them), never wrapped, so that scripts can cut columns.
    pub fn lines(&self) -> Vec<String> {
        if self.rows.is_empty() {
            return vec!["(none)".to_owned()];
        }
        let mut table = comfy_table::Table::new();
        table
            .load_preset(comfy_table::presets::NOTHING)
            .set_content_arrangement(comfy_table::ContentArrangement::Disabled)
            .set_header(self.headers.iter().map(|h| h.to_uppercase()));
        for row in &self.rows {
            table.add_row(row);
        }
        for column in table.column_iter_mut() {
            column.set_padding((0, 2));
        }
        table
            .lines()
            .map(|l| l.trim_end().to_owned())
            .filter(|l| !l.is_empty())
            .collect()
    }
}

pub fn time(t: Timestamp) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

pub fn opt_time(t: Option<Timestamp>) -> String {
    t.map_or_else(|| "-".into(), time)
}

pub fn results(r: Option<ResultCode>) -> String {
    r.map_or_else(|| "-".into(), |r| r.name().to_owned())
}

pub fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

/// A duration from `start` to `end` (or to now if still running), like `1m05s`.
pub fn duration(start: Timestamp, end: Option<Timestamp>) -> String {
    let end = end.unwrap_or_else(kiln_engine::model::now);
    let d = end.signed_duration_since(start);
    let ms = d.num_milliseconds().max(0);
    if ms < 1_000 {
        return format!("{ms}ms");
    }
    let s = ms / 1_000;
    match s {
        0..60 => format!("{}.{:01}s", s, (ms % 1_000) / 100),
        60..3_600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3_600, (s % 3_600) / 60),
    }
}

/// A progress bar with counts and status: `[#####...............] 5/20 status`.
pub fn bar(node: &ProgressNode) -> String {
    const WIDTH: usize = 20;
    let filled = node
        .fraction()
        .map_or(0, |f| (f * WIDTH as f64).round() as usize);
    format!(
        "[{}{}] {}/{} {}",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled),
        node.current,
        node.total,
        node.status.as_deref().unwrap_or("")
    )
}

/// A progress tree as indented lines, one per group; the root (the build as a whole)
/// is shown at depth 0 only when it has a total of its own.
pub fn progress_lines(node: &ProgressNode, depth: usize, out: &mut Vec<String>) {
    if depth > 0 || node.total > 0 {
        let name = if node.name.is_empty() {
            "(build)"
        } else {
            node.name.as_str()
        };
        out.push(format!(
            "  {:indent$}{name:<20} {}",
            "",
            bar(node),
            indent = depth.saturating_sub(1) * 2
        ));
    }
    for child in &node.children {
        progress_lines(child, depth + 1, out);
    }
}

/// An RFC 3339 time, or an age before now such as `90s`, `15m`, `2h` or `3d`.
pub fn parse_when(s: &str) -> Result<Timestamp> {
    parse_relative(s, "an age", |now, span| now.checked_sub_signed(span))
}

/// An RFC 3339 time, or a delay from now such as `90s`, `15m`, `2h` or `3d`.
pub fn parse_later(s: &str) -> Result<Timestamp> {
    parse_relative(s, "a delay", |now, span| now.checked_add_signed(span))
}

/// An RFC 3339 time, or a span such as `15m` applied to now by `apply`.
fn parse_relative(
    s: &str,
    what: &str,
    apply: impl Fn(Timestamp, TimeDelta) -> Option<Timestamp>,
) -> Result<Timestamp> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&chrono::Utc));
    }
    let bad = || {
        anyhow!(
            "bad time {s:?}: expected an RFC 3339 time (2026-01-31T12:00:00Z) or {what} such as 90s, 15m, 2h, 3d"
        )
    };
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
    let n: i64 = number.parse().map_err(|_| bad())?;
    let span = match unit {
        "s" => TimeDelta::try_seconds(n),
        "m" => TimeDelta::try_minutes(n),
        "h" => TimeDelta::try_hours(n),
        "d" => TimeDelta::try_days(n),
        _ => None,
    }
    .ok_or_else(bad)?;
    apply(kiln_engine::model::now(), span).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_columns_line_up_by_display_width_with_wide_characters() {
        let mut table = Table::new(&["name", "result"]);
        table.row(vec!["日本語のビルダー".into(), "SUCCESS".into()]);
        table.row(vec!["ascii".into(), "FAILURE".into()]);
        table.row(vec!["e\u{301}cole".into(), "SKIPPED".into()]);
        let lines = table.lines();
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert!(lines[0].starts_with("NAME"));
        // The second column starts at the same display column on every line.
        let starts: Vec<usize> = lines
            .iter()
            .map(|l| {
                let at = l.find(['S', 'F', 'R']).unwrap_or(0);
                unicode_width::UnicodeWidthStr::width(&l[..at])
            })
            .collect();
        assert!(
            starts.windows(2).all(|w| w[0] == w[1]),
            "{lines:?} {starts:?}"
        );
        assert_eq!(Table::new(&["x"]).lines(), ["(none)"]);
    }

    #[test]
    fn ages_and_rfc3339_times_parse_and_nonsense_does_not() {
        assert!(parse_when("2026-01-31T12:00:00Z").is_ok());
        let ten_minutes_ago = parse_when("10m").map(|t| kiln_engine::model::now() - t);
        assert!(
            ten_minutes_ago
                .is_ok_and(|d| d >= TimeDelta::minutes(10) && d < TimeDelta::minutes(11))
        );
        for bad in ["", "m", "10", "10y", "yesterday", "-5m"] {
            assert!(parse_when(bad).is_err(), "{bad}");
            assert!(parse_later(bad).is_err(), "{bad}");
        }
        let in_two_hours = parse_later("2h").map(|t| t - kiln_engine::model::now());
        assert!(
            in_two_hours.is_ok_and(|d| d > TimeDelta::minutes(119) && d <= TimeDelta::hours(2))
        );
    }

    #[test]
    fn durations_read_naturally() {
        let t0 = kiln_engine::model::now();
        assert_eq!(
            duration(t0, Some(t0 + TimeDelta::milliseconds(250))),
            "250ms"
        );
        assert_eq!(
            duration(t0, Some(t0 + TimeDelta::milliseconds(2_500))),
            "2.5s"
        );
        assert_eq!(duration(t0, Some(t0 + TimeDelta::seconds(65))), "1m05s");
        assert_eq!(duration(t0, Some(t0 + TimeDelta::seconds(7_260))), "2h01m");
    }
}
