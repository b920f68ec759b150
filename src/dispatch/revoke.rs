//! Revokes: when a lease is cancelled or reclaimed, the session holding it,
//! on whichever node, is told to stop.
//!
//! The node that voids a lease announces it on the revoke channel (lines of
//! `<task id> <lease token> <c|r>`); every node hears it, and the one whose
//! session holds that very lease pushes `cancel` down its stream. A newer
//! lease of the same task is never touched.

use uuid::Uuid;

use super::{Dispatcher, Push};
use crate::model::{CancelReason, LeaseRef};
use crate::store::{self, payloads, Channel};

fn reason_code(reason: CancelReason) -> char {
    match reason {
        CancelReason::Cancelled => 'c',
        CancelReason::LeaseReclaimed => 'r',
    }
}

fn reason_from_code(code: &str) -> Option<CancelReason> {
    match code {
        "c" => Some(CancelReason::Cancelled),
        "r" => Some(CancelReason::LeaseReclaimed),
        _ => None,
    }
}

impl Dispatcher {
    /// Tells every node that these leases are void, so the sessions holding
    /// them are told to stop.
    pub(crate) async fn revoke(&self, leases: &[LeaseRef], reason: CancelReason) {
        let lines = leases.iter().map(|lease| {
            format!(
                "{} {} {}",
                lease.task_id,
                lease.lease_token,
                reason_code(reason)
            )
        });
        for payload in payloads(lines) {
            if let Err(err) = self.inner.store.notify(Channel::Revoke, &payload).await {
                tracing::warn!(error = %err, "cannot announce revoked leases");
            }
        }
    }

    /// Handles a revoke payload heard from any node.
    pub(crate) fn on_revoke(&self, payload: &str) {
        for line in payload.lines() {
            let mut parts = line.split(' ');
            let (Some(Ok(task_id)), Some(Ok(lease_token)), Some(Some(reason))) = (
                parts.next().map(Uuid::parse_str),
                parts.next().map(Uuid::parse_str),
                parts.next().map(reason_from_code),
            ) else {
                tracing::warn!("malformed revoke notification ignored");
                continue;
            };
            let lease = LeaseRef {
                task_id,
                lease_token,
            };
            self.cancel_held(lease, reason);
        }
    }

    /// Checks every lease the local sessions hold against the database, and
    /// tells the sessions holding void ones to stop; returns how many were
    /// told. Run whenever the LISTEN connection is (again) listening: a
    /// revoke sent while it was away was never heard, and its worker would
    /// otherwise run on until its next heartbeat found out.
    pub(crate) async fn leases_recheck(&self) -> store::Result<usize> {
        let held: Vec<LeaseRef> = self
            .sessions()
            .iter()
            .flat_map(|session| session.leases())
            .collect();
        let voided = self.inner.store.lease_voided(&held).await?;
        Ok(voided
            .into_iter()
            .filter(|(lease, reason)| self.cancel_held(*lease, *reason))
            .count())
    }

    /// Pushes `cancel` to the local session holding this very lease (a
    /// newer lease of the same task is never touched) and frees its slot.
    /// True if a session held it.
    fn cancel_held(&self, lease: LeaseRef, reason: CancelReason) -> bool {
        let session = self.holder(lease.task_id);
        let Some(session) = session.filter(|_| self.forget(lease)) else {
            return false;
        };
        tracing::info!(task_id = %lease.task_id, session_id = %session.id, ?reason, "pushing cancel");
        session.push(Push::Cancel { lease, reason });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_round_trip_through_their_codes() {
        for reason in [CancelReason::Cancelled, CancelReason::LeaseReclaimed] {
            assert_eq!(
                reason_from_code(&reason_code(reason).to_string()),
                Some(reason)
            );
        }
        assert_eq!(reason_from_code("x"), None);
    }
}
