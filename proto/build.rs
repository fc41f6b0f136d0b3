//! Generates the `switchyard.v1` messages and services. protoc comes from the
//! `protoc-bin-vendored` crate, so building needs nothing installed beyond cargo.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC when it runs.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=switchyard/v1");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("switchyard_descriptor.bin"))
        .codec_path("crate::grpc_codec::SwitchyardCodec")
        .compile_protos(
            &[
                "switchyard/v1/expert.proto",
                "switchyard/v1/inference.proto",
                "switchyard/v1/coordinator.proto",
            ],
            &["."],
        )?;
    Ok(())
}
