//! The gRPC surface: each call checks its request into domain input
//! ([`crate::wire`]'s `request`), calls the [`Coordinator`], and converts
//! the answer back. No SQL and no policy here: the limits are the wire
//! contract's, the decisions the coordinator's, and every error reaches the
//! client through [`crate::error::Error`]'s one mapping. A layer around all
//! services counts and times every call (`metrics`), another checks its
//! token and role (`auth`).
//!
//! [`Coordinator`]: crate::coordinator::Coordinator

mod auth;
mod connect;
mod metrics;
mod task;
mod token;
mod worker;

pub(crate) use auth::AuthLayer;
pub(crate) use metrics::CallMetricsLayer;
pub(crate) use task::TaskApi;
pub(crate) use token::TokenApi;
pub(crate) use worker::WorkerApi;
