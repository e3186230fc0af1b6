//! What `cloudctl`'s session commands print and read, with the real daemon, a real
//! `cloud-relay` and the real `cloudctl`: human tables that stay aligned whatever the
//! values, `--json` prompts whose input is an object, and `send ID -`, which takes a
//! message longer than a command line from stdin.

use std::io::Write as _;
use std::process::Stdio;

use cloudd_e2e::{wait_for, Home, Relay, DEADLINE};
use serde_json::{json, Value};

/// A stream-json agent that asks, once, to use a tool with a long name, under a request id
/// as long as a real coding agent's, then reads everything and says nothing more.
const PROMPTING_AGENT: &[&str] = &[
    "--agent-command",
    "sh",
    "-c",
    r#"printf '%s\n' '{"type":"control_request","request_id":"toolu_01LongRequestIdLikeARealAgents","request":{"subtype":"can_use_tool","tool_name":"NotebookEdit","input":{"notebook_path":"a.ipynb","new_source":"x = 1"}}}'; cat >/dev/null"#,
];

/// An agent that reads everything and says nothing, so the log holds only what was sent.
const QUIET_AGENT: &[&str] = &["--agent-command", "sh", "-c", "cat >/dev/null"];

fn login(home: &Home, relay: &Relay) {
    let token = relay.token("ann", "acme");
    home.cloudctl_ok(&["login", "--relay", &relay.url(), "--token", &token]);
}

fn create_session(home: &Home, task: &str) -> String {
    let created = home.cloudctl_json(&["session", "create", "--task", task]);
    created["session"]["id"].as_str().unwrap().to_owned()
}

/// Where each cell of a table line starts: columns are at least two spaces apart, and
/// no value in these tests holds two spaces in a row.
fn cell_starts(line: &str) -> Vec<usize> {
    let bytes = line.as_bytes();
    (0..bytes.len())
        .filter(|&i| bytes[i] != b' ' && (i == 0 || (i >= 2 && &bytes[i - 2..i] == b"  ")))
        .collect()
}

/// Asserts every line of `table` starts its cells where the first line (the header)
/// starts its columns.
fn assert_aligned(table: &str, n_columns: usize) {
    let mut lines = table.lines();
    let header = cell_starts(lines.next().expect("a header"));
    assert_eq!(header.len(), n_columns, "{table}");
    for line in lines {
        let starts = cell_starts(line);
        assert!(
            starts.len() >= n_columns && starts[..n_columns] == header[..],
            "misaligned row {line:?} (cells at {starts:?}, columns at {header:?}):\n{table}"
        );
    }
}

#[test]
fn tables_stay_aligned_and_json_prompts_carry_their_input_as_an_object() {
    let relay = Relay::start_with(PROMPTING_AGENT);
    let home = Home::new();
    login(&home, &relay);
    let long_task = "a task described at length, longer than any column of the table";
    let session = create_session(&home, long_task);
    create_session(&home, "short");

    let list = home.cloudctl_ok(&["session", "list"]);
    assert_eq!(list.lines().count(), 3, "{list}");
    assert!(list.contains(long_task), "{list}");
    assert_aligned(&list, 5);

    let mut prompts = Value::Null;
    wait_for("the agent's prompt to reach the daemon", DEADLINE, || {
        prompts = home.cloudctl_json(&["permissions", &session]);
        prompts.as_array().is_some_and(|p| !p.is_empty())
    });
    assert_eq!(
        prompts[0]["input"],
        json!({"notebook_path": "a.ipynb", "new_source": "x = 1"}),
        "the input is an object, not JSON text: {prompts}"
    );
    assert_eq!(
        prompts[0]["request_id"],
        "toolu_01LongRequestIdLikeARealAgents"
    );
    assert_eq!(prompts[0]["tool_name"], "NotebookEdit");
    assert!(prompts[0]["seq"].as_u64().is_some(), "{prompts}");

    let text = home.cloudctl_ok(&["permissions", &session]);
    let lines: Vec<&str> = text.lines().collect();
    let (hint, table) = lines.split_last().unwrap();
    assert!(hint.starts_with("answer with `cloudctl allow"), "{text}");
    let table = table.join("\n");
    assert_aligned(&table, 3);
    assert!(
        table.contains(r#"{"new_source":"x = 1","notebook_path":"a.ipynb"}"#)
            || table.contains(r#"{"notebook_path":"a.ipynb","new_source":"x = 1"}"#),
        "{table}"
    );

    let show = home.cloudctl_ok(&["session", "show", &session]);
    let task_line = show.lines().find(|l| l.starts_with("task")).unwrap();
    let id_line = show.lines().find(|l| l.starts_with("id")).unwrap();
    assert_eq!(
        cell_starts(task_line),
        cell_starts(id_line),
        "key/value block misaligned:\n{show}"
    );
}

#[test]
fn send_reads_a_message_longer_than_a_command_line_from_stdin() {
    let relay = Relay::start_with(QUIET_AGENT);
    let home = Home::new();
    login(&home, &relay);
    let session = create_session(&home, "a long message");

    // 1 MiB in numbered lines: more than one command-line argument may hold (128 KiB).
    let mut message = String::new();
    let mut n = 0;
    while message.len() < 1024 * 1024 {
        message.push_str(&format!("line {n:06} of a long message\n"));
        n += 1;
    }
    let message = message.trim_end().to_owned();

    let mut send = home
        .cloudctl_command()
        .args(["send", &session, "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = send.stdin.take().unwrap();
    // `echo` and files end with a newline, which is not part of the message.
    stdin.write_all(message.as_bytes()).unwrap();
    stdin.write_all(b"\n").unwrap();
    drop(stdin);
    let sent = send.wait_with_output().unwrap();
    assert!(sent.status.success(), "{sent:?}");
    let stdout = String::from_utf8_lossy(&sent.stdout);
    assert!(stdout.starts_with("sent (seq "), "{stdout}");

    let mut content = Value::Null;
    wait_for("the message in the session's log", DEADLINE, || {
        let replay =
            home.cloudctl_ok(&["attach", &session, "--since", "0", "--no-follow", "--json"]);
        content = replay
            .lines()
            .map(|line| serde_json::from_str::<Value>(line).unwrap())
            .find(|entry| entry["message"]["type"] == "user")
            .map(|entry| entry["message"]["message"]["content"].clone())
            .unwrap_or(Value::Null);
        !content.is_null()
    });
    let content = content.as_str().expect("the message's text");
    assert_eq!(content.len(), message.len());
    assert!(content == message, "the message arrived altered");

    // Nothing on stdin is an error, not an empty message.
    let empty = home
        .cloudctl_command()
        .args(["send", &session, "-"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(empty.status.code(), Some(1), "{empty:?}");
    assert!(
        String::from_utf8_lossy(&empty.stderr).contains("stdin held no message"),
        "{empty:?}"
    );
}
