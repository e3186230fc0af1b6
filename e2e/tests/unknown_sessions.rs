//! Read commands never report success on nothing (issue 8, point 7): an unknown session is
//! an error with one wording everywhere, and a log the daemon no longer holds (after
//! `session unfollow`) is fetched again from the relay before it is replayed. Real daemon,
//! embedded relay, real `cloudctl`.

use std::time::{Duration, Instant};

use cloudd_e2e::{wait_for, Home, DEADLINE};
use serde_json::Value;

/// Runs `cloudctl ARGS` and asserts it fails with exit 1 and the one "unknown session"
/// wording, within a bound (`attach` without `--no-follow` must not wait forever).
fn assert_unknown(home: &Home, args: &[&str]) {
    let started = Instant::now();
    let output = home.cloudctl(args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "cloudctl {args:?}: {stderr}");
    assert!(
        stderr.contains("no session s-does-not-exist (see `cloudctl session list`)"),
        "cloudctl {args:?}: {stderr}"
    );
    assert!(output.stdout.is_empty() || args.contains(&"--json"));
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{args:?} took {:?}",
        started.elapsed()
    );
}

#[test]
fn unknown_sessions_are_errors_for_every_read_command() {
    let home = Home::new();
    home.wait_connected();
    let unknown = "s-does-not-exist";
    assert_unknown(&home, &["attach", unknown, "--no-follow"]);
    assert_unknown(&home, &["attach", unknown]);
    assert_unknown(&home, &["attach", unknown, "--since", "0", "--no-follow"]);
    assert_unknown(&home, &["permissions", unknown]);
    assert_unknown(&home, &["session", "show", unknown]);
    let json = home.cloudctl(&["--json", "permissions", unknown]);
    assert_eq!(json.status.code(), Some(1));
    let error: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert!(
        error["error"].as_str().unwrap().contains("no session"),
        "{error}"
    );
}

fn replay(home: &Home, session: &str) -> Vec<u64> {
    home.cloudctl_ok(&["attach", session, "--since", "0", "--no-follow", "--json"])
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

#[test]
fn attach_after_unfollow_replays_the_whole_log_at_once() {
    let home = Home::new();
    home.wait_connected();
    let created = home.cloudctl_json(&["session", "create", "--task", "refetch"]);
    let session = created["session"]["id"].as_str().unwrap().to_owned();
    for n in 0..3 {
        home.cloudctl_ok(&["send", &session, &format!("echo entry-{n}")]);
    }
    // The shell agent asks about the first command and waits: the log stops growing once the
    // three messages and the prompt are in.
    let mut before = Vec::new();
    wait_for("the log to settle", DEADLINE, || {
        before = replay(&home, &session);
        before.len() >= 4
            && !home
                .cloudctl_json(&["permissions", &session])
                .as_array()
                .unwrap()
                .is_empty()
    });
    let before = replay(&home, &session);

    home.cloudctl_ok(&["session", "unfollow", &session]);
    // One attach, no retrying: the daemon fetches what it dropped before it replays.
    let after = replay(&home, &session);
    assert_eq!(
        after, before,
        "the replay after unfollowing must be the whole log"
    );
    assert_eq!(after.first(), Some(&1));
    // And the pending prompt is back too, without retrying.
    home.cloudctl_ok(&["session", "unfollow", &session]);
    let prompts = home.cloudctl_json(&["permissions", &session]);
    assert_eq!(prompts.as_array().map(Vec::len), Some(1), "{prompts}");
}
