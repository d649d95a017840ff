//! Builds the eBPF object (ebpf/, nightly, bpfel-unknown-none) into OUT_DIR with aya-build.
//! `AYA_BUILD_SKIP=1` skips it so `cargo check` and clippy run without bpf-linker; an
//! empty placeholder object is written then, which the agent refuses to load.

use anyhow::{anyhow, Context as _};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    let ebpf = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ebpf");
    let root_dir = ebpf
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {ebpf:?}"))?;
    let package = aya_build::Package {
        name: "weft-ebpf",
        root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::default()).context(
        "building the eBPF programs (run `cargo xtask setup` if bpf-linker or the nightly rust-src is missing)",
    )?;
    let object = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("weft");
    if !object.exists() {
        std::fs::write(&object, b"").context("writing the placeholder eBPF object")?;
    }
    Ok(())
}
