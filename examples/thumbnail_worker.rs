//! A Rust worker for `generate_thumbnail` tasks.
//!
//! ```bash
//! cargo run --example thumbnail_worker            # server at 127.0.0.1:50051
//! LEASEHOLD_SERVER=10.0.0.5:50051,10.0.0.6:50051 cargo run --example thumbnail_worker
//! ```
//!
//! It takes up to four tasks at once, reports progress page by page, stops
//! a page loop when the task is cancelled, fails for good on bad input, and
//! drains on Ctrl-C: tasks still running after 10 s are given back.

use std::time::Duration;

use leasehold::client::{TaskContext, TaskError, Worker, DEFAULT_SERVER};
use serde_json::{json, Value};

/// Renders a thumbnail of every page in `params.pages` (pretend work).
async fn generate_thumbnail(task: TaskContext) -> Result<Value, TaskError> {
    let Some(book) = task.params()["book"].as_str().map(str::to_owned) else {
        // Retrying cannot fix the input.
        return Err(TaskError::permanent("params.book: required string"));
    };
    let pages = task.params()["pages"].as_i64().unwrap_or(3).clamp(1, 1000);
    for page in 1..=pages {
        tokio::select! {
            // The server cancelled the task or the lease was lost: stop.
            () = task.cancelled() => return Err(TaskError::retry("cancelled")),
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        task.progress(page, pages, format!("page {page} of {book}"));
    }
    Ok(json!({ "thumbnail": format!("thumbs/{book}.webp"), "pages": pages }))
}

#[tokio::main]
async fn main() -> Result<(), leasehold::client::Error> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let servers = std::env::var("LEASEHOLD_SERVER").unwrap_or_else(|_| DEFAULT_SERVER.into());
    Worker::builder(format!("thumbnailer-{}", std::process::id()))
        .servers(servers.split(',').map(str::trim))
        .slots(4)
        .drain_timeout(Duration::from_secs(10))
        .label("example", "thumbnail_worker")
        .handler("generate_thumbnail", generate_thumbnail)
        .build()?
        .run_until_signal()
        .await
}
