//! The `Connect` stream: one worker session. Reads the worker's messages,
//! answers each, and forwards what the dispatcher pushes (tasks, cancels,
//! drain) until either side ends the stream.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use super::validate::lease_ref;
use super::{convert, validate};
use crate::config::{MAX_LEASE, MIN_LEASE};
use crate::dispatch::{CancelReason, Push, Session, SessionSpec};
use crate::error::Error;
use crate::proto::{self, connect_request, connect_response};
use crate::service::Service;
use crate::task::{LeaseRef, LeaseState, Progress};

/// The server side of a session stream.
pub type ConnectStream = Pin<Box<dyn Stream<Item = Result<proto::ConnectResponse, Status>> + Send>>;

/// Answers travel boxed: a channel allocates its slots in blocks, and an
/// unboxed answer (a whole task) would make each idle session's block tens
/// of kilobytes.
type Out = mpsc::Sender<Box<Result<proto::ConnectResponse, Status>>>;

/// Answers buffered per session before the server waits for the worker to
/// read; bounded so a worker that stops reading holds no unbounded memory.
const OUT_BUFFER: usize = 256;

/// Messages of a session handled at once beyond its slots (heartbeats,
/// progress reports).
const IN_HAND_EXTRA: usize = 64;

/// Turns a channel into the response stream.
pub(crate) fn receiver_stream<T: Send + 'static>(
    rx: mpsc::Receiver<T>,
) -> Pin<Box<dyn Stream<Item = T> + Send>> {
    Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

fn respond(kind: connect_response::Kind) -> Result<proto::ConnectResponse, Status> {
    Ok(proto::ConnectResponse { kind: Some(kind) })
}

/// The session a `register` asks for, checked field by field (the Rust
/// `Worker` runs the same checks when it is built).
pub(crate) fn spec(
    register: &proto::RegisterWorker,
    default_lease: Duration,
) -> Result<SessionSpec, Error> {
    let mut task_types = validate::task_types("register.task_types", &register.task_types)?;
    task_types.sort();
    task_types.dedup();
    let slots = validate::range("register.slots", register.slots, 1, validate::MAX_SLOTS)?;
    Ok(SessionSpec {
        worker_id: validate::worker_id("register.worker_id", &register.worker_id)?,
        task_types,
        slots: slots as usize,
        lease_duration: validate::duration(
            "register.lease_duration",
            register.lease_duration.as_ref(),
            MIN_LEASE,
            MAX_LEASE,
            default_lease,
        )?,
        labels: validate::labels("register.labels", &register.labels)?,
    })
}

/// Opens a session: reads `register`, registers with the dispatcher, and
/// spawns the loop that serves the stream.
pub(crate) async fn open(
    service: Service,
    default_lease: Duration,
    max_payload_bytes: usize,
    mut inbound: Streaming<proto::ConnectRequest>,
) -> Result<ConnectStream, Status> {
    let first = inbound
        .message()
        .await?
        .ok_or_else(|| Status::failed_precondition("the stream ended before `register`"))?;
    let Some(connect_request::Kind::Register(register)) = first.kind else {
        return Err(Status::failed_precondition(
            "the first message of a session must be `register`",
        ));
    };
    let spec = spec(&register, default_lease)?;
    let Some((session, pushes)) = service.dispatcher().register(spec) else {
        return Err(Status::unavailable(
            "this node is draining: connect to another node",
        ));
    };
    let (out, rx) = mpsc::channel(OUT_BUFFER);
    let lease = session.spec.lease_duration;
    let _ = out
        .send(Box::new(respond(connect_response::Kind::Registered(
            proto::SessionRegistered {
                session_id: session.id.to_string(),
                node_id: service.dispatcher().node_id().to_string(),
                lease_duration: Some(convert::duration(lease)),
                heartbeat_interval: Some(convert::duration(lease / 3)),
            },
        ))))
        .await;
    let permits = Arc::new(tokio::sync::Semaphore::new(
        session.spec.slots + IN_HAND_EXTRA,
    ));
    let served = Served {
        service,
        session,
        out,
        max_payload_bytes,
        permits,
    };
    tokio::spawn(served.run(inbound, pushes));
    Ok(Box::pin(futures_util::StreamExt::map(
        receiver_stream(rx),
        |answer| *answer,
    )))
}

struct Served {
    service: Service,
    session: Arc<Session>,
    out: Out,
    max_payload_bytes: usize,
    permits: Arc<tokio::sync::Semaphore>,
}

/// The lease a pushed task carries.
fn lease_of(task: &crate::task::Task) -> Option<LeaseRef> {
    task.lease_token.map(|lease_token| LeaseRef {
        task_id: task.id,
        lease_token,
    })
}

impl Served {
    async fn run(
        self,
        mut inbound: Streaming<proto::ConnectRequest>,
        mut pushes: mpsc::UnboundedReceiver<Push>,
    ) {
        loop {
            tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(request)) => {
                        self.session.touch();
                        if let Err(status) = self.handle(request).await {
                            let _ = self.out.send(Box::new(Err(status))).await;
                            break;
                        }
                    }
                    // The worker closed its side, or the connection broke.
                    Ok(None) | Err(_) => break,
                },
                push = pushes.recv() => {
                    let mut undelivered = None;
                    let response = match push {
                        Some(Push::Task(task)) => {
                            undelivered = lease_of(&task);
                            connect_response::Kind::Task(convert::leased_to_proto(&task))
                        }
                        Some(Push::Cancel { lease, reason }) => {
                            connect_response::Kind::Cancel(proto::CancelLease {
                                task_id: lease.task_id.to_string(),
                                lease_token: lease.lease_token.to_string(),
                                reason: match reason {
                                    CancelReason::Cancelled => proto::CancelReason::Cancelled,
                                    CancelReason::LeaseReclaimed => proto::CancelReason::LeaseReclaimed,
                                } as i32,
                            })
                        }
                        Some(Push::Drain { grace }) => connect_response::Kind::Drain(proto::DrainNotice {
                            grace_period: Some(convert::duration(grace)),
                        }),
                        Some(Push::Close) | None => break,
                    };
                    if self.out.send(Box::new(respond(response))).await.is_err() {
                        if let Some(lease) = undelivered {
                            self.give_back(lease).await;
                        }
                        break;
                    }
                }
                _ = self.out.closed() => break,
            }
        }
        // Tasks pushed after the stream ended never reached the worker: give
        // them back now rather than let them wait for their lease to expire.
        pushes.close();
        while let Ok(push) = pushes.try_recv() {
            if let Push::Task(task) = push {
                if let Some(lease) = lease_of(&task) {
                    self.give_back(lease).await;
                }
            }
        }
        self.service.dispatcher().unregister(&self.session);
    }

    async fn give_back(&self, lease: LeaseRef) {
        if let Err(err) = self.service.release(lease).await {
            tracing::warn!(task_id = %lease.task_id, error = %err, "cannot give back an undelivered task");
        }
    }

    /// Handles one message. Outcomes run concurrently (they are written in
    /// batches with other sessions'); only protocol violations end the
    /// stream. At most `permits` messages are in hand at once: a worker that
    /// sends faster than it reads its answers is slowed down, not buffered.
    async fn handle(&self, request: proto::ConnectRequest) -> Result<(), Status> {
        let Some(kind) = request.kind else {
            return Err(Status::invalid_argument(
                "kind: a message must set one field",
            ));
        };
        let Ok(permit) = self.permits.clone().acquire_owned().await else {
            return Ok(());
        };
        let service = self.service.clone();
        let session = self.session.clone();
        let out = self.out.clone();
        let max_payload = self.max_payload_bytes;
        match kind {
            connect_request::Kind::Register(_) => {
                return Err(Status::failed_precondition(
                    "register: this session is already registered",
                ))
            }
            connect_request::Kind::Drain(_) => {
                service.dispatcher().session_drain(&session);
            }
            connect_request::Kind::Heartbeat(heartbeat) => {
                let leases = validate::lease_renewals("heartbeat.leases", &heartbeat.leases)?;
                tokio::spawn(async move {
                    let _permit = permit;
                    let answer = match service.session_heartbeat(&session, leases).await {
                        Ok(states) => respond(connect_response::Kind::HeartbeatAck(
                            proto::HeartbeatResponse {
                                leases: states
                                    .into_iter()
                                    .map(|(lease, s)| lease_state(lease, s))
                                    .collect(),
                            },
                        )),
                        Err(err) => Err(err.into()),
                    };
                    let _ = out.send(Box::new(answer)).await;
                });
            }
            connect_request::Kind::Complete(req) => {
                spawn_outcome(
                    permit,
                    out,
                    req.task_id.clone(),
                    req.lease_token.clone(),
                    proto::OutcomeKind::Complete,
                    async move {
                        let lease = lease_ref(&req.task_id, &req.lease_token)?;
                        let result = validate::payload("result", req.result.as_ref(), max_payload)?;
                        service.complete(lease, result).await
                    },
                );
            }
            connect_request::Kind::Fail(req) => {
                spawn_outcome(
                    permit,
                    out,
                    req.task_id.clone(),
                    req.lease_token.clone(),
                    proto::OutcomeKind::Fail,
                    async move {
                        let lease = lease_ref(&req.task_id, &req.lease_token)?;
                        let failure = super::worker_service::failure(&req)?;
                        service.fail(lease, failure).await
                    },
                );
            }
            connect_request::Kind::Release(req) => {
                spawn_outcome(
                    permit,
                    out,
                    req.task_id.clone(),
                    req.lease_token.clone(),
                    proto::OutcomeKind::Release,
                    async move {
                        let lease = lease_ref(&req.task_id, &req.lease_token)?;
                        service.release(lease).await
                    },
                );
            }
            connect_request::Kind::Progress(req) => {
                spawn_outcome(
                    permit,
                    out,
                    req.task_id.clone(),
                    req.lease_token.clone(),
                    proto::OutcomeKind::Progress,
                    async move {
                        let lease = lease_ref(&req.task_id, &req.lease_token)?;
                        let progress = Progress {
                            current: validate::range64("progress.current", req.current)?,
                            total: validate::range64("progress.total", req.total)?,
                            message: validate::progress_message("progress.message", &req.message)?,
                            updated_at: None,
                        };
                        service.progress(lease, progress).await
                    },
                );
            }
        }
        Ok(())
    }
}

/// A lease state on the wire.
pub(crate) fn lease_state(lease: LeaseRef, state: LeaseState) -> proto::LeaseState {
    let (status, locked_until) = match state {
        LeaseState::Held(until) => (proto::LeaseStatus::Held, Some(convert::timestamp(until))),
        LeaseState::Lost => (proto::LeaseStatus::Lost, None),
        LeaseState::Cancelled => (proto::LeaseStatus::Cancelled, None),
    };
    proto::LeaseState {
        task_id: lease.task_id.to_string(),
        lease_token: lease.lease_token.to_string(),
        status: status as i32,
        locked_until,
    }
}

/// Runs one outcome in its own task, holding its `permit` until answered,
/// and acknowledges it (a progress report only when refused).
fn spawn_outcome(
    permit: tokio::sync::OwnedSemaphorePermit,
    out: Out,
    task_id: String,
    lease_token: String,
    kind: proto::OutcomeKind,
    outcome: impl std::future::Future<Output = Result<crate::task::Task, Error>> + Send + 'static,
) {
    // Boxed: the outcome's future holds the whole state of a batch
    // submission and is large; unboxed, it was copied into every spawned
    // task and again as the task ran (memcpy was the top symbol of the
    // node's profile during a drain).
    let outcome = Box::pin(outcome);
    tokio::spawn(async move {
        let _permit = permit;
        let outcome = outcome.await;
        if kind != proto::OutcomeKind::Progress || outcome.is_err() {
            send_ack(&out, task_id, lease_token, kind, outcome).await;
        }
    });
}

async fn send_ack(
    out: &Out,
    task_id: String,
    lease_token: String,
    kind: proto::OutcomeKind,
    outcome: Result<crate::task::Task, Error>,
) {
    let (status, message, task) = match outcome {
        Ok(task) => (
            proto::AckStatus::Ok,
            String::new(),
            Some(convert::task_to_proto(&task)),
        ),
        Err(err) => {
            let status = match &err {
                Error::LeaseLost {
                    status: crate::task::Status::Cancelled,
                    ..
                } => proto::AckStatus::Cancelled,
                Error::LeaseLost { .. } | Error::FailedPrecondition(_) => {
                    proto::AckStatus::LeaseLost
                }
                Error::NotFound(_) => proto::AckStatus::NotFound,
                Error::InvalidArgument { .. } => proto::AckStatus::Invalid,
                Error::Unavailable(_) | Error::ResourceExhausted(_) | Error::Internal(_) => {
                    proto::AckStatus::Unavailable
                }
            };
            // The same mapping as unary calls: internal details stay in the log.
            let message = tonic::Status::from(err).message().to_owned();
            (status, message, None)
        }
    };
    let _ = out
        .send(Box::new(respond(connect_response::Kind::Ack(
            proto::OutcomeAck {
                task_id,
                lease_token,
                kind: kind as i32,
                status: status as i32,
                message,
                task,
            },
        ))))
        .await;
}
