//! What every scenario's report shares: the [`Report`] trait (a human table,
//! then one JSON line), latency [`Summary`] figures, and number formatting.

use std::time::Duration;

use super::workers::WorkerStats;

/// The result of a scenario, printed as a human table followed by one JSON
/// line (the last line on stdout; logs go to stderr).
pub(crate) trait Report {
    /// The report as a human table (several lines, each ending in `\n`).
    fn table(&self) -> String;
    /// The report as one line of JSON with the scenario's stable keys.
    fn json_line(&self) -> String;
    /// Why the run must end with an error although its figures stand (they
    /// are printed first); `None` when it went well.
    fn failure(&self) -> Option<String> {
        None
    }
}

/// Latency figures of a set of samples, by nearest rank.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Summary {
    /// Number of samples.
    pub(crate) count: usize,
    /// Median.
    pub(crate) p50: Duration,
    /// 90th percentile.
    pub(crate) p90: Duration,
    /// 99th percentile.
    pub(crate) p99: Duration,
    /// Largest sample.
    pub(crate) max: Duration,
    /// Smallest sample.
    pub(crate) min: Duration,
    /// Arithmetic mean.
    pub(crate) mean: Duration,
}

impl Summary {
    /// Summarises `samples`; `None` when there are none.
    pub(crate) fn of(mut samples: Vec<Duration>) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let count = samples.len();
        // Nearest rank: the smallest sample with at least p of all samples
        // at or below it.
        let rank = |p: f64| samples[((p * count as f64).ceil() as usize).clamp(1, count) - 1];
        let total: Duration = samples.iter().sum();
        Some(Self {
            count,
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            max: samples[count - 1],
            min: samples[0],
            mean: total / count as u32,
        })
    }

    /// One table row: `name` then p50, p90, p99, max, min and mean in
    /// milliseconds, under [`Summary::HEADER`].
    pub(crate) fn row(&self, name: &str) -> String {
        format!(
            "  {name:<15} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}\n",
            millis(self.p50),
            millis(self.p90),
            millis(self.p99),
            millis(self.max),
            millis(self.min),
            millis(self.mean),
        )
    }

    /// The header line of [`Summary::row`]s.
    pub(crate) const HEADER: &'static str =
        "\n                     p50       p90       p99       max       min      mean\n";
}

/// Milliseconds rounded to the microsecond, for reports.
pub(crate) fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// `value` rounded to `decimals` decimal places.
pub(crate) fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

/// Items per second over `elapsed`; zero when nothing was timed.
pub(crate) fn per_second(items: u64, elapsed: Duration) -> f64 {
    if elapsed.is_zero() {
        0.0
    } else {
        items as f64 / elapsed.as_secs_f64()
    }
}

/// Bytes as mebibytes.
pub(crate) fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// An optional figure for a table: the number, or `unknown`.
pub(crate) fn or_unknown(value: Option<f64>, decimals: usize) -> String {
    match value {
        Some(value) => format!("{value:.decimals$}"),
        None => "unknown".to_owned(),
    }
}

/// CPU seconds per 1,000 of `items`, for tables and JSON lines.
pub(crate) fn per_1k(cpu: Option<Duration>, items: u32) -> Option<f64> {
    cpu.map(|cpu| cpu.as_secs_f64() * 1000.0 / f64::from(items))
}

/// The `drained` row of a table: `tasks` in `elapsed`, their rate, and
/// what the time was measured between (`span`).
pub(crate) fn drained_row(tasks: u32, elapsed: Duration, span: &str) -> String {
    format!(
        "  drained     {tasks} tasks in {:.3} s: {:.0} tasks/s ({span})\n",
        elapsed.as_secs_f64(),
        per_second(u64::from(tasks), elapsed)
    )
}

/// How many tasks each worker session received, `12 / 9 / 11`; with more
/// than `shown` sessions, only the first `shown` then `/ ... (N sessions)`.
pub(crate) fn received(sessions: &[WorkerStats], shown: usize) -> String {
    let received: Vec<String> = sessions.iter().map(|s| s.received.to_string()).collect();
    if received.len() > shown {
        format!(
            "{} / ... ({} sessions)",
            received[..shown].join(" / "),
            received.len()
        )
    } else {
        received.join(" / ")
    }
}

/// The `anomalies` row of a run of [`Workers`](super::workers::Workers):
/// completions refused and tasks pushed twice; empty when there were none.
pub(crate) fn anomalies_row(sessions: &[WorkerStats], duplicates: u64) -> String {
    let refused: u64 = sessions.iter().map(|s| s.refused).sum();
    if refused > 0 || duplicates > 0 {
        format!("  anomalies   {refused} completions refused, {duplicates} tasks pushed twice\n")
    } else {
        String::new()
    }
}

/// Builds one JSON object with its keys in insertion order (serde_json's
/// own map sorts them), starting with `"scenario"`.
#[derive(Debug, Clone)]
pub(crate) struct JsonLine {
    out: String,
}

impl JsonLine {
    /// `{"scenario":"<scenario>"`.
    pub(crate) fn new(scenario: &str) -> Self {
        let mut line = Self {
            out: String::from("{"),
        };
        line.push("scenario", scenario.into());
        line
    }

    /// Appends `"key":value`; `None`, NaN and infinities become `null`.
    pub(crate) fn field(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.push(key, value.into());
        self
    }

    fn push(&mut self, key: &str, value: serde_json::Value) {
        if self.out.len() > 1 {
            self.out.push(',');
        }
        self.out.push_str(&serde_json::Value::from(key).to_string());
        self.out.push(':');
        self.out.push_str(&value.to_string());
    }

    /// The finished line (no newline).
    pub(crate) fn finish(mut self) -> String {
        self.out.push('}');
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_uses_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        let s = Summary::of(samples).unwrap();
        assert_eq!(s.count, 100);
        assert_eq!(s.p50, Duration::from_millis(50));
        assert_eq!(s.p90, Duration::from_millis(90));
        assert_eq!(s.p99, Duration::from_millis(99));
        assert_eq!(s.max, Duration::from_millis(100));
        assert_eq!(s.min, Duration::from_millis(1));
        assert_eq!(s.mean, Duration::from_micros(50_500));

        let one = Summary::of(vec![Duration::from_millis(7)]).unwrap();
        assert_eq!(
            (one.p50, one.p99, one.max),
            (
                Duration::from_millis(7),
                Duration::from_millis(7),
                Duration::from_millis(7)
            )
        );
        assert!(Summary::of(Vec::new()).is_none());
    }

    #[test]
    fn millis_rounds_to_microseconds() {
        assert_eq!(millis(Duration::from_nanos(2_345_678)), 2.346);
        assert_eq!(millis(Duration::ZERO), 0.0);
    }

    #[test]
    fn json_lines_keep_key_order_and_write_null() {
        let line = JsonLine::new("drain")
            .field("tasks", 10u64)
            .field("rate", round(1234.5678, 1))
            .field("cpu", None::<f64>)
            .field("nan", f64::NAN)
            .finish();
        assert_eq!(
            line,
            r#"{"scenario":"drain","tasks":10,"rate":1234.6,"cpu":null,"nan":null}"#
        );
        let parsed: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(parsed["tasks"], 10);
    }

    #[test]
    fn worker_rows() {
        let stats = |received, refused| WorkerStats {
            received,
            completed: received - refused,
            refused,
        };
        let sessions: Vec<WorkerStats> = (1..=3).map(|n| stats(n, 0)).collect();
        assert_eq!(received(&sessions, 8), "1 / 2 / 3");
        assert_eq!(received(&sessions, 2), "1 / 2 / ... (3 sessions)");
        assert_eq!(received(&sessions, usize::MAX), "1 / 2 / 3");
        assert_eq!(anomalies_row(&sessions, 0), "");
        assert_eq!(
            anomalies_row(&[stats(4, 1), stats(5, 2)], 1),
            "  anomalies   3 completions refused, 1 tasks pushed twice\n"
        );
        assert_eq!(
            drained_row(500, Duration::from_millis(250), "first to last"),
            "  drained     500 tasks in 0.250 s: 2000 tasks/s (first to last)\n"
        );
        assert_eq!(per_1k(Some(Duration::from_secs(2)), 4000), Some(0.5));
        assert_eq!(per_1k(None, 4000), None);
    }

    #[test]
    fn rates_and_sizes() {
        assert_eq!(per_second(500, Duration::from_millis(250)), 2000.0);
        assert_eq!(per_second(500, Duration::ZERO), 0.0);
        assert_eq!(mib(3 * 1024 * 1024), 3.0);
        assert_eq!(or_unknown(Some(1.23456), 2), "1.23");
        assert_eq!(or_unknown(None, 2), "unknown");
    }
}
