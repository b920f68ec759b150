//! Notifications between nodes: every channel, the one LISTEN connection of
//! a node, and the packing of payloads under Postgres' size limit.
//!
//! | channel | sent by | means |
//! |---|---|---|
//! | `leasehold_task` | the `task_wake` trigger (migration V1) | tasks became pending: claim again |
//! | `leasehold_revoke` | a cancel or a reclaim | these leases are void: tell their sessions |
//! | `leasehold_event` | any change while someone watches | task events, for WatchTasks |
//! | `leasehold_watch` | a node with watchers, every few seconds | keep publishing events |
//!
//! Payloads are lines of text; this module never reads them, it only routes
//! them: the dispatcher and the event hub own their formats.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use super::{Result, Store};

/// The channel the `task_wake` trigger notifies. Migration V1 writes the
/// name in SQL; a store test checks that the two agree.
pub(crate) const WAKE_CHANNEL: &str = "leasehold_task";

/// A channel a node sends on (the wake channel is the trigger's alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Channel {
    /// Leases made void, for the sessions holding them.
    Revoke,
    /// Task events, for watchers.
    Event,
    /// A node announcing that it has watchers.
    Watch,
}

impl Channel {
    /// The Postgres channel name.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Channel::Revoke => "leasehold_revoke",
            Channel::Event => "leasehold_event",
            Channel::Watch => "leasehold_watch",
        }
    }
}

/// What a node hears.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Notice {
    /// The connection is (again) listening: anything may have happened
    /// while it was not, so waiters should look again.
    Listening,
    /// Tasks became pending somewhere.
    TasksPending,
    /// A payload of revoked leases.
    Revoked(String),
    /// A payload of task events.
    Events(String),
    /// Another node has watchers.
    WatcherSeen,
}

/// Sends one notification (also inside a write's own transaction).
pub(super) const NOTIFY: &str = "SELECT pg_notify($1, $2)";

/// Every statement of this module, for the preparation test.
#[cfg(test)]
pub(super) const STATEMENTS: &[&str] = &[NOTIFY];

/// Postgres refuses payloads of 8000 bytes or more; this leaves room.
const PAYLOAD_LIMIT: usize = 7000;

/// Packs lines into as few payloads as fit under the limit, one line per
/// line of text, in order. A line is never split (every line the nodes send
/// is far below the limit).
pub(crate) fn payloads(lines: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut payload = String::new();
    for line in lines {
        if !payload.is_empty() && payload.len() + line.len() + 1 > PAYLOAD_LIMIT {
            out.push(std::mem::take(&mut payload));
        }
        if !payload.is_empty() {
            payload.push('\n');
        }
        payload.push_str(&line);
    }
    if !payload.is_empty() {
        out.push(payload);
    }
    out
}

/// The node's notifications, in arrival order.
#[derive(Debug)]
pub(crate) struct Listener {
    rx: mpsc::UnboundedReceiver<Notice>,
}

impl Listener {
    /// The next burst of notices: the first one waited for, and whatever
    /// else has arrived by then. `None` once the node stops.
    pub(crate) async fn next_burst(&mut self) -> Option<Vec<Notice>> {
        let first = self.rx.recv().await?;
        let mut burst = vec![first];
        while let Ok(more) = self.rx.try_recv() {
            burst.push(more);
        }
        Some(burst)
    }
}

impl Store {
    /// Sends `payload` on `channel` to every listening node.
    pub(crate) async fn notify(&self, channel: Channel, payload: &str) -> Result<()> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(NOTIFY).await?;
        client.execute(&stmt, &[&channel.name(), &payload]).await?;
        Ok(())
    }

    /// Opens the node's one LISTEN connection on every channel, reconnecting
    /// with backoff whenever it breaks, until `shutdown` turns true. The
    /// second value completes once it first listens.
    pub(crate) fn listen(
        &self,
        shutdown: watch::Receiver<bool>,
    ) -> (Listener, oneshot::Receiver<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (listening, ready) = oneshot::channel();
        tokio::spawn(self.clone().listen_loop(tx, listening, shutdown));
        (Listener { rx }, ready)
    }

    async fn listen_loop(
        self,
        notices: mpsc::UnboundedSender<Notice>,
        listening: oneshot::Sender<()>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let statement = format!(
            "LISTEN {WAKE_CHANNEL}; LISTEN {}; LISTEN {}; LISTEN {}",
            Channel::Revoke.name(),
            Channel::Event.name(),
            Channel::Watch.name(),
        );
        let mut listening = Some(listening);
        let mut backoff = Duration::from_millis(100);
        loop {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let opened = match self.connect_dedicated(Some(tx)).await {
                Ok(client) => client
                    .batch_execute(&statement)
                    .await
                    .map(|()| client)
                    .map_err(Into::into),
                Err(err) => Err(err),
            };
            let _client = match opened {
                Ok(client) => client,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot listen for notifications, retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.wait_for(|stop| *stop) => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            tracing::debug!("listening for notifications");
            if let Some(listening) = listening.take() {
                let _ = listening.send(());
            }
            if notices.send(Notice::Listening).is_err() {
                return;
            }
            loop {
                tokio::select! {
                    message = rx.recv() => match message {
                        Some(n) => {
                            let notice = match n.channel() {
                                WAKE_CHANNEL => Notice::TasksPending,
                                name if name == Channel::Revoke.name() => {
                                    Notice::Revoked(n.payload().to_owned())
                                }
                                name if name == Channel::Event.name() => {
                                    Notice::Events(n.payload().to_owned())
                                }
                                name if name == Channel::Watch.name() => Notice::WatcherSeen,
                                _ => continue,
                            };
                            if notices.send(notice).is_err() {
                                return;
                            }
                        }
                        None => break,
                    },
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
            }
            tracing::warn!("listen connection lost, reconnecting");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_stay_under_the_limit_and_keep_every_line_in_order() {
        let lines: Vec<String> = (0..1000).map(|i| format!("{i:0>40}")).collect();
        let packed = payloads(lines.clone());
        assert!(packed.len() > 1);
        assert!(packed.iter().all(|p| p.len() < PAYLOAD_LIMIT));
        let back: Vec<String> = packed
            .iter()
            .flat_map(|p| p.lines().map(str::to_owned))
            .collect();
        assert_eq!(back, lines);
        assert!(payloads(Vec::new()).is_empty());
    }
}
