//! The node's sessions, and which session holds which lease.
//!
//! A cache of the database's truth, kept for two things only: counting free
//! slots, and knowing which stream to push a cancel down. A lease is held
//! here from its hand-out (or re-attach) until its outcome, loss or cancel;
//! a stale token never frees anything.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{mpsc, Notify};
use uuid::Uuid;

use super::{Dispatcher, Push, Session};
use crate::error::Error;
use crate::model::{LeaseRef, SessionEntry, SessionSpec};

impl Dispatcher {
    /// Every registered session.
    pub(super) fn sessions(&self) -> Vec<Arc<Session>> {
        self.inner
            .sessions
            .lock()
            .expect("lock poisoned")
            .values()
            .cloned()
            .collect()
    }

    /// Registers a session; the returned receiver yields what to send down
    /// its stream. Refused while the node drains.
    pub(crate) fn register(
        &self,
        spec: SessionSpec,
    ) -> Result<(Arc<Session>, mpsc::UnboundedReceiver<Push>), Error> {
        if self.stopping() {
            return Err(Error::draining());
        }
        let (session, rx) = Session::new(spec);
        let session = Arc::new(session);
        self.inner
            .sessions
            .lock()
            .expect("lock poisoned")
            .insert(session.id, session.clone());
        tracing::info!(session_id = %session.id, worker = %session.spec.worker_id, slots = session.spec.slots, "session registered");
        self.inner.changed.notify_one();
        self.inner.kick.notify_one();
        Ok((session, rx))
    }

    /// Forgets a session whose stream ended. Its leases stay in the
    /// database until they expire or a new session re-attaches them.
    pub(crate) fn unregister(&self, session: &Session) {
        self.inner
            .sessions
            .lock()
            .expect("lock poisoned")
            .remove(&session.id);
        let mut holders = self.inner.holders.lock().expect("lock poisoned");
        for lease in session.leases() {
            if holders.get(&lease.task_id) == Some(&session.id) {
                holders.remove(&lease.task_id);
            }
        }
        drop(holders);
        tracing::info!(session_id = %session.id, worker = %session.spec.worker_id, in_flight = session.in_flight(), "session closed");
        self.inner.changed.notify_one();
    }

    /// The worker asked for nothing new on this session.
    pub(crate) fn session_drain(&self, session: &Session) {
        session.set_draining();
        self.inner.changed.notify_one();
    }

    /// The local session that holds `task_id`, if any.
    pub(super) fn holder(&self, task_id: Uuid) -> Option<Arc<Session>> {
        let session_id = *self
            .inner
            .holders
            .lock()
            .expect("lock poisoned")
            .get(&task_id)?;
        self.inner
            .sessions
            .lock()
            .expect("lock poisoned")
            .get(&session_id)
            .cloned()
    }

    /// Counts a freshly handed-out or re-attached lease as held by
    /// `session`, taking it from any other local session that held it.
    /// Refused (false) if the lease finished meanwhile: an outcome that
    /// raced with a heartbeat's answer.
    pub(super) fn attach(&self, session: &Arc<Session>, lease: LeaseRef) -> bool {
        if !session.hold(lease) {
            return false;
        }
        let previous = self
            .inner
            .holders
            .lock()
            .expect("lock poisoned")
            .insert(lease.task_id, session.id);
        if let Some(previous) = previous.filter(|id| *id != session.id) {
            let old = self
                .inner
                .sessions
                .lock()
                .expect("lock poisoned")
                .get(&previous)
                .cloned();
            if let Some(old) = old {
                old.drop_lease(lease);
            }
        }
        true
    }

    /// `session` lets go of `lease` (a task it was pushed but never got):
    /// its slot is free, registered or not.
    pub(super) fn detach(&self, session: &Session, lease: LeaseRef) {
        session.drop_lease(lease);
        let mut holders = self.inner.holders.lock().expect("lock poisoned");
        if holders.get(&lease.task_id) == Some(&session.id) {
            holders.remove(&lease.task_id);
        }
        drop(holders);
        self.inner.kick.notify_one();
    }

    /// A lease is finished or void: the local session holding it with this
    /// very token lets it go and its slot is free. A stale token frees
    /// nothing. True if a session held it.
    pub(super) fn forget(&self, lease: LeaseRef) -> bool {
        let Some(session) = self.holder(lease.task_id) else {
            return false;
        };
        if !session.drop_lease(lease) {
            return false;
        }
        let mut holders = self.inner.holders.lock().expect("lock poisoned");
        if holders.get(&lease.task_id) == Some(&session.id) {
            holders.remove(&lease.task_id);
        }
        drop(holders);
        self.inner.kick.notify_one();
        true
    }

    /// How many sessions are connected, and their free slots in all.
    pub(crate) fn session_slots(&self) -> (usize, usize) {
        let sessions = self.sessions();
        let free = sessions.iter().map(|s| s.free()).sum();
        (sessions.len(), free)
    }

    /// The node's sessions as the directory records them.
    pub(crate) fn directory_entries(&self) -> Vec<SessionEntry> {
        let draining = self.inner.draining.load(Ordering::Relaxed);
        self.sessions()
            .iter()
            .map(|s| SessionEntry {
                id: s.id,
                node_id: self.inner.node_id,
                worker_id: s.spec.worker_id.clone(),
                task_types: s.spec.task_types.clone(),
                slots: s.spec.slots as i32,
                labels: s.spec.labels.clone(),
                in_flight: s.in_flight() as i32,
                draining: draining || s.is_draining(),
                connected_at: s.connected_at,
                last_seen_at: s.last_seen(),
            })
            .collect()
    }

    /// Fires whenever the sessions change (one registers, leaves or
    /// drains), so the directory can be brought up to date at once.
    pub(crate) fn sessions_changed(&self) -> Arc<Notify> {
        self.inner.changed.clone()
    }
}
