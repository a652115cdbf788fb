//! The deployment files under `deploy/`: every Kubernetes variant renders and
//! validates offline against the Kubernetes API schemas, the route file
//! mounted into oboe names only files that its volumes provide, and the real
//! `oboe check` accepts each route file.
//!
//! The rendering and validation live in `scripts/validate-manifests.py`
//! (Python, for the `kubernetes-validate` package's bundled schemas;
//! `scripts/test-deps.sh` installs it).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::harness::oboe_command;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs the validation script on a `deploy/` directory.
fn validate_manifests(deploy_dir: &Path) -> Output {
    Command::new("python3")
        .arg(repo().join("scripts/validate-manifests.py"))
        .arg(deploy_dir)
        .stdin(Stdio::null())
        .output()
        .expect("run python3 scripts/validate-manifests.py (install with scripts/test-deps.sh)")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create directory");
    for entry in std::fs::read_dir(from).expect("read directory") {
        let entry = entry.expect("directory entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy file");
        }
    }
}

/// Every `oboe.yaml` under `deploy/kubernetes`, one per variant.
fn route_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read directory") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            route_files(&path, found);
        } else if path.file_name().is_some_and(|n| n == "oboe.yaml") {
            found.push(path);
        }
    }
}

#[test]
fn every_kubernetes_variant_renders_and_validates_offline() {
    let out = validate_manifests(&repo().join("deploy"));

    assert!(
        out.status.success(),
        "deploy/ fails validation:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    for variant in [
        "kubernetes:",
        "workload-identity:",
        "certificate:",
        "shared-cache:",
        "monitoring:",
    ] {
        assert!(
            stdout.contains(variant),
            "{variant} not rendered:\n{stdout}"
        );
    }
}

#[test]
fn a_route_file_naming_a_secret_outside_the_volume_mounts_fails_validation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let deploy = dir.path().join("deploy");
    copy_dir(&repo().join("deploy"), &deploy);
    let route_file = deploy.join("kubernetes/oboe.yaml");
    let original = std::fs::read_to_string(&route_file).expect("read oboe.yaml");
    let moved = original.replace(
        "/var/run/secrets/oboe/client-secret",
        "/var/run/secrets/elsewhere/client-secret",
    );
    assert_ne!(moved, original, "oboe.yaml no longer names the secret file");
    std::fs::write(&route_file, moved).expect("write oboe.yaml");

    let out = validate_manifests(&deploy);

    assert!(!out.status.success(), "{}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("identity.credential.client_secret.file")
            && stderr.contains("/var/run/secrets/elsewhere/client-secret"),
        "{stderr}"
    );
}

#[test]
fn oboe_check_passes_on_every_route_file_in_deploy() {
    let mut files = Vec::new();
    route_files(&repo().join("deploy/kubernetes"), &mut files);
    assert!(
        files.len() >= 3,
        "expected one route file per variant, found {files:?}"
    );
    for path in files {
        let out = oboe_command()
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .expect("run oboe check");
        assert!(
            out.status.success(),
            "{} fails `oboe check`:\n{}",
            path.display(),
            text(&out.stderr)
        );
    }
}
