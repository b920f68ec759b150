//! Leasehold: a gRPC server that hands out tasks to workers as time-limited
//! leases, backed by Postgres, and the Rust clients of it.
//!
//! What a build holds is chosen with cargo features, so that a program that
//! only talks to a server never compiles the server's database stack:
//!
//! | feature | adds | on top of |
//! |---|---|---|
//! | (none) | [`wire`]: the contract's messages, stubs and limits | tonic, prost |
//! | `client` | [`client`]: `Client` for producers and operators, `Worker` for handlers | tokio |
//! | `cli` | the operator commands and the command runner (`leasehold task`, `worker`) | clap |
//! | `server` (default) | the node: [`server`], its [`config`], `leasehold serve` and `bench` | tokio-postgres, deadpool, refinery |
//!
//! A Rust worker or producer depends on
//! `leasehold = { version = "0.1", default-features = false, features = ["client"] }`.
//!
//! Inside the server, dependencies point one way: `api` (tonic services)
//! -> `coordinator` (the domain) -> `dispatch` -> `store` (the only module
//! that knows SQL); `maintenance` jobs use the store only; everything
//! shares the plain data of `model` and the contract of [`wire`].
//! `ARCHITECTURE.md` has the whole map and the invariants.

#![warn(missing_docs, unreachable_pub)]

// The contract, the model and the error are shared by the server and the
// clients; what only the server uses of them (answers, events, directory
// entries, most checks) is unused in a client-only build, which must not
// fail for it. The default build compiles everything and checks it all.
#[cfg_attr(not(feature = "server"), allow(dead_code))]
mod error;
#[cfg_attr(not(feature = "server"), allow(dead_code))]
mod model;
#[cfg_attr(not(feature = "server"), allow(dead_code))]
pub mod wire;

pub use wire::proto;

#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "client")]
pub mod signal;

#[cfg(feature = "cli")]
pub mod cli;
#[cfg(feature = "cli")]
pub mod runner;
#[cfg(feature = "cli")]
pub mod telemetry;

#[cfg(feature = "server")]
mod api;
#[cfg(feature = "server")]
mod auth;
#[cfg(feature = "server")]
pub mod bench;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
mod coordinator;
#[cfg(feature = "server")]
mod dispatch;
#[cfg(feature = "server")]
mod events;
#[cfg(feature = "server")]
mod maintenance;
#[cfg(feature = "server")]
mod metrics;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
mod store;
#[cfg(all(test, feature = "server"))]
mod testing;
#[cfg(feature = "server")]
mod tls;
