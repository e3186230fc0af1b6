//! The `cloudd` binary's own flags. (Being an integration test of this package also makes
//! `cargo test --workspace` build the `cloudd` binary that the end-to-end tests run.)

use std::process::Command;

#[test]
fn version_and_help() {
    let version = Command::new(env!("CARGO_BIN_EXE_cloudd"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(version.status.success());
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("cloudd {}", env!("CARGO_PKG_VERSION"))
    );
    let unknown = Command::new(env!("CARGO_BIN_EXE_cloudd"))
        .arg("--frobnicate")
        .output()
        .unwrap();
    assert_eq!(unknown.status.code(), Some(2), "usage errors exit 2");
}

#[test]
fn an_unusable_home_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("cloudd-binary-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A file where the state directory should be.
    std::fs::write(dir.join("state"), "not a directory").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_cloudd"))
        .env("CLOUDD_HOME", &dir)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with("cloudd: error: cannot create"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
