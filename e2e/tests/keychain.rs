//! The login in the OS keychain, for real: a D-Bus session of its own
//! (`dbus-run-session`) with `gnome-keyring-daemon` unlocked in it as the Secret Service,
//! and a daemon on that session. The login's secrets go to the keychain, the credentials
//! file holds only where they are, `whoami` says so, a restarted daemon logs in from the
//! keychain, and logout removes them. Without a usable keychain the default falls back to
//! the 0600 file, and `CLOUDD_CREDENTIAL_STORE=keychain` refuses with what to do instead.
//!
//! Needs `dbus-run-session`, `dbus-send` and `gnome-keyring-daemon` (`.ci/run` installs
//! the `dbus` and `gnome-keyring` packages).

use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use cloudd_e2e::secrets::{assert_no_tokens, Outputs};
use cloudd_e2e::{wait_for, Home, Relay, DEADLINE};

/// A D-Bus session bus with an unlocked gnome-keyring as its Secret Service, in a temp
/// home; ended (its process group killed) when dropped.
struct SecretService {
    child: Child,
    address: String,
    _dir: tempfile::TempDir,
}

impl SecretService {
    fn start() -> SecretService {
        for tool in ["dbus-run-session", "dbus-send", "gnome-keyring-daemon"] {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success());
            assert!(
                found,
                "{tool} is missing: install the dbus and gnome-keyring packages (as .ci/run does)"
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("ks")
            .tempdir_in("/tmp")
            .unwrap();
        let home = dir.path().join("home");
        let runtime = dir.path().join("run");
        std::fs::create_dir_all(&home).unwrap();
        std::fs::create_dir_all(&runtime).unwrap();
        std::fs::set_permissions(
            &runtime,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        let address_file: PathBuf = dir.path().join("address");
        // The keyring is created (or unlocked) with the password on stdin; the session's
        // address is published; `cat` keeps the session alive until the test closes its
        // stdin or kills the group.
        let script = format!(
            "printf test | gnome-keyring-daemon --unlock --components=secrets >/dev/null \
             && echo \"$DBUS_SESSION_BUS_ADDRESS\" > {0}.tmp && mv {0}.tmp {0} && exec cat >/dev/null",
            address_file.display()
        );
        let child = Command::new("dbus-run-session")
            .args(["--", "sh", "-c", &script])
            .env("HOME", &home)
            .env("XDG_RUNTIME_DIR", &runtime)
            .env("XDG_DATA_HOME", home.join(".local/share"))
            .env_remove("DBUS_SESSION_BUS_ADDRESS")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("run dbus-run-session");
        let mut address = String::new();
        wait_for("the D-Bus session's address", DEADLINE, || {
            address = std::fs::read_to_string(&address_file)
                .unwrap_or_default()
                .trim()
                .to_owned();
            !address.is_empty()
        });
        // gnome-keyring takes the Secret Service's name a moment after it starts.
        wait_for(
            "gnome-keyring to serve the Secret Service",
            DEADLINE,
            || {
                Command::new("dbus-send")
                    .args([
                        "--session",
                        "--print-reply",
                        "--dest=org.freedesktop.DBus",
                        "/org/freedesktop/DBus",
                        "org.freedesktop.DBus.NameHasOwner",
                        "string:org.freedesktop.secrets",
                    ])
                    .env("DBUS_SESSION_BUS_ADDRESS", &address)
                    .output()
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("boolean true"))
            },
        );
        SecretService {
            child,
            address,
            _dir: dir,
        }
    }
}

impl Drop for SecretService {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.flush();
        }
        // The session, the keyring and `cat`: the whole group.
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

fn credentials_file(home: &Home) -> String {
    std::fs::read_to_string(home.paths.config_dir.join("credentials.toml")).unwrap_or_default()
}

/// With an unlocked Secret Service, the login's refresh token lives in the keychain: the
/// file names only the relay and the store, `whoami` says `keychain`, a restarted daemon
/// connects from the keychain alone, and logout clears both.
#[test]
fn the_login_is_kept_in_the_secret_service_when_there_is_one() {
    let service = SecretService::start();
    let relay = Relay::start_logging(&[], "debug");
    let home = Home::new();
    let on_session = |command: &mut Command| {
        command
            .env("CLOUDD_LOG", "debug")
            .env("CLOUDD_CREDENTIAL_STORE", "auto")
            .env("DBUS_SESSION_BUS_ADDRESS", &service.address);
    };
    let mut daemon = home.spawn_daemon_with(on_session);
    let mut outputs = Outputs::default();
    let key = relay.token("alice", "acme");
    outputs.ok(&home, &["login", "--relay", &relay.url(), "--token", &key]);
    home.wait_connected();

    // (The file is not printed on failure: it may hold a token.)
    let file = credentials_file(&home);
    assert!(
        file.contains("store = \"keychain\""),
        "the file names no keychain"
    );
    assert!(
        !file.contains("refresh_token") && !file.contains("crf_"),
        "the file holds the refresh token"
    );
    let whoami = outputs.ok(&home, &["whoami"]);
    assert!(
        whoami.contains("credentials: keychain (cloudd / "),
        "{whoami}"
    );
    let whoami = outputs.json(&home, &["whoami"]);
    assert_eq!(whoami["credentials"]["store"], "keychain", "{whoami:#}");

    // A new daemon process finds the login in the keychain only.
    daemon.signal(libc::SIGTERM);
    daemon.wait_exit(DEADLINE);
    let _daemon = home.spawn_daemon_with(on_session);
    let status = home.wait_connected();
    assert_eq!(status["relay"]["mode"], "remote", "{status:#}");
    assert_eq!(status["relay"]["user"], "alice", "{status:#}");
    let created = outputs.json(&home, &["session", "create", "--task", "keychain"]);
    assert!(created["session"]["id"].is_string(), "{created:#}");

    outputs.ok(&home, &["logout"]);
    assert!(credentials_file(&home).is_empty());
    let whoami = outputs.ok(&home, &["whoami"]);
    assert!(whoami.contains("credentials: none"), "{whoami}");
    assert_no_tokens(&home, &relay, &outputs, &[&key]);
}

/// Without a usable keychain (no session bus), the default keeps the login in the 0600
/// file and `whoami` says so; insisting on the keychain refuses the login and says how to
/// do without.
#[test]
fn without_a_keychain_the_file_is_used_or_the_login_refused_when_the_keychain_is_required() {
    let relay = Relay::start();
    let nowhere = "unix:path=/nonexistent/cloudd-test-bus";

    let home = Home::new();
    let _daemon = home.spawn_daemon_with(|command| {
        command
            .env("CLOUDD_CREDENTIAL_STORE", "auto")
            .env("DBUS_SESSION_BUS_ADDRESS", nowhere);
    });
    let key = relay.token("alice", "acme");
    home.cloudctl_ok(&["login", "--relay", &relay.url(), "--token", &key]);
    home.wait_connected();
    let file = credentials_file(&home);
    assert!(file.contains("refresh_token = \"crf_"), "no file login");
    let whoami = home.cloudctl_ok(&["whoami"]);
    assert!(whoami.contains("credentials: file ("), "{whoami}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(home.paths.config_dir.join("credentials.toml"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    let strict = Home::new();
    let _strict_daemon = strict.spawn_daemon_with(|command| {
        command
            .env("CLOUDD_CREDENTIAL_STORE", "keychain")
            .env("DBUS_SESSION_BUS_ADDRESS", nowhere);
    });
    let refused = strict.cloudctl(&["login", "--relay", &relay.url(), "--token", &key]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("keychain") && stderr.contains("CLOUDD_CREDENTIAL_STORE=file"),
        "{stderr}"
    );
    assert!(!stderr.contains(&key));
    assert!(credentials_file(&strict).is_empty());
}
