//! Background upkeep that every node runs: the lease reclaimer, and the
//! vacuumer of the task table.
//!
//! It uses the store only, and every statement it runs is safe on several
//! nodes at once (bounded batches, `SKIP LOCKED`, re-checks in the `WHERE`).

mod reclaim;
mod vacuum;

pub use reclaim::Reclaimer;
pub use vacuum::Vacuumer;
