//! The `Connect` stream: one worker session. Reads the worker's messages,
//! answers each, and forwards what the dispatcher pushes (tasks, cancels,
//! drain) until either side ends the stream.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tonic::{Status, Streaming};

use crate::auth::{Authenticator, Caller};
use crate::coordinator::Coordinator;
use crate::dispatch::{Push, Session};
use crate::error::Error;
use crate::model::{LeaseRef, Task};
use crate::wire::limit::MAX_PUSH_BYTES;
use crate::wire::proto::{self, connect_request, connect_response};
use crate::wire::{convert, request};

/// The server side of a session stream.
pub(crate) type ConnectStream =
    Pin<Box<dyn Stream<Item = Result<proto::ConnectResponse, Status>> + Send>>;

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

/// The token a session was opened with, and what checks it.
pub(super) struct Credential {
    pub(super) caller: Caller,
    pub(super) auth: Arc<Authenticator>,
}

fn respond(kind: connect_response::Kind) -> Box<Result<proto::ConnectResponse, Status>> {
    Box::new(Ok(proto::ConnectResponse { kind: Some(kind) }))
}

/// Opens a session: reads `register`, registers with the dispatcher, and
/// spawns the loop that serves the stream.
pub(super) async fn open(
    coordinator: Coordinator,
    default_lease: Duration,
    max_payload_bytes: usize,
    mut inbound: Streaming<proto::ConnectRequest>,
    credential: Option<Credential>,
) -> Result<ConnectStream, Status> {
    let first = inbound
        .message()
        .await?
        .ok_or_else(|| Error::FailedPrecondition("the stream ended before `register`".into()))?;
    let Some(connect_request::Kind::Register(register)) = first.kind else {
        return Err(Error::FailedPrecondition(
            "the first message of a session must be `register`".into(),
        )
        .into());
    };
    let spec = request::register(&register, default_lease)?;
    super::auth::check_task_types(credential.as_ref().map(|c| &c.caller), &spec.task_types)?;
    let (session, pushes) = coordinator.session_open(spec)?;
    let (out, rx) = mpsc::channel(OUT_BUFFER);
    let lease = session.spec.lease_duration;
    let _ = out
        .send(respond(connect_response::Kind::Registered(
            proto::SessionRegistered {
                session_id: session.id.to_string(),
                node_id: coordinator.node_id().to_string(),
                lease_duration: Some(convert::duration(lease)),
                heartbeat_interval: Some(convert::duration(lease / 3)),
            },
        )))
        .await;
    let in_hand = session.spec.slots + IN_HAND_EXTRA;
    let permits = Arc::new(Semaphore::new(in_hand));
    let stream = Connection {
        coordinator,
        session,
        out,
        max_payload_bytes,
        permits,
        in_hand,
    };
    tokio::spawn(stream.run(inbound, pushes, credential));
    let answers = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|answer| (*answer, rx))
    });
    Ok(Box::pin(answers))
}

/// A worker's Connect call: one registered session's stream, served
/// until either side ends it.
struct Connection {
    coordinator: Coordinator,
    session: Arc<Session>,
    out: Out,
    max_payload_bytes: usize,
    permits: Arc<Semaphore>,
    /// The permits there are.
    in_hand: usize,
}

/// The messages a push of `tasks` travels in: one `task` each, or, for a
/// session that reads them, `tasks` batches of at most about
/// [`MAX_PUSH_BYTES`] encoded (a larger task alone).
fn task_messages(tasks: &[Task], batched: bool) -> Vec<(connect_response::Kind, Vec<LeaseRef>)> {
    let leased = tasks
        .iter()
        .map(|task| (convert::leased_to_proto(task), LeaseRef::of(task)));
    if !batched {
        return leased
            .map(|(task, lease)| {
                (
                    connect_response::Kind::Task(task),
                    lease.into_iter().collect(),
                )
            })
            .collect();
    }
    let mut messages = Vec::new();
    let mut batch = Vec::new();
    let mut leases = Vec::new();
    let mut size = 0;
    for (task, lease) in leased {
        let len = prost::Message::encoded_len(&task);
        if !batch.is_empty() && size + len > MAX_PUSH_BYTES {
            messages.push((
                connect_response::Kind::Tasks(proto::TaskBatch {
                    tasks: std::mem::take(&mut batch),
                }),
                std::mem::take(&mut leases),
            ));
            size = 0;
        }
        size += len;
        batch.push(task);
        leases.extend(lease);
    }
    if !batch.is_empty() {
        messages.push((
            connect_response::Kind::Tasks(proto::TaskBatch { tasks: batch }),
            leases,
        ));
    }
    messages
}

impl Connection {
    async fn run(
        self,
        mut inbound: Streaming<proto::ConnectRequest>,
        mut pushes: mpsc::UnboundedReceiver<Push>,
        credential: Option<Credential>,
    ) {
        let mut undelivered = Vec::new();
        let mut revoked = match credential {
            Some(Credential { caller, auth }) => {
                super::auth::until_revoked(Some(auth), Some(caller))
            }
            None => super::auth::until_revoked(None, None),
        };
        loop {
            tokio::select! {
                () = &mut revoked => {
                    // Told to stop at once, then cut off: a revoked token may
                    // not report outcomes either. Its leases run out and are
                    // reclaimed.
                    tracing::info!(session_id = %self.session.id, "token revoked or expired: closing the session");
                    let _ = self
                        .out
                        .send(respond(connect_response::Kind::Drain(proto::DrainNotice {
                            grace_period: Some(convert::duration(Duration::ZERO)),
                        })))
                        .await;
                    let _ = self
                        .out
                        .send(Box::new(Err(super::auth::token_gone())))
                        .await;
                    break;
                }
                message = inbound.message() => match message {
                    Ok(Some(request)) => {
                        self.session.touch();
                        if let Err(err) = self.handle(request).await {
                            let _ = self.out.send(Box::new(Err(err.into_status()))).await;
                            break;
                        }
                    }
                    // The worker closed its side, or the connection broke.
                    Ok(None) | Err(_) => break,
                },
                push = pushes.recv() => {
                    let messages = match push {
                        Some(Push::Tasks(tasks)) => {
                            task_messages(&tasks, self.session.spec.batched_pushes)
                        }
                        Some(Push::Cancel { lease, reason }) => vec![(
                            connect_response::Kind::Cancel(convert::cancel_to_proto(lease, reason)),
                            Vec::new(),
                        )],
                        Some(Push::Drain { grace }) => vec![(
                            connect_response::Kind::Drain(proto::DrainNotice {
                                grace_period: Some(convert::duration(grace)),
                            }),
                            Vec::new(),
                        )],
                        Some(Push::Close) | None => break,
                    };
                    let mut messages = messages.into_iter();
                    let mut gone = false;
                    for (message, leases) in messages.by_ref() {
                        if self.out.send(respond(message)).await.is_err() {
                            undelivered.extend(leases);
                            gone = true;
                            break;
                        }
                    }
                    if gone {
                        undelivered.extend(messages.flat_map(|(_, leases)| leases));
                        break;
                    }
                }
                _ = self.out.closed() => break,
            }
        }
        // Tasks pushed after the stream ended never reached the worker: they
        // are given back now rather than left to wait for their lease to
        // expire.
        pushes.close();
        while let Ok(push) = pushes.try_recv() {
            if let Push::Tasks(tasks) = push {
                undelivered.extend(tasks.iter().filter_map(LeaseRef::of));
            }
        }
        self.coordinator.session_close(&self.session, undelivered);
    }

    /// Handles one message. Outcomes run concurrently (they are written in
    /// batches with other sessions'); only protocol violations end the
    /// stream. At most `in_hand` messages are in hand at once, an outcome of
    /// an `outcomes` message counting as one (up to all of them): a worker
    /// that sends faster than it reads its answers is slowed down, not
    /// buffered.
    async fn handle(&self, request: proto::ConnectRequest) -> Result<(), Error> {
        let Some(kind) = request.kind else {
            return Err(Error::invalid("kind", "a message must set one field"));
        };
        let weight = match &kind {
            connect_request::Kind::Outcomes(batch) => batch.outcomes.len().clamp(1, self.in_hand),
            _ => 1,
        };
        let Ok(permit) = self
            .permits
            .clone()
            .acquire_many_owned(u32::try_from(weight).unwrap_or(u32::MAX))
            .await
        else {
            return Ok(());
        };
        let coordinator = self.coordinator.clone();
        let session = self.session.clone();
        let out = self.out.clone();
        let max_payload = self.max_payload_bytes;
        match kind {
            connect_request::Kind::Register(_) => {
                return Err(Error::FailedPrecondition(
                    "register: this session is already registered".into(),
                ))
            }
            connect_request::Kind::Drain(_) => coordinator.session_drain(&session),
            connect_request::Kind::Heartbeat(heartbeat) => {
                let leases = request::session_heartbeat(&heartbeat)?;
                tokio::spawn(async move {
                    let _permit = permit;
                    let answer = match coordinator.session_heartbeat(&session, leases).await {
                        Ok(states) => respond(connect_response::Kind::HeartbeatAck(
                            proto::HeartbeatResponse {
                                leases: states
                                    .into_iter()
                                    .map(|(lease, s)| convert::lease_state(lease, s))
                                    .collect(),
                            },
                        )),
                        Err(err) => Box::new(Err(err.into_status())),
                    };
                    let _ = out.send(answer).await;
                });
            }
            connect_request::Kind::Outcomes(batch) => {
                request::outcomes(&batch)?;
                let outcomes: Vec<Outcome> = batch
                    .outcomes
                    .into_iter()
                    .filter_map(|outcome| outcome.kind)
                    .map(|kind| Outcome::of(kind, coordinator.clone(), max_payload))
                    .collect();
                tokio::spawn(async move {
                    let _permit = permit;
                    let acks =
                        futures_util::future::join_all(outcomes.into_iter().map(Outcome::ack))
                            .await;
                    let batch = connect_response::Kind::Acks(proto::AckBatch { acks });
                    let _ = out.send(respond(batch)).await;
                });
            }
            connect_request::Kind::Complete(req) => Outcome::of(
                proto::outcome::Kind::Complete(req),
                coordinator,
                max_payload,
            )
            .spawn(permit, out),
            connect_request::Kind::Fail(req) => {
                Outcome::of(proto::outcome::Kind::Fail(req), coordinator, max_payload)
                    .spawn(permit, out)
            }
            connect_request::Kind::Release(req) => {
                Outcome::of(proto::outcome::Kind::Release(req), coordinator, max_payload)
                    .spawn(permit, out)
            }
            connect_request::Kind::Progress(req) => Outcome {
                kind: proto::OutcomeKind::Progress,
                task_id: req.task_id.clone(),
                lease_token: req.lease_token.clone(),
                run: Box::pin(async move {
                    let (lease, progress) = request::progress(&req)?;
                    coordinator.progress(lease, progress).await
                }),
            }
            .spawn(permit, out),
        }
        Ok(())
    }
}

/// An outcome message (complete, fail, release, progress) being written:
/// what it is about, as sent, and the write.
struct Outcome {
    kind: proto::OutcomeKind,
    task_id: String,
    lease_token: String,
    /// Boxed: the write's future holds the whole state of a batch
    /// submission and is large; unboxed, it was copied into every spawned
    /// task and again as the task ran (memcpy was the top symbol of the
    /// node's profile during a drain).
    run: Pin<Box<dyn Future<Output = Result<Task, Error>> + Send>>,
}

impl Outcome {
    /// A complete, fail or release, alone or one of an `outcomes` message:
    /// each is written the same way.
    fn of(kind: proto::outcome::Kind, coordinator: Coordinator, max_payload: usize) -> Self {
        match kind {
            proto::outcome::Kind::Complete(req) => Outcome {
                kind: proto::OutcomeKind::Complete,
                task_id: req.task_id.clone(),
                lease_token: req.lease_token.clone(),
                run: Box::pin(async move {
                    let (lease, result) = request::complete(&req, max_payload)?;
                    coordinator.complete(lease, result).await
                }),
            },
            proto::outcome::Kind::Fail(req) => Outcome {
                kind: proto::OutcomeKind::Fail,
                task_id: req.task_id.clone(),
                lease_token: req.lease_token.clone(),
                run: Box::pin(async move {
                    let (lease, failure) = request::fail(&req)?;
                    coordinator.fail(lease, failure).await
                }),
            },
            proto::outcome::Kind::Release(req) => Outcome {
                kind: proto::OutcomeKind::Release,
                task_id: req.task_id.clone(),
                lease_token: req.lease_token.clone(),
                run: Box::pin(async move { coordinator.release(request::release(&req)?).await }),
            },
        }
    }

    /// Writes the outcome and returns its acknowledgement.
    async fn ack(self) -> proto::OutcomeAck {
        let outcome = self.run.await;
        convert::outcome_ack(self.task_id, self.lease_token, self.kind, outcome)
    }

    /// Runs the write in its own task, holding `permit` until answered, and
    /// acknowledges it (a progress report only when refused).
    fn spawn(self, permit: OwnedSemaphorePermit, out: Out) {
        tokio::spawn(async move {
            let _permit = permit;
            let progress = self.kind == proto::OutcomeKind::Progress;
            let ack = self.ack().await;
            if !progress || ack.status != proto::AckStatus::Ok as i32 {
                let _ = out.send(respond(connect_response::Kind::Ack(ack))).await;
            }
        });
    }
}
