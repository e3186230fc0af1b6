//! A newcomer's first run (issue 8, point 1): the README's session transcript on a fresh
//! `CLOUDD_HOME`, where the first command starts the daemon and its embedded relay, and
//! the commands that need the relay must wait for it to connect instead of failing.
//!
//! Both cores are kept busy for the test's duration: on an idle machine the embedded relay
//! is usually connected before `session create` asks for it, and the race goes unseen.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cloudd_e2e::{wait_for, Home, DEADLINE};

/// Threads that spin until dropped, so the daemon starts on a machine with no idle core.
struct Busy {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Busy {
    fn start(n_threads: usize) -> Busy {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n_threads)
            .map(|_| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                })
            })
            .collect();
        Busy { stop, threads }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// The first pending prompt's request id, once the agent has asked (waits with a deadline).
fn next_prompt(home: &Home, session: &str) -> String {
    let mut request_id = String::new();
    wait_for("the agent's permission prompt", DEADLINE, || {
        let prompts = home.cloudctl_json(&["permissions", session]);
        match prompts[0]["request_id"].as_str() {
            Some(id) => {
                request_id = id.to_owned();
                true
            }
            None => false,
        }
    });
    request_id
}

/// The README's transcript, from a fresh home: `session create` is the first command.
fn transcript(home: &Home) {
    let created = home.cloudctl_ok(&["session", "create", "--task", "try the shell agent"]);
    let session = created
        .lines()
        .find_map(|line| line.strip_prefix("id"))
        .map(|id| id.trim().to_owned())
        .unwrap_or_else(|| panic!("no id in {created}"));
    assert!(created.contains("try the shell agent"), "{created}");

    home.cloudctl_ok(&["send", &session, "echo hello from the cloud"]);
    let first = next_prompt(home, &session);
    let listed = home.cloudctl_ok(&["permissions", &session]);
    assert!(
        listed.contains(&first) && listed.contains("Bash"),
        "{listed}"
    );
    home.cloudctl_ok(&["allow", &session, &first]);

    home.cloudctl_ok(&["send", &session, "echo not that one"]);
    let second = next_prompt(home, &session);
    assert_ne!(first, second);
    home.cloudctl_ok(&["deny", &session, &second, "--message", "not that one"]);
    let again = home.cloudctl(&["allow", &session, &second]);
    assert_eq!(again.status.code(), Some(1), "{again:?}");
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already answered"),
        "{again:?}"
    );

    wait_for("the allowed command's output in the log", DEADLINE, || {
        home.cloudctl_ok(&["attach", &session, "--since", "0", "--no-follow"])
            .lines()
            .any(|line| line.contains("agent: hello from the cloud"))
    });
}

#[test]
fn the_readme_transcript_works_on_a_fresh_home_20_times_with_busy_cores() {
    let _busy = Busy::start(2);
    for round in 0..20 {
        let home = Home::new();
        // Half the rounds start as the README's quick start does, with `status` (which
        // starts the daemon) right before the first session.
        if round % 2 == 1 {
            home.cloudctl_ok(&["status"]);
        }
        transcript(&home);
        home.cloudctl_ok(&["down"]);
    }
}
