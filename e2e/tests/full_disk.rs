//! A full disk, for real: the daemon's `CLOUDD_HOME` on a small tmpfs that the test fills
//! up, a standalone `cloud-relay` that goes away and comes back, and the real `cloudctl`.
//!
//! A send the journal cannot write is refused at once, naming the disk and the path;
//! `status`, `down` and SIGTERM keep answering (also once the relay is back while the disk
//! is still full); once space is freed, sends are taken again without a restart; and every
//! send answered `queued` or `sent`, before, during and after, reaches the relay exactly
//! once, while none that was refused does.
//!
//! The tests mount a tmpfs, so they must run as root (CI does): they fail, rather than
//! skip, when they cannot.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use cloudd_e2e::{wait_for, Daemon, Home, Relay, DEADLINE};
use serde_json::Value;

/// The size of the tmpfs the daemon's home lives on.
const DISK_BYTES: u64 = 16 << 20;
/// How long a refused send may take: it is refused at once (the first one waits for the
/// flush that fails).
const REFUSAL_BOUND: Duration = Duration::from_secs(3);
/// How long `status` may take, disk full or not.
const STATUS_BOUND: Duration = Duration::from_secs(3);
/// How long the daemon may take to exit after `down` or SIGTERM (its drain is bounded by
/// 5 s).
const EXIT_BOUND: Duration = Duration::from_secs(10);
/// What a message carries besides its name, so that the journal rolls generations (and
/// compacts them) while the disk fills.
const PADDING: usize = 30_000;

/// An agent that reads everything and says nothing, so the log holds only what was sent.
const QUIET_AGENT: &[&str] = &["--agent-command", "sh", "-c", "cat >/dev/null"];

/// A tmpfs mounted over a directory; unmounted (lazily) when dropped.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    fn mount(path: &Path, size: u64) -> SmallDisk {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "this test mounts a small tmpfs for the daemon's home and fills it up: run it as root (CI does)"
        );
        let target = c_path(path);
        let options = CString::new(format!("size={size},mode=0700")).unwrap();
        // SAFETY: every pointer is a NUL-terminated string that outlives the call.
        let status = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                options.as_ptr().cast(),
            )
        };
        assert_eq!(
            status,
            0,
            "cannot mount a tmpfs on {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        SmallDisk {
            path: path.to_owned(),
        }
    }

    /// Free bytes.
    fn available(&self) -> u64 {
        let path = c_path(&self.path);
        // SAFETY: all-zero bytes are a valid `statvfs`.
        let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `path` is NUL-terminated and `stat` a valid place for the answer.
        assert_eq!(unsafe { libc::statvfs(path.as_ptr(), &mut stat) }, 0);
        stat.f_bavail * stat.f_frsize
    }

    /// Takes all but `leave` free bytes with a new file; returns its path.
    fn fill(&self, name: &str, leave: u64) -> PathBuf {
        let path = self.path.join(name);
        let file = std::fs::File::create(&path).unwrap();
        let take = self.available().saturating_sub(leave);
        if take > 0 {
            // SAFETY: a valid descriptor, offset and length.
            let status = unsafe {
                libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&file), 0, 0, take as i64)
            };
            assert_eq!(status, 0, "{}", std::io::Error::last_os_error());
        }
        if leave == 0 {
            // The crumbs fallocate leaves.
            use std::io::Write as _;
            let mut file = file;
            while file.write_all(&[0]).is_ok() {}
        }
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // SAFETY: a NUL-terminated path.
        unsafe { libc::umount2(c_path(&self.path).as_ptr(), libc::MNT_DETACH) };
    }
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap()
}

/// A daemon whose home is on a small tmpfs, logged in to a standalone relay, with one
/// session. The daemon's log is kept off the small disk.
struct Setup {
    relay: Relay,
    token: String,
    session: String,
    daemon: Daemon,
    /// Declared before `home`: unmounted before the home is removed.
    disk: SmallDisk,
    home: Home,
    logs: tempfile::TempDir,
}

impl Setup {
    fn start() -> Setup {
        let home = Home::new();
        let disk = SmallDisk::mount(home.path(), DISK_BYTES);
        let logs = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(logs.path().join("cloudd.log")).unwrap();
        let daemon = home.spawn_daemon_with(|command| {
            command.stderr(log);
        });
        let relay = Relay::start_with(QUIET_AGENT);
        let token = relay.token("ann", "acme");
        home.cloudctl_ok(&["login", "--relay", &relay.url(), "--token", &token]);
        let created = home.cloudctl_json(&["session", "create"]);
        let session = created["session"]["id"].as_str().unwrap().to_owned();
        Setup {
            relay,
            token,
            session,
            daemon,
            disk,
            home,
            logs,
        }
    }

    fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.logs.path().join("cloudd.log")).unwrap_or_default()
    }

    /// `cloudctl ARGS`, which must finish within `bound`.
    fn cloudctl_within(&self, args: &[&str], bound: Duration) -> Output {
        let mut child = self
            .home
            .cloudctl_command()
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if started.elapsed() > bound {
                let _ = child.kill();
                panic!(
                    "cloudctl {args:?} did not answer within {bound:?}; the daemon logged:\n{}",
                    self.daemon_log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        child.wait_with_output().unwrap()
    }

    /// `cloudctl status --json`, answered within [`STATUS_BOUND`].
    fn status(&self) -> Value {
        let output = self.cloudctl_within(&["--json", "status"], STATUS_BOUND);
        assert!(output.status.success(), "{output:?}");
        serde_json::from_slice(&output.stdout).unwrap()
    }

    /// Sends message `name` (padded); returns the reply's state (`queued`, `delivered`)
    /// or the error cloudctl printed.
    fn send(&self, name: &str, bound: Duration) -> Result<String, String> {
        let text = format!("{name} {}", "x".repeat(PADDING));
        let output = self.cloudctl_within(&["--json", "send", &self.session, &text], bound);
        if output.status.success() {
            let reply: Value = serde_json::from_slice(&output.stdout).unwrap();
            Ok(reply["state"].as_str().unwrap().to_owned())
        } else {
            assert_eq!(output.status.code(), Some(1), "{output:?}");
            Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
        }
    }

    /// The names of the messages the relay holds for the session, in log order.
    fn delivered(&self) -> Vec<String> {
        let mut names = Vec::new();
        let mut after = 0;
        loop {
            let (code, log) = self.relay.http(
                "GET",
                &format!("/v1/sessions/{}/log?after={after}", self.session),
                &self.token,
                None,
            );
            assert_eq!(code, 200, "{log}");
            let entries = log.as_array().unwrap();
            let Some(last) = entries.last() else {
                return names;
            };
            after = last["seq"].as_u64().unwrap();
            names.extend(entries.iter().filter_map(|entry| {
                let text = entry["event"]["message"].as_str()?;
                let value: Value = serde_json::from_str(text).ok()?;
                (value["type"] == "user").then(|| {
                    let content = value["message"]["content"].as_str().unwrap_or("");
                    content.split(' ').next().unwrap_or("").to_owned()
                })
            }));
        }
    }

    /// The journal's directory, as the refusal names it.
    fn journal_dir(&self) -> String {
        self.home
            .paths
            .state_dir
            .join("journal")
            .display()
            .to_string()
    }

    /// Sends with the relay away until one send is refused, on a disk that has `slack`
    /// bytes left; then takes the rest of the disk. Returns the names answered `queued`.
    fn fill_until_refused(&self, slack: u64) -> Vec<String> {
        self.disk.fill("filler-1", slack);
        let mut queued = Vec::new();
        for n in 0.. {
            assert!(n < 200, "the disk never filled up");
            let name = format!("during-{n:03}");
            let started = Instant::now();
            match self.send(&name, DEADLINE) {
                Ok(state) => {
                    assert_eq!(state, "queued");
                    queued.push(name);
                }
                Err(error) => {
                    let took = started.elapsed();
                    assert_eq!(
                        error,
                        format!(
                            "cloudctl: error: cannot queue: no space left on device for {}; free some space — cloudd retries by itself",
                            self.journal_dir()
                        )
                    );
                    assert!(took < REFUSAL_BOUND, "refused after {took:?}");
                    break;
                }
            }
        }
        self.disk.fill("filler-2", 0);
        queued
    }

    /// Every later send is refused at once, the same way.
    fn assert_refused_at_once(&self, name: &str) {
        let started = Instant::now();
        let error = self.send(name, REFUSAL_BOUND).unwrap_err();
        assert!(
            error.contains("no space left on device") && error.contains(&self.journal_dir()),
            "{error}"
        );
        assert!(started.elapsed() < REFUSAL_BOUND);
    }

    /// Restarts the relay and waits (with `status` answering all along) until the bridge
    /// is connected again.
    fn relay_comes_back(&mut self) {
        self.relay.restart();
        let mut status = Value::Null;
        // The bridge may be in a long backoff by now.
        wait_for("the bridge to reconnect", DEADLINE * 3, || {
            status = self.status();
            status["relay"]["state"] == "connected"
        });
        // And for a while after: the relay's first messages (the session list, the log)
        // are stored while the disk is full.
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            self.status();
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the relay has acknowledged every journaled event.
    fn wait_drained(&self) {
        wait_for("the journal to drain", DEADLINE * 2, || {
            let status = self.status();
            status["relay"]["state"] == "connected" && status["relay"]["journal_depth"] == 0
        });
    }
}

#[test]
fn a_full_disk_refuses_sends_at_once_and_the_daemon_recovers_when_space_returns() {
    let mut setup = Setup::start();
    let mut expected = Vec::new();
    for n in 0..3 {
        let name = format!("before-{n}");
        assert_eq!(setup.send(&name, DEADLINE).unwrap(), "delivered");
        expected.push(name);
    }

    // The relay goes away, events queue up in the journal (which rolls and compacts
    // generations as it grows), and the disk fills.
    setup.relay.kill();
    expected.extend(setup.fill_until_refused(600 << 10));
    setup.assert_refused_at_once("refused-1");
    setup.status();

    // The relay comes back while the disk is still full: everything keeps answering, and
    // what was queued is delivered.
    setup.relay_comes_back();
    setup.assert_refused_at_once("refused-2");

    // Space comes back: sends are taken again, without a restart.
    for filler in ["filler-1", "filler-2"] {
        std::fs::remove_file(setup.home.path().join(filler)).unwrap();
    }
    let mut first_after = None;
    wait_for("sends to be taken again", DEADLINE, || {
        match setup.send("after-0", DEADLINE) {
            Ok(state) => {
                first_after = Some(state);
                true
            }
            Err(error) => {
                assert!(error.contains("no space left on device"), "{error}");
                false
            }
        }
    });
    assert_eq!(first_after.as_deref(), Some("delivered"));
    expected.push("after-0".to_owned());
    for n in 1..3 {
        let name = format!("after-{n}");
        assert_eq!(setup.send(&name, DEADLINE).unwrap(), "delivered");
        expected.push(name);
    }

    // Everything answered reached the relay once, in order; nothing refused did.
    setup.wait_drained();
    assert_eq!(setup.delivered(), expected);
    let log = setup.daemon_log();
    assert!(log.contains("the journal writes again"), "{log}");

    let output = setup.cloudctl_within(&["down"], EXIT_BOUND);
    assert!(output.status.success(), "{output:?}");
    setup.daemon.wait_exit(EXIT_BOUND);
}

#[test]
fn a_daemon_stopped_while_the_disk_is_full_exits_and_loses_nothing_it_queued() {
    let mut setup = Setup::start();
    assert_eq!(setup.send("before-0", DEADLINE).unwrap(), "delivered");
    let mut expected = vec!["before-0".to_owned()];
    setup.relay.kill();
    expected.extend(setup.fill_until_refused(600 << 10));
    setup.relay_comes_back();
    setup.assert_refused_at_once("refused-1");

    // SIGTERM with the disk still full: the daemon drains and exits in time.
    setup.daemon.signal(libc::SIGTERM);
    let status = setup.daemon.wait_exit(EXIT_BOUND);
    assert!(status.success(), "{status}");

    // A new daemon, once there is room again, delivers what was queued, and nothing
    // refused.
    for filler in ["filler-1", "filler-2"] {
        std::fs::remove_file(setup.home.path().join(filler)).unwrap();
    }
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(setup.logs.path().join("cloudd.log"))
        .unwrap();
    setup.daemon = setup.home.spawn_daemon_with(|command| {
        command.stderr(log);
    });
    assert_eq!(setup.send("after-0", DEADLINE).unwrap(), "delivered");
    expected.push("after-0".to_owned());
    setup.wait_drained();
    assert_eq!(setup.delivered(), expected);
    let output = setup.cloudctl_within(&["down"], EXIT_BOUND);
    assert!(output.status.success(), "{output:?}");
    setup.daemon.wait_exit(EXIT_BOUND);
}
