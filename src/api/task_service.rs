//! `leasehold.v1.TaskService`: creating and administering tasks.

use tonic::{Request, Response, Status};

use super::{convert, validate};
use crate::error::Error;
use crate::events::{Delivery, Filter};
use crate::proto::{self, task_service_server::TaskService};
use crate::service::Service;
use crate::task::{ListFilter, NewTask, Status as TaskStatus};

/// The server side of a WatchTasks stream.
pub type WatchStream = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<proto::WatchTasksResponse, Status>> + Send>,
>;

/// Implements `TaskService` over the domain.
#[derive(Debug, Clone)]
pub struct TaskApi {
    service: Service,
    max_payload_bytes: usize,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl TaskApi {
    /// The service, with the payload limit it enforces on `params`.
    /// Watch streams end when `shutdown` turns true.
    pub fn new(
        service: Service,
        max_payload_bytes: usize,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Self {
            service,
            max_payload_bytes,
            shutdown,
        }
    }

    fn new_task(&self, req: &proto::CreateTaskRequest) -> Result<NewTask, Error> {
        let max_attempts = validate::range(
            "max_attempts",
            req.max_attempts,
            0,
            validate::MAX_ATTEMPTS_LIMIT,
        )?;
        Ok(NewTask {
            id: uuid::Uuid::now_v7(),
            task_type: validate::task_type("task_type", &req.task_type)?,
            params: validate::payload("params", req.params.as_ref(), self.max_payload_bytes)?,
            priority: req.priority,
            max_attempts: if max_attempts == 0 {
                validate::DEFAULT_MAX_ATTEMPTS
            } else {
                max_attempts
            },
            scheduled_for: validate::timestamp("scheduled_for", req.scheduled_for.as_ref())?,
            library_id: validate::opt_uuid("library_id", req.library_id.as_deref())?,
            series_id: validate::opt_uuid("series_id", req.series_id.as_deref())?,
            book_id: validate::opt_uuid("book_id", req.book_id.as_deref())?,
            dedup_key: validate::dedup_key("dedup_key", req.dedup_key.as_deref())?,
        })
    }
}

fn created(created: crate::task::Created) -> proto::CreateTaskResponse {
    proto::CreateTaskResponse {
        task: Some(convert::task_to_proto(&created.task)),
        deduplicated: created.deduplicated,
    }
}

#[tonic::async_trait]
impl TaskService for TaskApi {
    async fn create_task(
        &self,
        request: Request<proto::CreateTaskRequest>,
    ) -> Result<Response<proto::CreateTaskResponse>, Status> {
        let new = self.new_task(request.get_ref())?;
        let result = self.service.create(new).await?;
        Ok(Response::new(created(result)))
    }

    async fn create_tasks(
        &self,
        request: Request<proto::CreateTasksRequest>,
    ) -> Result<Response<proto::CreateTasksResponse>, Status> {
        let req = request.into_inner();
        if req.tasks.is_empty() {
            return Err(Error::invalid("tasks", "must hold at least one task").into());
        }
        if req.tasks.len() > validate::MAX_BATCH {
            return Err(Error::invalid(
                "tasks",
                format!("must hold at most {} tasks", validate::MAX_BATCH),
            )
            .into());
        }
        let news = req
            .tasks
            .iter()
            .enumerate()
            .map(|(i, t)| {
                self.new_task(t)
                    .map_err(|e| e.within(&format!("tasks[{i}].")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let results = self.service.create_many(news).await?;
        Ok(Response::new(proto::CreateTasksResponse {
            results: results.into_iter().map(created).collect(),
        }))
    }

    async fn get_task(
        &self,
        request: Request<proto::GetTaskRequest>,
    ) -> Result<Response<proto::GetTaskResponse>, Status> {
        let id = validate::uuid("id", &request.get_ref().id)?;
        let task = self.service.get(id).await?;
        Ok(Response::new(proto::GetTaskResponse {
            task: Some(convert::task_to_proto(&task)),
        }))
    }

    async fn list_tasks(
        &self,
        request: Request<proto::ListTasksRequest>,
    ) -> Result<Response<proto::ListTasksResponse>, Status> {
        let req = request.get_ref();
        let page_size = validate::range("page_size", req.page_size, 0, validate::MAX_PAGE_SIZE)?;
        let filter = ListFilter {
            statuses: validate::statuses("statuses", &req.statuses)?,
            task_types: validate::task_types("task_types", &req.task_types)?,
            library_id: validate::opt_uuid("library_id", req.library_id.as_deref())?,
            series_id: validate::opt_uuid("series_id", req.series_id.as_deref())?,
            book_id: validate::opt_uuid("book_id", req.book_id.as_deref())?,
            before_id: validate::page_token("page_token", &req.page_token)?,
            limit: if page_size == 0 {
                validate::DEFAULT_PAGE_SIZE
            } else {
                page_size
            } as i64,
        };
        let page = self.service.list(filter).await?;
        Ok(Response::new(proto::ListTasksResponse {
            tasks: page.tasks.iter().map(convert::task_to_proto).collect(),
            next_page_token: page
                .next_id
                .map(validate::page_token_encode)
                .unwrap_or_default(),
        }))
    }

    async fn cancel_task(
        &self,
        request: Request<proto::CancelTaskRequest>,
    ) -> Result<Response<proto::CancelTaskResponse>, Status> {
        let req = request.get_ref();
        let id = validate::uuid("id", &req.id)?;
        let reason = validate::reason("reason", &req.reason)?;
        let task = self.service.cancel(id, reason).await?;
        Ok(Response::new(proto::CancelTaskResponse {
            task: Some(convert::task_to_proto(&task)),
        }))
    }

    async fn retry_task(
        &self,
        request: Request<proto::RetryTaskRequest>,
    ) -> Result<Response<proto::RetryTaskResponse>, Status> {
        let id = validate::uuid("id", &request.get_ref().id)?;
        let task = self.service.retry(id).await?;
        Ok(Response::new(proto::RetryTaskResponse {
            task: Some(convert::task_to_proto(&task)),
        }))
    }

    async fn purge_tasks(
        &self,
        request: Request<proto::PurgeTasksRequest>,
    ) -> Result<Response<proto::PurgeTasksResponse>, Status> {
        let req = request.get_ref();
        let before = validate::timestamp("completed_before", req.completed_before.as_ref())?;
        let mut statuses = validate::statuses("statuses", &req.statuses)?;
        if let Some((i, s)) = statuses.iter().enumerate().find(|(_, s)| !s.is_terminal()) {
            return Err(Error::invalid(
                format!("statuses[{i}]"),
                format!(
                    "only completed, failed or cancelled tasks can be purged, not {}",
                    s.as_str()
                ),
            )
            .into());
        }
        if statuses.is_empty() {
            statuses = TaskStatus::TERMINAL.to_vec();
        }
        let deleted_count = self.service.purge(statuses, before).await?;
        Ok(Response::new(proto::PurgeTasksResponse { deleted_count }))
    }

    async fn get_stats(
        &self,
        _request: Request<proto::GetStatsRequest>,
    ) -> Result<Response<proto::GetStatsResponse>, Status> {
        let stats = self.service.stats().await?;
        Ok(Response::new(convert::stats_to_proto(&stats)))
    }

    type WatchTasksStream = WatchStream;

    async fn watch_tasks(
        &self,
        request: Request<proto::WatchTasksRequest>,
    ) -> Result<Response<Self::WatchTasksStream>, Status> {
        let req = request.get_ref();
        if req.task_ids.len() > validate::MAX_FILTER_VALUES {
            return Err(Error::invalid(
                "task_ids",
                format!("at most {} values", validate::MAX_FILTER_VALUES),
            )
            .into());
        }
        let filter = Filter {
            task_types: validate::task_types("task_types", &req.task_types)?
                .into_iter()
                .collect(),
            statuses: validate::statuses("statuses", &req.statuses)?
                .into_iter()
                .collect(),
            task_ids: req
                .task_ids
                .iter()
                .enumerate()
                .map(|(i, id)| validate::uuid(&format!("task_ids[{i}]"), id))
                .collect::<Result<_, _>>()?,
            library_id: validate::opt_uuid("library_id", req.library_id.as_deref())?,
            series_id: validate::opt_uuid("series_id", req.series_id.as_deref())?,
            book_id: validate::opt_uuid("book_id", req.book_id.as_deref())?,
        };
        let subscription = self.service.watch().await;
        let shutdown = self.shutdown.clone();
        // The stream is polled only as fast as the client reads; meanwhile
        // the subscription's bounded buffer absorbs events and reports what
        // overflowed as `missed`.
        let stream = futures_util::stream::unfold(
            (subscription, filter, shutdown),
            |(mut subscription, filter, mut shutdown)| async move {
                loop {
                    let delivery = tokio::select! {
                        d = subscription.next() => d?,
                        _ = shutdown.wait_for(|s| *s) => return None,
                    };
                    let kind = match delivery {
                        Delivery::Event(event) if filter.matches(&event) => {
                            proto::watch_tasks_response::Kind::Event(convert::event_to_proto(
                                &event,
                            ))
                        }
                        Delivery::Event(_) => continue,
                        Delivery::Missed(count) => {
                            proto::watch_tasks_response::Kind::Missed(proto::EventsMissed { count })
                        }
                    };
                    let item = Ok(proto::WatchTasksResponse { kind: Some(kind) });
                    return Some((item, (subscription, filter, shutdown)));
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }
}
