//! `leasehold stats`: task counts per status, overall and per task type.

use super::{human, json, print_json, print_line, Failure, Options};
use crate::proto;

/// Arguments of `leasehold stats`.
#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    /// Where the server is, and how to print.
    #[command(flatten)]
    pub(crate) options: Options,
}

pub(super) async fn run(args: StatsArgs) -> Result<(), Failure> {
    let client = args.options.connect().await?;
    let stats = client.stats().await?;
    if args.options.json {
        return print_json(&json::stats(&stats));
    }
    let mut table = human::table(
        &[
            "TYPE",
            "PENDING",
            "PROCESSING",
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TOTAL",
            "OLDEST DUE",
        ],
        &[1, 2, 3, 4, 5, 6, 7],
    );
    let row = |name: &str, counts: Option<&proto::StatusCounts>, age| {
        let c = counts.cloned().unwrap_or_default();
        vec![
            name.to_owned(),
            c.pending.to_string(),
            c.processing.to_string(),
            c.completed.to_string(),
            c.failed.to_string(),
            c.cancelled.to_string(),
            c.total.to_string(),
            human::duration(age),
        ]
    };
    for t in &stats.task_types {
        table.add_row(row(
            &t.task_type,
            t.counts.as_ref(),
            t.oldest_due_pending_age.as_ref(),
        ));
    }
    // `*` cannot be a task type, so the totals row never reads as one.
    table.add_row(row(
        "*",
        stats.totals.as_ref(),
        stats.oldest_due_pending_age.as_ref(),
    ));
    print_line(human::render(&table))
}
