//! Bearer tokens and what they allow.

use std::time::SystemTime;

use uuid::Uuid;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Role {
    /// WorkerService, limited to the token's task types when it has some.
    Worker,
    /// TaskService's producer calls: create, get, list, stats, watch.
    Producer,
    /// Everything.
    Admin,
}

impl Role {
    /// The name stored in the database and shown by the CLI.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Role::Worker => "worker",
            Role::Producer => "producer",
            Role::Admin => "admin",
        }
    }

    /// The role of a stored or typed name.
    pub(crate) fn parse(name: &str) -> Option<Role> {
        match name {
            "worker" => Some(Role::Worker),
            "producer" => Some(Role::Producer),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// A token as stored (never its secret).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Token {
    pub(crate) id: Uuid,
    pub(crate) role: Role,
    /// For a worker token, the only task types it may ask for; empty: any.
    pub(crate) task_types: Vec<String>,
    pub(crate) description: String,
    pub(crate) created_at: SystemTime,
    pub(crate) expires_at: Option<SystemTime>,
    pub(crate) revoked_at: Option<SystemTime>,
}

impl Token {
    /// Whether the token works at `now`: not revoked, not expired.
    pub(crate) fn is_valid_at(&self, now: SystemTime) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|at| now < at)
    }

    /// Whether a worker holding this token may ask for `task_types` (empty:
    /// any type, which only an unlimited token may).
    pub(crate) fn allows_task_types(&self, task_types: &[String]) -> bool {
        if self.task_types.is_empty() {
            return true;
        }
        !task_types.is_empty() && task_types.iter().all(|t| self.task_types.contains(t))
    }
}

/// A token to create.
#[derive(Debug, Clone)]
pub(crate) struct NewToken {
    pub(crate) role: Role,
    pub(crate) task_types: Vec<String>,
    pub(crate) description: String,
    pub(crate) expires_at: Option<SystemTime>,
}
