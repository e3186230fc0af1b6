//! `cloudctl` against the real daemon: start, query, stop, auto-start, singleton, and
//! recovery from `kill -9`.

use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};

use cloudd_e2e::{binary, wait_for, Home, DEADLINE};

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn up_status_ping_down() {
    let home = Home::new();
    let up = home.cloudctl_json(&["up"]);
    assert_eq!(up["started"], true, "{up}");
    let pid = up["pid"].as_u64().unwrap();

    let again = home.cloudctl_json(&["up"]);
    assert_eq!(
        again["started"], false,
        "up must be a no-op when cloudd runs: {again}"
    );
    assert_eq!(again["pid"].as_u64(), Some(pid));

    let status = home.cloudctl_json(&["status"]);
    assert_eq!(status["pid"].as_u64(), Some(pid));
    assert_eq!(status["state"], "ready");
    assert_eq!(status["protocol"], 1);
    assert_eq!(status["socket"], home.paths.socket.display().to_string());
    let log_file = status["log_file"]
        .as_str()
        .expect("a detached daemon logs to a file");
    assert!(std::path::Path::new(log_file).starts_with(&home.paths.state_dir));
    assert!(std::fs::read_to_string(log_file)
        .unwrap()
        .contains("cloudd ready"));

    let text = home.cloudctl_ok(&["status"]);
    assert!(
        text.starts_with(&format!("cloudd     running (pid {pid}")),
        "{text}"
    );

    let ping = home.cloudctl_json(&["ping", "--count", "50"]);
    assert_eq!(ping["count"], 50);
    assert!(ping["median_us"].as_f64().unwrap() > 0.0);

    // Security by default: the socket directory and the socket are private.
    assert_eq!(mode(home.paths.socket_dir()), 0o700);
    assert_eq!(mode(&home.paths.socket), 0o600);
    assert_eq!(mode(&home.paths.state_dir), 0o700);

    let down = home.cloudctl_json(&["down"]);
    assert_eq!(down["stopped"], true);
    assert_eq!(down["pid"].as_u64(), Some(pid));
    assert!(!home.paths.socket.exists(), "the socket is removed on exit");
    assert!(!cloudctl::launcher::process_exists(pid as u32));

    let down_again = home.cloudctl_ok(&["down"]);
    assert_eq!(down_again.trim(), "cloudd is not running");
}

#[test]
fn commands_auto_start_the_daemon() {
    let home = Home::new();
    let output = home.cloudctl(&["ping"]);
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stdout.starts_with("pong from cloudd"), "{stdout}");
    assert!(stderr.contains("started cloudd"), "{stderr}");
    home.cloudctl_ok(&["down"]);
}

#[test]
fn usage_errors_exit_2_and_failures_exit_1() {
    let home = Home::new();
    assert_eq!(home.cloudctl(&["frobnicate"]).status.code(), Some(2));
    assert_eq!(
        home.cloudctl(&["ping", "--count", "0"]).status.code(),
        Some(2)
    );

    // A config file that does not parse stops the start with the parser's words.
    std::fs::create_dir_all(&home.paths.config_dir).unwrap();
    std::fs::write(home.paths.config_file(), "max_clients = \"many\"\n").unwrap();
    let output = home.cloudctl(&["status"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("invalid config file") && stderr.contains("max_clients"),
        "{stderr}"
    );
}

#[test]
fn a_second_daemon_names_the_first_and_fails() {
    let home = Home::new();
    let first = home.spawn_daemon();
    let output = home.cloudd_command().output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("already running (pid {})", first.pid())),
        "{stderr}"
    );
    // The first one is undisturbed.
    home.cloudctl_ok(&["ping"]);
}

#[test]
fn kill_9_leaves_a_stale_socket_that_the_next_start_replaces() {
    let home = Home::new();
    let mut daemon = home.spawn_daemon();
    let old_pid = daemon.pid();
    daemon.signal(libc::SIGKILL);
    daemon.wait_exit(DEADLINE);
    let metadata = std::fs::symlink_metadata(&home.paths.socket).expect("stale socket left behind");
    assert!(metadata.file_type().is_socket());

    let status = home.cloudctl_json(&["status"]);
    let new_pid = status["pid"].as_u64().unwrap() as u32;
    assert_ne!(new_pid, old_pid);
    assert_eq!(status["state"], "ready");
    home.cloudctl_ok(&["down"]);
}

#[test]
fn up_foreground_refuses_when_running() {
    let home = Home::new();
    let _daemon = home.spawn_daemon();
    let output = home.cloudctl(&["up", "--foreground"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("already running"));
}

#[test]
fn a_client_of_another_uid_is_refused_and_logged() {
    let home = Home::new();
    let _daemon = home.spawn_daemon();
    // uid 65534 ("nobody") with CAP_DAC_OVERRIDE, so the file modes (0700 directory, 0600
    // socket) do not stop it first and the daemon's own uid check is what refuses it.
    let output = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=+dac_override",
            "--ambient-caps=+dac_override",
        ])
        .arg(binary("cloudctl"))
        .arg("ping")
        .env("CLOUDD_HOME", home.path())
        .env("CLOUDD_BIN", binary("cloudd"))
        .output()
        .expect("setpriv (util-linux) is needed for this test");
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("permission denied: peer uid 65534 is not the daemon's uid 0"),
        "{stderr}"
    );
    wait_for("the refusal in the daemon's log", DEADLINE, || {
        home.read_daemon_log()
            .contains("refused connection: peer uid 65534")
    });

    // Without the capability the file modes stop it before it reaches the daemon.
    let output = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(binary("cloudctl"))
        .arg("ping")
        .env("CLOUDD_HOME", home.path())
        .env("CLOUDD_BIN", binary("cloudd"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");

    // The daemon's own user is still served.
    home.cloudctl_ok(&["ping"]);
}

#[test]
fn allow_input_that_is_not_a_json_object_is_a_usage_error() {
    let home = Home::new();
    for (input, says) in [("not json", "not JSON"), ("[1, 2]", "not a JSON object")] {
        let output = home.cloudctl(&["allow", "s-1", "req-1", "--input", input]);
        assert_eq!(output.status.code(), Some(2), "{output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(&format!("invalid value '{input}' for '--input <INPUT>'"))
                && stderr.contains(says),
            "{stderr}"
        );
    }
    // Checked before the daemon is contacted: none was started.
    assert_eq!(home.daemon_pid(), None);
    assert!(!home.paths.socket.exists());
}
