//! The gRPC surface: decode and validate requests, call the domain, encode
//! answers. No SQL here, and no policy beyond the wire contract's limits.

pub mod convert;
pub(crate) mod session;
mod task_service;
pub mod validate;
mod worker_service;

pub use task_service::TaskApi;
pub use worker_service::WorkerApi;
