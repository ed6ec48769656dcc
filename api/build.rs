//! Generates the gRPC code from `proto/lockstep.proto` with the vendored protoc, so building
//! needs no protoc on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().compile_with_config(
        config,
        &["proto/lockstep.proto"],
        &["proto"],
    )?;
    println!("cargo:rerun-if-changed=proto/lockstep.proto");
    Ok(())
}
