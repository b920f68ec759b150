//! The node directory: each node keeps its own row and its sessions' rows
//! fresh (for ListWorkers), deletes them when it stops, and expires the rows
//! of nodes that stopped refreshing theirs. A view for operators, never a
//! source of truth for leases.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use uuid::Uuid;

use super::Job;
use crate::model::SessionEntry;
use crate::store::{self, Store};

/// How often the node refreshes its rows when nothing changes.
const INTERVAL: Duration = Duration::from_secs(5);

/// What the directory records about this node, read at every pass.
#[derive(Debug, Clone)]
pub(crate) struct NodeState {
    pub(crate) draining: bool,
    pub(crate) sessions: Vec<SessionEntry>,
}

/// Keeps this node's directory rows up to date.
pub(crate) struct Directory {
    store: Store,
    node_id: Uuid,
    address: String,
    state: Box<dyn Fn() -> NodeState + Send + Sync>,
    changed: Arc<Notify>,
}

impl std::fmt::Debug for Directory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Directory")
            .field("node_id", &self.node_id)
            .field("address", &self.address)
            .finish()
    }
}

impl Directory {
    /// The directory of node `node_id`, listening on `address`: `state`
    /// tells what to record, and `changed` fires when it changed (a
    /// session came or went), so rows follow at once.
    pub(crate) fn new(
        store: Store,
        node_id: Uuid,
        address: String,
        state: impl Fn() -> NodeState + Send + Sync + 'static,
        changed: Arc<Notify>,
    ) -> Self {
        Self {
            store,
            node_id,
            address,
            state: Box::new(state),
            changed,
        }
    }
}

impl Job for Directory {
    const NAME: &'static str = "directory";

    async fn pass(&mut self) -> Result<Duration, store::Error> {
        let state = (self.state)();
        let synced = self
            .store
            .node_sync(self.node_id, &self.address, state.draining, &state.sessions)
            .await;
        // Dead nodes are expired even when this node's own rows could not
        // be written.
        let expired = self.store.node_expire().await;
        synced?;
        expired?;
        Ok(INTERVAL)
    }

    fn retry_after(&self, _failures: u32) -> Duration {
        INTERVAL
    }

    async fn wait(&mut self, delay: Duration) {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = self.changed.notified() => {}
        }
    }

    async fn stop(&mut self) {
        if let Err(err) = self.store.node_delete(self.node_id).await {
            tracing::debug!(error = %err, "cannot remove the node from the directory");
        }
    }
}
