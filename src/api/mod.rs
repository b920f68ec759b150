//! The gRPC surface: each call checks its request into domain input
//! ([`crate::wire`]'s `request`), calls the [`Coordinator`], and converts
//! the answer back. No SQL and no policy here: the limits are the wire
//! contract's, the decisions the coordinator's, and every error reaches the
//! client through [`crate::error::Error`]'s one mapping.
//!
//! [`Coordinator`]: crate::coordinator::Coordinator

mod connect;
mod task;
mod worker;

pub(crate) use task::TaskApi;
pub(crate) use worker::WorkerApi;
