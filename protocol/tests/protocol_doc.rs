//! docs/PROTOCOL.md's reference against the code: every method the daemon routes
//! ([`method::ALL`], generated with the [`Request`] enum the daemon's dispatcher matches
//! exhaustively), every notification ([`notification::ALL`], generated with
//! [`Notification::method`]) and every error code ([`ErrorCode::ALL`], generated with the
//! enum) has an entry in "Reference by example", and nothing else does; and every example
//! line there is checked against the codecs: requests decode as their method's params,
//! replies and notifications are exactly what the encoder writes for the same values, and
//! errors carry their kind's numeric code (request errors: the one the decoder gives).
//!
//! The conventions it reads (the document states them too): under `## Reference by
//! example`, the subsections `### Methods`, `### Notifications` and `### Errors` hold one
//! `#### ` heading per entry, whose first backticked word is the method name or the
//! error's `data.kind`; example lines are in fenced blocks, `-> ` before what the client
//! writes and `<- ` before what the daemon writes.

use std::collections::BTreeMap;

use cloud_protocol::ipc::{
    method, notification, ErrorCode, Notification, Prompt, Response, TeleportLink, TeleportOutcome,
};
use cloud_protocol::jsonrpc::{decode_request, encode_notification, encode_reply};
use cloud_protocol::session::{LogEntry, Session, SessionEvent};
use serde_json::{json, Value};

const DOC: &str = include_str!("../../docs/PROTOCOL.md");

/// One `#### ` entry: its name and its example lines.
#[derive(Debug, Default)]
struct Entry {
    /// The heading, whole.
    heading: String,
    /// `(true, line)` for `-> line`, `(false, line)` for `<- line`.
    lines: Vec<(bool, String)>,
}

/// The entries of each `### ` subsection of the reference, by subsection and name.
fn reference() -> BTreeMap<String, BTreeMap<String, Entry>> {
    let start = DOC
        .find("\n## Reference by example\n")
        .expect("docs/PROTOCOL.md has no \"## Reference by example\" section");
    let rest = &DOC[start + 1..];
    let body = match rest[3..].find("\n## ") {
        Some(end) => &rest[..end + 3],
        None => rest,
    };
    let mut sections: BTreeMap<String, BTreeMap<String, Entry>> = BTreeMap::new();
    let mut section = String::new();
    let mut name: Option<String> = None;
    let mut in_block = false;
    for line in body.lines() {
        if line.starts_with("```") {
            in_block = !in_block;
        } else if in_block {
            let parsed = match (line.strip_prefix("-> "), line.strip_prefix("<- ")) {
                (Some(sent), _) => Some((true, sent.to_owned())),
                (_, Some(received)) => Some((false, received.to_owned())),
                _ => None,
            };
            if let (Some(parsed), Some(name)) = (parsed, &name) {
                sections
                    .get_mut(&section)
                    .unwrap()
                    .get_mut(name)
                    .unwrap()
                    .lines
                    .push(parsed);
            }
        } else if let Some(title) = line.strip_prefix("### ") {
            section = title.trim().to_owned();
            sections.entry(section.clone()).or_default();
            name = None;
        } else if let Some(title) = line.strip_prefix("#### ") {
            let entry_name = title
                .split('`')
                .nth(1)
                .unwrap_or_else(|| panic!("a reference heading without a `name`: {title}"))
                .to_owned();
            let entries = sections
                .get_mut(&section)
                .unwrap_or_else(|| panic!("{title} is outside a ### subsection"));
            assert!(
                !entries.contains_key(&entry_name),
                "{entry_name} is documented twice in {section}"
            );
            entries.insert(
                entry_name.clone(),
                Entry {
                    heading: title.to_owned(),
                    lines: Vec::new(),
                },
            );
            name = Some(entry_name);
        }
    }
    sections
}

fn section<'a>(
    reference: &'a BTreeMap<String, BTreeMap<String, Entry>>,
    title: &str,
) -> &'a BTreeMap<String, Entry> {
    reference
        .get(title)
        .unwrap_or_else(|| panic!("the reference has no \"### {title}\" subsection"))
}

/// Fails with the names the code has and the document lacks, and the other way round.
fn assert_same_names(what: &str, code: &[String], documented: &BTreeMap<String, Entry>) {
    let undocumented: Vec<&String> = code
        .iter()
        .filter(|name| !documented.contains_key(*name))
        .collect();
    let unknown: Vec<&String> = documented
        .keys()
        .filter(|name| !code.contains(name))
        .collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty(),
        "docs/PROTOCOL.md, \"Reference by example\": {what} the code has but the document \
         does not: {undocumented:?}; documented but not in the code: {unknown:?}"
    );
}

#[test]
fn every_method_the_daemon_routes_is_documented_and_nothing_else() {
    let code: Vec<String> = method::ALL.iter().map(|m| m.to_string()).collect();
    assert_same_names("methods", &code, section(&reference(), "Methods"));
}

#[test]
fn every_notification_is_documented_and_nothing_else() {
    let code: Vec<String> = notification::ALL.iter().map(|m| m.to_string()).collect();
    assert_same_names(
        "notifications",
        &code,
        section(&reference(), "Notifications"),
    );
}

#[test]
fn every_error_code_is_documented_with_its_number_and_nothing_else() {
    let reference = reference();
    let errors = section(&reference, "Errors");
    let code: Vec<String> = ErrorCode::ALL.iter().map(|c| kind(*c)).collect();
    assert_same_names("error codes", &code, errors);
    for code in ErrorCode::ALL {
        let entry = &errors[&kind(*code)];
        assert!(
            entry
                .heading
                .contains(&format!("({})", code.jsonrpc_code())),
            "the heading of {} must give its code ({}): {}",
            kind(*code),
            code.jsonrpc_code(),
            entry.heading
        );
    }
}

fn kind(code: ErrorCode) -> String {
    serde_json::to_value(code)
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned()
}

/// Checks one entry's lines; returns the methods of its requests, the methods of its
/// notifications, and the error kinds it shows.
fn check_lines(entry: &Entry) -> (Vec<String>, Vec<String>, Vec<String>) {
    let (mut requests, mut notifications, mut errors) = (Vec::new(), Vec::new(), Vec::new());
    // The method of each request id seen so far, and the last line sent.
    let mut sent: BTreeMap<String, &'static str> = BTreeMap::new();
    let mut last_sent: Option<&str> = None;
    for (outgoing, line) in &entry.lines {
        let context = format!("{}: {line}", entry.heading);
        if *outgoing {
            last_sent = Some(line);
            // A line meant to fail is checked with its error, below.
            if let Ok(request) = decode_request(line.as_bytes()) {
                requests.push(request.request.method().to_owned());
                if let Some(id) = request.id {
                    sent.insert(id.to_string(), request.request.method());
                }
            }
            continue;
        }
        let value: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {context}"));
        assert_eq!(value["jsonrpc"], "2.0", "{context}");
        if let Some(name) = value.get("method").and_then(Value::as_str) {
            let notification = notification_from(name, value["params"].clone())
                .unwrap_or_else(|e| panic!("{e}: {context}"));
            let mut out = Vec::new();
            encode_notification(&notification, &mut out);
            assert_eq!(
                serde_json::from_slice::<Value>(&out).unwrap(),
                value,
                "the encoder writes this notification otherwise: {context}"
            );
            notifications.push(name.to_owned());
            if let Notification::Closing(closing) = &notification {
                errors.push(kind(closing.code));
            }
        } else if let Some(error) = value.get("error") {
            let code: ErrorCode = serde_json::from_value(error["data"]["kind"].clone())
                .unwrap_or_else(|e| panic!("unknown data.kind ({e}): {context}"));
            assert_eq!(error["code"], json!(code.jsonrpc_code()), "{context}");
            assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
            // An error the decoder gives is the one it gives to the line sent before it.
            let sent_line = last_sent.unwrap_or_else(|| panic!("an error to nothing: {context}"));
            if let Err(decoded) = decode_request(sent_line.as_bytes()) {
                assert_eq!(decoded.error.code, code, "{context}");
                assert_eq!(decoded.id.as_ref(), Some(&value["id"]), "{context}");
                assert_eq!(
                    decoded.error.message,
                    error["message"].as_str().unwrap(),
                    "{context}"
                );
            } else {
                let id = value["id"].to_string();
                assert!(sent.contains_key(&id), "a reply to no request: {context}");
            }
            errors.push(kind(code));
        } else {
            let id = value["id"].to_string();
            let method = sent.get(&id).unwrap_or_else(|| {
                let why = last_sent
                    .and_then(|line| decode_request(line.as_bytes()).err())
                    .map(|e| format!(" (the line before does not decode: {})", e.error))
                    .unwrap_or_default();
                panic!("a reply to no request{why}: {context}")
            });
            let response = response_from(method, value["result"].clone())
                .unwrap_or_else(|e| panic!("{e}: {context}"));
            let mut out = Vec::new();
            encode_reply(&value["id"], &Ok(response), &mut out);
            assert_eq!(
                serde_json::from_slice::<Value>(&out).unwrap(),
                value,
                "the encoder writes this reply otherwise: {context}"
            );
        }
    }
    (requests, notifications, errors)
}

#[test]
fn every_example_matches_the_codecs() {
    let reference = reference();
    for (name, entry) in section(&reference, "Methods") {
        let (requests, _, _) = check_lines(entry);
        assert!(
            requests.contains(name),
            "{}: no example request of {name}",
            entry.heading
        );
    }
    for (name, entry) in section(&reference, "Notifications") {
        let (_, notifications, _) = check_lines(entry);
        assert!(
            notifications.contains(name),
            "{}: no example notification {name}",
            entry.heading
        );
    }
    for (name, entry) in section(&reference, "Errors") {
        let (_, _, errors) = check_lines(entry);
        assert!(
            errors.contains(name),
            "{}: no example of {name}",
            entry.heading
        );
    }
}

/// The [`Response`] a reply to `method` holds, read back from its JSON `result`.
fn response_from(method: &str, result: Value) -> serde_json::Result<Response> {
    use serde_json::from_value;
    let word = result.as_str().map(str::to_owned);
    Ok(match (method, word.as_deref()) {
        (method::HELLO, _) => Response::Hello(from_value(result)?),
        (method::PING | method::DETACH | method::UNFOLLOW, _) => {
            word_of(word, "pong", Response::Pong)?
        }
        (method::STATUS, _) => Response::Status(from_value(result)?),
        (method::SHUTDOWN, _) => word_of(word, "shutting_down", Response::ShuttingDown)?,
        (method::SUBSCRIBE, _) => Response::Subscribed(from_value(result)?),
        (method::LOGIN | method::LOGOUT | method::WHOAMI, _) => {
            Response::Identity(from_value(result)?)
        }
        (method::SESSION_ACTION, Some("deleted")) => Response::SessionDeleted,
        (
            method::SESSION_CREATE
            | method::SESSION_SHOW
            | method::SESSION_ACTION
            | method::SESSION_SHARE,
            _,
        ) => {
            #[derive(serde::Deserialize)]
            struct One {
                session: Session,
                stale: bool,
            }
            let one: One = from_value(result)?;
            Response::Session {
                session: one.session,
                stale: one.stale,
            }
        }
        (method::SESSION_LIST, _) => {
            #[derive(serde::Deserialize)]
            struct All {
                sessions: Vec<Session>,
                stale: bool,
            }
            let all: All = from_value(result)?;
            Response::Sessions {
                sessions: all.sessions,
                stale: all.stale,
            }
        }
        (method::SEND | method::INTERRUPT | method::ANSWER | method::DELIVERY, _) => {
            let seq = from_value(result["seq"].clone())?;
            match result["state"].as_str() {
                Some("queued") => Response::Queued { seq },
                Some("delivered") => Response::Delivered { seq },
                _ => {
                    return Err(serde::de::Error::custom(
                        "state must be queued or delivered",
                    ))
                }
            }
        }
        (method::ATTACH, _) => Response::Attached {
            session: from_value(result["session"].clone())?,
            last_seq: from_value(result["last_seq"].clone())?,
        },
        (method::PERMISSIONS, _) => Response::Prompts(from_value::<Vec<Prompt>>(result)?),
        (method::TELEPORT_PUSH | method::TELEPORT_PULL, _) => {
            Response::Teleported(from_value::<TeleportOutcome>(result)?)
        }
        (method::TELEPORT_WATCH | method::TELEPORT_STOP | method::TELEPORT_STATUS, _) => {
            Response::TeleportLinks(from_value::<Vec<TeleportLink>>(result)?)
        }
        (method::METRICS, _) => Response::Metrics(from_value(result)?),
        (method::ORG_LIST | method::ORG_SWITCH, _) => Response::Orgs(from_value(result)?),
        (method::SETTINGS_GET | method::SETTINGS_SET, _) => Response::Settings(from_value(result)?),
        (method::LOGIN_DEVICE_POLL, _) if result.get("user_code").is_none() => {
            Response::Identity(from_value(result)?)
        }
        (method::LOGIN_DEVICE | method::LOGIN_DEVICE_POLL, _) => {
            Response::DeviceLogin(from_value(result)?)
        }
        (method::DEVICE_APPROVE | method::DEVICE_DENY, _) => {
            Response::DeviceDecided(from_value(result)?)
        }
        (method::DEVICE_LIST | method::DEVICE_REVOKE, _) => Response::Devices(from_value(result)?),
        (method::CREDENTIALS, _) => Response::CredentialStore(from_value(result)?),
        (method::SESSION_SHELL, _) => match result["state"].as_str() {
            Some("open") => Response::ShellOpened {
                session: from_value(result["session"].clone())?,
            },
            _ => return Err(serde::de::Error::custom("state must be open")),
        },
        _ => {
            return Err(serde::de::Error::custom(format!(
                "this test does not know the reply to {method}"
            )))
        }
    })
}

/// `response` when the result is the string `expected`.
fn word_of(
    word: Option<String>,
    expected: &str,
    response: Response,
) -> serde_json::Result<Response> {
    match word.as_deref() == Some(expected) {
        true => Ok(response),
        false => Err(serde::de::Error::custom(format!(
            "the result must be {expected:?}"
        ))),
    }
}

/// The [`Notification`] a notification `name` holds, read back from its JSON `params`.
fn notification_from(name: &str, params: Value) -> serde_json::Result<Notification> {
    use serde_json::from_value;
    Ok(match name {
        notification::STATE => Notification::State(from_value(params)?),
        notification::LOG => Notification::Log(from_value(params)?),
        notification::CLOSING => Notification::Closing(from_value(params)?),
        notification::SESSION_LOG => {
            let entry = &params["entry"];
            let event = if let Some(status) = entry.get("status") {
                SessionEvent::Status {
                    status: from_value(status.clone())?,
                    reason: from_value(entry["reason"].clone())?,
                }
            } else if let Some(snapshot) = entry.get("snapshot") {
                SessionEvent::Snapshot(from_value(snapshot.clone())?)
            } else {
                SessionEvent::Message(match &entry["message"] {
                    Value::String(text) => text.clone(),
                    message => message.to_string(),
                })
            };
            Notification::SessionLog {
                session: from_value(params["session"].clone())?,
                entry: LogEntry {
                    seq: from_value(entry["seq"].clone())?,
                    at: from_value(entry["at"].clone())?,
                    author: from_value(entry["author"].clone())?,
                    event,
                },
            }
        }
        notification::SESSION_CHANGED => Notification::SessionChanged(from_value(params)?),
        notification::SESSION_REMOVED => Notification::SessionRemoved {
            session: from_value(params["session"].clone())?,
        },
        notification::RELAY => Notification::Relay(from_value(params)?),
        notification::EVENT_REFUSED => Notification::EventRefused {
            seq: from_value(params["seq"].clone())?,
            session: from_value(params["session"].clone())?,
            reason: from_value(params["reason"].clone())?,
        },
        notification::TELEPORT_PROGRESS => Notification::TeleportProgress(from_value(params)?),
        notification::TELEPORTED => Notification::Teleported(from_value(params)?),
        _ => {
            return Err(serde::de::Error::custom(format!(
                "this test does not know the notification {name}"
            )))
        }
    })
}

/// A new method or notification fails here until [`response_from`] or
/// [`notification_from`] can read it back, so that its examples are checked too.
#[test]
fn this_test_reads_back_every_method_and_notification() {
    for name in method::ALL {
        let err = response_from(name, json!(null))
            .err()
            .map(|e| e.to_string());
        assert!(
            !err.unwrap_or_default().contains("this test does not know"),
            "protocol_doc.rs: response_from does not know {name}"
        );
    }
    for name in notification::ALL {
        let err = notification_from(name, json!(null))
            .err()
            .map(|e| e.to_string());
        assert!(
            !err.unwrap_or_default().contains("this test does not know"),
            "protocol_doc.rs: notification_from does not know {name}"
        );
    }
}
