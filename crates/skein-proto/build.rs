//! Compiles `proto/` with protox (pure Rust), so building Skein needs no
//! system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Where this package is now (not where the build script was compiled).
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = ["skein/v1/raft.proto", "skein/v1/admin.proto"];
    let fds = protox::compile(files, [&root])?;
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    for f in files {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    Ok(())
}
