//! A producer: creates thumbnail tasks in one call, then follows them to the
//! end through the live event stream and prints a summary.
//!
//! ```bash
//! cargo run --example producer -- 20     # 20 tasks; server at 127.0.0.1:50051
//! ```
//!
//! Run `cargo run --example thumbnail_worker` alongside to see them finish.

use std::collections::HashSet;

use futures_util::StreamExt;
use leasehold::client::{Client, NewTask, WatchFilter, DEFAULT_SERVER};
use leasehold::proto::{watch_tasks_response, TaskStatus};
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), leasehold::client::Error> {
    let count: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(10);
    let server = std::env::var("LEASEHOLD_SERVER").unwrap_or_else(|_| DEFAULT_SERVER.into());
    let client = Client::connect(&server).await?;

    // Watch first, so no event of the new tasks is missed.
    let mut events = client
        .watch(WatchFilter::new().task_type("generate_thumbnail"))
        .await?;
    let created = client
        .create_many((0..count).map(|n| {
            NewTask::new("generate_thumbnail")
                .params(json!({ "book": format!("book-{n}"), "pages": 5 }))
                // One task per book, however often the producer runs.
                .dedup_key(format!("thumbnail:book-{n}"))
        }))
        .await?;
    let mut open: HashSet<String> = created
        .into_iter()
        .filter_map(|c| c.task.map(|t| t.id))
        .collect();
    println!("{} tasks waiting", open.len());

    while !open.is_empty() {
        let Some(message) = events.next().await else {
            break;
        };
        let Some(watch_tasks_response::Kind::Event(event)) = message?.kind else {
            continue;
        };
        let status = TaskStatus::try_from(event.status).unwrap_or(TaskStatus::Unspecified);
        if matches!(
            status,
            TaskStatus::Completed | TaskStatus::Failed | TaskStatus::Cancelled
        ) && open.remove(&event.task_id)
        {
            println!("{} {}", event.task_id, status.as_str_name());
        }
    }
    if let Some(totals) = client.stats().await?.totals {
        println!(
            "queue now: {} pending, {} processing, {} completed, {} failed",
            totals.pending, totals.processing, totals.completed, totals.failed
        );
    }
    Ok(())
}
