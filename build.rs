//! Generates the gRPC code and the descriptor sets for server reflection from `proto/`, with the
//! pure-Rust `protox` compiler so that building needs no system `protoc`.

use std::{env, path::PathBuf};

const QUOTA_PROTO: &str = "proto/quota/v1/quota.proto";
/// Served by reflection only, so that grpcurl can decode the error details quotad sends.
const ERROR_DETAILS_PROTO: &str = "proto/google/rpc/error_details.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    let quota = protox::compile([QUOTA_PROTO], ["proto"])?;
    std::fs::write(out_dir.join("quota_descriptor.bin"), prost::Message::encode_to_vec(&quota))?;
    let error_details = protox::compile([ERROR_DETAILS_PROTO], ["proto"])?;
    std::fs::write(out_dir.join("error_details_descriptor.bin"), prost::Message::encode_to_vec(&error_details))?;

    tonic_prost_build::configure().compile_fds(quota)?;
    Ok(())
}
