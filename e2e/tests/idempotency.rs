//! A send whose reply was lost can be retried safely (issue 8, point 5): with `kill -9` at
//! random points and clients retrying every send they got no answer to, with the same
//! idempotency key, the relay holds each logical message exactly once. Real daemon
//! (restarted by `cloudctl` after each kill), real standalone relay, real `cloudctl`.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cloudd_e2e::{wait_for, Home, Relay, DEADLINE};
use serde_json::Value;

/// An agent that reads everything and says nothing, so the log holds only what was sent.
const QUIET_AGENT: &[&str] = &["--agent-command", "sh", "-c", "cat >/dev/null"];

/// A small seeded generator (xorshift64*), so a failing run can be replayed.
struct Random(u64);

impl Random {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

#[test]
fn kill_9_at_random_points_with_retrying_clients_holds_each_message_once() {
    let seed = std::env::var("CLOUDD_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_1234_u64);
    eprintln!("seed {seed} (set CLOUDD_TEST_SEED to replay)");
    let relay = Relay::start_with(QUIET_AGENT);
    let home = Arc::new(Home::new());
    home.wait_connected();
    let token = relay.token("ann", "acme");
    home.cloudctl_ok(&["login", "--relay", &relay.url(), "--token", &token]);
    let created = home.cloudctl_json(&["session", "create", "--task", "idempotency"]);
    let session = created["session"]["id"].as_str().unwrap().to_owned();

    const CLIENTS: usize = 2;
    const PER_CLIENT: usize = 80;
    let stop = Arc::new(AtomicBool::new(false));
    let kills = Arc::new(AtomicU32::new(0));
    // Sends answered so far: the killer waits for a few between kills, so the run always
    // progresses (a daemon killed while it starts, again and again, would not).
    let answered = Arc::new(AtomicU32::new(0));
    let killer = {
        let (home, stop, kills, answered) = (
            Arc::clone(&home),
            Arc::clone(&stop),
            Arc::clone(&kills),
            Arc::clone(&answered),
        );
        std::thread::spawn(move || {
            let mut random = Random(seed | 1);
            while !stop.load(Ordering::Relaxed) {
                let progress = answered.load(Ordering::Relaxed) + 4;
                while answered.load(Ordering::Relaxed) < progress && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                // Then at a random point: while sends are in flight, replies being written,
                // or the journal flushing.
                std::thread::sleep(Duration::from_millis(random.below(120)));
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if let Some(pid) = home.daemon_pid() {
                    // SAFETY: kill(2) on a pid; a stale pid is at worst ESRCH.
                    if unsafe { libc::kill(pid as i32, libc::SIGKILL) } == 0 {
                        kills.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (home, session, answered) =
                (Arc::clone(&home), session.clone(), Arc::clone(&answered));
            std::thread::spawn(move || {
                let mut retries = 0;
                for n in 0..PER_CLIENT {
                    let text = format!("c{client}-{n:04}");
                    let key = format!("key-{text}");
                    // Retry with the same key until the outcome is known.
                    loop {
                        let output = home.cloudctl(&[
                            "--json",
                            "send",
                            &session,
                            &text,
                            "--idempotency-key",
                            &key,
                        ]);
                        if output.status.success() {
                            answered.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        retries += 1;
                        assert!(retries < 10 * PER_CLIENT, "too many failures: {output:?}");
                    }
                }
                retries
            })
        })
        .collect();
    let retries: usize = clients.into_iter().map(|c| c.join().unwrap()).sum();
    stop.store(true, Ordering::Relaxed);
    killer.join().unwrap();
    let kills = kills.load(Ordering::Relaxed);
    eprintln!("{kills} kills, {retries} sends retried by the test's clients");
    assert!(kills >= 3, "the daemon was killed only {kills} times");

    // Let the last daemon deliver what it holds.
    // (A client may have met the last daemon as it died: status is asked until it answers.)
    wait_for("the journal to drain", DEADLINE * 3, || {
        let output = home.cloudctl(&["--json", "status"]);
        let status: Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
        output.status.success()
            && status["relay"]["state"] == "connected"
            && status["relay"]["journal_depth"] == 0
    });
    let held = relay.user_messages(&token, &session);
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for message in &held {
        *counts.entry(message.clone()).or_default() += 1;
    }
    let duplicated: Vec<_> = counts.iter().filter(|(_, &n)| n > 1).take(10).collect();
    let missing: Vec<String> = (0..CLIENTS)
        .flat_map(|c| (0..PER_CLIENT).map(move |n| format!("c{c}-{n:04}")))
        .filter(|m| !counts.contains_key(m))
        .take(10)
        .collect();
    assert!(duplicated.is_empty(), "duplicated: {duplicated:?}");
    assert!(missing.is_empty(), "missing: {missing:?}");
    assert_eq!(held.len(), CLIENTS * PER_CLIENT);
}
