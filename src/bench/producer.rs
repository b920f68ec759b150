//! Creating a run's tasks through the public API.

use std::time::Duration;

use super::error::{Context, Error, Result};
use tokio::time::Instant;

use super::target::{bearer, channel_to};
use crate::client::AuthChannel;
use crate::proto;
use crate::proto::task_service_client::TaskServiceClient;

/// Tasks per CreateTasks call when a scenario sets up its tasks (the API
/// takes up to 10,000; this keeps each answer well under 4 MiB).
pub(crate) const SETUP_BATCH: usize = 5000;

/// A client of the task service on a connection of its own.
pub(crate) async fn task_client(endpoint: &str) -> Result<TaskServiceClient<AuthChannel>> {
    Ok(TaskServiceClient::with_interceptor(
        channel_to(endpoint).await?,
        bearer(),
    ))
}

/// `count` requests for tasks of `task_type` with empty params.
pub(crate) fn requests(task_type: &str, count: usize) -> Vec<proto::CreateTaskRequest> {
    (0..count)
        .map(|_| proto::CreateTaskRequest {
            task_type: task_type.to_owned(),
            ..Default::default()
        })
        .collect()
}

/// Creates `count` tasks of `task_type` through CreateTasks, `batch` per
/// call, one call at a time; returns the duration of each call. Fails if
/// any call fails or answers for fewer tasks than it was given.
pub(crate) async fn create_tasks(
    client: &mut TaskServiceClient<AuthChannel>,
    task_type: &str,
    count: usize,
    batch: usize,
) -> Result<Vec<Duration>> {
    let batch = batch.max(1);
    let mut calls = Vec::with_capacity(count.div_ceil(batch));
    let mut left = count;
    while left > 0 {
        let n = left.min(batch);
        let tasks = requests(task_type, n);
        let started = Instant::now();
        let response = client
            .create_tasks(proto::CreateTasksRequest { tasks })
            .await
            .context("CreateTasks failed")?
            .into_inner();
        calls.push(started.elapsed());
        if response.results.len() != n {
            return Err(Error::Scenario(format!(
                "CreateTasks answered for {} of {n} tasks",
                response.results.len()
            )));
        }
        left -= n;
    }
    Ok(calls)
}

/// Creates a scenario's tasks up front, logging how long it took.
pub(crate) async fn set_up_tasks(endpoint: &str, task_type: &str, count: usize) -> Result<()> {
    if count == 0 {
        return Ok(());
    }
    let mut client = task_client(endpoint).await?;
    let started = Instant::now();
    create_tasks(&mut client, task_type, count, SETUP_BATCH)
        .await
        .context("cannot create the tasks of the run")?;
    tracing::info!(
        tasks = count,
        task_type,
        took_ms = super::report::millis(started.elapsed()),
        "tasks created"
    );
    Ok(())
}

/// A task type unique to one run of `scenario`: `bench.<scenario>.<uuid>`.
pub(crate) fn unique_task_type(scenario: &str) -> String {
    format!("bench.{scenario}.{}", uuid::Uuid::new_v4().simple())
}
