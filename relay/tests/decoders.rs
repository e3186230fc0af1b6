//! The relay's decoders of bytes from the network and from its disk, fed inputs up to
//! 64 KiB, in a real relay on 127.0.0.1:0:
//!
//! - REST bodies (`parse_body` into each endpoint's body type): every body is answered, with
//!   a client error and a reason when it is not what the endpoint takes, never with a
//!   server error, and the relay keeps serving;
//! - bridge messages (`bridge::decode::<ToRelay>` on a daemon's WebSocket): one that does
//!   not decode is refused, not permanently, with a reason, and the relay keeps serving;
//! - store records (sessions, log chunks, the dedup table, refusals, queued agent input,
//!   prompts), damaged on disk before the relay starts: the start fails with an error
//!   naming the record, or succeeds and every read answers, never a panic.
//!
//! The protocol's own decoders are covered in `protocol/tests/decoders.rs` and by the
//! cargo-fuzz targets in `fuzz/`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use cloud_protocol::bridge::{self, FromRelay, ToRelay, BRIDGE_PATH};
use cloud_protocol::session::{
    Author, LogEntry, NetworkAccess, RepoAccess, Session, SessionEvent, SessionStatus, Visibility,
};
use cloud_relay::RelayConfig;
use common::*;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// The largest input fed to a decoder.
const MAX_INPUT: usize = 64 * 1024;

/// A runner of `cases` cases that keeps no regression file (these tests hold a relay
/// across cases, so they drive the runner themselves).
fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Arbitrary bytes up to [`MAX_INPUT`].
fn bytes() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..=MAX_INPUT)
}

/// JSON built from the field names and value shapes the REST bodies use, mixed with
/// others: these reach the typed body decoders (unknown fields, wrong types, missing
/// fields, unknown tags) where byte noise stops at the JSON parser.
fn json_body() -> impl Strategy<Value = String> {
    let key = prop::sample::select(
        &[
            "task",
            "visibility",
            "network_access",
            "repo_access",
            "vm_image",
            "text",
            "behavior",
            "updated_input",
            "message",
            "name",
            "x",
        ][..],
    );
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        prop::sample::select(
            &[
                "private", "team", "public", "none", "limited", "full", "read", "write", "allow",
                "deny", "ping", "",
            ][..],
        )
        .prop_map(Value::from),
        vec(any::<u8>(), 0..MAX_INPUT / 4)
            .prop_map(|bytes| Value::from(String::from_utf8_lossy(&bytes).into_owned())),
    ];
    let value = leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::from),
            vec(
                (prop::sample::select(&["a", "text", "behavior"][..]), inner),
                0..4
            )
            .prop_map(|entries| {
                let object: serde_json::Map<String, Value> = entries
                    .into_iter()
                    .map(|(key, value)| (key.to_owned(), value))
                    .collect();
                Value::Object(object)
            }),
        ]
    });
    prop_oneof![
        vec((key, value.clone()), 0..5).prop_map(|entries| {
            let object: serde_json::Map<String, Value> = entries
                .into_iter()
                .map(|(key, value)| (key.to_owned(), value))
                .collect();
            Value::Object(object).to_string()
        }),
        value.prop_map(|value| value.to_string()),
    ]
}

/// A body: arbitrary bytes (as text: the shared test client sends text, and the JSON
/// parser refuses invalid UTF-8 at its first byte just as it does other noise) or JSON.
fn body() -> impl Strategy<Value = String> {
    prop_oneof![
        bytes().prop_map(|bytes| String::from_utf8_lossy(&bytes).into_owned()),
        json_body(),
    ]
}

#[test]
fn rest_bodies_are_answered_with_a_client_error_never_a_server_error() {
    let rt = runtime();
    let relay = rt.block_on(TestRelay::start(script_agent("cat >/dev/null")));
    let token = relay.token("alice", "acme");
    let session = rt.block_on(relay.create(&token, "{}"))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let endpoints = [
        "/v1/sessions".to_owned(),
        format!("/v1/sessions/{session}/share"),
        format!("/v1/sessions/{session}/messages"),
        format!("/v1/sessions/{session}/permissions/r-1"),
        "/v1/instances/i-1/commands".to_owned(),
    ];
    let result = runner(96).run(
        &(prop::sample::select(endpoints.to_vec()), body()),
        |(endpoint, body)| {
            let (status, answer) =
                rt.block_on(relay.http("POST", &endpoint, Some(&token), Some(&body)));
            prop_assert!(status < 500, "{endpoint}: {status} {answer}");
            if status >= 400 {
                let reason = answer["error"].as_str().unwrap_or_default();
                prop_assert!(!reason.is_empty(), "{endpoint}: {status} {answer}");
            }
            Ok(())
        },
    );
    if let Err(e) = result {
        panic!("{e}");
    }
    let (status, _) = rt.block_on(relay.http("GET", "/v1/sessions", Some(&token), None));
    assert_eq!(status, 200, "the relay keeps serving");
    rt.block_on(relay.stop());
}

#[test]
fn bridge_messages_that_do_not_decode_are_refused() {
    let rt = runtime();
    let relay = rt.block_on(TestRelay::start(script_agent("cat >/dev/null")));
    let token = relay.token("alice", "acme");
    let result = runner(48).run(&(bytes(), any::<bool>()), |(bytes, registered)| {
        if bridge::decode::<ToRelay>(&bytes).is_ok() {
            // A message the relay can read; what it does with it is tested elsewhere.
            return Ok(());
        }
        rt.block_on(async {
            let mut daemon = if registered {
                Bridge::connect(relay.addr, &token, "i-fuzz").await.0
            } else {
                let socket = websocket(relay.addr, BRIDGE_PATH, &token).await.unwrap();
                Bridge { socket, ack: 0 }
            };
            daemon.send_raw(Message::Binary(bytes.into())).await;
            let refusal = loop {
                match daemon.recv().await {
                    Some(FromRelay::Refused { reason, permanent }) => {
                        break Some((reason, permanent))
                    }
                    Some(_) => {}
                    None => break None,
                }
            };
            let Some((reason, permanent)) = refusal else {
                return Err(TestCaseError::fail("closed without a refusal"));
            };
            prop_assert!(!permanent, "a garbled message is not a reason to give up");
            prop_assert!(!reason.is_empty());
            prop_assert!(daemon.recv().await.is_none(), "the connection is closed");
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    rt.block_on(async {
        let (_, sessions) = Bridge::connect(relay.addr, &token, "i-after").await;
        assert!(sessions.is_empty(), "the relay keeps serving daemons");
        relay.stop().await;
    });
}

/// A record of the relay's store (see the layout in `relay/src/store.rs`), damaged.
#[derive(Debug, Clone)]
enum Damaged {
    /// `s\0{session}`: the session itself.
    Session(Vec<u8>),
    /// `l\0{session}\0{key tail}`: a log chunk (valid entries, cut or extended, or noise).
    LogChunk { tail: Vec<u8>, value: Vec<u8> },
    /// `d\0{instance}`: the last journal seq applied for a daemon instance.
    Dedup(Vec<u8>),
    /// `r\0{instance}\0{key tail}`: a stored refusal.
    Refusal { tail: Vec<u8>, value: Vec<u8> },
    /// `q\0{session}\0{key tail}`: queued agent input.
    Queued { tail: Vec<u8>, value: Vec<u8> },
    /// `p\0{session}\0{request id}`: a prompt's state.
    Prompt(Vec<u8>),
}

const SESSION: &str = "s-0123456789abcdef";
const INSTANCE: &str = "i-fuzz";

fn record_key(prefix: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut key = vec![prefix, 0];
    key.extend_from_slice(&parts.join(&0u8));
    key
}

/// Eight bytes of seq, or a damaged key tail.
fn key_tail() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => any::<u64>().prop_map(|seq| seq.to_be_bytes().to_vec()),
        1 => vec(any::<u8>(), 0..12),
    ]
}

fn log_entry(seq: u64, text: String) -> LogEntry {
    LogEntry {
        seq,
        at: 1,
        author: Author::Agent,
        event: SessionEvent::Message(text),
    }
}

/// Valid log entries back to back, cut short or followed by noise.
fn chunk() -> impl Strategy<Value = Vec<u8>> {
    (
        vec(vec(any::<u8>(), 0..1024), 1..8),
        any::<prop::sample::Index>(),
        vec(any::<u8>(), 0..16),
    )
        .prop_map(|(texts, cut, noise)| {
            let mut bytes = Vec::new();
            for (seq, text) in (1..).zip(texts) {
                let entry = log_entry(seq, String::from_utf8_lossy(&text).into_owned());
                bytes.extend(postcard::to_allocvec(&entry).unwrap());
            }
            bytes.truncate(cut.index(bytes.len() + 1));
            bytes.extend(noise);
            bytes
        })
}

fn damaged() -> impl Strategy<Value = Damaged> {
    prop_oneof![
        bytes().prop_map(Damaged::Session),
        (key_tail(), prop_oneof![bytes(), chunk()])
            .prop_map(|(tail, value)| Damaged::LogChunk { tail, value }),
        vec(any::<u8>(), 0..16).prop_map(Damaged::Dedup),
        (key_tail(), bytes()).prop_map(|(tail, value)| Damaged::Refusal { tail, value }),
        (key_tail(), bytes()).prop_map(|(tail, value)| Damaged::Queued { tail, value }),
        vec(any::<u8>(), 0..4).prop_map(Damaged::Prompt),
    ]
}

fn session(status: SessionStatus) -> Session {
    Session {
        id: SESSION.to_owned(),
        status,
        created_at: 1,
        last_activity: 1,
        task: "fuzz".to_owned(),
        visibility: Visibility::Private,
        repo_access: RepoAccess::Write,
        network_access: NetworkAccess::Limited,
        vm_image: "default".to_owned(),
        owner: "alice".to_owned(),
        org: "acme".to_owned(),
        failure: None,
        last_seq: 0,
        snapshot: None,
        auto_stop_minutes: 0,
        clients: Vec::new(),
        provider: Default::default(),
        allowed_domains: Vec::new(),
    }
}

/// Writes a store holding a session of alice's with one log entry, and `damaged`, in
/// `dir`; returns once sled has let go of it.
fn write_store(dir: &Path, status: SessionStatus, damaged: &Damaged) {
    let db = sled::open(dir).unwrap();
    let tree = db.open_tree("relay").unwrap();
    let session_key = record_key(b's', &[SESSION.as_bytes()]);
    let valid = postcard::to_allocvec(&session(status)).unwrap();
    let first = postcard::to_allocvec(&log_entry(1, "{}".to_owned())).unwrap();
    tree.insert(&session_key, valid).unwrap();
    tree.insert(
        record_key(b'l', &[SESSION.as_bytes(), &1u64.to_be_bytes()]),
        first,
    )
    .unwrap();
    let (key, value) = match damaged {
        Damaged::Session(value) => (session_key, value.clone()),
        Damaged::LogChunk { tail, value } => {
            (record_key(b'l', &[SESSION.as_bytes(), tail]), value.clone())
        }
        Damaged::Dedup(value) => (record_key(b'd', &[INSTANCE.as_bytes()]), value.clone()),
        Damaged::Refusal { tail, value } => (
            record_key(b'r', &[INSTANCE.as_bytes(), tail]),
            value.clone(),
        ),
        Damaged::Queued { tail, value } => {
            (record_key(b'q', &[SESSION.as_bytes(), tail]), value.clone())
        }
        Damaged::Prompt(value) => (
            record_key(b'p', &[SESSION.as_bytes(), b"r-1"]),
            value.clone(),
        ),
    };
    tree.insert(key, value).unwrap();
    db.flush().unwrap();
    drop(tree);
    drop(db);
    // sled lets go of its lock when its last thread does, a moment after the drop.
    let deadline = Instant::now() + DEADLINE;
    while std::fs::File::open(dir.join("db"))
        .unwrap()
        .try_lock()
        .is_err()
    {
        assert!(Instant::now() < deadline, "sled kept the store locked");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Starts a relay on a store holding `damaged`: it fails to start with an error naming an
/// undecodable record, or starts and serves the session's owner and a daemon (whose
/// registration reads the dedup table and the stored refusals). Returns whether it started.
async fn start_on(damaged: &Damaged, status: SessionStatus) -> Result<bool, TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let token = cloud_relay::tokens::create(
        dir.path(),
        &cloud_relay::tokens::NewKey::new("alice", "acme"),
    )
    .unwrap();
    write_store(&dir.path().join("store"), status, damaged);
    let started = cloud_relay::start(RelayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_owned(),
        agent_command: script_agent("cat >/dev/null"),
        access_token_ttl: cloud_relay::auth::DEFAULT_ACCESS_TOKEN_TTL,
        limits: cloud_relay::limits::Limits::OFF,
        device: Default::default(),
        presence: Default::default(),
        provider: Default::default(),
    })
    .await;
    let relay = match started {
        Ok(relay) => relay,
        Err(cloud_relay::RelayError::Store(e)) => {
            let message = e.to_string();
            prop_assert!(message.contains("undecodable"), "{message}");
            return Ok(false);
        }
        Err(e) => return Err(TestCaseError::fail(format!("unexpected: {e}"))),
    };
    let addr = relay.local_addr();
    let (status, sessions) = http(addr, "GET", "/v1/sessions", Some(&token), None).await;
    prop_assert_eq!(status, 200, "{}", sessions);
    let log = format!("/v1/sessions/{SESSION}/log?after=0");
    let (status, entries) = http(addr, "GET", &log, Some(&token), None).await;
    prop_assert!(status == 200 || status == 503, "{status} {entries}");
    let (_, sessions) = Bridge::connect(addr, &token, INSTANCE).await;
    prop_assert_eq!(sessions.len(), 1);
    relay.shutdown().await;
    Ok(true)
}

#[test]
fn damaged_store_records_fail_the_start_cleanly_or_are_read() {
    let rt = runtime();
    let strategy = (
        damaged(),
        prop_oneof![Just(SessionStatus::Paused), Just(SessionStatus::Running)],
    );
    let result = runner(48).run(&strategy, |(damaged, status)| {
        rt.block_on(start_on(&damaged, status)).map(drop)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[tokio::test]
async fn a_dedup_record_shorter_than_a_seq_does_not_crash_the_relay() {
    for value in [vec![], vec![7; 7]] {
        let started = start_on(&Damaged::Dedup(value), SessionStatus::Paused).await;
        assert!(started.unwrap(), "the relay starts and serves");
    }
}
