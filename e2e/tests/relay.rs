//! The relay and the durable bridge with real processes: the daemon (embedded relay, or a
//! standalone `cloud-relay`), the real `cloudctl`, and raw socket clients.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;

use cloud_protocol::frame;
use cloud_protocol::ipc::{Request, Response, ServerMessage};
use cloudd_e2e::{wait_for, Home, JsonClient, Relay, DEADLINE};
use serde_json::{json, Value};

/// A JSON-RPC client attached to one session, reading its log as it grows.
struct Watcher {
    client: JsonClient,
    session: String,
    seen: Vec<Value>,
}

impl Watcher {
    fn attach(home: &Home, session: &str) -> Watcher {
        let mut client = JsonClient::connect(&home.paths.socket).unwrap();
        client.hello().unwrap();
        let reply = client
            .call("attach", json!({"session": session, "since": 0}))
            .unwrap();
        assert!(reply.get("result").is_some(), "{reply}");
        Watcher {
            client,
            session: session.to_owned(),
            seen: Vec::new(),
        }
    }

    /// Reads entries until one satisfies `matches`; returns it.
    fn until(&mut self, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
        if let Some(entry) = self.seen.iter().find(|e| matches(e)) {
            return entry.clone();
        }
        loop {
            let line = self
                .client
                .recv()
                .unwrap_or_else(|e| panic!("waiting for {what}: {e}; seen {:#?}", self.seen))
                .unwrap_or_else(|| panic!("daemon closed while waiting for {what}"));
            if line["method"] == "session/log" && line["params"]["session"] == self.session.as_str()
            {
                let entry = line["params"]["entry"].clone();
                self.seen.push(entry.clone());
                if matches(&entry) {
                    return entry;
                }
            }
        }
    }
}

fn message_type(entry: &Value) -> &str {
    entry["message"]["type"].as_str().unwrap_or("")
}

fn is_prompt(entry: &Value) -> bool {
    message_type(entry) == "control_request"
        && entry["message"]["request"]["subtype"] == "can_use_tool"
}

fn assistant_text(entry: &Value) -> String {
    entry["message"]["message"]["content"]
        .as_array()
        .map(|blocks| blocks.iter().filter_map(|b| b["text"].as_str()).collect())
        .unwrap_or_default()
}

fn create_session(home: &Home, args: &[&str]) -> String {
    let mut all = vec!["session", "create"];
    all.extend_from_slice(args);
    let created = home.cloudctl_json(&all);
    created["session"]["id"].as_str().unwrap().to_owned()
}

fn login(home: &Home, relay: &Relay, user: &str, org: &str) -> String {
    let token = relay.token(user, org);
    home.cloudctl_ok(&["login", "--relay", &relay.url(), "--token", &token]);
    token
}

#[test]
fn embedded_relay_round_trip_with_allow_and_deny() {
    let home = Home::new();
    let identity = home.wait_connected();
    assert_eq!(identity["relay"]["mode"], "embedded");
    let status = home.cloudctl_ok(&["status"]);
    assert!(
        status.contains("relay      embedded, connected"),
        "{status}"
    );

    let session = create_session(&home, &["--task", "round trip"]);
    let mut watcher = Watcher::attach(&home, &session);
    let sent = home.cloudctl_ok(&["send", &session, "echo hello-from-the-agent"]);
    assert!(sent.starts_with("sent (seq "), "{sent}");

    // The prompt, as the agent asked it, as `permissions` lists it.
    let prompt = watcher.until("the first prompt", is_prompt);
    assert_eq!(prompt["message"]["request"]["tool_name"], "Bash");
    assert_eq!(
        prompt["message"]["request"]["input"]["command"],
        "echo hello-from-the-agent"
    );
    let request_id = prompt["message"]["request_id"].as_str().unwrap().to_owned();
    let prompts = home.cloudctl_json(&["permissions", &session]);
    assert_eq!(prompts[0]["request_id"], request_id.as_str());

    home.cloudctl_ok(&["allow", &session, &request_id]);
    watcher.until("the command's output", |e| {
        assistant_text(e).contains("hello-from-the-agent")
    });
    watcher.until("the result", |e| message_type(e) == "result");
    assert_eq!(home.cloudctl_json(&["permissions", &session]), json!([]));

    // A second answer to the same prompt is refused, clearly.
    let again = home.cloudctl(&["allow", &session, &request_id]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already answered"),
        "{again:?}"
    );

    // A denied command never runs; the agent reports the denial.
    home.cloudctl_ok(&["send", &session, "echo must-not-run"]);
    let prompt = watcher.until("the second prompt", |e| {
        is_prompt(e) && e["message"]["request"]["input"]["command"] == "echo must-not-run"
    });
    let request_id = prompt["message"]["request_id"].as_str().unwrap().to_owned();
    home.cloudctl_ok(&["deny", &session, &request_id, "--message", "not today"]);
    let result = watcher.until("the denial's result", |e| {
        message_type(e) == "result" && e["seq"].as_u64() > prompt["seq"].as_u64()
    });
    assert!(result.to_string().contains("not today"), "{result}");
    assert!(!watcher
        .seen
        .iter()
        .any(|e| assistant_text(e).contains("must-not-run")));

    // The user's own messages are in the log too, in order.
    let users: Vec<&Value> = watcher
        .seen
        .iter()
        .filter(|e| message_type(e) == "user")
        .collect();
    assert_eq!(users.len(), 2);

    // `session list` and `show` answer from the replica.
    let list = home.cloudctl_json(&["session", "list"]);
    assert_eq!(list["sessions"][0]["id"], session.as_str());
    assert_eq!(list["stale"], false);
    home.cloudctl_ok(&["down"]);
}

#[test]
fn unfinished_messages_survive_a_pause_and_a_relay_restart_and_attach_shows_what_could_not_run() {
    let mut relay = Relay::start();
    let home = Home::new();
    login(&home, &relay, "ann", "acme");
    let session = create_session(&home, &["--task", "work left unfinished"]);
    let mut watcher = Watcher::attach(&home, &session);
    let asks = |command: &'static str, after: u64| {
        move |e: &Value| {
            is_prompt(e)
                && e["message"]["request"]["input"]["command"] == command
                && e["seq"].as_u64() > Some(after)
        }
    };
    let request_id = |prompt: &Value| prompt["message"]["request_id"].as_str().unwrap().to_owned();

    // AAA's prompt is left unanswered, BBB waits behind it; a pause stops the agent where
    // it is (SIGSTOP) and resume continues it: AAA's prompt is still open, BBB still
    // queued, and each runs once.
    home.cloudctl_ok(&["send", &session, "echo AAA"]);
    home.cloudctl_ok(&["send", &session, "echo BBB"]);
    let first = watcher.until("AAA's prompt", asks("echo AAA", 0));
    home.cloudctl_ok(&["session", "pause", &session]);
    home.cloudctl_ok(&["session", "resume", &session]);
    let after = first["seq"].as_u64().unwrap();
    home.cloudctl_ok(&["allow", &session, &request_id(&first)]);
    let prompt = watcher.until("BBB's prompt", asks("echo BBB", after));
    home.cloudctl_ok(&["allow", &session, &request_id(&prompt)]);
    let asked = prompt["seq"].as_u64().unwrap();
    watcher.until("BBB's result", |e| {
        message_type(e) == "result" && e["seq"].as_u64() > Some(asked)
    });

    // The relay dies with CCC's prompt pending; the allow queued meanwhile reaches a relay
    // that withdrew that prompt at its restart, and handed CCC to a new agent.
    home.cloudctl_ok(&["send", &session, "echo CCC"]);
    let prompt = watcher.until("CCC's prompt", asks("echo CCC", asked));
    let withdrawn = request_id(&prompt);
    relay.kill();
    let queued = home.cloudctl_ok(&["allow", &session, &withdrawn]);
    assert!(queued.contains("(queued"), "{queued}");
    relay.restart();
    let refused = watcher.until("the not_delivered entry", |e| {
        e["message"]["subtype"] == "not_delivered"
    });
    assert_eq!(refused["author"], "relay");
    watcher.until(
        "CCC's prompt from the new agent",
        asks("echo CCC", prompt["seq"].as_u64().unwrap()),
    );

    // Completing the session gives up what no agent finished, in the log.
    home.cloudctl_ok(&["session", "complete", &session]);
    watcher.until("the not_processed entry", |e| {
        e["message"]["subtype"] == "not_processed"
    });
    let replay = home.cloudctl_ok(&["attach", &session, "--since", "0", "--no-follow"]);
    assert!(
        replay.contains(&format!(
            "relay: not delivered: permission request {withdrawn} was withdrawn (allow {withdrawn})"
        )),
        "{replay}"
    );
    assert!(
        replay.contains(
            "relay: not processed: echo CCC (the session was completed before an agent finished it)"
        ),
        "{replay}"
    );
    let outputs: Vec<&str> = replay
        .lines()
        .filter(|l| l.ends_with("agent: AAA") || l.ends_with("agent: BBB"))
        .collect();
    assert_eq!(outputs.len(), 2, "each ran once: {replay}");
    home.cloudctl_ok(&["down"]);
}

/// Sends `count` messages `prefix-NNNNN` on one binary connection, pipelined in batches;
/// returns how many were confirmed queued before the connection broke (or all of them).
fn send_pipelined(
    home: &Home,
    session: &str,
    prefix: &str,
    range: std::ops::Range<usize>,
    stop_after: Option<(usize, &mut dyn FnMut())>,
) -> usize {
    let mut stream = cloudd_e2e::binary_connect(&home.paths.socket);
    let mut buf = Vec::new();
    let read_one = |stream: &mut UnixStream, buf: &mut Vec<u8>| -> Option<ServerMessage> {
        loop {
            if let Some((message, used)) = frame::decode::<ServerMessage>(buf).unwrap() {
                buf.drain(..used);
                return Some(message);
            }
            let mut chunk = [0u8; 65536];
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    assert!(matches!(
        read_one(&mut stream, &mut buf),
        Some(ServerMessage::Reply {
            id: 0,
            result: Ok(_)
        })
    ));
    let mut stop_after = stop_after;
    let mut confirmed = range.start;
    for batch in range.clone().collect::<Vec<_>>().chunks(100) {
        let bytes = cloudd_e2e::frames(batch.iter().map(|&n| {
            let request = Request::Send {
                session: session.to_owned(),
                text: format!("{prefix}-{n:05}"),
                key: None,
                wait: false,
            };
            (n as u64 + 1, request)
        }));
        if stream.write_all(&bytes).is_err() {
            return confirmed;
        }
        for _ in batch {
            match read_one(&mut stream, &mut buf) {
                Some(ServerMessage::Reply {
                    result: Ok(Response::Queued { .. }),
                    ..
                }) => confirmed += 1,
                None => return confirmed,
                other => panic!("unexpected {other:?}"),
            }
            if let Some((after, action)) = stop_after.as_mut() {
                if confirmed == *after {
                    action();
                    return confirmed;
                }
            }
        }
    }
    confirmed
}

fn wait_journal_empty(home: &Home) {
    wait_for("the journal to drain", DEADLINE * 3, || {
        let status = home.cloudctl_json(&["status"]);
        status["relay"]["state"] == "connected" && status["relay"]["journal_depth"] == 0
    });
}

/// An agent that reads everything and says nothing, so the log holds only what was sent.
const QUIET_AGENT: &[&str] = &["--agent-command", "sh", "-c", "cat >/dev/null"];

#[test]
fn kill_9_while_sending_10000_messages_loses_and_duplicates_nothing() {
    let relay = Relay::start_with(QUIET_AGENT);
    let home = Home::new();
    let mut daemon = home.spawn_daemon();
    let token = login(&home, &relay, "ann", "acme");
    let session = create_session(&home, &[]);

    let mut kill = || daemon.signal(libc::SIGKILL);
    let confirmed = send_pipelined(&home, &session, "m", 0..10_000, Some((3_000, &mut kill)));
    assert_eq!(confirmed, 3_000);
    daemon.wait_exit(DEADLINE);

    let _daemon = home.spawn_daemon();
    wait_journal_empty(&home);
    // Everything confirmed reached the relay; what was in flight may or may not have been
    // journaled. Resend what is missing, as a client that saw no reply would.
    let held = relay.user_messages(&token, &session);
    assert!(held.len() >= confirmed, "{} < {confirmed}", held.len());
    let resend_from = held.len();
    send_pipelined(&home, &session, "m", resend_from..10_000, None);
    wait_journal_empty(&home);
    let held = relay.user_messages(&token, &session);
    let expected: Vec<String> = (0..10_000).map(|n| format!("m-{n:05}")).collect();
    let missing: Vec<&String> = expected
        .iter()
        .filter(|m| !held.contains(m))
        .take(10)
        .collect();
    assert_eq!(
        held.len(),
        expected.len(),
        "each message exactly once; resent from {resend_from}; missing {missing:?}"
    );
    if held != expected {
        let at = held
            .iter()
            .zip(&expected)
            .position(|(a, b)| a != b)
            .unwrap();
        let lo = at.saturating_sub(3);
        panic!(
            "in order; resent from {resend_from}, confirmed {confirmed}; first difference at {at}: held {:?} expected {:?}",
            &held[lo..(at + 5).min(held.len())],
            &expected[lo..(at + 5).min(held.len())]
        );
    }
}

#[test]
fn a_relay_killed_and_restarted_mid_stream_loses_nothing() {
    let mut relay = Relay::start_with(QUIET_AGENT);
    let home = Home::new();
    let token = login(&home, &relay, "ann", "acme");
    let session = create_session(&home, &[]);

    send_pipelined(&home, &session, "r", 0..500, None);
    relay.kill();
    // Sending goes on while the relay is down: the journal takes it.
    let queued = home.cloudctl_ok(&["send", &session, "while-down"]);
    assert!(queued.starts_with("queued"), "{queued}");
    send_pipelined(&home, &session, "r", 500..1_000, None);
    relay.restart();
    send_pipelined(&home, &session, "r", 1_000..1_500, None);
    wait_journal_empty(&home);
    let held = relay.user_messages(&token, &session);
    let mut expected: Vec<String> = (0..500).map(|n| format!("r-{n:05}")).collect();
    expected.push("while-down".into());
    expected.extend((500..1_500).map(|n| format!("r-{n:05}")));
    assert!(
        held == expected,
        "held {} messages, expected {}",
        held.len(),
        expected.len()
    );
}

#[test]
fn a_revoked_token_is_refused_without_a_retry_storm() {
    let relay = Relay::start();
    let home = Home::new();
    login(&home, &relay, "ann", "acme");
    home.wait_connected();
    relay.revoke("ann");
    wait_for("the daemon to show the refusal", DEADLINE, || {
        home.cloudctl_json(&["status"])["relay"]["state"] == "refused"
    });
    let status = home.cloudctl_ok(&["status"]);
    assert!(status.contains("refused"), "{status}");
    assert!(!status.contains("crt_"), "the token never shows: {status}");
    // A refusal is final until the credentials change: the daemon does not come back.
    let refusals = |log: &str| log.matches("relay refused this daemon for good").count();
    let before = refusals(&std::fs::read_to_string(home.paths.log_file()).unwrap());
    assert_eq!(before, 1);
    for _ in 0..20 {
        assert_eq!(home.cloudctl_json(&["status"])["relay"]["state"], "refused");
    }
    let log = std::fs::read_to_string(home.paths.log_file()).unwrap();
    assert_eq!(refusals(&log), 1);
    assert!(
        !log.contains("relay connection failed"),
        "no retries after a refusal: {log}"
    );
}

#[test]
fn visibility_is_enforced_across_orgs_and_viewers_cannot_send() {
    let relay = Relay::start();
    let ann = Home::new();
    login(&ann, &relay, "ann", "acme");
    let bob = Home::new();
    login(&bob, &relay, "bob", "other");

    let team = create_session(&ann, &["--visibility", "team", "--task", "team only"]);
    let public = create_session(&ann, &["--visibility", "public", "--task", "for all"]);
    wait_for("bob's replica to settle", DEADLINE, || {
        bob.cloudctl_json(&["session", "list"])["sessions"]
            .as_array()
            .is_some_and(|s| s.iter().all(|s| s["id"] != team.as_str()))
    });
    let shown = bob.cloudctl(&["session", "show", &team]);
    assert_eq!(shown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&shown.stderr).contains("no session"));

    // Bob can watch the public session, read-only.
    let mut watcher = Watcher::attach(&bob, &public);
    ann.cloudctl_ok(&["send", &public, "echo visible"]);
    watcher.until("ann's message", |e| message_type(e) == "user");
    let sent = bob.cloudctl(&["send", &public, "echo from-bob"]);
    assert_eq!(sent.status.code(), Some(1), "{sent:?}");
    assert!(
        String::from_utf8_lossy(&sent.stderr).contains("viewer"),
        "{sent:?}"
    );
}

#[test]
fn a_prompt_answered_on_one_machine_is_withdrawn_everywhere() {
    let relay = Relay::start();
    let ann = Home::new();
    login(&ann, &relay, "ann", "acme");
    let cat = Home::new();
    login(&cat, &relay, "cat", "acme");
    let session = create_session(&ann, &["--visibility", "team"]);
    let mut ann_watch = Watcher::attach(&ann, &session);
    let mut cat_watch = Watcher::attach(&cat, &session);
    ann.cloudctl_ok(&["send", &session, "echo shared"]);
    let prompt = cat_watch.until("the prompt on cat's machine", is_prompt);
    let request_id = prompt["message"]["request_id"].as_str().unwrap().to_owned();
    ann_watch.until("the prompt on ann's machine", is_prompt);

    cat.cloudctl_ok(&["allow", &session, &request_id]);
    // Ann's machine sees the answer at once, and its prompt list empties.
    ann_watch.until("the answer", |e| message_type(e) == "control_response");
    assert_eq!(ann.cloudctl_json(&["permissions", &session]), json!([]));
    let second = ann.cloudctl(&["deny", &session, &request_id]);
    assert_eq!(second.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&second.stderr).contains("already answered"));
    // The agent saw exactly one answer: the command ran once.
    ann_watch.until("the output", |e| assistant_text(e).contains("shared"));
    ann_watch.until("the result", |e| message_type(e) == "result");
    let answers = ann_watch
        .seen
        .iter()
        .filter(|e| message_type(e) == "control_response")
        .count();
    assert_eq!(answers, 1);
}

#[test]
fn network_none_gives_the_agent_no_network_or_says_it_cannot() {
    let home = Home::new();
    home.wait_connected();
    let session = create_session(&home, &["--network", "none"]);
    let mut watcher = Watcher::attach(&home, &session);
    let note = watcher.until("the network note", |e| e["message"]["subtype"] == "network");
    // /proc/net/dev lists the interfaces of the reader's own network namespace.
    home.cloudctl_ok(&[
        "send",
        &session,
        "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '",
    ]);
    let prompt = watcher.until("the prompt", is_prompt);
    let request_id = prompt["message"]["request_id"].as_str().unwrap().to_owned();
    home.cloudctl_ok(&["allow", &session, &request_id]);
    watcher.until("the result", |e| message_type(e) == "result");
    let interfaces: Vec<String> = watcher
        .seen
        .iter()
        .map(assistant_text)
        .filter(|t| !t.is_empty())
        .collect();
    if note["message"]["enforced"] == true {
        assert_eq!(
            interfaces,
            ["lo"],
            "only a loopback in the agent's namespace"
        );
    } else {
        // Where it cannot be enforced, the session says so, with the reason.
        assert!(
            note["message"]["reason"]
                .as_str()
                .is_some_and(|r| !r.is_empty()),
            "{note}"
        );
    }
}

#[test]
fn attach_since_replays_what_happened_while_nobody_watched() {
    let home = Home::new();
    home.wait_connected();
    let session = create_session(&home, &["--task", "unwatched"]);
    home.cloudctl_ok(&["send", &session, "echo while-nobody-watched"]);
    // Nobody is attached: the daemon still follows the session and stores its log.
    let mut prompts = json!([]);
    wait_for("the prompt to reach the daemon", DEADLINE, || {
        prompts = home.cloudctl_json(&["permissions", &session]);
        prompts.as_array().is_some_and(|p| !p.is_empty())
    });
    let request_id = prompts[0]["request_id"].as_str().unwrap().to_owned();
    home.cloudctl_ok(&["allow", &session, &request_id]);
    let mut replay = String::new();
    wait_for("the result in the stored log", DEADLINE, || {
        replay = home.cloudctl_ok(&["attach", &session, "--since", "0", "--no-follow"]);
        replay.contains("result success")
    });
    let lines: Vec<&str> = replay.lines().collect();
    assert!(
        lines[0].starts_with("[1] relay: session starting"),
        "{replay}"
    );
    assert!(replay.contains("asks to use Bash"), "{replay}");
    assert!(replay.contains("agent: while-nobody-watched"), "{replay}");
    // From a later point, only what came after.
    let tail = home.cloudctl_ok(&["attach", &session, "--since", "4", "--no-follow", "--json"]);
    let seqs: Vec<u64> = tail
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert!(!seqs.is_empty() && seqs.iter().all(|&s| s > 4), "{tail}");
}
