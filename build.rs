//! Generates the gRPC code and the descriptor sets for server reflection from `proto/`, with the
//! pure-Rust `protox` compiler so that building needs no system `protoc`.

use std::{env, path::PathBuf};

const QUOTA_PROTO: &str = "proto/quota/v1/quota.proto";
/// Served by reflection only, so that grpcurl can decode the error details quotad sends.
const ERROR_DETAILS_PROTO: &str = "proto/google/rpc/error_details.proto";
/// Where the generated code finds the `google.rpc` messages `quota.proto` imports.
const GOOGLE_RPC_TYPES: &str = "::tonic_types::pb";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    let quota = protox::compile([QUOTA_PROTO], ["proto"])?;
    std::fs::write(out_dir.join("quota_descriptor.bin"), prost::Message::encode_to_vec(&quota))?;
    let error_details = protox::compile([ERROR_DETAILS_PROTO], ["proto"])?;
    std::fs::write(out_dir.join("error_details_descriptor.bin"), prost::Message::encode_to_vec(&error_details))?;

    // Messages and clients, with prost's codec. `google.rpc.Status` (a batch item's refusal) is the
    // type tonic-types builds every refusal's details with, so an item's error is the unary one as is.
    tonic_prost_build::configure()
        .build_server(false)
        .extern_path(".google.rpc", GOOGLE_RPC_TYPES)
        .compile_fds(quota.clone())?;
    // Servers alone (the messages are the ones above), with a codec that answers a request body that is
    // not its message with INVALID_ARGUMENT rather than prost's INTERNAL: the fault is the client's.
    let server_out = out_dir.join("server");
    std::fs::create_dir_all(&server_out)?;
    tonic_prost_build::configure()
        .build_client(false)
        .out_dir(&server_out)
        .extern_path(".quota.v1", "crate::proto")
        .extern_path(".google.rpc", GOOGLE_RPC_TYPES)
        .codec_path("crate::grpc::codec::RequestCodec")
        .compile_fds(quota)?;
    Ok(())
}
