//! Every decoder of `cloud-protocol` that reads bytes a peer chose, fed inputs up to 64 KiB:
//! the local socket's binary frames (both directions), JSON-RPC lines and Content-Length
//! framed JSON-RPC messages, the bridge
//! envelopes (both directions) and an agent's stream-json lines.
//!
//! Two kinds of input: arbitrary bytes, and valid messages with random damage (bytes
//! changed, inserted, removed, cut short), which get much further into a decoder than
//! noise does. Whatever the input, a decoder answers a value or an error with a message and
//! never panics; a value it answers encodes again to the same value. Structured round trips
//! cover what the unit tests beside each codec do not: every bridge message, both ways.
//!
//! The cargo-fuzz targets in `fuzz/` run the same decoders for much longer; these run on
//! every `cargo test`.

use cloud_protocol::bridge::{
    self, Channel, Envelope, FromRelay, InstanceSnapshot, Outbound, PermissionDecision,
    RelayRequest, ToRelay,
};
use cloud_protocol::content_length::{self, HeaderError};
use cloud_protocol::ipc::{
    method, ClientMessage, ErrorBody, ErrorCode, Hello, Notification, Request, ServerMessage,
};
use cloud_protocol::session::{
    Author, CreateSession, LogEntry, NetworkAccess, RepoAccess, Session, SessionAction,
    SessionEvent, SessionStatus, Visibility,
};
use cloud_protocol::settings::{
    SettingRecord, SettingRefusal, SettingScope, SettingWrite, SettingsSnapshot,
};
use cloud_protocol::{agent, frame, jsonrpc, MAX_MESSAGE_LEN};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

/// The largest input the properties feed a decoder.
const MAX_INPUT: usize = 64 * 1024;

/// Arbitrary bytes, up to [`MAX_INPUT`].
fn bytes() -> impl Strategy<Value = Vec<u8>> {
    bytes_below(MAX_INPUT + 1)
}

/// Which bytes [`bytes_below`] draws from: all of them, or the ones the decoders give
/// meaning to (small varints and enum tags; JSON punctuation and newlines), whose
/// sequences get further into a decoder than uniform noise.
const ALPHABETS: [&[u8]; 3] = [
    b"",
    b"\x00\x01\x02\x03\x04\x7f\x80\xff",
    b"{}[]\":,\n\\0ae-",
];

/// Up to `max - 1` bytes, made from a length, a seed and an alphabet (proptest's own byte
/// vectors build a value tree per byte: twenty times slower at these sizes).
/// Failures still shrink: towards shorter inputs, seed 0 and all bytes.
fn bytes_below(max: usize) -> impl Strategy<Value = Vec<u8>> {
    (0..max, any::<u64>(), 0..ALPHABETS.len()).prop_map(|(len, mut seed, alphabet)| {
        let alphabet = ALPHABETS[alphabet];
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            // splitmix64
            seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = seed;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            if alphabet.is_empty() {
                out.extend_from_slice(&z.to_le_bytes());
            } else {
                out.extend(
                    z.to_le_bytes()
                        .map(|b| alphabet[usize::from(b) % alphabet.len()]),
                );
            }
        }
        out.truncate(len);
        out
    })
}

/// One change to a valid encoding.
#[derive(Debug, Clone)]
enum Edit {
    Set(Index, u8),
    Insert(Index, u8),
    Remove(Index),
    Truncate(Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (any::<Index>(), any::<u8>()).prop_map(|(at, byte)| Edit::Set(at, byte)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(at, byte)| Edit::Insert(at, byte)),
        2 => any::<Index>().prop_map(Edit::Remove),
        1 => any::<Index>().prop_map(Edit::Truncate),
    ]
}

/// `valid` with one to eight random edits and perhaps some bytes appended, capped at
/// [`MAX_INPUT`].
fn damaged(valid: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    (valid, vec(edit(), 1..8), bytes_below(16)).prop_map(|(mut bytes, edits, tail)| {
        for edit in edits {
            match edit {
                Edit::Set(at, byte) if !bytes.is_empty() => {
                    let at = at.index(bytes.len());
                    bytes[at] = byte;
                }
                Edit::Insert(at, byte) => bytes.insert(at.index(bytes.len() + 1), byte),
                Edit::Remove(at) if !bytes.is_empty() => {
                    bytes.remove(at.index(bytes.len()));
                }
                Edit::Truncate(at) => bytes.truncate(at.index(bytes.len() + 1)),
                _ => {}
            }
        }
        bytes.extend(tail);
        bytes.truncate(MAX_INPUT);
        bytes
    })
}

/// Text of up to `max` bytes of UTF-8 (any bytes, invalid sequences replaced), built from
/// bytes rather than chars so that long strings are cheap to generate.
fn text(max: usize) -> impl Strategy<Value = String> {
    bytes_below(max).prop_map(move |bytes| {
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        while text.len() > max {
            text.pop();
        }
        text
    })
}

/// A short text; the long ones go where a peer really puts long text.
fn word() -> impl Strategy<Value = String> {
    text(24)
}

fn status() -> impl Strategy<Value = SessionStatus> {
    prop_oneof![
        Just(SessionStatus::Starting),
        Just(SessionStatus::Running),
        Just(SessionStatus::Paused),
        Just(SessionStatus::Completed),
        Just(SessionStatus::Failed),
    ]
}

fn visibility() -> impl Strategy<Value = Visibility> {
    prop_oneof![
        Just(Visibility::Private),
        Just(Visibility::Team),
        Just(Visibility::Public)
    ]
}

fn network_access() -> impl Strategy<Value = NetworkAccess> {
    prop_oneof![
        Just(NetworkAccess::None),
        Just(NetworkAccess::Limited),
        Just(NetworkAccess::Full)
    ]
}

fn repo_access() -> impl Strategy<Value = RepoAccess> {
    prop_oneof![Just(RepoAccess::Read), Just(RepoAccess::Write)]
}

fn session() -> impl Strategy<Value = Session> {
    (
        (word(), status(), any::<u64>(), any::<u64>(), text(2048)),
        (visibility(), repo_access(), network_access(), word()),
        (word(), word(), proptest::option::of(word()), any::<u64>()),
        (any::<u32>(), vec(session_client(), 0..4)),
    )
        .prop_map(
            |(
                (id, status, created_at, last_activity, task),
                (visibility, repo_access, network_access, vm_image),
                (owner, org, failure, last_seq),
                (auto_stop_minutes, clients),
            )| Session {
                id,
                status,
                created_at,
                last_activity,
                task,
                visibility,
                repo_access,
                network_access,
                vm_image,
                owner,
                org,
                failure,
                last_seq,
                snapshot: None,
                auto_stop_minutes,
                clients,
                provider: Default::default(),
                allowed_domains: Vec::new(),
            },
        )
}

fn session_client() -> impl Strategy<Value = cloud_protocol::session::SessionClient> {
    use cloud_protocol::session::{ClientKind, SessionClient};
    (
        prop_oneof![
            Just(ClientKind::Daemon),
            Just(ClientKind::Viewer),
            Just(ClientKind::Terminal)
        ],
        (word(), word(), any::<u64>(), any::<u64>()),
    )
        .prop_map(
            |(kind, (user, label, connected_at, last_heartbeat))| SessionClient {
                kind,
                user,
                label,
                connected_at,
                last_heartbeat,
            },
        )
}

fn log_entry() -> impl Strategy<Value = LogEntry> {
    let author = prop_oneof![
        word().prop_map(Author::User),
        Just(Author::Agent),
        Just(Author::Relay)
    ];
    let event = prop_oneof![
        text(MAX_INPUT / 2).prop_map(SessionEvent::Message),
        (status(), proptest::option::of(word()))
            .prop_map(|(status, reason)| SessionEvent::Status { status, reason }),
    ];
    (any::<u64>(), any::<u64>(), author, event).prop_map(|(seq, at, author, event)| LogEntry {
        seq,
        at,
        author,
        event,
    })
}

/// A journaled event. Built from its JSON form rather than field by field, so these tests
/// keep compiling when a variant gains an optional field (serde leaves it `None`).
fn outbound() -> impl Strategy<Value = Outbound> {
    let decision = prop_oneof![
        proptest::option::of(text(1024))
            .prop_map(|input| json!({"Allow": {"updated_input": input}})),
        word().prop_map(|message| json!({"Deny": {"message": message}})),
    ];
    prop_oneof![
        (word(), text(MAX_INPUT / 2))
            .prop_map(|(session, text)| json!({"UserMessage": {"session": session, "text": text}})),
        (word(), word(), decision).prop_map(|(session, request_id, decision)| {
            json!({"PermissionAnswer": {"session": session, "request_id": request_id, "decision": decision}})
        }),
        word().prop_map(|session| json!({"Interrupt": {"session": session}})),
    ]
    .prop_map(|value| serde_json::from_value(value).expect("a journaled event in JSON"))
}

fn relay_request() -> impl Strategy<Value = RelayRequest> {
    let action = prop_oneof![
        Just(SessionAction::Pause),
        Just(SessionAction::Resume),
        Just(SessionAction::Complete),
        Just(SessionAction::Delete),
    ];
    prop_oneof![
        (
            text(2048),
            visibility(),
            network_access(),
            repo_access(),
            word(),
            (vec(word(), 0..4), any::<u32>())
        )
            .prop_map(
                |(
                    task,
                    visibility,
                    network_access,
                    repo_access,
                    vm_image,
                    (allowed_domains, auto_stop_minutes),
                )| {
                    RelayRequest::Create(CreateSession {
                        task,
                        visibility,
                        network_access,
                        repo_access,
                        vm_image,
                        allowed_domains,
                        auto_stop_minutes,
                    })
                }
            ),
        (word(), action).prop_map(|(session, action)| RelayRequest::Action { session, action }),
        (word(), visibility()).prop_map(|(session, visibility)| RelayRequest::Share {
            session,
            visibility
        }),
    ]
}

fn to_relay() -> impl Strategy<Value = ToRelay> {
    let snapshot = (
        (word(), word(), word(), any::<u32>()),
        (vec(word(), 0..8), vec(word(), 0..8)),
    )
        .prop_map(
            |((instance_id, hostname, daemon_version, bridge_version), (worktrees, sessions))| {
                InstanceSnapshot {
                    instance_id,
                    hostname,
                    daemon_version,
                    bridge_version,
                    worktrees,
                    sessions,
                }
            },
        );
    prop_oneof![
        snapshot.prop_map(ToRelay::Register),
        Just(ToRelay::Heartbeat),
        (
            any::<u64>(),
            prop_oneof![text(4096).prop_map(Ok), word().prop_map(Err)]
        )
            .prop_map(|(id, result)| ToRelay::CommandResult { id, result }),
        (word(), any::<u64>()).prop_map(|(session, after)| ToRelay::Join { session, after }),
        word().prop_map(|session| ToRelay::Leave { session }),
        outbound().prop_map(ToRelay::Event),
        (any::<u64>(), relay_request()).prop_map(|(id, request)| ToRelay::Request { id, request }),
        text(4096).prop_map(|token| ToRelay::Authenticate {
            token: cloud_protocol::bridge::BearerToken(token)
        }),
        (
            (any::<u64>(), any::<u64>(), any::<u64>()),
            (any::<u64>(), any::<u64>(), any::<u64>()),
            vec(any::<u64>(), 0..16)
        )
            .prop_map(
                |(
                    (sends, deliveries, refusals),
                    (retries, reconnects, slow_downs),
                    latency_buckets,
                )| {
                    ToRelay::Telemetry(cloud_protocol::bridge::TelemetryReport {
                        sends,
                        deliveries,
                        refusals,
                        retries,
                        reconnects,
                        slow_downs,
                        latency_buckets,
                    })
                }
            ),
        (any::<u64>(), setting_write()).prop_map(|(id, write)| ToRelay::Settings { id, write }),
        vec(word(), 0..8).prop_map(|sessions| ToRelay::Attached { sessions }),
    ]
}

fn setting_scope() -> impl Strategy<Value = SettingScope> {
    prop_oneof![Just(SettingScope::User), Just(SettingScope::Org)]
}

fn setting_write() -> impl Strategy<Value = SettingWrite> {
    (
        setting_scope(),
        word(),
        text(256),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|(scope, key, value, lock, expected_version)| SettingWrite {
            scope,
            key,
            value,
            lock,
            expected_version,
        })
}

fn setting_record() -> impl Strategy<Value = SettingRecord> {
    (
        word(),
        text(256),
        any::<u64>(),
        any::<bool>(),
        word(),
        any::<u64>(),
    )
        .prop_map(
            |(key, value, version, locked, updated_by, updated_at)| SettingRecord {
                key,
                value,
                version,
                locked,
                updated_by,
                updated_at,
            },
        )
}

fn from_relay() -> impl Strategy<Value = FromRelay> {
    let reply = prop_oneof![
        proptest::option::of(session()).prop_map(Ok),
        word().prop_map(Err)
    ];
    prop_oneof![
        Just(FromRelay::Ack),
        (word(), word(), word()).prop_map(|(user, org, relay_version)| FromRelay::Registered {
            user,
            org,
            relay_version
        }),
        (word(), any::<bool>())
            .prop_map(|(reason, permanent)| FromRelay::Refused { reason, permanent }),
        vec(session(), 0..8).prop_map(FromRelay::Sessions),
        session().prop_map(FromRelay::SessionChanged),
        word().prop_map(|session| FromRelay::SessionRemoved { session }),
        (any::<u64>(), word()).prop_map(|(id, name)| FromRelay::Command { id, name }),
        (word(), log_entry()).prop_map(|(session, entry)| FromRelay::Log { session, entry }),
        (any::<u64>(), word()).prop_map(|(seq, reason)| FromRelay::EventRefused { seq, reason }),
        (word(), word()).prop_map(|(session, reason)| FromRelay::JoinRefused { session, reason }),
        (any::<u64>(), reply).prop_map(|(id, result)| FromRelay::Reply { id, result }),
        (any::<u64>(), proptest::option::of(any::<u64>())).prop_map(|(retry_after_ms, request)| {
            FromRelay::SlowDown {
                retry_after_ms,
                request,
            }
        }),
        (
            word(),
            vec(setting_record(), 0..4),
            vec(setting_record(), 0..4)
        )
            .prop_map(
                |(org_name, user, org)| FromRelay::Settings(SettingsSnapshot {
                    org_name,
                    user,
                    org
                })
            ),
        (
            any::<u64>(),
            prop_oneof![
                setting_record().prop_map(Ok),
                (word(), proptest::option::of(setting_record()))
                    .prop_map(|(reason, current)| Err(SettingRefusal { reason, current }))
            ]
        )
            .prop_map(|(id, result)| FromRelay::SettingsReply { id, result }),
    ]
}

fn envelope<B: std::fmt::Debug>(
    body: impl Strategy<Value = B>,
) -> impl Strategy<Value = Envelope<B>> {
    (
        prop_oneof![Just(Channel::Extension), Just(Channel::Task)],
        any::<u64>(),
        any::<u64>(),
        body,
    )
        .prop_map(|(channel, seq, ack, body)| Envelope {
            channel,
            seq,
            ack,
            body,
        })
}

fn encoded<B: Serialize + std::fmt::Debug>(
    body: impl Strategy<Value = B>,
) -> impl Strategy<Value = Vec<u8>> {
    envelope(body).prop_map(|envelope| bridge::encode(&envelope).expect("encodes"))
}

/// What the bridge decoder makes of `bytes`: a value that encodes again to the same value
/// (never to more bytes than it was read from), or a clean refusal.
fn check_bridge<B>(bytes: &[u8]) -> Result<(), TestCaseError>
where
    B: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    match bridge::decode::<B>(bytes) {
        Ok(envelope) => {
            let again = bridge::encode(&envelope).expect("a decoded envelope encodes");
            prop_assert!(again.len() <= bytes.len());
            prop_assert_eq!(
                bridge::decode::<B>(&again).expect("decodes again"),
                envelope
            );
        }
        Err(e) => {
            prop_assert!(matches!(e, bridge::BridgeError::Malformed(_)), "{e:?}");
            prop_assert!(!e.to_string().is_empty());
        }
    }
    Ok(())
}

/// Reads `bytes` as a stream of frames the way a connection does: every frame is consumed
/// or skipped, nothing is claimed beyond the input, and a decoded message encodes again to
/// the same message.
fn check_frames<T>(bytes: &[u8]) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let mut rest = bytes;
    loop {
        let len = frame::frame_len(rest);
        match frame::decode::<T>(rest) {
            Ok(Some((message, used))) => {
                prop_assert_eq!(len, Ok(Some(used)));
                prop_assert!(used >= frame::HEADER_LEN && used <= rest.len());
                let again = frame::encode_to_vec(&message).expect("a decoded message encodes");
                let (back, _) = frame::decode::<T>(&again).unwrap().unwrap();
                prop_assert_eq!(back, message);
                rest = &rest[used..];
            }
            Ok(None) => {
                prop_assert!(
                    matches!(len, Ok(None)) || matches!(len, Ok(Some(n)) if n > rest.len())
                );
                break;
            }
            Err(frame::FrameError::Malformed { consumed, .. }) => {
                prop_assert_eq!(len, Ok(Some(consumed)));
                prop_assert!(consumed <= rest.len());
                rest = &rest[consumed..];
            }
            Err(e @ frame::FrameError::TooLarge { .. }) => {
                prop_assert!(!e.is_recoverable());
                prop_assert_eq!(len, Err(e));
                break;
            }
        }
    }
    Ok(())
}

/// Reads `bytes` as JSON-RPC lines the way a connection does: a request, or an error with a
/// message; anything that is not JSON at all is a parse error answered with a null id.
fn check_jsonrpc(bytes: &[u8]) -> Result<(), TestCaseError> {
    let mut rest = bytes;
    loop {
        let line = match jsonrpc::find_line(rest) {
            Ok(Some(end)) => {
                prop_assert_eq!(rest[end], b'\n');
                prop_assert!(!rest[..end].contains(&b'\n'));
                &rest[..end]
            }
            // The last, unterminated line is decoded too: it is what a connection would
            // decode once its newline arrives.
            Ok(None) => rest,
            Err(e) => return Err(TestCaseError::fail(format!("{e} within {MAX_INPUT} bytes"))),
        };
        let is_json = serde_json::from_slice::<Value>(line).is_ok();
        match jsonrpc::decode_request(line) {
            Ok(_) => prop_assert!(is_json),
            Err(e) => {
                prop_assert!(!e.error.message.is_empty());
                if !is_json {
                    prop_assert_eq!(e.id, Some(Value::Null));
                    prop_assert_eq!(e.error.code.jsonrpc_code(), -32700);
                }
            }
        }
        match rest.get(line.len() + 1..) {
            Some(next) => rest = next,
            None => break,
        }
    }
    Ok(())
}

/// Reads `bytes` as Content-Length framed JSON-RPC the way a connection does: each message
/// found lies within the bytes and decodes to a request or an error with a message; the
/// reading stops at the first header error, which needs no more than the header limit.
fn check_content_length(bytes: &[u8]) -> Result<(), TestCaseError> {
    let mut rest = bytes;
    loop {
        match content_length::find_message(rest) {
            Ok(Some(body)) => {
                prop_assert!(body.start <= content_length::MAX_HEADER_LEN);
                prop_assert!(body.end <= rest.len());
                if let Err(e) = jsonrpc::decode_request(&rest[body.clone()]) {
                    prop_assert!(!e.error.message.is_empty());
                }
                rest = &rest[body.end..];
            }
            Ok(None) => {
                prop_assert!(rest.len() < content_length::MAX_HEADER_LEN + MAX_MESSAGE_LEN);
                return Ok(());
            }
            Err(HeaderError::HeaderTooLong { .. }) => {
                prop_assert!(rest.len() >= content_length::MAX_HEADER_LEN);
                return Ok(());
            }
            Err(e) => {
                prop_assert!(e.to_string().contains("Content-Length"), "{}", e);
                return Ok(());
            }
        }
    }
}

/// Request lines framed as an LSP client frames them.
fn content_length_messages() -> impl Strategy<Value = Vec<u8>> {
    vec(request_line(), 1..4).prop_map(|lines| {
        let mut out = Vec::new();
        for line in lines {
            let start = out.len();
            out.extend_from_slice(&line);
            content_length::frame_line(&mut out, start);
        }
        out
    })
}

/// What `agent::parse` makes of a line agrees with the line's JSON.
fn check_agent_line(line: &str) -> Result<(), TestCaseError> {
    let value = serde_json::from_str::<Value>(line).ok();
    match agent::parse(line) {
        Some(parsed) => {
            let value = value.expect("parsed lines are JSON");
            prop_assert_eq!(value["type"].as_str(), Some(parsed.kind.as_str()));
        }
        None => prop_assert!(value.is_none_or(|v| !v["type"].is_string())),
    }
    Ok(())
}

/// A stream of valid frames of both directions' messages.
fn frames() -> impl Strategy<Value = Vec<u8>> {
    let request = prop_oneof![
        Just(Request::Ping),
        Just(Request::Status),
        (any::<u32>(), word(), word()).prop_map(|(protocol, client, client_version)| {
            Request::Hello(Hello {
                protocol,
                client,
                client_version,
            })
        }),
    ];
    let client = (any::<u64>(), request)
        .prop_map(|(id, request)| frame::encode_to_vec(&ClientMessage { id, request }).unwrap());
    let server = prop_oneof![
        (any::<u64>(), word()).prop_map(|(id, message)| ServerMessage::Reply {
            id,
            result: Err(ErrorBody::new(ErrorCode::Internal, message)),
        }),
        (word(), log_entry()).prop_map(|(session, entry)| {
            ServerMessage::Notify(Notification::SessionLog { session, entry })
        }),
    ]
    .prop_map(|message| frame::encode_to_vec(&message).unwrap());
    vec(prop_oneof![client, server], 1..8).prop_map(|frames| frames.concat())
}

/// Valid JSON-RPC request lines, some of them long, as a client would send them.
fn request_line() -> impl Strategy<Value = Vec<u8>> {
    let id = prop_oneof![
        any::<u64>().prop_map(Value::from),
        word().prop_map(Value::from),
        Just(Value::Null)
    ];
    let call = prop_oneof![
        Just(json!({"method": method::PING})),
        Just(json!({"method": method::STATUS})),
        (any::<u32>(), word(), word()).prop_map(|(protocol, client, client_version)| {
            json!({"method": method::HELLO, "params": {"protocol": protocol, "client": client, "client_version": client_version}})
        }),
        (word(), text(MAX_INPUT / 2)).prop_map(|(session, text)| {
            json!({"method": method::SEND, "params": {"session": session, "text": text}})
        }),
        (word(), word(), text(1024)).prop_map(|(session, request_id, message)| {
            let decision = json!({"behavior": "deny", "message": message});
            json!({"method": method::ANSWER, "params": {"session": session, "request_id": request_id, "decision": decision}})
        }),
    ];
    (proptest::option::of(id), call).prop_map(|(id, mut call)| {
        call["jsonrpc"] = json!("2.0");
        if let Some(id) = id {
            call["id"] = id;
        }
        let mut line = serde_json::to_vec(&call).unwrap();
        line.push(b'\n');
        line
    })
}

/// Valid stream-json lines, as an agent writes them.
fn agent_line() -> impl Strategy<Value = String> {
    prop_oneof![
        text(MAX_INPUT / 2).prop_map(|text| agent::user_message(&text)),
        (word(), word()).prop_map(|(id, message)| {
            agent::permission_response(&id, &PermissionDecision::Deny { message })
        }),
        (word(), word()).prop_map(|(id, error)| agent::error_response(&id, &error)),
        word().prop_map(|id| agent::interrupt_request(&id)),
        (word(), text(1024)).prop_map(|(id, input)| {
            json!({"type": "control_request", "request_id": id, "request": {"subtype": agent::CAN_USE_TOOL, "input": input}}).to_string()
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Any bytes a daemon sends on the bridge are an envelope or a clean refusal.
    #[test]
    fn to_relay_arbitrary_bytes(bytes in bytes()) {
        check_bridge::<ToRelay>(&bytes)?;
    }

    /// Any bytes a relay sends on the bridge are an envelope or a clean refusal.
    #[test]
    fn from_relay_arbitrary_bytes(bytes in bytes()) {
        check_bridge::<FromRelay>(&bytes)?;
    }

    /// Damaged daemon messages, read by the relay.
    #[test]
    fn to_relay_damaged(bytes in damaged(encoded(to_relay()))) {
        check_bridge::<ToRelay>(&bytes)?;
    }

    /// Damaged relay messages, read by the daemon.
    #[test]
    fn from_relay_damaged(bytes in damaged(encoded(from_relay()))) {
        check_bridge::<FromRelay>(&bytes)?;
    }

    /// Every daemon message reads back as itself, and the same message cut short is
    /// refused rather than read as another.
    #[test]
    fn to_relay_round_trips(envelope in envelope(to_relay()), cut in any::<Index>()) {
        let bytes = bridge::encode(&envelope).unwrap();
        prop_assert_eq!(bridge::decode::<ToRelay>(&bytes).unwrap(), envelope);
        prop_assert!(bridge::decode::<ToRelay>(&bytes[..cut.index(bytes.len())]).is_err());
    }

    /// Every relay message reads back as itself, and cut short is refused.
    #[test]
    fn from_relay_round_trips(envelope in envelope(from_relay()), cut in any::<Index>()) {
        let bytes = bridge::encode(&envelope).unwrap();
        prop_assert_eq!(bridge::decode::<FromRelay>(&bytes).unwrap(), envelope);
        prop_assert!(bridge::decode::<FromRelay>(&bytes[..cut.index(bytes.len())]).is_err());
    }

    /// Any bytes on a binary local-socket connection, read by the daemon.
    #[test]
    fn client_frames_arbitrary_bytes(bytes in bytes()) {
        check_frames::<ClientMessage>(&bytes)?;
    }

    /// Any bytes on a binary local-socket connection, read by a client.
    #[test]
    fn server_frames_arbitrary_bytes(bytes in bytes()) {
        check_frames::<ServerMessage>(&bytes)?;
    }

    /// Frames with a short, plausible length prefix and arbitrary bodies: the bodies reach
    /// the message decoder (a random prefix mostly announces more than is there).
    #[test]
    fn client_frames_with_arbitrary_bodies(bodies in vec(bytes_below(4096), 1..16)) {
        let mut bytes = Vec::new();
        for body in &bodies {
            bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
            bytes.extend_from_slice(body);
        }
        check_frames::<ClientMessage>(&bytes)?;
        check_frames::<ServerMessage>(&bytes)?;
    }

    /// Damaged streams of frames, as both ends read them: cut, joined and altered frames.
    #[test]
    fn frames_damaged(bytes in damaged(frames())) {
        check_frames::<ClientMessage>(&bytes)?;
        check_frames::<ServerMessage>(&bytes)?;
    }

    /// Any bytes on a JSON-RPC connection, read by the daemon.
    #[test]
    fn jsonrpc_arbitrary_bytes(bytes in bytes()) {
        check_jsonrpc(&bytes)?;
    }

    /// Damaged request lines, read by the daemon.
    #[test]
    fn jsonrpc_damaged(bytes in damaged(request_line())) {
        check_jsonrpc(&bytes)?;
    }

    /// Any bytes on a Content-Length connection, read by the daemon.
    #[test]
    fn content_length_arbitrary_bytes(bytes in bytes()) {
        check_content_length(&bytes)?;
    }

    /// Damaged Content-Length messages, read by the daemon.
    #[test]
    fn content_length_damaged(bytes in damaged(content_length_messages())) {
        check_content_length(&bytes)?;
    }

    /// Requests framed as a client frames them are read as the same requests.
    #[test]
    fn content_length_requests_decode(bytes in content_length_messages()) {
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let body = content_length::find_message(rest).unwrap().unwrap();
            let request = jsonrpc::decode_request(&rest[body.clone()]);
            prop_assert!(request.is_ok(), "{:?}", request);
            rest = &rest[body.end..];
        }
    }

    /// Requests as a client writes them are read as requests, whatever their size.
    #[test]
    fn jsonrpc_requests_decode(line in request_line()) {
        let end = jsonrpc::find_line(&line).unwrap().unwrap();
        prop_assert_eq!(end, line.len() - 1);
        let request = jsonrpc::decode_request(&line[..end]);
        prop_assert!(request.is_ok(), "{:?}", request);
    }

    /// Any text an agent writes is routed by what its JSON says, or not at all.
    #[test]
    fn agent_arbitrary_bytes(bytes in bytes()) {
        check_agent_line(&String::from_utf8_lossy(&bytes))?;
    }

    /// Damaged agent lines.
    #[test]
    fn agent_damaged(bytes in damaged(agent_line().prop_map(String::into_bytes))) {
        check_agent_line(&String::from_utf8_lossy(&bytes))?;
    }

    /// The lines written to an agent carry their request ids and subtypes through `parse`.
    #[test]
    fn agent_lines_round_trip(id in text(1024), text in text(MAX_INPUT / 2)) {
        let user = agent::parse(&agent::user_message(&text)).unwrap();
        prop_assert_eq!(user.kind, "user");
        let deny = PermissionDecision::Deny { message: text.clone() };
        let response = agent::parse(&agent::permission_response(&id, &deny)).unwrap();
        prop_assert_eq!(response.kind, "control_response");
        prop_assert_eq!(response.request_id.as_deref(), Some(id.as_str()));
        prop_assert_eq!(response.subtype.as_deref(), Some("success"));
        let error = agent::parse(&agent::error_response(&id, &text)).unwrap();
        prop_assert_eq!(error.request_id.as_deref(), Some(id.as_str()));
        prop_assert_eq!(error.subtype.as_deref(), Some("error"));
        let interrupt = agent::parse(&agent::interrupt_request(&id)).unwrap();
        prop_assert_eq!(interrupt.kind, "control_request");
        prop_assert_eq!(interrupt.request_id.as_deref(), Some(id.as_str()));
        prop_assert_eq!(interrupt.subtype.as_deref(), Some(agent::INTERRUPT));
    }
}
