//! Pushes: the dispatch loop claims for every free session of the node and
//! sends the tasks down their streams.
//!
//! Free sessions are grouped by what they take (task types and lease
//! length); each group gets one claim statement for its free slots, and the
//! tasks are dealt round-robin from a rotating start, so work is spread
//! across sessions rather than piled onto the first.
//!
//! Claims are pipelined: a claim runs in a task of its own, with the slots
//! it deals promised to it (reserved) until its tasks are delivered, and the
//! loop goes on launching claims for slots that are still free: for other
//! groups, and for the same group when enough slots have freed up while its
//! previous claim was in flight. A slot is never promised twice, so no
//! session ever gets more tasks than its slots. A claim that came back full
//! runs the loop again at once (more may be due). One that came back short
//! leaves its group idle: nothing more is due for it, so freed slots alone
//! launch no claim, until a wake-up (tasks may have become claimable: one
//! that arrived while the claim was in flight runs the loop again when it
//! ends), the group's next due task (looked up as the claim ends) or the
//! safety poll. Idleness is per group, so a busy group never keeps another
//! from its due tasks.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::OwnedSemaphorePermit;

use super::{Dispatcher, Push, Session};
use crate::model::{Claim, LeaseRef, Task};

/// Most tasks claimed by one statement.
const MAX_CLAIM: usize = 1000;

/// Claims of one node in flight at once: enough to keep Postgres busy while
/// the node delivers, few enough to leave the pool to outcomes and calls.
pub(super) const MAX_CLAIMS_IN_FLIGHT: usize = 3;

/// Claims of one group in flight at once: the one being delivered, and the
/// next.
const GROUP_CLAIMS: usize = 2;

/// While a group's claim is in flight, the next one is launched only once
/// this share of the group's slots is free, or [`NEXT_CLAIM_MIN`] of them
/// if fewer: a claim per freed slot would spend a statement on every task.
const NEXT_CLAIM_SHARE: usize = 4;
const NEXT_CLAIM_MIN: usize = 64;

/// How long a claim that failed (the database away) keeps its slots
/// promised, so that the loop does not retry it at once.
const CLAIM_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// The shortest wait for a due task: one due now (or a moment ago) is
/// claimed again after this, not in a loop.
const MIN_DUE_WAIT: Duration = Duration::from_millis(5);

/// A group whose last claim found fewer due tasks than it asked for.
#[derive(Debug, Clone, Copy)]
pub(super) struct Idle {
    /// The wake-up count its statement started after: a later wake-up ends
    /// the idleness.
    woken: u64,
    /// Its next due task (or the safety poll): nothing is due for it before.
    until: Instant,
}

/// What a group of sessions takes: its task types and lease length.
pub(super) type GroupKey = (Vec<String>, Duration);

/// One claim about to run: its group, and the sessions its slots were dealt
/// to, slot by slot.
struct Deal {
    key: GroupKey,
    members: Vec<Arc<Session>>,
    /// The member index of each slot, in dealing order.
    owners: Vec<usize>,
}

impl Dispatcher {
    pub(super) async fn dispatch_loop(self) {
        let mut shutdown = self.inner.shutdown.clone();
        loop {
            if *shutdown.borrow() {
                return;
            }
            let mut pause = self.inner.poll_interval;
            if !self.is_draining() {
                self.launch_claims();
                // Until the first idle group's next due task (or safety
                // poll); a claim ending runs the loop again anyway.
                // Expired ones are forgotten (their group may be gone).
                let now = Instant::now();
                let mut idle = self.inner.idle_groups.lock().expect("lock poisoned");
                idle.retain(|_, i| i.until > now);
                if let Some(until) = idle.values().map(|i| i.until).min() {
                    pause = pause.min(until.saturating_duration_since(now));
                }
            }
            tokio::select! {
                _ = self.inner.kick.notified() => {}
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
    }

    /// Launches a claim for every group of sessions with free slots, as
    /// long as claims may still be in flight. A group with a claim in flight
    /// gets its next one only once enough of its slots are free; an idle
    /// group none until the next wake-up or its next due task.
    fn launch_claims(&self) {
        let woken = *self.inner.wake.borrow();
        let now = Instant::now();
        let mut groups: BTreeMap<GroupKey, Vec<Arc<Session>>> = BTreeMap::new();
        for session in self.sessions() {
            if session.is_draining() {
                continue;
            }
            let key = (session.spec.task_types.clone(), session.spec.lease_duration);
            groups.entry(key).or_default().push(session);
        }
        for (key, members) in groups {
            let free: usize = members.iter().map(|s| s.free()).sum();
            if free == 0 {
                continue;
            }
            let idle = self
                .inner
                .idle_groups
                .lock()
                .expect("lock poisoned")
                .get(&key)
                .is_some_and(|idle| idle.woken == woken && now < idle.until);
            if idle {
                continue;
            }
            let in_flight = self.group_claims(&key);
            if in_flight >= GROUP_CLAIMS {
                continue;
            }
            if in_flight > 0 {
                let slots: usize = members.iter().map(|s| s.spec.slots).sum();
                if free < (slots / NEXT_CLAIM_SHARE).clamp(1, NEXT_CLAIM_MIN) {
                    continue;
                }
            }
            let Ok(permit) = self.inner.claims.clone().try_acquire_owned() else {
                break;
            };
            let Some(deal) = self.deal(key, members) else {
                continue;
            };
            *self
                .inner
                .group_claims
                .lock()
                .expect("lock poisoned")
                .entry(deal.key.clone())
                .or_default() += 1;
            tokio::spawn(self.clone().claim(deal, permit));
        }
    }

    /// Claims of the group `key` in flight.
    fn group_claims(&self, key: &GroupKey) -> usize {
        self.inner
            .group_claims
            .lock()
            .expect("lock poisoned")
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    /// Deals the free slots of a group round-robin from a rotating start, so
    /// work is spread across sessions rather than piled onto the first, and
    /// promises each session the slots dealt to it. `None` if no slot was
    /// free by the time it was dealt.
    fn deal(&self, key: GroupKey, members: Vec<Arc<Session>>) -> Option<Deal> {
        let start = self.inner.rotation.fetch_add(1, Ordering::Relaxed) % members.len();
        let mut free: Vec<usize> = members.iter().map(|s| s.free()).collect();
        let mut dealt = vec![0usize; members.len()];
        let mut owners = Vec::new();
        'deal: while free.iter().any(|f| *f > 0) {
            for k in 0..members.len() {
                let i = (start + k) % members.len();
                if free[i] > 0 {
                    free[i] -= 1;
                    dealt[i] += 1;
                    owners.push(i);
                    if owners.len() == MAX_CLAIM {
                        break 'deal;
                    }
                }
            }
        }
        // A slot taken since `free` was read is simply dealt the next time:
        // a session whose promise cannot be kept gets none this time.
        for (i, session) in members.iter().enumerate() {
            if dealt[i] > 0 && !session.reserve(dealt[i]) {
                dealt[i] = 0;
            }
        }
        owners.retain(|i| dealt[*i] > 0);
        if owners.is_empty() {
            return None;
        }
        Some(Deal {
            key,
            members,
            owners,
        })
    }

    /// Runs one claim and delivers what it got; then the promised slots are
    /// free again (or taken by the tasks delivered). A full claim runs the
    /// loop again: more may be due.
    async fn claim(self, deal: Deal, permit: OwnedSemaphorePermit) {
        let claim = Claim {
            task_types: deal.key.0.clone(),
            slots: deal
                .owners
                .iter()
                .map(|i| deal.members[*i].spec.worker_id.clone())
                .collect(),
            lease_duration: deal.key.1,
        };
        // Read before the statement runs: a wake-up counted after this may
        // be about a task the statement did not see.
        let woken = *self.inner.wake.borrow();
        let claimed = self.claim_counted(&claim).await;
        let mut failed = false;
        let full = match claimed {
            Ok(claimed) => {
                let full = claimed.len() == claim.slots.len();
                // One push per session: its tasks of this claim, in claim
                // order.
                let mut tasks: Vec<Vec<Task>> = vec![Vec::new(); deal.members.len()];
                for (slot, task) in claimed {
                    tasks[deal.owners[slot]].push(task);
                }
                for (member, tasks) in deal.members.iter().zip(tasks) {
                    if !tasks.is_empty() {
                        self.deliver(member, tasks);
                    }
                }
                full
            }
            Err(err) => {
                tracing::warn!(error = %err, "dispatch failed");
                tokio::time::sleep(CLAIM_ERROR_PAUSE).await;
                failed = true;
                false
            }
        };
        // Delivered first, so that the slots the tasks now hold are never
        // free in between.
        let mut promised = vec![0usize; deal.members.len()];
        for i in &deal.owners {
            promised[*i] += 1;
        }
        for (member, n) in deal.members.iter().zip(promised) {
            member.unreserve(n);
        }
        {
            let mut groups = self.inner.group_claims.lock().expect("lock poisoned");
            if let Some(n) = groups.get_mut(&deal.key) {
                *n -= 1;
                if *n == 0 {
                    groups.remove(&deal.key);
                }
            }
        }
        drop(permit);
        // Short, and no wake-up since: idle until the group's next due task
        // (or the safety poll). A failed claim learnt nothing: it is tried
        // again.
        let idle = if full || failed || *self.inner.wake.borrow() != woken {
            None
        } else {
            match self.inner.store.task_next_due(&deal.key.0).await {
                Ok(due) => {
                    let wait = due.map_or(self.inner.poll_interval, |due| {
                        due.clamp(MIN_DUE_WAIT, self.inner.poll_interval)
                    });
                    Some(Idle {
                        woken,
                        until: Instant::now() + wait,
                    })
                }
                Err(err) => {
                    tracing::debug!(error = %err, "next due check failed");
                    None
                }
            }
        };
        {
            let mut groups = self.inner.idle_groups.lock().expect("lock poisoned");
            match idle {
                Some(idle) => groups.insert(deal.key, idle),
                None => groups.remove(&deal.key),
            };
        }
        // Full: more may be due. Short: the loop sleeps until the next due
        // time now, or (woken meanwhile) claims again.
        self.inner.kick.notify_one();
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
}
