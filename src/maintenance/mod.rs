//! Background upkeep that every node runs: today the lease reclaimer.
//!
//! It uses the store only, and every statement it runs is safe on several
//! nodes at once (bounded batches, `SKIP LOCKED`, re-checks in the `WHERE`).

mod reclaim;

pub use reclaim::Reclaimer;
