//! `leasehold.v1.TaskService`: creating and administering tasks.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::auth::{caller, token_gone, until_revoked};
use crate::auth::Authenticator;
use crate::coordinator::Coordinator;
use crate::events::Delivery;
use crate::model::Created;
use crate::wire::proto::{self, task_service_server::TaskService};
use crate::wire::{convert, field, request};

/// The server side of a WatchTasks stream.
type WatchStream = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<proto::WatchTasksResponse, Status>> + Send>,
>;

/// Implements `TaskService` over the coordinator.
#[derive(Debug, Clone)]
pub(crate) struct TaskApi {
    coordinator: Coordinator,
    max_payload_bytes: usize,
    shutdown: tokio::sync::watch::Receiver<bool>,
    auth: Option<Arc<Authenticator>>,
}

impl TaskApi {
    /// The service, with the payload limit it enforces on `params`.
    /// Watch streams end when `shutdown` turns true, or, with `auth`, when
    /// their token stops working.
    pub(crate) fn new(
        coordinator: Coordinator,
        max_payload_bytes: usize,
        shutdown: tokio::sync::watch::Receiver<bool>,
        auth: Option<Arc<Authenticator>>,
    ) -> Self {
        Self {
            coordinator,
            max_payload_bytes,
            shutdown,
            auth,
        }
    }
}

fn created(created: Created) -> proto::CreateTaskResponse {
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
        let new = request::new_task(request.get_ref(), self.max_payload_bytes)?;
        let result = self.coordinator.create(new).await?;
        Ok(Response::new(created(result)))
    }

    async fn create_tasks(
        &self,
        request: Request<proto::CreateTasksRequest>,
    ) -> Result<Response<proto::CreateTasksResponse>, Status> {
        let news = request::new_tasks(request.get_ref(), self.max_payload_bytes)?;
        let results = self.coordinator.create_many(news).await?;
        Ok(Response::new(proto::CreateTasksResponse {
            results: results.into_iter().map(created).collect(),
        }))
    }

    async fn get_task(
        &self,
        request: Request<proto::GetTaskRequest>,
    ) -> Result<Response<proto::GetTaskResponse>, Status> {
        let id = request::task_id(&request.get_ref().id)?;
        let task = self.coordinator.get(id).await?;
        Ok(Response::new(proto::GetTaskResponse {
            task: Some(convert::task_to_proto(&task)),
        }))
    }

    async fn list_tasks(
        &self,
        request: Request<proto::ListTasksRequest>,
    ) -> Result<Response<proto::ListTasksResponse>, Status> {
        let filter = request::list_filter(request.get_ref())?;
        let page = self.coordinator.list(filter).await?;
        Ok(Response::new(proto::ListTasksResponse {
            tasks: page.tasks.iter().map(convert::task_to_proto).collect(),
            next_page_token: page
                .next_id
                .map(field::page_token_encode)
                .unwrap_or_default(),
        }))
    }

    async fn cancel_task(
        &self,
        request: Request<proto::CancelTaskRequest>,
    ) -> Result<Response<proto::CancelTaskResponse>, Status> {
        let (id, reason) = request::cancel(request.get_ref())?;
        let task = self.coordinator.cancel(id, reason).await?;
        Ok(Response::new(proto::CancelTaskResponse {
            task: Some(convert::task_to_proto(&task)),
        }))
    }

    async fn retry_task(
        &self,
        request: Request<proto::RetryTaskRequest>,
    ) -> Result<Response<proto::RetryTaskResponse>, Status> {
        let id = request::task_id(&request.get_ref().id)?;
        let task = self.coordinator.retry(id).await?;
        Ok(Response::new(proto::RetryTaskResponse {
            task: Some(convert::task_to_proto(&task)),
        }))
    }

    async fn purge_tasks(
        &self,
        request: Request<proto::PurgeTasksRequest>,
    ) -> Result<Response<proto::PurgeTasksResponse>, Status> {
        let (statuses, before) = request::purge(request.get_ref())?;
        let deleted_count = self.coordinator.purge(statuses, before).await?;
        Ok(Response::new(proto::PurgeTasksResponse { deleted_count }))
    }

    async fn get_stats(
        &self,
        _request: Request<proto::GetStatsRequest>,
    ) -> Result<Response<proto::GetStatsResponse>, Status> {
        let stats = self.coordinator.stats().await?;
        Ok(Response::new(convert::stats_to_proto(&stats)))
    }

    type WatchTasksStream = WatchStream;

    async fn watch_tasks(
        &self,
        request: Request<proto::WatchTasksRequest>,
    ) -> Result<Response<Self::WatchTasksStream>, Status> {
        let filter = request::watch_filter(request.get_ref())?;
        let subscription = self.coordinator.watch().await;
        let shutdown = self.shutdown.clone();
        let revoked = until_revoked(self.auth.clone(), caller(&request).cloned());
        // The stream is polled only as fast as the client reads; meanwhile
        // the subscription's bounded buffer absorbs events and reports what
        // overflowed as `missed`.
        let stream = futures_util::stream::unfold(
            (subscription, filter, shutdown, Some(revoked)),
            |(mut subscription, filter, mut shutdown, mut revoked)| async move {
                // Ended by a revocation: the error was the last item.
                let revoking = revoked.as_mut()?;
                loop {
                    let delivery = tokio::select! {
                        d = subscription.next() => Some(d?),
                        _ = shutdown.wait_for(|s| *s) => return None,
                        () = &mut *revoking => None,
                    };
                    let Some(delivery) = delivery else {
                        return Some((Err(token_gone()), (subscription, filter, shutdown, None)));
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
                    return Some((item, (subscription, filter, shutdown, revoked)));
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }
}
