//! Compiles `preflight/v1/*.proto` with protox (pure Rust: no system `protoc` needed), then
//! generates prost types, tonic stubs, proto3-JSON serde impls (pbjson) and the encoded
//! descriptor set that server reflection serves.
use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=preflight");
    let fds = protox::compile(["preflight/v1/preflight.proto"], ["."])?;
    let bytes = fds.encode_to_vec();
    fs::write(out.join("preflight_descriptor.bin"), &bytes)?;

    let mut config = prost_build::Config::new();
    config.compile_well_known_types();
    config.extern_path(".google.protobuf", "::pbjson_types");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds_with_config(fds, config)?;

    pbjson_build::Builder::new()
        .register_descriptors(&bytes)?
        .build(&[".preflight"])?;
    Ok(())
}
