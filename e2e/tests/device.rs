//! Device login with real processes: a `cloud-relay` (polls every 200 ms), machine 1 (a
//! daemon logged in with an API key) and machine 2 (a daemon with nothing), each with the
//! real `cloudctl`. Machine 2 runs `cloudctl login --relay URL`, machine 1 approves or
//! denies the code it shows; the operator can approve too; codes expire; a user lists and
//! revokes their machines' logins. Every test greps the logs and every output for tokens
//! and device codes.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc;

use cloudd_e2e::secrets::{assert_no_tokens, Outputs};
use cloudd_e2e::{binary, wait_for, Home, Relay, DEADLINE};
use serde_json::Value;

/// A relay whose device logins poll every 200 ms (and expire after `ttl`), logging at
/// debug.
fn relay(ttl: &str) -> Relay {
    Relay::start_logging(
        &[
            "--device-poll-interval",
            "200ms",
            "--device-code-ttl",
            ttl,
            "--agent-command",
            "sh",
            "-c",
            "cat >/dev/null",
        ],
        "debug",
    )
}

/// Machine 1: a daemon logged in as alice with an API key.
fn logged_in(relay: &Relay, outputs: &mut Outputs) -> (Home, cloudd_e2e::Daemon, String) {
    let home = Home::new();
    let daemon = home.spawn_daemon_with(|command| {
        command.env("CLOUDD_LOG", "debug");
    });
    let key = relay.token("alice", "acme");
    outputs.ok(&home, &["login", "--relay", &relay.url(), "--token", &key]);
    home.wait_connected();
    (home, daemon, key)
}

/// `cloudctl login --relay URL` on a new machine, running; and the code it shows.
struct DeviceLogin {
    child: Child,
    code: String,
    /// What it printed up to the code.
    shown: String,
    /// The rest of its stdout, read to its end.
    rest: std::thread::JoinHandle<String>,
}

impl DeviceLogin {
    fn start(home: &Home, relay: &Relay) -> DeviceLogin {
        let mut child = home
            .cloudctl_command()
            .args(["login", "--relay", &relay.url()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run cloudctl login");
        let stdout = child.stdout.take().unwrap();
        let (lines, received) = mpsc::channel();
        // Reads every line (so cloudctl never writes to a closed pipe): the first ones
        // to the test as they come, all of them as the thread's result.
        let rest = std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(stdout).lines() {
                let line = line.unwrap_or_default();
                all.push_str(&line);
                all.push('\n');
                let _ = lines.send(line);
            }
            all
        });
        let mut shown = String::new();
        let code = loop {
            let line = received
                .recv_timeout(DEADLINE)
                .unwrap_or_else(|_| panic!("cloudctl login shows no code: {shown}"));
            shown.push_str(&line);
            shown.push('\n');
            if let Some(code) = line.trim().strip_prefix("cloudctl device approve ") {
                break code.to_owned();
            }
        };
        DeviceLogin {
            child,
            code,
            shown,
            rest,
        }
    }

    /// Waits for it to end: (success, all of stdout, stderr).
    fn finish(mut self, outputs: &mut Outputs) -> (bool, String, String) {
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut self.child.stderr.take().unwrap(), &mut stderr).unwrap();
        let status = self.child.wait().expect("cloudctl login ends");
        let stdout = self.rest.join().unwrap();
        outputs
            .0
            .extend([self.shown, stdout.clone(), stderr.clone()]);
        (status.success(), stdout, stderr)
    }
}

/// Machine 2 logs in by machine 1's approval: it gets its own login for alice, its daemon
/// connects and lists alice's sessions, and its login is in the keychain-less file store.
/// `device list` shows both machines; revoking machine 2's login from machine 1 refuses
/// machine 2's daemon with "log in again" and leaves machine 1 connected.
#[test]
fn a_second_machine_logs_in_by_approval_and_a_revoked_one_must_log_in_again() {
    let relay = relay("10m");
    let mut outputs = Outputs::default();
    let (one, _daemon_one, key) = logged_in(&relay, &mut outputs);
    let created = outputs.json(&one, &["session", "create", "--task", "from machine 1"]);
    let session = created["session"]["id"].as_str().unwrap().to_owned();

    let two = Home::new();
    let _daemon_two = two.spawn_daemon_with(|command| {
        command.env("CLOUDD_LOG", "debug");
    });
    let login = DeviceLogin::start(&two, &relay);
    assert_eq!(login.code.len(), 9, "{}", login.shown);
    // Typed as a person might: lower case.
    let approved = outputs.ok(&one, &["device", "approve", &login.code.to_lowercase()]);
    assert!(approved.starts_with("approved: the machine"), "{approved}");
    let (ok, stdout, stderr) = login.finish(&mut outputs);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("logged in: remote, connected"), "{stdout}");
    assert!(stdout.contains("as alice@acme"), "{stdout}");

    // Machine 2 works as alice: it sees machine 1's session.
    let sessions = outputs.json(&two, &["session", "list"]);
    assert!(
        sessions["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["id"] == session.as_str()),
        "{sessions:#}"
    );
    let whoami = outputs.ok(&two, &["whoami"]);
    assert!(whoami.contains("credentials: file ("), "{whoami}");

    // Two logins, each machine's marked as its own.
    let devices = outputs.json(&one, &["device", "list"]);
    let devices = devices.as_array().unwrap();
    assert_eq!(devices.len(), 2, "{devices:#?}");
    let theirs: Vec<&Value> = devices.iter().filter(|d| d["current"] == false).collect();
    assert_eq!(theirs.len(), 1, "{devices:#?}");
    let id = theirs[0]["id"].as_str().unwrap().to_owned();
    let listed = outputs.ok(&two, &["device", "list"]);
    assert!(listed.contains("(this machine)"), "{listed}");

    let revoked = outputs.ok(&one, &["device", "revoke", &id[..12]]);
    assert!(revoked.contains("it must log in again"), "{revoked}");
    let mut status = Value::Null;
    wait_for("machine 2 to be refused for good", DEADLINE, || {
        status = outputs.json(&two, &["status"]);
        status["relay"]["state"] == "refused"
    });
    let reason = status["relay"]["reason"].as_str().unwrap();
    assert!(reason.contains("cloudctl login"), "{reason}");
    assert_eq!(
        outputs.json(&one, &["status"])["relay"]["state"],
        "connected"
    );
    assert_eq!(
        outputs
            .json(&one, &["device", "list"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // Revoking what is gone says what to do.
    let again = outputs.run(&one, &["device", "revoke", &id]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("cloudctl device list"));

    assert_no_tokens(&one, &relay, &outputs, &[&key]);
    assert_no_tokens(&two, &relay, &outputs, &[&key]);
}

/// A denied code fails the new machine's login with "denied" and leaves it logged out; the
/// relay's operator can approve another machine on the relay host, as any user.
#[test]
fn a_denied_login_fails_and_the_operator_can_approve_one() {
    let relay = relay("10m");
    let mut outputs = Outputs::default();
    let (one, _daemon_one, key) = logged_in(&relay, &mut outputs);
    let two = Home::new();
    let _daemon_two = two.spawn_daemon_with(|command| {
        command.env("CLOUDD_LOG", "debug");
    });

    let login = DeviceLogin::start(&two, &relay);
    let code = login.code.clone();
    // A machine not logged in cannot approve (nor is it asked to pretend).
    let outsider = outputs.run(&two, &["device", "approve", &code]);
    assert!(!outsider.status.success());
    assert!(
        String::from_utf8_lossy(&outsider.stderr)
            .contains("run `cloudctl login --relay URL` first"),
        "{outsider:?}"
    );
    let denied = outputs.ok(&one, &["device", "deny", &code]);
    assert!(denied.starts_with("denied: the machine"), "{denied}");
    let (ok, _, stderr) = login.finish(&mut outputs);
    assert!(!ok);
    assert!(stderr.contains("denied"), "{stderr}");
    assert!(stderr.contains("cloudctl login"), "{stderr}");
    assert_eq!(outputs.json(&two, &["status"])["relay"]["mode"], "embedded");
    // A decided code cannot be decided again.
    let twice = outputs.run(&one, &["device", "approve", &code]);
    assert!(!twice.status.success());

    let login = DeviceLogin::start(&two, &relay);
    let operator = std::process::Command::new(binary("cloud-relay"))
        .args([
            "device",
            "approve",
            &login.code,
            "--user",
            "bob",
            "--org",
            "acme",
            "--data",
        ])
        .arg(relay.data.path())
        .output()
        .unwrap();
    assert!(operator.status.success(), "{operator:?}");
    outputs
        .0
        .push(String::from_utf8_lossy(&operator.stderr).into_owned());
    let (ok, stdout, stderr) = login.finish(&mut outputs);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("as bob@acme"), "{stdout}");

    assert_no_tokens(&one, &relay, &outputs, &[&key]);
    assert_no_tokens(&two, &relay, &outputs, &[&key]);
}

/// A code nobody approves expires: the new machine's login fails saying so and what to
/// do, and approving the code afterwards fails too.
#[test]
fn an_unapproved_code_expires() {
    let relay = relay("2s");
    let mut outputs = Outputs::default();
    let (one, _daemon_one, key) = logged_in(&relay, &mut outputs);
    let two = Home::new();
    let _daemon_two = two.spawn_daemon_with(|command| {
        command.env("CLOUDD_LOG", "debug");
    });
    let login = DeviceLogin::start(&two, &relay);
    let code = login.code.clone();
    let (ok, _, stderr) = login.finish(&mut outputs);
    assert!(!ok);
    assert!(stderr.contains("expired"), "{stderr}");
    assert!(stderr.contains("cloudctl login --relay"), "{stderr}");
    let late = outputs.run(&one, &["device", "approve", &code]);
    assert!(!late.status.success());
    assert!(
        String::from_utf8_lossy(&late.stderr).contains("expired"),
        "{late:?}"
    );
    assert_eq!(outputs.json(&two, &["status"])["relay"]["mode"], "embedded");
    assert_no_tokens(&one, &relay, &outputs, &[&key]);
    assert_no_tokens(&two, &relay, &outputs, &[&key]);
}
