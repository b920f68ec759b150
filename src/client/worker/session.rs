//! The session loop: the worker's one background task. It connects,
//! registers, re-attaches what it holds, serves the stream until it breaks
//! or drains, and reconnects (with jittered back-off, to the next server)
//! until the worker stops. What it holds between streams (leases, running
//! handlers, unacknowledged outcomes) is its [`Leases`].

use std::time::Duration;

use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tonic::transport::Channel;
use tonic::Code;

use super::leases::Leases;
use super::message;
use super::Worker;
use crate::client::{Error, Result};
use crate::proto::{
    self, connect_request, connect_response, worker_service_client::WorkerServiceClient,
};

/// How one session ended.
enum SessionEnd {
    /// Drained: nothing held, nothing unacknowledged.
    Done,
    /// The server ended the stream or it broke; reconnect.
    Broken(String),
    /// The server refused the registration in a way reconnecting cannot
    /// fix.
    Fatal(Box<tonic::Status>),
}

/// The session loop's state, which outlives each stream.
pub(super) struct SessionLoop {
    worker: Worker,
    leases: Leases,
    /// Set once shutdown began: when the remaining work must be released.
    drain_deadline: Option<Instant>,
}

/// How long releases sent at the drain deadline may wait for their answers.
const RELEASE_ANSWER_WAIT: Duration = Duration::from_secs(5);

/// After telling the server it drains, how long an idle worker keeps
/// reading: a task pushed just before the server saw `drain` is given back
/// at once instead of waiting out its lease.
const DRAIN_LINGER: Duration = Duration::from_millis(300);

/// The longest heartbeat interval honoured, whatever the server says.
const MAX_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(3600);

impl SessionLoop {
    pub(super) fn new(mut worker: Worker) -> Self {
        let slots = usize::try_from(worker.register.slots).unwrap_or(1);
        let leases = Leases::new(slots, std::mem::take(&mut worker.handlers));
        Self {
            worker,
            leases,
            drain_deadline: None,
        }
    }

    pub(super) async fn run(mut self) -> Result<()> {
        let result = self.serve().await;
        self.leases.wind_down().await;
        result
    }

    async fn serve(&mut self) -> Result<()> {
        let mut server = 0;
        // Sessions in a row that ended without registering; a session that
        // registers resets it, so a healthy fleet reconnects quickly.
        let mut failures: u32 = 0;
        loop {
            let (address, channel) = self.worker.channels[server].clone();
            match self.session(&address, channel, &mut failures).await {
                SessionEnd::Done => return Ok(()),
                SessionEnd::Fatal(status) => {
                    tracing::error!(%address, code = ?status.code(), message = status.message(), "server refused the worker");
                    self.leases.abandon();
                    return Err(Error::Status(status));
                }
                SessionEnd::Broken(why) => {
                    tracing::warn!(%address, %why, "worker session ended; reconnecting");
                }
            }
            server = (server + 1) % self.worker.channels.len();
            let delay = self.backoff(failures);
            failures = failures.saturating_add(1);
            if !self.wait_offline(delay).await {
                self.leases.abandon();
                return Ok(());
            }
        }
    }

    /// Jittered exponential delay before reconnect number `failures`.
    fn backoff(&self, failures: u32) -> Duration {
        let exp = self
            .worker
            .backoff_initial
            .saturating_mul(2u32.saturating_pow(failures.min(20)));
        let capped = exp.min(self.worker.backoff_max);
        capped.mul_f64(rand::rng().random_range(0.5..1.0))
    }

    /// Waits `delay` while disconnected, still collecting finished handlers
    /// and honouring shutdown. False when the worker should give up: it is
    /// shutting down and either has nothing left or its drain deadline
    /// passed.
    async fn wait_offline(&mut self, delay: Duration) -> bool {
        let until = after(delay);
        loop {
            if self.worker.shutdown.is_cancelled() {
                let deadline = *self
                    .drain_deadline
                    .get_or_insert_with(|| after(self.worker.drain_timeout));
                if self.leases.idle() || Instant::now() >= deadline {
                    return false;
                }
            }
            tokio::select! {
                () = tokio::time::sleep_until(until) => return true,
                // Outcomes are queued until the next stream sends them.
                activity = self.leases.finished_handler() => {
                    self.leases.settle(activity);
                }
                () = self.worker.shutdown.cancelled(), if self.drain_deadline.is_none() => {}
                () = sleep_until_opt(self.drain_deadline) => {}
            }
        }
    }

    /// One session: register, then serve until the stream ends.
    async fn session(&mut self, address: &str, channel: Channel, failures: &mut u32) -> SessionEnd {
        let (tx, rx) = mpsc::channel::<proto::ConnectRequest>(256);
        let outbound = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|message| (message, rx))
        });
        // The register message is queued before the call, so the server
        // finds it as soon as the stream opens.
        let _ = tx
            .send(request(connect_request::Kind::Register(
                self.worker.register.clone(),
            )))
            .await;
        let mut client = WorkerServiceClient::with_interceptor(channel, self.worker.bearer.clone());
        let mut inbound = match client.connect(outbound).await {
            Ok(response) => response.into_inner(),
            Err(status) => return refused(status),
        };
        let registered = match inbound.message().await {
            Ok(Some(proto::ConnectResponse {
                kind: Some(connect_response::Kind::Registered(registered)),
            })) => registered,
            Ok(Some(other)) => {
                return SessionEnd::Broken(format!("expected `registered` first, got {other:?}"))
            }
            Ok(None) => return SessionEnd::Broken("stream ended before `registered`".into()),
            Err(status) => return refused(status),
        };
        *failures = 0;
        tracing::info!(
            %address,
            session_id = %registered.session_id,
            node_id = %registered.node_id,
            held = self.leases.held(),
            "worker session registered"
        );
        let interval = registered
            .heartbeat_interval
            .and_then(|d| Duration::try_from(d).ok())
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::from_secs(10))
            .min(MAX_HEARTBEAT_INTERVAL);

        // Drain first: registering wakes the dispatcher, and a draining
        // worker wants nothing pushed.
        let mut opening = Vec::new();
        let mut drain_sent_at = None;
        if self.drain_deadline.is_some() {
            opening.push(connect_request::Kind::Drain(proto::DrainSession {}));
            drain_sent_at = Some(Instant::now());
        }
        opening.extend(self.leases.heartbeat());
        opening.extend(self.leases.unacknowledged());
        if !self.send_all(&tx, opening).await {
            return SessionEnd::Broken("stream closed while re-attaching".into());
        }

        let mut heartbeat = tokio::time::interval_at(Instant::now() + interval, interval);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut resend = tokio::time::interval(Duration::from_secs(1));
        resend.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut unavailable: Vec<String> = Vec::new();
        let mut node_draining = false;

        loop {
            let linger_until = drain_sent_at.map(|at: Instant| at + DRAIN_LINGER);
            if self.leases.idle() && linger_until.is_some_and(|until| Instant::now() >= until) {
                return SessionEnd::Done;
            }
            if node_draining && self.leases.idle() {
                // Nothing left for the draining node: move on now rather
                // than wait for it to close the stream.
                return SessionEnd::Broken("node is draining".into());
            }
            let mut out: Vec<connect_request::Kind> = Vec::new();
            tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(proto::ConnectResponse { kind: Some(kind) })) => {
                        match kind {
                            connect_response::Kind::Task(leased) => {
                                let draining = self.drain_deadline.is_some();
                                out.extend(self.leases.start(leased, draining));
                            }
                            connect_response::Kind::Tasks(batch) => {
                                let draining = self.drain_deadline.is_some();
                                for leased in batch.tasks {
                                    out.extend(self.leases.start(leased, draining));
                                }
                            }
                            connect_response::Kind::HeartbeatAck(ack) => self.leases.heartbeat_ack(ack),
                            connect_response::Kind::Ack(ack) => {
                                self.leases.ack(ack).apply(&mut out, &mut unavailable)
                            }
                            connect_response::Kind::Acks(batch) => {
                                for ack in batch.acks {
                                    self.leases.ack(ack).apply(&mut out, &mut unavailable);
                                }
                            }
                            connect_response::Kind::Cancel(cancel) => self.leases.cancel(&cancel),
                            connect_response::Kind::Drain(_) => {
                                tracing::info!(%address, "node is draining; finishing held tasks, then reconnecting");
                                node_draining = true;
                            }
                            connect_response::Kind::Registered(_) => {
                                return SessionEnd::Broken("a second `registered`".into());
                            }
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return SessionEnd::Broken("server closed the session".into()),
                    Err(status) => {
                        return SessionEnd::Broken(format!("{}: {}", status.code(), status.message()))
                    }
                },
                activity = self.leases.activity() => {
                    out.extend(self.leases.settle(activity));
                    // Handlers that finished meanwhile go out in the same
                    // message.
                    out.extend(self.leases.settle_ready());
                }
                _ = heartbeat.tick() => out.extend(self.leases.heartbeat()),
                _ = resend.tick(), if !unavailable.is_empty() => {
                    out.extend(self.leases.resend(std::mem::take(&mut unavailable)));
                }
                () = self.worker.shutdown.cancelled(), if self.drain_deadline.is_none() => {
                    tracing::info!(held = self.leases.held(), "worker shutting down: draining");
                    self.drain_deadline = Some(after(self.worker.drain_timeout));
                    drain_sent_at = Some(Instant::now());
                    out.push(connect_request::Kind::Drain(proto::DrainSession {}));
                    out.extend(self.leases.release_waiting());
                }
                () = sleep_until_opt(linger_until), if self.leases.idle() => {}
                () = sleep_until_opt(self.drain_deadline), if self.leases.held() > 0 => {
                    out.extend(self.leases.release_all());
                }
                // Releases sent but never answered: stop anyway; the leases
                // expire on their own.
                () = sleep_until_opt(self.drain_deadline.and_then(|d| d.checked_add(RELEASE_ANSWER_WAIT))) => {
                    self.leases.abandon();
                    return SessionEnd::Done;
                }
            }
            if !self.send_all(&tx, out).await {
                return SessionEnd::Broken("stream closed".into());
            }
        }
    }

    /// Sends `messages` in order, outcomes that follow each other packed
    /// into one `outcomes` message. False if the stream is closed.
    async fn send_all(
        &mut self,
        tx: &mpsc::Sender<proto::ConnectRequest>,
        messages: Vec<connect_request::Kind>,
    ) -> bool {
        for message in message::packed(messages) {
            if tx.send(request(message)).await.is_err() {
                return false;
            }
        }
        true
    }
}

/// The instant `delay` from now; a delay too long to represent means a
/// century (a "never" given as `Duration::MAX` must not panic).
pub(super) fn after(delay: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(delay)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

fn request(kind: connect_request::Kind) -> proto::ConnectRequest {
    proto::ConnectRequest { kind: Some(kind) }
}

/// How a session whose registration failed with `status` goes on: a
/// refusal reconnecting cannot fix ends the worker, anything else is
/// retried.
fn refused(status: tonic::Status) -> SessionEnd {
    match status.code() {
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::Unimplemented => SessionEnd::Fatal(Box::new(status)),
        _ => SessionEnd::Broken(format!("{}: {}", status.code(), status.message())),
    }
}

/// Sleeps until `deadline`, or forever when there is none.
async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
