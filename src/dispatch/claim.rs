//! Pushes: the dispatch loop claims for every free session of the node and
//! sends the tasks down their streams.
//!
//! Free sessions are grouped by what they take (task types and lease
//! length); each group gets one claim statement for all its free slots, and
//! the tasks are dealt round-robin from a rotating start, so work is spread
//! across sessions rather than piled onto the first. The loop runs again at
//! once while claims come back full, and otherwise sleeps until a wake-up,
//! the next due task or the safety poll.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::{Dispatcher, Push, Session};
use crate::model::{Claim, EventKind, LeaseRef, Task};
use crate::store;

/// Most tasks claimed by one statement.
const MAX_CLAIM: usize = 1000;

impl Dispatcher {
    pub(super) async fn dispatch_loop(self) {
        let mut shutdown = self.inner.shutdown.clone();
        loop {
            if *shutdown.borrow() {
                return;
            }
            let mut pause = self.inner.poll_interval;
            if !self.is_draining() {
                match self.dispatch_once().await {
                    Ok(true) => continue,
                    Ok(false) => match self.next_due().await {
                        Ok(Some(due)) => pause = pause.min(due.max(Duration::from_millis(5))),
                        Ok(None) => {}
                        Err(err) => tracing::debug!(error = %err, "next due check failed"),
                    },
                    Err(err) => {
                        tracing::warn!(error = %err, "dispatch failed");
                        pause = pause.min(Duration::from_secs(1));
                    }
                }
            }
            tokio::select! {
                _ = self.inner.kick.notified() => {}
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
    }

    /// Sessions that can take work now.
    fn takers(&self) -> Vec<Arc<Session>> {
        self.sessions()
            .into_iter()
            .filter(|s| !s.is_draining() && s.free() > 0)
            .collect()
    }

    /// One claim per group of free sessions; true if some group got all it
    /// asked for (more may be due).
    async fn dispatch_once(&self) -> store::Result<bool> {
        let _pass = self.inner.dispatching.lock().await;
        let mut groups: BTreeMap<(Vec<String>, Duration), Vec<Arc<Session>>> = BTreeMap::new();
        for session in self.takers() {
            let key = (session.spec.task_types.clone(), session.spec.lease_duration);
            groups.entry(key).or_default().push(session);
        }
        let mut more = false;
        for ((task_types, lease_duration), members) in groups {
            let start = self.inner.rotation.fetch_add(1, Ordering::Relaxed) % members.len();
            let mut free: Vec<usize> = members.iter().map(|s| s.free()).collect();
            let mut owners = Vec::new();
            let mut workers = Vec::new();
            'deal: while free.iter().any(|f| *f > 0) {
                for k in 0..members.len() {
                    let i = (start + k) % members.len();
                    if free[i] > 0 {
                        free[i] -= 1;
                        owners.push(i);
                        workers.push(members[i].spec.worker_id.clone());
                        if owners.len() == MAX_CLAIM {
                            break 'deal;
                        }
                    }
                }
            }
            let claim = Claim {
                task_types,
                slots: workers,
                lease_duration,
            };
            let announce = self.inner.events.announcer(EventKind::Leased);
            let claimed = self
                .inner
                .store
                .task_claim(&claim, announce.as_ref().map(|a| a as store::Announce))
                .await?;
            more |= claimed.len() == claim.slots.len();
            // One push per session: its tasks of this claim, in claim order.
            let mut dealt: Vec<Vec<Task>> = vec![Vec::new(); members.len()];
            for (slot, task) in claimed {
                dealt[owners[slot]].push(task);
            }
            for (member, tasks) in members.iter().zip(dealt) {
                if !tasks.is_empty() {
                    self.deliver(member, tasks);
                }
            }
        }
        Ok(more)
    }

    /// Pushes claimed tasks down their session's stream. Claimed just as
    /// the node or the session began to drain, or the stream ended between
    /// the claim and now: given back at once.
    fn deliver(&self, session: &Arc<Session>, tasks: Vec<Task>) {
        let leases: Vec<LeaseRef> = tasks.iter().filter_map(LeaseRef::of).collect();
        for lease in &leases {
            self.attach(session, *lease);
        }
        let draining = self.is_draining() || session.is_draining();
        if draining || !session.push(Push::Tasks(tasks)) {
            for lease in leases {
                self.give_back(session, lease);
            }
        }
    }

    /// Time until the next pending task that a free session could take is
    /// due; `None` when no session is free or nothing is pending.
    async fn next_due(&self) -> store::Result<Option<Duration>> {
        let takers = self.takers();
        if takers.is_empty() {
            return Ok(None);
        }
        let mut types: Vec<String> = Vec::new();
        for session in &takers {
            if session.spec.task_types.is_empty() {
                types.clear();
                return self.inner.store.task_next_due(&types).await;
            }
            types.extend(session.spec.task_types.iter().cloned());
        }
        types.sort();
        types.dedup();
        self.inner.store.task_next_due(&types).await
    }
}
