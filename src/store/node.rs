//! Nodes and worker sessions, as ListWorkers sees them. These rows are a
//! directory, never a source of truth for leases.

use std::time::SystemTime;

use uuid::Uuid;

use super::{Result, Store};
use crate::model::SessionEntry;

/// How long a node may go without refreshing its row before it counts as
/// dead, in seconds.
pub(crate) const NODE_EXPIRY_SECS: f64 = 30.0;

const NODE_UPSERT: &str = "INSERT INTO node (id, address, draining) VALUES ($1, $2, $3) \
     ON CONFLICT (id) DO UPDATE SET last_seen_at = now(), draining = EXCLUDED.draining";

// Brings this node's session rows in line with its memory in one statement:
// upserts the live ones and deletes the rest.
const SESSION_SYNC: &str = "WITH live AS ( \
       SELECT * FROM unnest($2::uuid[], $3::text[], $4::jsonb[], $5::int4[], $6::int4[], \
         $7::bool[], $8::timestamptz[], $9::timestamptz[], $10::jsonb[]) \
         AS s(id, worker_id, task_types, slots, in_flight, draining, connected_at, \
           last_seen_at, labels)), \
     gone AS ( \
       DELETE FROM worker_session w WHERE w.node_id = $1 \
         AND NOT EXISTS (SELECT 1 FROM live WHERE live.id = w.id)) \
     INSERT INTO worker_session (id, node_id, worker_id, task_types, slots, labels, \
       in_flight, draining, connected_at, last_seen_at) \
     SELECT id, $1, worker_id, ARRAY(SELECT jsonb_array_elements_text(task_types)), slots, \
       labels, in_flight, draining, connected_at, last_seen_at FROM live \
     ON CONFLICT (id) DO UPDATE SET in_flight = EXCLUDED.in_flight, \
       draining = EXCLUDED.draining, last_seen_at = EXCLUDED.last_seen_at";

const NODE_EXPIRE: &str = "DELETE FROM node WHERE last_seen_at < now() - $1 * interval '1 second'";

const NODE_DELETE: &str = "DELETE FROM node WHERE id = $1";

const WORKER_LIST: &str = "SELECT w.id, w.node_id, w.worker_id, w.task_types, w.slots, \
       w.labels, w.in_flight, w.draining OR n.draining AS draining, w.connected_at, \
       w.last_seen_at \
     FROM worker_session w JOIN node n ON n.id = w.node_id \
     WHERE n.last_seen_at >= now() - $1 * interval '1 second' \
     ORDER BY w.worker_id, w.connected_at, w.id";

/// Every statement of this module, for the preparation test.
#[cfg(test)]
pub(super) const STATEMENTS: &[&str] = &[
    NODE_UPSERT,
    SESSION_SYNC,
    NODE_EXPIRE,
    NODE_DELETE,
    WORKER_LIST,
];

impl Store {
    /// Records that this node is alive (and whether it is draining), and
    /// replaces its session rows by `sessions`, in one transaction.
    pub(crate) async fn node_sync(
        &self,
        node_id: Uuid,
        address: &str,
        draining: bool,
        sessions: &[SessionEntry],
    ) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute(NODE_UPSERT, &[&node_id, &address, &draining])
            .await?;
        let ids: Vec<Uuid> = sessions.iter().map(|s| s.id).collect();
        let workers: Vec<&str> = sessions.iter().map(|s| s.worker_id.as_str()).collect();
        // Text arrays of different lengths cannot be a 2-D array, so each
        // session's task types travel as a JSON array.
        let types: Vec<serde_json::Value> = sessions
            .iter()
            .map(|s| serde_json::Value::from(s.task_types.clone()))
            .collect();
        let slots: Vec<i32> = sessions.iter().map(|s| s.slots).collect();
        let in_flight: Vec<i32> = sessions.iter().map(|s| s.in_flight).collect();
        let draining_each: Vec<bool> = sessions.iter().map(|s| s.draining).collect();
        let connected: Vec<SystemTime> = sessions.iter().map(|s| s.connected_at).collect();
        let seen: Vec<SystemTime> = sessions.iter().map(|s| s.last_seen_at).collect();
        let labels: Vec<&serde_json::Value> = sessions.iter().map(|s| &s.labels).collect();
        tx.execute(
            SESSION_SYNC,
            &[
                &node_id,
                &ids,
                &workers,
                &types,
                &slots,
                &in_flight,
                &draining_each,
                &connected,
                &seen,
                &labels,
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Deletes nodes (and their sessions) that stopped refreshing their row.
    pub(crate) async fn node_expire(&self) -> Result<u64> {
        let client = self.client().await?;
        Ok(client.execute(NODE_EXPIRE, &[&NODE_EXPIRY_SECS]).await?)
    }

    /// Deletes this node's row and sessions (at shutdown).
    pub(crate) async fn node_delete(&self, node_id: Uuid) -> Result<()> {
        let client = self.client().await?;
        client.execute(NODE_DELETE, &[&node_id]).await?;
        Ok(())
    }

    /// Every session of a live node.
    pub(crate) async fn worker_list(&self) -> Result<Vec<SessionEntry>> {
        let client = self.client().await?;
        let rows = client.query(WORKER_LIST, &[&NODE_EXPIRY_SECS]).await?;
        rows.iter()
            .map(|row| {
                Ok(SessionEntry {
                    id: row.try_get("id")?,
                    node_id: row.try_get("node_id")?,
                    worker_id: row.try_get("worker_id")?,
                    task_types: row.try_get("task_types")?,
                    slots: row.try_get("slots")?,
                    labels: row.try_get("labels")?,
                    in_flight: row.try_get("in_flight")?,
                    draining: row.try_get("draining")?,
                    connected_at: row.try_get("connected_at")?,
                    last_seen_at: row.try_get("last_seen_at")?,
                })
            })
            .collect()
    }
}
