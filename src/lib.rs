//! Leasehold: a gRPC server that hands out tasks to workers as time-limited
//! leases, backed by Postgres.
//!
//! Layers, with dependencies pointing one way: [`api`] (tonic services) ->
//! [`service`] and [`dispatch`] (domain) -> [`store`] (Postgres).
//! [`maintenance`] uses the store only.

pub mod api;
pub mod bench;
pub mod cli;
pub mod client;
pub mod config;
pub mod dispatch;
pub mod error;
pub mod events;
pub mod maintenance;
pub mod runner;
pub mod server;
pub mod service;
pub mod signal;
pub mod store;
pub mod task;
pub mod telemetry;

/// Generated protobuf types and gRPC stubs of package `leasehold.v1`.
pub mod proto {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("leasehold.v1");

    /// Encoded descriptor set of the contract, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("leasehold_descriptor");
}
