//! The limits of the wire contract, as the proto files document them. The
//! server enforces them; clients read them to split or cap what they send
//! instead of copying the numbers.

use std::time::Duration;

/// Longest task type, in characters.
pub const TASK_TYPE_MAX_CHARS: usize = 64;
/// Longest worker id, in characters.
pub const WORKER_ID_MAX_CHARS: usize = 100;
/// Longest dedup key, in characters.
pub const DEDUP_KEY_MAX_CHARS: usize = 255;
/// Longest cancellation reason, in characters.
pub const REASON_MAX_CHARS: usize = 1000;
/// Longest error text of a failed attempt, in characters.
pub const ERROR_MAX_CHARS: usize = 65_536;
/// Largest `max_attempts`.
pub const MAX_ATTEMPTS_LIMIT: i32 = 1000;
/// The attempts a task gets when `max_attempts` is 0.
pub const DEFAULT_MAX_ATTEMPTS: i32 = 3;
/// Most tasks in one CreateTasks call.
pub const MAX_BATCH: usize = 10_000;
/// Most tasks one AcquireTasks call asks for.
pub const MAX_CLAIM: i32 = 1000;
/// Most outcomes in one `outcomes` message of a session.
pub const MAX_OUTCOMES: usize = 1000;
/// About the largest `outcomes` message a client sends, in encoded bytes
/// (a larger outcome goes alone): well inside the server's message limit,
/// whatever the outcomes' results and errors.
pub const MAX_OUTCOME_BATCH_BYTES: usize = 1024 * 1024;
/// About the largest `tasks` message a session gets, in encoded bytes: a
/// push of more is split, and a larger task comes alone.
pub const MAX_PUSH_BYTES: usize = 1024 * 1024;
/// Most leases in one heartbeat.
pub const MAX_HEARTBEAT_LEASES: usize = 10_000;
/// Longest long-poll wait of AcquireTasks.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// Longest `retry_after` of a failed attempt.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(30 * 24 * 3600);
/// Tasks per ListTasks page when `page_size` is 0.
pub const DEFAULT_PAGE_SIZE: i32 = 50;
/// Most tasks per ListTasks page.
pub const MAX_PAGE_SIZE: i32 = 1000;
/// Most values in one list filter (task types, statuses, task ids).
pub const MAX_FILTER_VALUES: usize = 1000;
/// Most slots of one session.
pub const MAX_SLOTS: i32 = 10_000;
/// Most labels of one session.
pub const MAX_LABELS: usize = 64;
/// Longest label key or value, in characters.
pub const LABEL_MAX_CHARS: usize = 256;
/// Longest progress message, in characters.
pub const PROGRESS_MESSAGE_MAX_CHARS: usize = 1000;
/// Shortest lease.
pub const MIN_LEASE: Duration = Duration::from_secs(1);
/// Longest lease.
pub const MAX_LEASE: Duration = Duration::from_secs(3600);
