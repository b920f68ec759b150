//! `leasehold.v1.WorkerService`: leases, heartbeats and outcomes.

use std::time::Duration;

use tonic::{Request, Response, Status, Streaming};

use super::session::{self, ConnectStream};
use super::validate::lease_ref;
use super::{convert, validate};
use crate::config::{MAX_LEASE, MIN_LEASE};
use crate::error::Error;
use crate::proto::{self, worker_service_server::WorkerService};
use crate::service::Service;
use crate::task::{Claim, Failure};

/// Implements `WorkerService` over the domain.
#[derive(Debug, Clone)]
pub struct WorkerApi {
    service: Service,
    default_lease: Duration,
    max_payload_bytes: usize,
}

impl WorkerApi {
    /// The service, with the default lease length and the payload limit it
    /// enforces on `result`.
    pub fn new(service: Service, default_lease: Duration, max_payload_bytes: usize) -> Self {
        Self {
            service,
            default_lease,
            max_payload_bytes,
        }
    }

    fn lease_duration(&self, value: Option<&prost_types::Duration>) -> Result<Duration, Error> {
        validate::duration(
            "lease_duration",
            value,
            MIN_LEASE,
            MAX_LEASE,
            self.default_lease,
        )
    }
}

/// The failure a FailTask request reports.
pub(crate) fn failure(req: &proto::FailTaskRequest) -> Result<Failure, Error> {
    Ok(Failure {
        error: validate::error_text("error", &req.error)?,
        permanent: req.permanent,
        retry_after: req
            .retry_after
            .as_ref()
            .map(|d| {
                validate::duration(
                    "retry_after",
                    Some(d),
                    Duration::ZERO,
                    validate::MAX_RETRY_AFTER,
                    Duration::ZERO,
                )
            })
            .transpose()?,
    })
}

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    async fn acquire_tasks(
        &self,
        request: Request<proto::AcquireTasksRequest>,
    ) -> Result<Response<proto::AcquireTasksResponse>, Status> {
        let req = request.get_ref();
        let max_tasks = validate::range("max_tasks", req.max_tasks, 0, validate::MAX_CLAIM)?;
        let claim = Claim::for_worker(
            &validate::worker_id("worker_id", &req.worker_id)?,
            validate::task_types("task_types", &req.task_types)?,
            max_tasks.max(1) as usize,
            self.lease_duration(req.lease_duration.as_ref())?,
        );
        let wait = validate::duration(
            "wait",
            req.wait.as_ref(),
            Duration::ZERO,
            validate::MAX_WAIT,
            Duration::ZERO,
        )?;
        let tasks = self.service.acquire(claim, wait).await?;
        Ok(Response::new(proto::AcquireTasksResponse {
            tasks: tasks.iter().map(convert::leased_to_proto).collect(),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<proto::HeartbeatRequest>,
    ) -> Result<Response<proto::HeartbeatResponse>, Status> {
        let req = request.get_ref();
        validate::worker_id("worker_id", &req.worker_id)?;
        let leases = validate::lease_renewals("leases", &req.leases)?;
        let duration = self.lease_duration(req.lease_duration.as_ref())?;
        let states = self.service.heartbeat(leases, duration).await?;
        Ok(Response::new(proto::HeartbeatResponse {
            leases: states
                .into_iter()
                .map(|(lease, state)| session::lease_state(lease, state))
                .collect(),
        }))
    }

    async fn complete_task(
        &self,
        request: Request<proto::CompleteTaskRequest>,
    ) -> Result<Response<proto::CompleteTaskResponse>, Status> {
        let req = request.get_ref();
        let lease = lease_ref(&req.task_id, &req.lease_token)?;
        let result = validate::payload("result", req.result.as_ref(), self.max_payload_bytes)?;
        let task = self.service.complete(lease, result).await?;
        Ok(Response::new(proto::CompleteTaskResponse {
            task: Some(convert::task_to_proto(&task)),
        }))
    }

    async fn fail_task(
        &self,
        request: Request<proto::FailTaskRequest>,
    ) -> Result<Response<proto::FailTaskResponse>, Status> {
        let req = request.get_ref();
        let lease = lease_ref(&req.task_id, &req.lease_token)?;
        let failure = failure(req)?;
        let task = self.service.fail(lease, failure).await?;
        Ok(Response::new(proto::FailTaskResponse {
            task: Some(convert::task_to_proto(&task)),
        }))
    }

    async fn release_task(
        &self,
        request: Request<proto::ReleaseTaskRequest>,
    ) -> Result<Response<proto::ReleaseTaskResponse>, Status> {
        let req = request.get_ref();
        let lease = lease_ref(&req.task_id, &req.lease_token)?;
        let task = self.service.release(lease).await?;
        Ok(Response::new(proto::ReleaseTaskResponse {
            task: Some(convert::task_to_proto(&task)),
        }))
    }

    type ConnectStream = ConnectStream;

    async fn connect(
        &self,
        request: Request<Streaming<proto::ConnectRequest>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let stream = session::open(
            self.service.clone(),
            self.default_lease,
            self.max_payload_bytes,
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(stream))
    }

    async fn list_workers(
        &self,
        _request: Request<proto::ListWorkersRequest>,
    ) -> Result<Response<proto::ListWorkersResponse>, Status> {
        let rows = self.service.workers().await?;
        Ok(Response::new(proto::ListWorkersResponse {
            sessions: rows.iter().map(convert::session_to_proto).collect(),
        }))
    }
}
