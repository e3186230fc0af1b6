//! A subscriber that stops reading, with the real daemon and a raw JSON-RPC client as an
//! editor would be: it is cut off, the daemon's log says why at once, and when it reads
//! again it finds whole messages, then a `closing` that names the reason, then the end.

use cloudd_e2e::{Home, JsonClient, DEADLINE};
use serde_json::{json, Value};

#[test]
fn a_stalled_subscriber_reads_why_it_was_cut_off_and_the_log_says_so() {
    let home = Home::new();
    // At debug level every request is logged, so every ping feeds the log topic.
    let _daemon = home.spawn_daemon_with(|command| {
        command.env("CLOUDD_LOG", "debug");
    });
    let mut stalled = JsonClient::connect(&home.paths.socket).unwrap();
    stalled.hello().unwrap();
    let subscribed = stalled
        .call("subscribe", json!({"topics": ["log"]}))
        .unwrap();
    assert_eq!(subscribed["result"]["topics"], json!(["log"]));
    // From here on, `stalled` reads nothing until the daemon has logged cutting it off.

    let mut busy = JsonClient::connect(&home.paths.socket).unwrap();
    busy.hello().unwrap();
    let start = std::time::Instant::now();
    let cut_off = |log: &str| {
        log.lines().any(|line| {
            line.contains("disconnecting stalled client") || line.contains("slow subscriber")
        })
    };
    while !cut_off(&home.read_daemon_log()) {
        for _ in 0..1000 {
            assert_eq!(busy.call("ping", Value::Null).unwrap()["result"], "pong");
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the stalled subscriber was never cut off"
        );
    }

    // Reading again: whole log notifications, then the closing, then the end of the
    // stream (a cut message would not parse).
    let mut lines = Vec::new();
    while let Some(line) = stalled
        .recv()
        .expect("whole messages until the daemon closes")
    {
        lines.push(line);
    }
    let (closing, before) = lines.split_last().expect("at least the closing");
    assert!(
        before.iter().all(|line| line["method"] == "log"),
        "{before:?}"
    );
    assert_eq!(closing["method"], "closing", "{closing}");
    assert_eq!(closing["params"]["code"], "slow_consumer", "{closing}");
    let reason = closing["params"]["message"].as_str().unwrap();
    assert!(
        reason.starts_with("disconnected: this client")
            && reason.contains("read")
            && reason.contains("as they arrive"),
        "{reason}"
    );
    // The same reason is in the daemon's log.
    let log = home.read_daemon_log();
    assert!(
        log.lines()
            .any(|line| line.contains("WARN") && line.contains(reason)),
        "{reason} not in the log:\n{}",
        log.lines()
            .filter(|l| l.contains("WARN"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
