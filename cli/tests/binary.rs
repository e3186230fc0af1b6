//! The `cloudctl` binary's usage surface. (Being an integration test of this package also
//! makes `cargo test --workspace` build the `cloudctl` binary that the end-to-end tests
//! run.)

use std::process::Command;

fn cloudctl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cloudctl"))
        .args(args)
        .env("CLOUDD_HOME", "/nonexistent/cloudctl-binary-test")
        .output()
        .unwrap()
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(cloudctl(&[]).status.code(), Some(2));
    assert_eq!(cloudctl(&["frobnicate"]).status.code(), Some(2));
    assert_eq!(
        cloudctl(&["service", "install", "--manager", "runit"])
            .status
            .code(),
        Some(2)
    );
}

#[test]
fn version_and_help_name_every_command() {
    let version = cloudctl(&["--version"]);
    assert!(version.status.success());
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("cloudctl {}", env!("CARGO_PKG_VERSION"))
    );
    let help = String::from_utf8(cloudctl(&["--help"]).stdout).unwrap();
    for command in ["up", "down", "status", "ping", "service"] {
        assert!(
            help.contains(&format!("  {command} ")),
            "help lacks {command}: {help}"
        );
    }
}

#[test]
fn down_without_a_daemon_is_not_an_error() {
    let output = cloudctl(&["down"]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "cloudd is not running"
    );
}
