//! `leasehold.v1.WorkerService`: leases, heartbeats and outcomes, as unary
//! calls and as the `Connect` session stream.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status, Streaming};

use super::auth::{caller, check_task_types, token_gone, until_revoked};
use super::connect::{self, ConnectStream};
use crate::auth::Authenticator;
use crate::coordinator::Coordinator;
use crate::wire::proto::{self, worker_service_server::WorkerService};
use crate::wire::{convert, request};

/// Implements `WorkerService` over the coordinator.
#[derive(Debug, Clone)]
pub(crate) struct WorkerApi {
    coordinator: Coordinator,
    default_lease: Duration,
    max_payload_bytes: usize,
    auth: Option<Arc<Authenticator>>,
}

impl WorkerApi {
    /// The service, with the default lease length and the payload limit it
    /// enforces on `result`; with `auth`, sessions end when their token
    /// stops working.
    pub(crate) fn new(
        coordinator: Coordinator,
        default_lease: Duration,
        max_payload_bytes: usize,
        auth: Option<Arc<Authenticator>>,
    ) -> Self {
        Self {
            coordinator,
            default_lease,
            max_payload_bytes,
            auth,
        }
    }
}

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    async fn acquire_tasks(
        &self,
        request: Request<proto::AcquireTasksRequest>,
    ) -> Result<Response<proto::AcquireTasksResponse>, Status> {
        let (claim, wait) = request::acquire(request.get_ref(), self.default_lease)?;
        check_task_types(caller(&request), &claim.task_types)?;
        // A long poll ends when its token stops working, like a session.
        let revoked = until_revoked(self.auth.clone(), caller(&request).cloned());
        let tasks = tokio::select! {
            tasks = self.coordinator.acquire(claim, wait) => tasks?,
            () = revoked => return Err(token_gone()),
        };
        Ok(Response::new(proto::AcquireTasksResponse {
            tasks: tasks.iter().map(convert::leased_to_proto).collect(),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<proto::HeartbeatRequest>,
    ) -> Result<Response<proto::HeartbeatResponse>, Status> {
        let (leases, duration) = request::heartbeat(request.get_ref(), self.default_lease)?;
        let states = self.coordinator.heartbeat(leases, duration).await?;
        Ok(Response::new(proto::HeartbeatResponse {
            leases: states
                .into_iter()
                .map(|(lease, state)| convert::lease_state(lease, state))
                .collect(),
        }))
    }

    async fn complete_task(
        &self,
        request: Request<proto::CompleteTaskRequest>,
    ) -> Result<Response<proto::CompleteTaskResponse>, Status> {
        let (lease, result) = request::complete(request.get_ref(), self.max_payload_bytes)?;
        let task = self.coordinator.complete(lease, result).await?;
        Ok(Response::new(proto::CompleteTaskResponse {
            task: Some(convert::task_to_proto(&task)),
        }))
    }

    async fn fail_task(
        &self,
        request: Request<proto::FailTaskRequest>,
    ) -> Result<Response<proto::FailTaskResponse>, Status> {
        let (lease, failure) = request::fail(request.get_ref())?;
        let task = self.coordinator.fail(lease, failure).await?;
        Ok(Response::new(proto::FailTaskResponse {
            task: Some(convert::task_to_proto(&task)),
        }))
    }

    async fn release_task(
        &self,
        request: Request<proto::ReleaseTaskRequest>,
    ) -> Result<Response<proto::ReleaseTaskResponse>, Status> {
        let lease = request::release(request.get_ref())?;
        let task = self.coordinator.release(lease).await?;
        Ok(Response::new(proto::ReleaseTaskResponse {
            task: Some(convert::task_to_proto(&task)),
        }))
    }

    type ConnectStream = ConnectStream;

    async fn connect(
        &self,
        request: Request<Streaming<proto::ConnectRequest>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let credential = match (&self.auth, caller(&request)) {
            (Some(auth), Some(caller)) => Some(connect::Credential {
                caller: caller.clone(),
                auth: auth.clone(),
            }),
            _ => None,
        };
        let stream = connect::open(
            self.coordinator.clone(),
            self.default_lease,
            self.max_payload_bytes,
            request.into_inner(),
            credential,
        )
        .await?;
        Ok(Response::new(stream))
    }

    async fn list_workers(
        &self,
        _request: Request<proto::ListWorkersRequest>,
    ) -> Result<Response<proto::ListWorkersResponse>, Status> {
        let rows = self.coordinator.workers().await?;
        Ok(Response::new(proto::ListWorkersResponse {
            sessions: rows.iter().map(convert::session_to_proto).collect(),
        }))
    }
}
