//! How values read for people: short status names, UTC times to the second,
//! rounded durations, and borderless aligned tables.

use std::time::{Duration, SystemTime};

use comfy_table::{presets, CellAlignment, Table};

use crate::proto;

/// Shown for a value that is not set.
pub(crate) const NONE: &str = "-";

/// A borderless table with `header` (none if empty); the columns listed in
/// `right` (by index) are right-aligned, for numbers.
pub(crate) fn table(header: &[&str], right: &[usize]) -> Table {
    let mut table = Table::new();
    table.load_preset(presets::NOTHING);
    if !header.is_empty() {
        table.set_header(header.to_vec());
    }
    for &index in right {
        if let Some(column) = table.column_mut(index) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    table
}

/// Prints `table` without the padding comfy-table puts at the start and end
/// of every line, so output starts in the first column and can be cut and
/// grepped.
pub(crate) fn render(table: &Table) -> String {
    table
        .lines()
        .map(|line| {
            line.strip_prefix(' ')
                .unwrap_or(&line)
                .trim_end()
                .to_owned()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `pending`, `processing`, ...: the status without its enum prefix.
pub(crate) fn status(value: i32) -> String {
    match proto::TaskStatus::try_from(value) {
        Ok(status) => short(status.as_str_name(), "TASK_STATUS_"),
        Err(_) => format!("unknown({value})"),
    }
}

/// `created`, `lease_expired`, ...: the event kind without its enum prefix.
pub(crate) fn event_kind(value: i32) -> String {
    match proto::TaskEventKind::try_from(value) {
        Ok(kind) => short(kind.as_str_name(), "TASK_EVENT_KIND_"),
        Err(_) => format!("unknown({value})"),
    }
}

fn short(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
}

/// A time in UTC to the second (`2026-11-28T17:15:26Z`), or `-`.
pub(crate) fn time(value: Option<&prost_types::Timestamp>) -> String {
    value
        .and_then(printable_time)
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_else(|| NONE.to_owned())
}

/// The time, if RFC 3339 can show it: from 1970 (no task is older) to the
/// end of 9999 (humantime refuses, and panics, outside that range).
pub(crate) fn printable_time(value: &prost_types::Timestamp) -> Option<SystemTime> {
    const YEAR_10000: u64 = 253_402_300_800;
    let time = SystemTime::try_from(*value).ok()?;
    let since_epoch = time.duration_since(SystemTime::UNIX_EPOCH).ok()?;
    (since_epoch.as_secs() < YEAR_10000).then_some(time)
}

/// A duration rounded for reading (`4m 12s`, `350ms`), or `-`.
pub(crate) fn duration(value: Option<&prost_types::Duration>) -> String {
    let Some(value) = value.and_then(|d| Duration::try_from(*d).ok()) else {
        return NONE.to_owned();
    };
    let rounded = if value >= Duration::from_secs(1) {
        Duration::from_secs(value.as_secs())
    } else {
        Duration::from_millis(value.subsec_millis().into())
    };
    humantime::format_duration(rounded).to_string()
}

/// `3/10` for known totals, `3` otherwise.
pub(crate) fn progress(value: Option<&proto::TaskProgress>) -> String {
    match value {
        None => NONE.to_owned(),
        Some(p) if p.total > 0 => format!("{}/{}", p.current, p.total),
        Some(p) => p.current.to_string(),
    }
}

/// The value, or `-` when unset or empty.
pub(crate) fn or_none(value: Option<&str>) -> String {
    match value {
        Some(text) if !text.is_empty() => text.to_owned(),
        _ => NONE.to_owned(),
    }
}

/// At most `max` characters on one line, with `…` when cut, so that one
/// long error cannot stretch a whole table.
pub(crate) fn clip(text: &str, max: usize) -> String {
    let flat = text.replace(['\n', '\r', '\t'], " ");
    if flat.chars().count() <= max {
        return flat;
    }
    let mut clipped: String = flat.chars().take(max.saturating_sub(1)).collect();
    clipped.push('…');
    clipped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enum_names_are_short_and_lowercase() {
        assert_eq!(status(proto::TaskStatus::Completed as i32), "completed");
        assert_eq!(
            event_kind(proto::TaskEventKind::LeaseExpired as i32),
            "lease_expired"
        );
        assert_eq!(status(42), "unknown(42)");
    }

    #[test]
    fn durations_round_to_what_matters() {
        let d = |seconds, nanos| prost_types::Duration { seconds, nanos };
        assert_eq!(duration(Some(&d(252, 900_000_000))), "4m 12s");
        assert_eq!(duration(Some(&d(0, 350_123_456))), "350ms");
        assert_eq!(duration(Some(&d(-1, 0))), NONE);
        assert_eq!(duration(None), NONE);
    }

    #[test]
    fn times_outside_what_rfc_3339_shows_are_unset() {
        let t = |seconds| prost_types::Timestamp { seconds, nanos: 0 };
        assert_eq!(time(Some(&t(0))), "1970-01-01T00:00:00Z");
        assert_eq!(time(Some(&t(-1))), NONE);
        assert_eq!(time(Some(&t(253_402_300_800))), NONE);
        assert_eq!(time(Some(&t(i64::MAX))), NONE);
    }

    #[test]
    fn long_text_is_clipped_to_one_line() {
        assert_eq!(clip("a\nb", 10), "a b");
        assert_eq!(clip("abcdefgh", 5), "abcd…");
    }

    #[test]
    fn tables_align_without_outer_padding() {
        let mut t = table(&["NAME", "N"], &[1]);
        t.add_row(vec!["a", "10"]);
        t.add_row(vec!["bb", "2"]);
        let text = render(&t);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines, ["NAME   N", "a     10", "bb     2"]);
    }
}
