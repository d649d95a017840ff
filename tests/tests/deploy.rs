//! The manifests in deploy/ are valid: Kubernetes' kinds and the CRDs against the
//! Kubernetes API schemas, weft's examples against the CRDs (deploy/validate.py, with
//! PyPI's kubernetes-validate, which `cargo xtask setup` installs into target/pypi).

use std::process::Command;

#[test]
fn every_manifest_in_deploy_validates() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("python3")
        .arg(root.join("deploy/validate.py"))
        .env("PYTHONPATH", root.join("target/pypi"))
        .output()
        .expect("running python3");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("No module named"),
        "deploy/validate.py needs kubernetes-validate in target/pypi: run `cargo xtask setup`\n{text}"
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains(", 0 invalid"), "{text}");
    println!("{text}");
}
