//! The Neovim plugin (editors/nvim) against the real daemon and relay (issue 10, points 3
//! and 5): `nvim --headless` runs the plugin's own Lua tests (editors/nvim/tests), which list
//! sessions, follow one with replay, answer permission prompts, teleport, and live through
//! a daemon restart. This file only sets the stage (a standalone relay, a logged-in home
//! whose daemon is then stopped, so the plugin must start it) and checks the exit code.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use cloudd_e2e::{binary, Home, Relay};

/// The repository's editors/nvim directory.
fn plugin_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../editors/nvim")
        .canonicalize()
        .expect("editors/nvim exists")
}

/// `nvim --version`'s first line; fails the test (never skips it) when nvim is missing.
fn nvim_version() -> String {
    let output = Command::new("nvim")
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "nvim is not installed ({e}): the Neovim plugin's tests need it; install it \
                 with `apt-get install -y neovim` (.ci/run does this in CI)"
            )
        });
    assert!(output.status.success(), "nvim --version failed: {output:?}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

#[test]
fn the_neovim_plugin_lists_follows_answers_prompts_and_survives_a_daemon_restart() {
    let version = nvim_version();
    let relay = Relay::start();
    let home = Home::new();
    let token = relay.token("ann", "acme");
    home.cloudctl_ok(&["login", "--relay", &relay.url(), "--token", &token]);
    home.wait_connected();
    // The plugin must start the daemon itself (`cloudctl up`) when it is absent.
    home.cloudctl_ok(&["down"]);

    let dir = plugin_dir();
    let output = Command::new("nvim")
        .args(["--headless", "-u", "NONE", "-i", "NONE", "-n"])
        .arg("--cmd")
        .arg(format!("set rtp^={}", dir.display()))
        .arg("-c")
        .arg(format!("luafile {}", dir.join("tests/run.lua").display()))
        .env("CLOUDD_HOME", home.path())
        .env_remove("CLOUDD_SOCKET")
        .env_remove("CLOUDD_LOG")
        .env("CLOUDD_BIN", binary("cloudd"))
        .env("CLOUDCTL", binary("cloudctl"))
        .env("TMPDIR", home.path())
        .stdin(Stdio::null())
        .output()
        .expect("run nvim");
    let report = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the plugin's tests failed under {version} ({}):\n{report}\nstdout: {}\n--- daemon log:\n{}\n--- relay log (tail):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        std::fs::read_to_string(home.paths.log_file()).unwrap_or_default(),
        tail(&relay.log(), 40),
    );
    assert!(report.contains("# 10 passed, 0 failed"), "{report}");
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
