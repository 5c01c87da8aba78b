//! Generates the gRPC code from `proto/` without a system `protoc`: protox parses the
//! files into a descriptor set, tonic-build generates from it, and the set itself is
//! written next to the code for server reflection.

use std::path::PathBuf;

use prost::Message;

const PROTO_ROOT: &str = "proto";
const PROTO_FILE: &str = "proto/mplug_search/v1/search.proto";
const DESCRIPTOR_FILE: &str = "mplug_search_v1_descriptor.bin";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");

    let fds = protox::compile([PROTO_FILE], [PROTO_ROOT])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join(DESCRIPTOR_FILE), fds.encode_to_vec())?;

    tonic_build::configure()
        .codec_path("crate::server::codec::ApiCodec")
        .compile_fds(fds)?;
    Ok(())
}
