//! Live task events across nodes, for WatchTasks.
//!
//! Each node publishes the events of the changes it makes as few
//! `NOTIFY leasehold_event` payloads, but only while some node has a watcher
//! (watching nodes announce themselves on `leasehold_watch` every few
//! seconds), so an unwatched queue pays nothing. Postgres delivers
//! notifications in commit order, so the events of one task arrive in the
//! order it lived them: creations and claims notify inside their own
//! transaction (a claim cannot commit before the creation it claims), and
//! every later change notifies before its caller is answered (the worker's
//! next step comes after). Every node fans the events it hears out to its
//! local watchers through a bounded broadcast buffer: a watcher that reads
//! too slowly loses the oldest events and is told how many, and never slows
//! anyone else.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::model::{Event, EventKind, Progress, Status, Task};
use crate::store::{payloads, Channel, Store};

/// How often a node with watchers announces itself, and how long an
/// announcement keeps other nodes publishing.
const WATCH_PING: Duration = Duration::from_secs(5);
const WATCH_TTL: Duration = Duration::from_secs(15);
/// Events buffered per watcher before it starts losing the oldest.
const WATCHER_BUFFER: usize = 4096;

/// The number an event kind travels as between nodes.
fn kind_code(kind: EventKind) -> u8 {
    EventKind::ALL.iter().position(|k| *k == kind).unwrap_or(0) as u8
}

fn kind_from_code(code: u64) -> Option<EventKind> {
    EventKind::ALL.get(code as usize).copied()
}

/// An event as one line of a notification payload: a compact JSON object.
fn encode(event: &Event) -> Value {
    let micros = event
        .at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    let mut v = json!({
        "k": kind_code(event.kind),
        "id": event.task_id.to_string(),
        "ty": event.task_type,
        "s": event.status.as_str(),
        "a": event.attempts,
        "at": micros,
    });
    let map = v.as_object_mut().expect("literal object");
    if let Some(w) = &event.worker_id {
        map.insert("w".into(), json!(w));
    }
    if let Some(p) = &event.progress {
        map.insert("pc".into(), json!(p.current));
        map.insert("pt".into(), json!(p.total));
        map.insert("pm".into(), json!(p.message));
    }
    for (key, id) in [
        ("l", event.library_id),
        ("se", event.series_id),
        ("b", event.book_id),
    ] {
        if let Some(id) = id {
            map.insert(key.into(), json!(id.to_string()));
        }
    }
    if let Some(e) = &event.error {
        map.insert("e".into(), json!(e));
    }
    v
}

/// The event a payload line holds; `None` if it is malformed.
fn decode(v: &Value) -> Option<Event> {
    let uuid = |key: &str| {
        v.get(key)
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok())
    };
    let text = |key: &str| v.get(key).and_then(Value::as_str).map(str::to_owned);
    let at = SystemTime::UNIX_EPOCH + Duration::from_micros(v.get("at")?.as_u64()?);
    Some(Event {
        kind: kind_from_code(v.get("k")?.as_u64()?)?,
        task_id: uuid("id")?,
        task_type: text("ty")?,
        status: Status::parse(v.get("s")?.as_str()?)?,
        attempts: v.get("a")?.as_i64()? as i32,
        worker_id: text("w"),
        progress: v.get("pc").map(|current| Progress {
            current: current.as_i64().unwrap_or(0),
            total: v.get("pt").and_then(Value::as_i64).unwrap_or(0),
            message: text("pm").unwrap_or_default(),
            updated_at: Some(at),
        }),
        library_id: uuid("l"),
        series_id: uuid("se"),
        book_id: uuid("b"),
        at,
        error: text("e"),
    })
}

/// Events as notification payloads.
fn event_payloads(events: &[Event]) -> Vec<String> {
    payloads(events.iter().map(|e| encode(e).to_string()))
}

/// What a watcher receives.
#[derive(Debug, Clone)]
pub(crate) enum Delivery {
    Event(Arc<Event>),
    /// This many events were dropped because the watcher fell behind.
    Missed(u64),
}

/// The node's event hub.
#[derive(Debug, Clone)]
pub(crate) struct Hub {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    local: broadcast::Sender<Arc<Event>>,
    watchers: AtomicUsize,
    remote_until: Mutex<Option<Instant>>,
}

impl Hub {
    /// Starts the hub's watch announcer.
    pub(crate) fn start(store: Store, shutdown: tokio::sync::watch::Receiver<bool>) -> Self {
        let (local, _) = broadcast::channel(WATCHER_BUFFER);
        let hub = Self {
            inner: Arc::new(Inner {
                store,
                local,
                watchers: AtomicUsize::new(0),
                remote_until: Mutex::new(None),
            }),
        };
        tokio::spawn(hub.clone().announce_loop(shutdown));
        hub
    }

    fn anyone_watching(&self) -> bool {
        if self.inner.watchers.load(Ordering::Relaxed) > 0 {
            return true;
        }
        let until = *self.inner.remote_until.lock().expect("lock poisoned");
        until.is_some_and(|until| Instant::now() < until)
    }

    /// Publishes events, if anyone anywhere is watching, and returns once
    /// they are sent.
    pub(crate) async fn publish(&self, events: Vec<Event>) {
        if events.is_empty() || !self.anyone_watching() {
            return;
        }
        for payload in event_payloads(&events) {
            if let Err(err) = self.inner.store.notify(Channel::Event, &payload).await {
                tracing::warn!(error = %err, "cannot publish task events");
            }
        }
    }

    /// Publishes the events of `kind` for `tasks`, and returns once they are
    /// sent.
    pub(crate) async fn publish_tasks<'a>(
        &self,
        kind: EventKind,
        tasks: impl IntoIterator<Item = &'a Task>,
    ) {
        if self.anyone_watching() {
            self.publish(tasks.into_iter().map(|t| Event::of(kind, t)).collect())
                .await;
        }
    }

    /// The payloads announcing `kind` for tasks, for a store write to send
    /// inside its own transaction; `None` when nobody is watching.
    pub(crate) fn announcer(
        &self,
        kind: EventKind,
    ) -> Option<impl Fn(&[Task]) -> Vec<String> + Sync> {
        self.anyone_watching().then_some(move |tasks: &[Task]| {
            event_payloads(&tasks.iter().map(|t| Event::of(kind, t)).collect::<Vec<_>>())
        })
    }

    /// Handles a payload heard on the event channel.
    pub(crate) fn receive(&self, payload: &str) {
        if self.inner.watchers.load(Ordering::Relaxed) == 0 {
            return;
        }
        for line in payload.lines() {
            match serde_json::from_str::<Value>(line)
                .ok()
                .as_ref()
                .and_then(decode)
            {
                Some(event) => {
                    let _ = self.inner.local.send(Arc::new(event));
                }
                None => tracing::warn!("malformed event payload ignored"),
            }
        }
    }

    /// Notes that another node has watchers.
    pub(crate) fn remote_watcher_seen(&self) {
        *self.inner.remote_until.lock().expect("lock poisoned") = Some(Instant::now() + WATCH_TTL);
    }

    /// Subscribes a watcher; it counts as one until the returned value drops.
    /// Other nodes are told before this returns, so that they publish the
    /// events of every change that starts after it (notifications reach
    /// each listener in commit order).
    pub(crate) async fn subscribe(&self) -> Subscription {
        let subscription = Subscription {
            rx: self.inner.local.subscribe(),
            hub: self.clone(),
        };
        self.inner.watchers.fetch_add(1, Ordering::Relaxed);
        if let Err(err) = self.inner.store.notify(Channel::Watch, "").await {
            tracing::warn!(error = %err, "cannot announce a new watcher");
        }
        subscription
    }

    async fn announce_loop(self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        loop {
            if self.inner.watchers.load(Ordering::Relaxed) > 0 {
                if let Err(err) = self.inner.store.notify(Channel::Watch, "").await {
                    tracing::debug!(error = %err, "cannot announce watchers");
                }
            }
            let stop = tokio::select! {
                _ = tokio::time::sleep(WATCH_PING) => false,
                _ = shutdown.wait_for(|s| *s) => true,
            };
            if stop {
                return;
            }
        }
    }
}

/// A watcher's subscription to the node's events.
#[derive(Debug)]
pub(crate) struct Subscription {
    rx: broadcast::Receiver<Arc<Event>>,
    hub: Hub,
}

impl Subscription {
    /// The next event or gap marker; `None` when the hub is gone.
    pub(crate) async fn next(&mut self) -> Option<Delivery> {
        match self.rx.recv().await {
            Ok(event) => Some(Delivery::Event(event)),
            Err(broadcast::error::RecvError::Lagged(n)) => Some(Delivery::Missed(n)),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.inner.watchers.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn events_round_trip_through_json() {
        let event = Event {
            kind: EventKind::Progress,
            task_id: Uuid::now_v7(),
            task_type: "scan_library".into(),
            status: Status::Processing,
            attempts: 2,
            worker_id: Some("w-1".into()),
            progress: Some(Progress {
                current: 3,
                total: 10,
                message: "reading".into(),
                updated_at: None,
            }),
            library_id: Some(Uuid::new_v4()),
            series_id: None,
            book_id: Some(Uuid::new_v4()),
            at: SystemTime::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456),
            error: None,
        };
        let mut back = decode(&encode(&event)).unwrap();
        back.progress.as_mut().unwrap().updated_at = None;
        assert_eq!(back, event);
    }
}
