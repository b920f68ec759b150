//! The domain model: tasks, leases, events and worker sessions as the rest
//! of the code sees them.
//!
//! Plain data, free of SQL and of protobuf: the store fills these from rows,
//! the wire contract ([`crate::wire`]) turns requests into them and them into
//! answers, and the coordinator decides what a call does with them. It must
//! never do I/O or know where a value came from.

pub(crate) mod event;
pub(crate) mod session;
pub(crate) mod task;
pub(crate) mod token;

pub(crate) use event::{Event, EventFilter, EventKind};
pub(crate) use session::{CancelReason, SessionEntry, SessionSpec};
pub(crate) use task::*;
pub(crate) use token::{NewToken, Role, Token};
