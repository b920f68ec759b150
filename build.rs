//! Compiles the protobuf contract with protox (no system `protoc` needed)
//! and writes the descriptor set that gRPC server reflection serves. The
//! server traits are generated only for the `server` feature: clients
//! compile the messages and client stubs alone.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "proto/leasehold/v1/task.proto",
    "proto/leasehold/v1/task_service.proto",
    "proto/leasehold/v1/worker_service.proto",
    "proto/leasehold/v1/token_service.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    // refinery embeds migrations at compile time; without this a new file in
    // migrations/ would not trigger a rebuild and would be silently skipped.
    println!("cargo:rerun-if-changed=migrations");

    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(PROTOS)?;
    let fds = compiler.file_descriptor_set();

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("leasehold_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(std::env::var_os("CARGO_FEATURE_SERVER").is_some())
        // `connect` would clash with the `Connect` RPC; clients use `new(channel)`.
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
