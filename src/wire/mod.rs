//! The wire contract of package `leasehold.v1`, shared by the server and the
//! Rust clients: the generated messages and stubs ([`proto`]), the limits
//! the proto files document ([`limit`]), the checks that turn a request into
//! domain input (`request`, over the single-field checks of `field`), and
//! the conversions of domain values and JSON into messages (`convert`,
//! `json`).
//!
//! Everything here is a pure function of a message: it must not touch the
//! database, the network or any state of a node. The server's services and
//! the clients both go through it, so a limit or a check is written once.

pub(crate) mod convert;
pub(crate) mod field;
pub(crate) mod json;
pub mod limit;
pub(crate) mod request;

/// Generated protobuf types and gRPC stubs of package `leasehold.v1`: the
/// client stubs always, the server traits with the `server` feature.
pub mod proto {
    #![allow(missing_docs, unreachable_pub, clippy::all)]
    tonic::include_proto!("leasehold.v1");

    /// Encoded descriptor set of the contract, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("leasehold_descriptor");
}
