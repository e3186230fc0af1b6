//! docs/PROTOCOL.md's "Reference by example", replayed against the real daemon (with its
//! embedded relay): each documented request is sent as written (the session id, the
//! worktree path and the prompt id replaced by this run's), and the daemon's reply must
//! have the documented reply's shape: the same keys at every level, the same JSON types,
//! the same error kind, the same word for a result that is one (`"pong"`, `"deleted"`).
//! Every method is replayed at least once, so a method the document lacks, or documents
//! wrongly, fails here too. (The codecs are checked against the same examples, value for
//! value, by protocol/tests/protocol_doc.rs.)

use std::collections::BTreeSet;

use cloud_protocol::ipc::method;
use cloud_protocol::jsonrpc::decode_request;
use cloudd_e2e::{wait_for, Home, JsonClient, DEADLINE};
use serde_json::{json, Value};

const DOC: &str = include_str!("../../docs/PROTOCOL.md");

/// What the document's examples name, and what this run names instead.
const DOC_SESSION: &str = "s-013f44165fb84e3d";
const DOC_PATH: &str = "/home/me/src/app";
const DOC_PROMPT: &str = "bash-4807-1";

/// The example lines (`(client writes, line)`) of entry `name` of subsection `section`.
fn entry(section: &str, name: &str) -> Vec<(bool, String)> {
    let start = DOC
        .find("\n## Reference by example\n")
        .expect("docs/PROTOCOL.md has a \"Reference by example\" section");
    let mut in_section = false;
    let mut in_entry = false;
    let mut in_block = false;
    let mut lines = Vec::new();
    for line in DOC[start + 1..].lines().skip(1) {
        if line.starts_with("## ") {
            break;
        } else if line.starts_with("```") {
            in_block = !in_block;
        } else if in_block {
            if in_entry {
                if let Some(sent) = line.strip_prefix("-> ") {
                    lines.push((true, sent.to_owned()));
                } else if let Some(received) = line.strip_prefix("<- ") {
                    lines.push((false, received.to_owned()));
                }
            }
        } else if let Some(title) = line.strip_prefix("### ") {
            in_section = title.trim() == section;
            in_entry = false;
        } else if let Some(title) = line.strip_prefix("#### ") {
            in_entry = in_section && title.split('`').nth(1) == Some(name);
        }
    }
    assert!(!lines.is_empty(), "no examples of {section} {name}");
    lines
}

/// Whether `real` has the shape of `documented`; a `null` on either side matches anything
/// (optional fields), and arrays are compared by their first elements.
fn same_shape(documented: &Value, real: &Value, at: &str) -> Result<(), String> {
    match (documented, real) {
        (Value::Null, _) | (_, Value::Null) => Ok(()),
        (Value::Object(doc), Value::Object(got)) => {
            let doc_keys: BTreeSet<&String> = doc.keys().collect();
            let got_keys: BTreeSet<&String> = got.keys().collect();
            if doc_keys != got_keys {
                return Err(format!(
                    "{at}: documented keys {doc_keys:?}, the daemon's {got_keys:?}"
                ));
            }
            for (key, value) in doc {
                same_shape(value, &got[key], &format!("{at}.{key}"))?;
            }
            Ok(())
        }
        (Value::Array(doc), Value::Array(got)) => match (doc.first(), got.first()) {
            (Some(doc), Some(got)) => same_shape(doc, got, &format!("{at}[0]")),
            _ => Ok(()),
        },
        (Value::String(_), Value::String(_))
        | (Value::Number(_), Value::Number(_))
        | (Value::Bool(_), Value::Bool(_)) => Ok(()),
        _ => Err(format!(
            "{at}: documented {documented}, the daemon wrote {real}"
        )),
    }
}

/// Replays documented exchanges on one connection.
struct Replay {
    client: JsonClient,
    substitutions: Vec<(&'static str, String)>,
    /// The methods replayed so far.
    methods: BTreeSet<String>,
}

impl Replay {
    fn connect(home: &Home) -> Replay {
        Replay {
            client: JsonClient::connect(&home.paths.socket).expect("connect"),
            substitutions: Vec::new(),
            methods: BTreeSet::new(),
        }
    }

    fn substitute(&self, line: &str) -> String {
        let mut line = line.to_owned();
        for (documented, real) in &self.substitutions {
            line = line.replace(documented, real);
        }
        line
    }

    /// Sends the requests of `section` `name` (only those at the indices in `only`, when
    /// given), checks each reply against the documented one, and returns the replies.
    fn run(&mut self, section: &str, name: &str, only: Option<&[usize]>) -> Vec<Value> {
        let lines = entry(section, name);
        let mut replies = Vec::new();
        let sent_lines = lines.iter().enumerate().filter(|(_, (out, _))| *out);
        for (index, (at, (_, documented_line))) in sent_lines.enumerate() {
            if only.is_some_and(|only| !only.contains(&index)) {
                continue;
            }
            let line = self.substitute(documented_line);
            let id = serde_json::from_str::<Value>(&line)
                .ok()
                .and_then(|request| request.get("id").cloned())
                .unwrap_or(Value::Null);
            if let Ok(request) = decode_request(line.as_bytes()) {
                self.methods.insert(request.request.method().to_owned());
            }
            // The documented reply: the next line the daemon writes with this id.
            let documented: Value = lines[at..]
                .iter()
                .filter(|(out, _)| !*out)
                .map(|(_, reply)| serde_json::from_str::<Value>(reply).unwrap())
                .find(|reply| reply.get("method").is_none() && reply["id"] == id)
                .unwrap_or_else(|| panic!("{name}: no documented reply to {line}"));
            self.client
                .send_raw(format!("{line}\n").as_bytes())
                .unwrap();
            let real = loop {
                let message = self.client.recv().unwrap().unwrap_or_else(|| {
                    panic!("{name}: the daemon closed before replying to {line}")
                });
                if message.get("method").is_none() && message["id"] == id {
                    break message;
                }
            };
            let context =
                format!("{section} `{name}`: {line}\n documented: {documented}\n real: {real}");
            if let Err(e) = same_shape(&documented, &real, "reply") {
                panic!("{e}\n{context}");
            }
            assert_eq!(
                real["error"]["data"]["kind"], documented["error"]["data"]["kind"],
                "{context}"
            );
            if documented["result"].is_string() {
                assert_eq!(real["result"], documented["result"], "{context}");
            }
            replies.push(real);
        }
        replies
    }
}

#[test]
fn the_documented_exchanges_hold_against_the_real_daemon() {
    let home = Home::new();
    // The embedded relay's shell (`session/shell`) starts in a HOME of its own: the test
    // user's startup files are not its to read.
    let shell_home = tempfile::tempdir().unwrap();
    let mut daemon = home.spawn_daemon_with(|command| {
        command.env("HOME", shell_home.path());
    });
    home.wait_connected();
    let worktree = tempfile::tempdir().unwrap();
    std::fs::write(worktree.path().join("main.py"), "print('hi')\n").unwrap();

    // Each on a fresh connection: they need one that is not greeted, or close it.
    let mut fresh = Replay::connect(&home);
    fresh.run("Errors", "hello_required", None);
    let mut fresh = Replay::connect(&home);
    fresh.run("Errors", "version_mismatch", None);

    let mut c = Replay::connect(&home);
    c.run("Methods", "hello", None);
    for name in ["ping", "status", "subscribe", "whoami"] {
        c.run("Methods", name, None);
    }
    // The first example logs in to a relay that does not exist here; the second is
    // refused before any connection is tried.
    c.run("Methods", "login", Some(&[1]));

    let created = c.run("Methods", "session/create", None);
    let session = created[0]["result"]["session"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    c.substitutions.push((DOC_SESSION, session.clone()));
    c.substitutions
        .push((DOC_PATH, worktree.path().to_str().unwrap().to_owned()));
    for name in ["session/list", "session/show", "session/share", "attach"] {
        c.run("Methods", name, None);
    }

    // A prompt to list and answer: the shell agent asks before running the command.
    c.run("Methods", "send", Some(&[0]));
    let mut asker = JsonClient::connect(&home.paths.socket).unwrap();
    asker.hello().unwrap();
    let mut prompt = String::new();
    wait_for("the shell agent's prompt", DEADLINE, || {
        let prompts = asker
            .call("permissions", json!({"session": session}))
            .unwrap();
        match prompts["result"][0]["request_id"].as_str() {
            Some(id) => {
                prompt = id.to_owned();
                true
            }
            None => false,
        }
    });
    c.substitutions.push((DOC_PROMPT, prompt));
    for name in ["permissions", "answer"] {
        c.run("Methods", name, None);
    }
    c.run("Methods", "send", Some(&[1]));
    // A shell takes its connection over: on a connection of its own, closed after.
    let mut shell = Replay::connect(&home);
    shell.substitutions = c.substitutions.clone();
    shell.run("Methods", "hello", Some(&[1]));
    shell.run("Methods", "session/shell", None);
    c.methods.extend(shell.methods);
    for name in [
        "interrupt",
        "delivery",
        "detach",
        "teleport/push",
        "teleport/pull",
        "teleport/watch",
        "teleport/status",
        "teleport/stop",
        "metrics",
        "session/unfollow",
        "session/action",
    ] {
        c.run("Methods", name, None);
    }
    // The embedded relay's user belongs to one org: the switch example that succeeds
    // names another, so only the refused one is replayed.
    c.run("Methods", "org/list", None);
    c.run("Methods", "org/switch", Some(&[1]));
    for name in ["settings/get", "settings/set"] {
        c.run("Methods", name, None);
    }
    c.run("Errors", "conflict", None);

    // The errors a request causes and this daemon can be made to give. Not replayed:
    // `internal` (a full disk), `relay_unavailable` (a relay that does not connect),
    // `timeout` (15 s), the `closing`-only kinds, and `refused` and `already_answered`,
    // whose examples the session/action and answer entries above replayed.
    for name in [
        "parse_error",
        "invalid_request",
        "method_not_found",
        "invalid_params",
        "not_found",
    ] {
        c.run("Errors", name, None);
    }

    // The device family as a daemon on the embedded relay answers it: each refused
    // before any relay is asked (the approved, denied and listed examples need a second
    // machine and a remote relay: e2e/tests/device.rs runs those).
    c.run("Methods", "login/device", Some(&[1]));
    c.run("Methods", "login/device/poll", Some(&[3]));
    c.run("Methods", "device/approve", Some(&[2]));
    for name in ["device/deny", "device/list", "device/revoke"] {
        c.run("Methods", name, Some(&[1]));
    }
    c.run("Methods", "credentials", None);

    c.run("Methods", "logout", None);
    c.run("Methods", "shutdown", None);
    daemon.wait_exit(DEADLINE);

    let missing: Vec<&&str> = method::ALL
        .iter()
        .filter(|name| !c.methods.contains(**name))
        .collect();
    assert!(
        missing.is_empty(),
        "methods not replayed (document them in PROTOCOL.md, and replay them here): {missing:?}"
    );
}
