//! `cloudctl session unfollow`: the daemon stops following a session (a `Leave` on the
//! bridge), drops its stored copy of the log, and follows it again, from the relay's
//! beginning, when asked to attach. Real daemon, embedded relay, real `cloudctl`.

use cloudd_e2e::{wait_for, Home, DEADLINE};
use serde_json::{json, Value};

#[test]
fn unfollowing_drops_the_local_copy_and_attach_follows_again() {
    let home = Home::new();
    home.wait_connected();
    let created = home.cloudctl_json(&["session", "create", "--task", "unfollow"]);
    let session = created["session"]["id"].as_str().unwrap().to_owned();
    home.cloudctl_ok(&["send", &session, "echo kept-by-the-relay"]);
    // Created sessions are followed: the prompt reaches the daemon's stored copy.
    let mut prompts = json!([]);
    wait_for("the prompt to reach the daemon", DEADLINE, || {
        prompts = home.cloudctl_json(&["permissions", &session]);
        prompts.as_array().is_some_and(|p| !p.is_empty())
    });

    let out = home.cloudctl_ok(&["session", "unfollow", &session]);
    assert!(out.contains("no longer following"), "{out}");
    assert_eq!(
        home.cloudctl_json(&["session", "unfollow", &session]),
        json!({"unfollowed": true}),
        "unfollowing twice is not an error"
    );
    // Still listed: unfollowing changes nothing on the relay.
    let listed = home.cloudctl_json(&["session", "list"]);
    assert!(
        listed["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["id"] == session.as_str()),
        "{listed}"
    );

    // Attaching follows it again, and the relay replays the whole log.
    let replay = home.cloudctl_ok(&["attach", &session, "--since", "0", "--no-follow", "--json"]);
    assert!(replay.contains("kept-by-the-relay"), "{replay}");
    let seqs: Vec<u64> = replay
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs.first(), Some(&1), "{replay}");
    assert!(seqs.windows(2).all(|w| w[0] + 1 == w[1]), "{replay}");
    let prompts = home.cloudctl_json(&["permissions", &session]);
    assert_eq!(prompts.as_array().map(Vec::len), Some(1), "{prompts}");
}
