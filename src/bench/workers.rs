//! Simulated workers over real session streams: [`SessionStream`] opens and
//! registers one `Connect` stream; [`Workers`] runs a fleet of them that
//! complete every pushed task at once and report each hand-out and each
//! acknowledgement as an [`Event`].

use std::time::{Duration, SystemTime};

use super::error::{Context, Error, Result};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::transport::Channel;

use super::target::channel_to;
use crate::proto::worker_service_client::WorkerServiceClient;
use crate::proto::{self, connect_request, connect_response};

/// How long closing the worker sessions may take at the end of a run.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// A pushed task as a worker saw it.
#[derive(Debug, Clone)]
pub(crate) struct Arrival {
    /// Id of the task.
    pub(crate) task_id: String,
    /// When the worker read it off its stream.
    pub(crate) at: Instant,
    /// The same moment by the wall clock, to compare with server times.
    pub(crate) wall: SystemTime,
    /// Which session (index) received it.
    pub(crate) session: usize,
}

/// The server's answer to a completion, as a worker saw it.
#[derive(Debug, Clone)]
pub(crate) struct Ack {
    /// When the worker read it off its stream.
    pub(crate) at: Instant,
    /// True when the completion was recorded.
    pub(crate) ok: bool,
}

/// What a worker of a [`Workers`] fleet reports.
#[derive(Debug, Clone)]
pub(crate) enum Event {
    /// A task was pushed to it.
    Arrived(Arrival),
    /// Its completion of a task was answered.
    Acked(Ack),
}

/// What one worker session did during a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct WorkerStats {
    /// Tasks pushed to it.
    pub(crate) received: u64,
    /// Completions the server acknowledged as recorded.
    pub(crate) completed: u64,
    /// Completions the server refused (any acknowledgement other than OK).
    pub(crate) refused: u64,
}

/// Worker sessions that take one task type and complete every pushed task
/// at once over the stream, so their slots never fill. Every hand-out and
/// every acknowledgement is reported, timestamped when read off the stream.
#[derive(Debug)]
pub(crate) struct Workers {
    stop: watch::Sender<bool>,
    handles: Vec<JoinHandle<Result<WorkerStats>>>,
}

impl Workers {
    /// Opens `sessions` sessions of `slots` slots on `endpoints` (in turn),
    /// each on its own connection, taking only `task_type`; returns once every one is
    /// registered, with the receiver of their events. `batched` sessions
    /// take several tasks per message and send the completions of a message
    /// in one.
    pub(crate) async fn open(
        endpoints: &[&str],
        task_type: &str,
        sessions: usize,
        slots: i32,
        batched: bool,
    ) -> Result<(Self, mpsc::UnboundedReceiver<Event>)> {
        let (events, events_rx) = mpsc::unbounded_channel();
        let (stop, stop_rx) = watch::channel(false);
        let mut handles = Vec::with_capacity(sessions);
        let run = uuid::Uuid::new_v4().simple().to_string();
        for index in 0..sessions {
            let register = proto::RegisterWorker {
                worker_id: format!("bench-{}-{index}", &run[..8]),
                task_types: vec![task_type.to_owned()],
                slots,
                batched_pushes: batched,
                ..Default::default()
            };
            // Spread over the nodes in turn.
            let endpoint = endpoints[index % endpoints.len()];
            let session = SessionStream::open(endpoint, register, index)
                .await
                .with_context(|| format!("cannot open worker session {index}"))?;
            handles.push(tokio::spawn(complete_at_once(
                session,
                events.clone(),
                stop_rx.clone(),
            )));
        }
        Ok((Self { stop, handles }, events_rx))
    }

    /// Waits for the acknowledgements of the completions sent so far, closes
    /// every session and returns what each did, in session order.
    pub(crate) async fn close(self) -> Result<Vec<WorkerStats>> {
        let _ = self.stop.send(true);
        let mut stats = Vec::with_capacity(self.handles.len());
        for (index, mut handle) in self.handles.into_iter().enumerate() {
            match tokio::time::timeout(CLOSE_TIMEOUT, &mut handle).await {
                Ok(joined) => stats.push(
                    joined
                        .context("worker task panicked")?
                        .with_context(|| format!("worker session {index} failed"))?,
                ),
                Err(_) => {
                    handle.abort();
                    return Err(Error::Scenario(format!(
                        "worker session {index} did not close within {CLOSE_TIMEOUT:?}"
                    )));
                }
            }
        }
        Ok(stats)
    }
}

/// One registered session stream: the sender of the worker's messages and
/// the stream of the server's.
pub(crate) struct SessionStream {
    /// Index of the session within its run, for logs and reports.
    pub(crate) index: usize,
    /// The worker's side; dropping it closes the stream, and the server
    /// then ends its side.
    pub(crate) tx: mpsc::Sender<proto::ConnectRequest>,
    /// The server's side.
    pub(crate) rx: tonic::Streaming<proto::ConnectResponse>,
    /// The server's answer to `register`.
    pub(crate) registered: proto::SessionRegistered,
}

impl SessionStream {
    /// Connects to `endpoint` on a connection of its own, sends `register`
    /// and waits for `registered`.
    pub(crate) async fn open(
        endpoint: &str,
        register: proto::RegisterWorker,
        index: usize,
    ) -> Result<Self> {
        Self::open_on(channel_to(endpoint).await?, register, index).await
    }

    /// As [`SessionStream::open`], on a given channel.
    pub(crate) async fn open_on(
        channel: Channel,
        register: proto::RegisterWorker,
        index: usize,
    ) -> Result<Self> {
        let (tx, rx) = mpsc::channel(1024);
        tx.send(proto::ConnectRequest {
            kind: Some(connect_request::Kind::Register(register)),
        })
        .await
        .context("session channel closed")?;
        let outbound = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let mut client = WorkerServiceClient::with_interceptor(channel, super::target::bearer());
        let mut rx = client
            .connect(outbound)
            .await
            .context("Connect refused")?
            .into_inner();
        match rx.message().await.context("session stream failed")? {
            Some(proto::ConnectResponse {
                kind: Some(connect_response::Kind::Registered(registered)),
            }) => Ok(Self {
                index,
                tx,
                rx,
                registered,
            }),
            other => Err(Error::Scenario(format!(
                "expected `registered` first, got {other:?}"
            ))),
        }
    }

    /// The heartbeat interval the server recommends (a third of the lease).
    pub(crate) fn heartbeat_interval(&self) -> Duration {
        self.registered
            .heartbeat_interval
            .as_ref()
            .map(std_duration)
            .filter(|d| !d.is_zero())
            // A zero interval (from a faulty server) would make the
            // heartbeat timer panic.
            .unwrap_or(Duration::from_secs(10))
    }
}

/// A protobuf duration as a std one (negative counts as zero).
pub(crate) fn std_duration(d: &prost_types::Duration) -> Duration {
    Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32)
}

/// A protobuf timestamp as a system time (before the epoch counts as the
/// epoch).
pub(crate) fn system_time(t: &prost_types::Timestamp) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32)
}

/// A complete message for a pushed lease, with an empty result.
pub(crate) fn complete(lease: &proto::Lease) -> proto::ConnectRequest {
    proto::ConnectRequest {
        kind: Some(connect_request::Kind::Complete(
            proto::CompleteTaskRequest {
                task_id: lease.task_id.clone(),
                lease_token: lease.lease_token.clone(),
                result: None,
            },
        )),
    }
}

/// One `outcomes` message completing every lease of `leases`, with empty
/// results.
pub(crate) fn complete_many(leases: &[proto::Lease]) -> proto::ConnectRequest {
    proto::ConnectRequest {
        kind: Some(connect_request::Kind::Outcomes(proto::OutcomeBatch {
            outcomes: leases
                .iter()
                .map(|lease| proto::Outcome {
                    kind: Some(proto::outcome::Kind::Complete(proto::CompleteTaskRequest {
                        task_id: lease.task_id.clone(),
                        lease_token: lease.lease_token.clone(),
                        result: None,
                    })),
                })
                .collect(),
        })),
    }
}

/// A message read off session `index`'s stream, `Ok(None)` at its end. Once
/// the worker has closed its side (`closing`), an error is how the stream
/// may end, so it counts as the end too (logged at debug level).
pub(crate) fn end_if_closing(
    message: Result<Option<proto::ConnectResponse>, tonic::Status>,
    index: usize,
    closing: bool,
) -> Result<Option<proto::ConnectResponse>, tonic::Status> {
    match message {
        Err(status) if closing => {
            tracing::debug!(session = index, %status, "session ended while closing");
            Ok(None)
        }
        other => other,
    }
}

/// Completes every pushed task at once until told to stop; then waits for
/// the outstanding acknowledgements, closes its side and reads the stream
/// to its end.
async fn complete_at_once(
    session: SessionStream,
    events: mpsc::UnboundedSender<Event>,
    mut stop: watch::Receiver<bool>,
) -> Result<WorkerStats> {
    let SessionStream {
        index, tx, mut rx, ..
    } = session;
    let mut tx = Some(tx);
    let mut stats = WorkerStats::default();
    let mut outstanding = 0u64;
    let mut stopping = false;
    loop {
        if stopping && outstanding == 0 {
            // Closing our side makes the server end the stream.
            tx = None;
        }
        let message = tokio::select! {
            message = rx.message() => message,
            _ = stop.changed(), if !stopping => {
                stopping = true;
                continue;
            }
        };
        let at = Instant::now();
        let kind = match end_if_closing(message, index, tx.is_none()) {
            Ok(Some(message)) => message.kind,
            Ok(None) => break,
            Err(status) => return Err(status).context("the server ended the session"),
        };
        let (pushed, acks) = match kind {
            Some(connect_response::Kind::Task(leased)) => (vec![leased], Vec::new()),
            Some(connect_response::Kind::Tasks(batch)) => (batch.tasks, Vec::new()),
            Some(connect_response::Kind::Ack(ack)) => (Vec::new(), vec![ack]),
            Some(connect_response::Kind::Acks(batch)) => (Vec::new(), batch.acks),
            Some(connect_response::Kind::Drain(_)) => {
                tracing::warn!(session = index, "the server is draining this session");
                continue;
            }
            Some(connect_response::Kind::Cancel(cancel)) => {
                tracing::warn!(
                    session = index,
                    task_id = %cancel.task_id,
                    reason = cancel.reason,
                    "lease taken back"
                );
                continue;
            }
            Some(connect_response::Kind::Registered(_))
            | Some(connect_response::Kind::HeartbeatAck(_))
            | None => continue,
        };
        // The tasks of one message are completed in one (when pushed in one).
        let mut completions = Vec::with_capacity(pushed.len());
        for leased in pushed {
            let lease = leased
                .lease
                .context("a task was pushed without its lease")?;
            stats.received += 1;
            let _ = events.send(Event::Arrived(Arrival {
                task_id: lease.task_id.clone(),
                at,
                wall: SystemTime::now(),
                session: index,
            }));
            completions.push(lease);
        }
        if let (Some(tx), false) = (&tx, completions.is_empty()) {
            outstanding += completions.len() as u64;
            let message = if completions.len() == 1 {
                complete(&completions[0])
            } else {
                complete_many(&completions)
            };
            tx.send(message).await.context("session stream closed")?;
        }
        for ack in acks {
            outstanding = outstanding.saturating_sub(1);
            let ok = ack.status == proto::AckStatus::Ok as i32;
            if ok {
                stats.completed += 1;
            } else {
                stats.refused += 1;
                tracing::warn!(
                    session = index,
                    task_id = %ack.task_id,
                    status = ack.status,
                    message = %ack.message,
                    "completion refused"
                );
            }
            let _ = events.send(Event::Acked(Ack { at, ok }));
        }
    }
    Ok(stats)
}
