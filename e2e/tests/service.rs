//! Running at login: the generated systemd units and launchd plist, `service install` and
//! `uninstall` plans (snapshots), socket activation, readiness notifications, and the
//! restart of a daemon whose binary was upgraded.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cloudd_e2e::{binary, wait_for, Home, JsonClient, DEADLINE};
use serde_json::Value;

/// A `cloudctl` with a controlled environment: a fake HOME and runtime dir under `root`,
/// no graphical session, and none of the variables that move cloudd's files.
fn cloudctl_in(root: &Path) -> Command {
    let mut command = Command::new(binary("cloudctl"));
    for name in [
        "CLOUDD_HOME",
        "CLOUDD_SOCKET",
        "CLOUDD_LOG",
        "XDG_CONFIG_HOME",
        "XDG_STATE_HOME",
        "DISPLAY",
        "WAYLAND_DISPLAY",
        "XDG_SESSION_TYPE",
    ] {
        command.env_remove(name);
    }
    command
        .env("HOME", root.join("home"))
        .env("XDG_RUNTIME_DIR", root.join("run"))
        .env("CLOUDD_BIN", binary("cloudd"));
    command
}

fn plan(root: &Path, args: &[&str]) -> (String, Value) {
    let text = cloudctl_in(root).args(args).output().unwrap();
    assert!(text.status.success(), "{text:?}");
    let json = cloudctl_in(root).arg("--json").args(args).output().unwrap();
    assert!(json.status.success(), "{json:?}");
    (
        String::from_utf8(text.stdout).unwrap(),
        serde_json::from_slice(&json.stdout).unwrap(),
    )
}

/// The files a plan writes: (path, contents).
fn written_files(plan: &Value) -> Vec<(PathBuf, String)> {
    plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|step| {
            Some((
                PathBuf::from(step.get("write")?.as_str()?),
                step["contents"].as_str()?.to_owned(),
            ))
        })
        .collect()
}

fn check_snapshot(name: &str, actual: &str, root: &Path) {
    let normalised = actual
        .replace(&binary("cloudd").display().to_string(), "{CLOUDD}")
        .replace(&root.display().to_string(), "{ROOT}");
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(format!("{name}.txt"));
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, &normalised).unwrap();
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "missing snapshot {}; run with UPDATE_SNAPSHOTS=1",
            path.display()
        )
    });
    assert_eq!(
        normalised, expected,
        "snapshot {name} differs (UPDATE_SNAPSHOTS=1 rewrites it)"
    );
}

#[test]
fn dry_runs_match_their_snapshots_and_write_nothing() {
    let root = tempfile::tempdir().unwrap();
    for (name, args) in [
        (
            "systemd-install",
            &["service", "install", "--dry-run", "--manager", "systemd"][..],
        ),
        (
            "systemd-uninstall",
            &["service", "uninstall", "--dry-run", "--manager", "systemd"],
        ),
        (
            "launchd-install",
            &["service", "install", "--dry-run", "--manager", "launchd"],
        ),
        (
            "launchd-uninstall",
            &["service", "uninstall", "--dry-run", "--manager", "launchd"],
        ),
    ] {
        let (text, _) = plan(root.path(), args);
        check_snapshot(name, &text, root.path());
    }
    assert!(
        !root.path().join("home").exists(),
        "a dry run writes nothing"
    );
}

#[test]
fn generated_units_pass_systemd_analyze_verify() {
    let root = tempfile::tempdir().unwrap();
    let (_, install) = plan(
        root.path(),
        &["service", "install", "--dry-run", "--manager", "systemd"],
    );
    let files = written_files(&install);
    let names: Vec<_> = files
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["cloudd.service", "cloudd.socket"]);
    let unit_dir = root.path().join("units");
    std::fs::create_dir_all(&unit_dir).unwrap();
    let runtime = root.path().join("run");
    std::fs::create_dir_all(&runtime).unwrap();
    let mut verify = Command::new("systemd-analyze");
    verify
        .args(["--user", "verify"])
        .env("XDG_RUNTIME_DIR", &runtime);
    for (path, contents) in &files {
        let unit = unit_dir.join(path.file_name().unwrap());
        std::fs::write(&unit, contents).unwrap();
        verify.arg(unit);
    }
    let output = verify
        .output()
        .expect("systemd-analyze (package systemd) is needed");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );

    let service = &files[0].1;
    for line in [
        "Type=notify",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ProtectSystem=strict",
        "WantedBy=default.target",
    ] {
        assert!(
            service.lines().any(|l| l == line),
            "cloudd.service lacks {line}"
        );
    }
    let socket = &files[1].1;
    assert!(
        socket
            .lines()
            .any(|l| l == "ListenStream=%t/cloudd/cloudd.sock"),
        "{socket}"
    );
    assert!(socket.contains("SocketMode=0600"));
}

#[test]
fn the_plist_parses_and_has_the_required_keys() {
    let root = tempfile::tempdir().unwrap();
    let (_, install) = plan(
        root.path(),
        &["service", "install", "--dry-run", "--manager", "launchd"],
    );
    let files = written_files(&install);
    assert_eq!(files.len(), 1);
    let (path, contents) = &files[0];
    assert!(path.ends_with("Library/LaunchAgents/dev.cloudd.agent.plist"));
    let plist = plist::Value::from_reader_xml(contents.as_bytes()).expect("valid plist XML");
    let dict = plist.as_dictionary().unwrap();
    assert_eq!(dict["Label"].as_string(), Some("dev.cloudd.agent"));
    let program = dict["ProgramArguments"].as_array().unwrap();
    assert_eq!(
        program[0].as_string(),
        Some(binary("cloudd").to_str().unwrap())
    );
    assert_eq!(dict["RunAtLoad"].as_boolean(), Some(true));
    let keep_alive = dict["KeepAlive"].as_dictionary().unwrap();
    assert_eq!(
        keep_alive["SuccessfulExit"].as_boolean(),
        Some(false),
        "restarted on crash only"
    );
    for key in ["StandardOutPath", "StandardErrorPath"] {
        assert!(dict[key]
            .as_string()
            .unwrap()
            .ends_with("Library/Logs/cloudd/cloudd.log"));
    }
    let environment = dict["EnvironmentVariables"].as_dictionary().unwrap();
    assert_eq!(
        environment["CLOUDD_SOCKET"].as_string(),
        Some(root.path().join("run/cloudd/cloudd.sock").to_str().unwrap())
    );
}

#[test]
fn a_socket_activated_daemon_answers_on_the_passed_socket() {
    let home = Home::new();
    let socket = home.path().join("activated.sock");
    let mut activator = Command::new("systemd-socket-activate")
        .arg("--listen")
        .arg(&socket)
        .arg(format!("--setenv=CLOUDD_HOME={}", home.path().display()))
        .arg(binary("cloudd"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("systemd-socket-activate (package systemd) is needed");
    wait_for("the activator to listen", DEADLINE, || socket.exists());

    let status = home
        .cloudctl_command()
        .env("CLOUDD_SOCKET", &socket)
        .args(["--json", "status"])
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["supervisor"], "systemd");
    assert_eq!(status["socket"], socket.display().to_string());
    // The daemon is the activator's process, exec'd on the first connection.
    assert_eq!(status["pid"].as_u64(), Some(activator.id() as u64));

    let down = home
        .cloudctl_command()
        .env("CLOUDD_SOCKET", &socket)
        .arg("down")
        .output()
        .unwrap();
    assert!(down.status.success(), "{down:?}");
    let exit = activator.wait().unwrap();
    assert!(exit.success(), "{exit}");
    assert!(
        socket.exists(),
        "the socket belongs to the service manager and is left alone"
    );
}

fn recv_notification(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .expect("a notification before the deadline");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn ready_watchdog_and_stopping_reach_notify_socket() {
    let home = Home::new();
    let notify_path = home.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut daemon = home.spawn_daemon_with(|command| {
        command
            .env("NOTIFY_SOCKET", &notify_path)
            .env("WATCHDOG_USEC", "200000");
    });
    let ready = recv_notification(&notify);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(
        ready.contains(&format!("MAINPID={}", daemon.pid())),
        "{ready:?}"
    );
    assert_eq!(recv_notification(&notify), "WATCHDOG=1");

    // Children never inherit the manager's variables.
    let mut client = JsonClient::connect(&home.paths.socket).unwrap();
    assert_eq!(client.hello().unwrap()["supervisor"], "systemd");

    daemon.signal(libc::SIGTERM);
    loop {
        let message = recv_notification(&notify);
        if message == "STOPPING=1" {
            break;
        }
        assert_eq!(message, "WATCHDOG=1");
    }
    assert!(daemon.wait_exit(DEADLINE).success());
}

#[test]
fn an_abstract_notify_socket_works_too() {
    let home = Home::new();
    let name = format!("cloudd-e2e-{}", std::process::id());
    let address =
        <std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(
            name.as_bytes(),
        )
        .unwrap();
    let notify = UnixDatagram::bind_addr(&address).unwrap();
    notify.set_read_timeout(Some(DEADLINE)).unwrap();
    let _daemon = home.spawn_daemon_with(|command| {
        command.env("NOTIFY_SOCKET", format!("@{name}"));
    });
    assert!(recv_notification(&notify).starts_with("READY=1\n"));
}

#[test]
fn an_upgraded_daemon_is_restarted_by_the_next_command() {
    let home = Home::new();
    // The installed binary, which an upgrade replaces (by rename, as package managers do).
    let bin_dir = home.path().join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    let installed = bin_dir.join("cloudd");
    std::fs::copy(binary("cloudd"), &installed).unwrap();
    let cloudctl = |args: &[&str]| {
        home.cloudctl_command()
            .env("CLOUDD_BIN", &installed)
            .args(args)
            .output()
            .unwrap()
    };
    let up = cloudctl(&["--json", "up"]);
    assert!(up.status.success(), "{up:?}");
    let old_pid = serde_json::from_slice::<Value>(&up.stdout).unwrap()["pid"]
        .as_u64()
        .unwrap();

    let staged = bin_dir.join("cloudd.new");
    std::fs::copy(binary("cloudd"), &staged).unwrap();
    std::fs::rename(&staged, &installed).unwrap();

    let status = cloudctl(&["--json", "status"]);
    assert!(status.status.success(), "{status:?}");
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert!(
        stderr.contains("restarted cloudd") && stderr.contains("upgraded on disk"),
        "{stderr}"
    );
    let new_pid = serde_json::from_slice::<Value>(&status.stdout).unwrap()["pid"]
        .as_u64()
        .unwrap();
    assert_ne!(new_pid, old_pid);
    assert!(!cloudctl::launcher::process_exists(old_pid as u32));
    // The old daemon drained (it did not die): its log says so, in the same state dir.
    let log = std::fs::read_to_string(home.paths.log_file()).unwrap();
    assert!(
        log.contains(&format!("cloudd ready pid={old_pid}")) && log.contains("cloudd stopped"),
        "{log}"
    );

    // The new one is current: no further restart.
    let again = cloudctl(&["status"]);
    assert!(again.status.success());
    assert!(!String::from_utf8_lossy(&again.stderr).contains("restarted"));
    cloudctl(&["down"]);
}

/// Kills a daemon a test started through `cloudctl`, even when the test fails first.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if cloudctl::launcher::process_exists(self.0) {
            // SAFETY: the pid is the daemon this test started and saw answer.
            unsafe { libc::kill(self.0 as libc::pid_t, libc::SIGKILL) };
        }
    }
}

#[test]
fn install_without_a_user_manager_changes_nothing() {
    let root = tempfile::tempdir().unwrap();
    // This shell has no systemd user manager: the runtime dir holds no bus to reach one.
    let cloudctl = |args: &[&str]| {
        cloudctl_in(root.path())
            .env_remove("DBUS_SESSION_BUS_ADDRESS")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let up = cloudctl(&["--json", "up"]);
    assert!(up.status.success(), "{up:?}");
    let pid = serde_json::from_slice::<Value>(&up.stdout).unwrap()["pid"]
        .as_u64()
        .unwrap() as u32;
    let _daemon = KillOnDrop(pid);

    let install = cloudctl(&["service", "install", "--manager", "systemd"]);
    assert_eq!(install.status.code(), Some(1), "{install:?}");
    let stderr = String::from_utf8_lossy(&install.stderr);
    assert!(
        stderr.contains("no systemd user manager is reachable from this shell")
            && stderr.contains("nothing was changed"),
        "{stderr}"
    );
    assert!(!stderr.contains("stopping cloudd"), "{stderr}");

    // The daemon started by hand still runs and answers, and is the same one.
    assert!(cloudctl::launcher::process_exists(pid));
    let status = cloudctl(&["--json", "status"]);
    assert!(status.status.success(), "{status:?}");
    assert!(
        String::from_utf8_lossy(&status.stderr).is_empty(),
        "no restart: {status:?}"
    );
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["pid"].as_u64(), Some(pid as u64));
    assert_eq!(status["supervisor"], "none");
    // No unit file was written (nor their directory made).
    assert!(
        !root.path().join("home/.config/systemd").exists(),
        "unit files written"
    );

    assert!(cloudctl(&["down"]).status.success());
}
