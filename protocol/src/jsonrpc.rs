//! The newline-delimited JSON-RPC 2.0 encoding of the local-socket messages.
//!
//! One JSON object per line, in both directions. This is the encoding for editors and for
//! people with `socat`: a connection whose first byte is `{` speaks it. Request ids may be
//! numbers or strings and are echoed verbatim; a request without an id is a JSON-RPC
//! notification and gets no reply. The daemon's own notifications use the method names in
//! [`crate::ipc::notification`].

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{
    self, DeserializeOwned, DeserializeSeed, Deserializer as _, IgnoredAny, MapAccess, SeqAccess,
    Visitor,
};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::bridge::PermissionDecision;
use crate::ipc::{ErrorBody, ErrorCode, Notification, Request, Response};
use crate::session::{LogEntry, Session, SessionEvent};
use crate::MAX_MESSAGE_LEN;

/// A line is longer than [`MAX_MESSAGE_LEN`] without a newline. The stream cannot be
/// resynchronised after this: the connection must be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("line exceeds the {max}-byte limit without a newline")]
pub struct LineTooLong {
    /// The limit.
    pub max: usize,
}

/// Finds the end of the first line in `buf`: the index of its `\n`, or `Ok(None)` while the
/// line is incomplete ("need more bytes").
pub fn find_line(buf: &[u8]) -> Result<Option<usize>, LineTooLong> {
    let window = &buf[..buf.len().min(MAX_MESSAGE_LEN + 1)];
    match window.iter().position(|&b| b == b'\n') {
        Some(end) => Ok(Some(end)),
        None if buf.len() > MAX_MESSAGE_LEN => Err(LineTooLong {
            max: MAX_MESSAGE_LEN,
        }),
        None => Ok(None),
    }
}

/// A decoded JSON-RPC request.
#[derive(Debug, Clone, PartialEq)]
pub struct JsonRequest {
    /// The request id, echoed in the reply; `None` for a notification (no reply).
    pub id: Option<Value>,
    /// The request.
    pub request: Request,
}

/// A line that is not a valid request: the error to reply with, and the id to reply to.
#[derive(Debug, Clone, PartialEq)]
pub struct JsonRequestError {
    /// The id of the offending request (`null` when it could not be read), or `None` when
    /// the line was a well-formed notification (no id): JSON-RPC never answers those,
    /// not even with an error.
    pub id: Option<Value>,
    /// What was wrong.
    pub error: ErrorBody,
}

/// Decodes one line (without its newline) into a request.
///
/// A well-formed request is read without building a [`Value`] of the whole line: its
/// envelope is picked out in one pass and its params are read straight into their typed
/// struct. Anything that path is unsure about (every invalid line included) is decided by
/// parsing the line into a `Value` first, so both paths give the same answer, errors and
/// error messages included.
pub fn decode_request(line: &[u8]) -> Result<JsonRequest, JsonRequestError> {
    match decode_fast(line) {
        Some(request) => Ok(request),
        None => decode_via_value(line),
    }
}

/// The fast path of [`decode_request`]: `Some` only for a line the `Value` path accepts,
/// with the same request and id; `None` hands the line to the `Value` path.
///
/// The first pass reads the whole line with the same parser calls that parsing it into a
/// `Value` makes (so the same verdict on bad escapes, out-of-range numbers and nesting
/// depth), keeping only the id (as a `Value`, as before), whether `jsonrpc` is `"2.0"`,
/// the method name (borrowed) and which `"params"` key holds the params. A repeated key
/// keeps its last value, as in a `Value` map. The second pass, for methods with params,
/// reads that key straight into the typed params.
fn decode_fast(line: &[u8]) -> Option<JsonRequest> {
    let mut de = serde_json::Deserializer::from_slice(line);
    let envelope = de.deserialize_any(EnvelopeVisitor).ok()?;
    de.end().ok()?;
    let id_ok = matches!(
        envelope.id,
        None | Some(Value::Number(_) | Value::String(_) | Value::Null)
    );
    if !id_ok || !envelope.jsonrpc_is_2_0 {
        return None;
    }
    let Some(Scanned::Str(method_name)) = envelope.method else {
        return None;
    };
    let params = LineParams {
        line,
        params: envelope.params,
    };
    let request = Request::from_json_params(&method_name, params).ok()??;
    Some(JsonRequest {
        id: envelope.id,
        request,
    })
}

/// The reference decoder: parses the line into a [`Value`], then checks it. Decides every
/// line the fast path declines, and so every error.
fn decode_via_value(line: &[u8]) -> Result<JsonRequest, JsonRequestError> {
    let fail = |id: Option<Value>, code: ErrorCode, message: String| JsonRequestError {
        id,
        error: ErrorBody::new(code, message),
    };
    let value: Value = serde_json::from_slice(line).map_err(|e| {
        fail(
            Some(Value::Null),
            ErrorCode::ParseError,
            format!("parse error: {e}"),
        )
    })?;
    let Value::Object(mut object) = value else {
        return Err(fail(
            Some(Value::Null),
            ErrorCode::InvalidRequest,
            "invalid request: expected a JSON object (batches are not supported)".into(),
        ));
    };
    let id = object.remove("id");
    let reply_id = id.clone();
    if !matches!(
        id,
        None | Some(Value::Number(_)) | Some(Value::String(_)) | Some(Value::Null)
    ) {
        return Err(fail(
            Some(Value::Null),
            ErrorCode::InvalidRequest,
            "invalid request: id must be a number or a string".into(),
        ));
    }
    if object.get("jsonrpc") != Some(&Value::String("2.0".into())) {
        return Err(fail(
            Some(reply_id.unwrap_or(Value::Null)),
            ErrorCode::InvalidRequest,
            "invalid request: \"jsonrpc\" must be \"2.0\"".into(),
        ));
    }
    let Some(Value::String(method_name)) = object.remove("method") else {
        return Err(fail(
            Some(reply_id.unwrap_or(Value::Null)),
            ErrorCode::InvalidRequest,
            "invalid request: \"method\" must be a string".into(),
        ));
    };
    let params = object.remove("params").unwrap_or(Value::Null);
    match Request::from_json_params(&method_name, params) {
        Ok(Some(request)) => Ok(JsonRequest { id, request }),
        Ok(None) => Err(fail(
            reply_id,
            ErrorCode::MethodNotFound,
            format!("method not found: {method_name:?} (see docs/PROTOCOL.md for the methods)"),
        )),
        Err(e) => Err(fail(
            reply_id,
            ErrorCode::InvalidParams,
            format!("invalid params for {method_name}: {e}"),
        )),
    }
}

/// Where a request's params are read from: a parsed [`Value`], or the line itself.
pub(crate) trait ParamsSource: Sized {
    /// Whether the params are absent or `null`.
    fn is_null(&self) -> bool;
    /// Reads the params (`null` when absent) as a `T`.
    fn read<T: DeserializeOwned>(self) -> serde_json::Result<T>;
    /// Reads the params as a `T`, absent or `null` params as `{}` (a type whose fields all
    /// have defaults takes no params).
    fn read_or_empty<T: DeserializeOwned>(self) -> serde_json::Result<T> {
        if self.is_null() {
            serde_json::from_value(json!({}))
        } else {
            self.read()
        }
    }
}

impl ParamsSource for Value {
    fn is_null(&self) -> bool {
        Value::is_null(self)
    }

    fn read<T: DeserializeOwned>(self) -> serde_json::Result<T> {
        serde_json::from_value(self)
    }
}

/// The params of a request line that the fast path has scanned.
struct LineParams<'a> {
    line: &'a [u8],
    params: Params,
}

impl ParamsSource for LineParams<'_> {
    fn is_null(&self) -> bool {
        matches!(self.params, Params::Absent | Params::Null)
    }

    fn read<T: DeserializeOwned>(self) -> serde_json::Result<T> {
        let Params::At(occurrence) = self.params else {
            return serde_json::from_value(Value::Null);
        };
        let mut de = serde_json::Deserializer::from_slice(self.line);
        let params = de.deserialize_map(ParamsVisitor {
            occurrence,
            wanted: PhantomData,
        })?;
        de.end()?;
        Ok(params)
    }
}

/// A request line's envelope, as the fast path keeps it.
struct Envelope<'de> {
    /// The id, parsed as a `Value` exactly as before.
    id: Option<Value>,
    /// Whether `jsonrpc` is the string `"2.0"`.
    jsonrpc_is_2_0: bool,
    /// The method, if the key is there.
    method: Option<Scanned<'de>>,
    /// Where the params are.
    params: Params,
}

/// Where a request line's params are.
#[derive(Clone, Copy)]
enum Params {
    /// No `"params"` key.
    Absent,
    /// `"params": null`.
    Null,
    /// Under the n-th `"params"` key of the line, from 1 (the last one, as in a `Value`).
    At(usize),
}

/// A top-level key of a request line.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Key {
    Id,
    Jsonrpc,
    Method,
    Params,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Key, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }

            fn visit_str<E: de::Error>(self, key: &str) -> Result<Key, E> {
                Ok(match key {
                    "id" => Key::Id,
                    "jsonrpc" => Key::Jsonrpc,
                    "method" => Key::Method,
                    "params" => Key::Params,
                    _ => Key::Other,
                })
            }
        }
        // As `Value` reads its keys.
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// Reads a request line's top-level object into an [`Envelope`].
struct EnvelopeVisitor;

impl<'de> Visitor<'de> for EnvelopeVisitor {
    type Value = Envelope<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON-RPC request object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Envelope<'de>, A::Error> {
        let mut envelope = Envelope {
            id: None,
            jsonrpc_is_2_0: false,
            method: None,
            params: Params::Absent,
        };
        let mut params_keys = 0;
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Id => envelope.id = Some(map.next_value()?),
                Key::Jsonrpc => {
                    envelope.jsonrpc_is_2_0 = matches!(
                        map.next_value_seed(Scan { keep: true })?,
                        Scanned::Str(version) if version == "2.0"
                    );
                }
                Key::Method => envelope.method = Some(map.next_value_seed(Scan { keep: true })?),
                Key::Params => {
                    params_keys += 1;
                    envelope.params = match map.next_value_seed(Scan { keep: false })? {
                        Scanned::Null => Params::Null,
                        _ => Params::At(params_keys),
                    };
                }
                Key::Other => {
                    map.next_value_seed(Scan { keep: false })?;
                }
            }
        }
        Ok(envelope)
    }
}

/// Reads any JSON value with the parser calls that reading it into a [`Value`] makes (so
/// it is refused exactly when a `Value` would be), and keeps only what it was: a string
/// (when `keep`), `null`, or something else.
#[derive(Clone, Copy)]
struct Scan {
    keep: bool,
}

/// What [`Scan`] saw.
enum Scanned<'de> {
    Str(Cow<'de, str>),
    Null,
    Other,
}

impl<'de> DeserializeSeed<'de> for Scan {
    type Value = Scanned<'de>;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Scan {
    type Value = Scanned<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Scanned::Other)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Scanned::Other)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Scanned::Other)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Scanned::Other)
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(match self.keep {
            true => Scanned::Str(Cow::Borrowed(v)),
            false => Scanned::Other,
        })
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(match self.keep {
            true => Scanned::Str(Cow::Owned(v.to_owned())),
            false => Scanned::Other,
        })
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Scanned::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element_seed(Scan { keep: false })?.is_some() {}
        Ok(Scanned::Other)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_key_seed(Scan { keep: false })?.is_some() {
            map.next_value_seed(Scan { keep: false })?;
        }
        Ok(Scanned::Other)
    }
}

/// Reads the value of the `occurrence`-th `"params"` key of a request line as a `T`,
/// skipping the rest (which the first pass has checked).
struct ParamsVisitor<T> {
    occurrence: usize,
    wanted: PhantomData<fn() -> T>,
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for ParamsVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON-RPC request object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<T, A::Error> {
        let mut seen = 0;
        let mut params = None;
        while let Some(key) = map.next_key::<Key>()? {
            if key == Key::Params {
                seen += 1;
                if seen == self.occurrence {
                    params = Some(map.next_value()?);
                    continue;
                }
            }
            map.next_value::<IgnoredAny>()?;
        }
        params.ok_or_else(|| de::Error::missing_field("params"))
    }
}

/// The JSON form of a successful response.
pub fn response_value(response: &Response) -> Value {
    serde_json::to_value(ResultOut(response)).expect("the protocol types serialize to JSON")
}

/// The JSON form of a session log entry: stream-json messages are embedded as JSON
/// (not as text), so an editor reads them directly.
pub fn log_entry_value(entry: &LogEntry) -> Value {
    serde_json::to_value(EntryOut(entry)).expect("the protocol types serialize to JSON")
}

/// Appends the reply to request `id` as one line to `out`.
///
/// Written straight from the typed values (no intermediate [`Value`]). The envelope's
/// keys come in the order a `Value` map sorts them, as before; inside a result they come
/// in declaration order (clients must not depend on key order).
pub fn encode_reply(id: &Value, result: &Result<Response, ErrorBody>, out: &mut Vec<u8>) {
    match result {
        Ok(response) => {
            out.extend_from_slice(b"{\"id\":");
            write_json(id, out);
            out.extend_from_slice(b",\"jsonrpc\":\"2.0\",\"result\":");
            write_json(&ResultOut(response), out);
        }
        Err(error) => {
            out.extend_from_slice(b"{\"error\":");
            write_json(&ErrorOut::new(error), out);
            out.extend_from_slice(b",\"id\":");
            write_json(id, out);
            out.extend_from_slice(b",\"jsonrpc\":\"2.0\"");
        }
    }
    out.extend_from_slice(b"}\n");
}

/// The JSON-RPC error object for `error`: the numeric code, the message, and the
/// symbolic code under `data.kind`.
pub fn error_value(error: &ErrorBody) -> Value {
    serde_json::to_value(ErrorOut::new(error)).expect("the protocol types serialize to JSON")
}

/// Appends `notification` as one JSON-RPC notification line to `out`.
pub fn encode_notification(notification: &Notification, out: &mut Vec<u8>) {
    let method_name = notification.method();
    out.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"method\":");
    write_json(method_name, out);
    out.extend_from_slice(b",\"params\":");
    write_json(&NotificationParamsOut(notification), out);
    out.extend_from_slice(b"}\n");
}

/// A response's `result`, serialised from the typed values. The objects built here list
/// their keys in sorted order, as the `Value` maps they replace did.
struct ResultOut<'a>(&'a Response);

impl Serialize for ResultOut<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct SessionsOut<'a> {
            sessions: &'a [Session],
            stale: bool,
        }
        #[derive(Serialize)]
        struct SessionOut<'a> {
            session: &'a Session,
            stale: bool,
        }
        #[derive(Serialize)]
        struct SeqStateOut {
            seq: u64,
            state: &'static str,
        }
        #[derive(Serialize)]
        struct ShellOpenedOut<'a> {
            session: &'a str,
            state: &'static str,
        }
        #[derive(Serialize)]
        struct AttachedOut<'a> {
            last_seq: u64,
            session: &'a str,
        }
        match self.0 {
            Response::Hello(reply) => reply.serialize(serializer),
            Response::Pong => serializer.serialize_str("pong"),
            Response::Status(status) => status.serialize(serializer),
            Response::ShuttingDown => serializer.serialize_str("shutting_down"),
            Response::Subscribed(subscribe) => subscribe.serialize(serializer),
            Response::Identity(identity) => identity.serialize(serializer),
            Response::Sessions { sessions, stale } => SessionsOut {
                sessions,
                stale: *stale,
            }
            .serialize(serializer),
            Response::Session { session, stale } => SessionOut {
                session,
                stale: *stale,
            }
            .serialize(serializer),
            Response::SessionDeleted => serializer.serialize_str("deleted"),
            Response::Queued { seq } => SeqStateOut {
                seq: *seq,
                state: "queued",
            }
            .serialize(serializer),
            Response::Delivered { seq } => SeqStateOut {
                seq: *seq,
                state: "delivered",
            }
            .serialize(serializer),
            Response::Attached { session, last_seq } => AttachedOut {
                last_seq: *last_seq,
                session,
            }
            .serialize(serializer),
            Response::Prompts(prompts) => prompts.serialize(serializer),
            Response::Teleported(outcome) => outcome.serialize(serializer),
            Response::TeleportLinks(links) => links.serialize(serializer),
            Response::Metrics(metrics) => metrics.serialize(serializer),
            Response::Orgs(orgs) => orgs.serialize(serializer),
            Response::Settings(settings) => settings.serialize(serializer),
            Response::DeviceLogin(login) => login.serialize(serializer),
            Response::DeviceDecided(decision) => decision.serialize(serializer),
            Response::Devices(devices) => devices.serialize(serializer),
            Response::CredentialStore(store) => store.serialize(serializer),
            Response::ShellOpened { session } => ShellOpenedOut {
                session,
                state: "open",
            }
            .serialize(serializer),
        }
    }
}

/// A notification's `params`, serialised from the typed values (objects built here list
/// their keys sorted, as before).
struct NotificationParamsOut<'a>(&'a Notification);

impl Serialize for NotificationParamsOut<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct SessionLogOut<'a> {
            entry: EntryOut<'a>,
            session: &'a str,
        }
        #[derive(Serialize)]
        struct SessionRemovedOut<'a> {
            session: &'a str,
        }
        #[derive(Serialize)]
        struct EventRefusedOut<'a> {
            reason: &'a str,
            seq: u64,
            session: &'a str,
        }
        match self.0 {
            Notification::State(change) => change.serialize(serializer),
            Notification::Log(record) => record.serialize(serializer),
            Notification::Closing(closing) => closing.serialize(serializer),
            Notification::SessionLog { session, entry } => SessionLogOut {
                entry: EntryOut(entry),
                session,
            }
            .serialize(serializer),
            Notification::SessionChanged(session) => session.serialize(serializer),
            Notification::SessionRemoved { session } => {
                SessionRemovedOut { session }.serialize(serializer)
            }
            Notification::Relay(relay) => relay.serialize(serializer),
            Notification::EventRefused {
                seq,
                session,
                reason,
            } => EventRefusedOut {
                reason,
                seq: *seq,
                session,
            }
            .serialize(serializer),
            Notification::TeleportProgress(progress) => progress.serialize(serializer),
            Notification::Teleported(outcome) => outcome.serialize(serializer),
        }
    }
}

/// A session log entry as [`log_entry_value`] shapes it: `seq`, `at`, `author`, and
/// either the `message` (embedded as JSON when it parses, else as a string), the
/// `status` and `reason`, or the `snapshot` (a new version of the session's tree). Keys in sorted order, as before.
struct EntryOut<'a>(&'a LogEntry);

impl Serialize for EntryOut<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let entry = self.0;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("at", &entry.at)?;
        map.serialize_entry("author", &entry.author)?;
        match &entry.event {
            SessionEvent::Message(text) => match serde_json::from_str::<Value>(text) {
                Ok(message) => map.serialize_entry("message", &message)?,
                Err(_) => map.serialize_entry("message", text)?,
            },
            SessionEvent::Status { reason, .. } => map.serialize_entry("reason", reason)?,
            SessionEvent::Snapshot(version) => map.serialize_entry("snapshot", version)?,
        }
        map.serialize_entry("seq", &entry.seq)?;
        if let SessionEvent::Status { status, .. } = &entry.event {
            map.serialize_entry("status", status)?;
        }
        map.end()
    }
}

/// A JSON-RPC error object (keys sorted, as before).
#[derive(Serialize)]
struct ErrorOut<'a> {
    code: i64,
    data: ErrorData,
    message: &'a str,
}

#[derive(Serialize)]
struct ErrorData {
    kind: ErrorCode,
}

impl ErrorOut<'_> {
    fn new(error: &ErrorBody) -> ErrorOut<'_> {
        ErrorOut {
            code: error.code.jsonrpc_code(),
            data: ErrorData { kind: error.code },
            message: &error.message,
        }
    }
}

/// A permission answer as editors write it: `{"behavior": "allow", "updated_input": {..}}`
/// or `{"behavior": "deny", "message": ".."}`.
#[derive(serde::Deserialize)]
#[serde(tag = "behavior", rename_all = "snake_case")]
pub(crate) enum JsonDecision {
    Allow {
        #[serde(default)]
        updated_input: Option<Value>,
    },
    Deny {
        #[serde(default)]
        message: String,
    },
}

impl From<JsonDecision> for PermissionDecision {
    fn from(decision: JsonDecision) -> PermissionDecision {
        match decision {
            JsonDecision::Allow { updated_input } => PermissionDecision::Allow {
                updated_input: updated_input.map(|v| v.to_string()),
            },
            JsonDecision::Deny { message } => PermissionDecision::Deny { message },
        }
    }
}

/// Appends `value` as JSON to `out`.
fn write_json<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) {
    serde_json::to_writer(&mut *out, value).expect("the protocol types serialize to JSON");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipc::{
        notification, BridgeState, Closing, DaemonState, HelloReply, Identity, LogRecord, Prompt,
        RelayMode, RelayStatus, StateChange, Status, Subscribe, Supervisor, Topic,
    };
    use crate::session::{
        Author, NetworkAccess, NewSession, RepoAccess, SessionStatus, Visibility,
    };
    use proptest::prelude::*;

    /// The encoders as they were, building a `Value` first: the reference the direct
    /// encoders must match (same keys and values).
    mod via_value {
        use super::*;

        pub fn response_value(response: &Response) -> Value {
            match response {
                Response::Hello(reply) => json!(reply),
                Response::Pong => json!("pong"),
                Response::Status(status) => json!(status),
                Response::ShuttingDown => json!("shutting_down"),
                Response::Subscribed(subscribe) => json!(subscribe),
                Response::Identity(identity) => json!(identity),
                Response::Sessions { sessions, stale } => {
                    json!({"sessions": sessions, "stale": stale})
                }
                Response::Session { session, stale } => json!({"session": session, "stale": stale}),
                Response::SessionDeleted => json!("deleted"),
                Response::Queued { seq } => json!({"seq": seq, "state": "queued"}),
                Response::Delivered { seq } => json!({"seq": seq, "state": "delivered"}),
                Response::Attached { session, last_seq } => {
                    json!({"session": session, "last_seq": last_seq})
                }
                Response::Prompts(prompts) => json!(prompts),
                Response::Teleported(outcome) => json!(outcome),
                Response::TeleportLinks(links) => json!(links),
                Response::Metrics(metrics) => json!(metrics),
                Response::Orgs(orgs) => json!(orgs),
                Response::Settings(settings) => json!(settings),
                Response::DeviceLogin(login) => json!(login),
                Response::DeviceDecided(decision) => json!(decision),
                Response::Devices(devices) => json!(devices),
                Response::CredentialStore(store) => json!(store),
                Response::ShellOpened { session } => json!({"session": session, "state": "open"}),
            }
        }

        pub fn log_entry_value(entry: &LogEntry) -> Value {
            let mut value = json!({"seq": entry.seq, "at": entry.at, "author": entry.author});
            match &entry.event {
                SessionEvent::Message(text) => {
                    value["message"] =
                        serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.clone()));
                }
                SessionEvent::Status { status, reason } => {
                    value["status"] = json!(status);
                    value["reason"] = json!(reason);
                }
                SessionEvent::Snapshot(version) => value["snapshot"] = json!(version),
            }
            value
        }

        pub fn error_value(error: &ErrorBody) -> Value {
            json!({
                "code": error.code.jsonrpc_code(),
                "message": error.message,
                "data": { "kind": error.code },
            })
        }

        pub fn encode_reply(id: &Value, result: &Result<Response, ErrorBody>) -> Vec<u8> {
            let mut object = serde_json::Map::new();
            object.insert("jsonrpc".into(), json!("2.0"));
            object.insert("id".into(), id.clone());
            match result {
                Ok(response) => object.insert("result".into(), response_value(response)),
                Err(error) => object.insert("error".into(), error_value(error)),
            };
            let mut out = serde_json::to_vec(&Value::Object(object)).unwrap();
            out.push(b'\n');
            out
        }

        pub fn encode_notification(notification: &Notification) -> Vec<u8> {
            let (method_name, params) = match notification {
                Notification::State(change) => (notification::STATE, json!(change)),
                Notification::Log(record) => (notification::LOG, json!(record)),
                Notification::Closing(closing) => (notification::CLOSING, json!(closing)),
                Notification::SessionLog { session, entry } => (
                    notification::SESSION_LOG,
                    json!({"session": session, "entry": log_entry_value(entry)}),
                ),
                Notification::SessionChanged(session) => {
                    (notification::SESSION_CHANGED, json!(session))
                }
                Notification::SessionRemoved { session } => {
                    (notification::SESSION_REMOVED, json!({"session": session}))
                }
                Notification::Relay(relay) => (notification::RELAY, json!(relay)),
                Notification::EventRefused {
                    seq,
                    session,
                    reason,
                } => (
                    notification::EVENT_REFUSED,
                    json!({"seq": seq, "session": session, "reason": reason}),
                ),
                Notification::TeleportProgress(progress) => {
                    (notification::TELEPORT_PROGRESS, json!(progress))
                }
                Notification::Teleported(outcome) => (notification::TELEPORTED, json!(outcome)),
            };
            let line = json!({ "jsonrpc": "2.0", "method": method_name, "params": params });
            let mut out = serde_json::to_vec(&line).unwrap();
            out.push(b'\n');
            out
        }
    }

    fn relay_status() -> RelayStatus {
        RelayStatus {
            mode: RelayMode::Remote,
            url: "https://relay.example:8443".into(),
            state: BridgeState::Retrying,
            reason: Some("connection refused \"quoted\"\n".into()),
            user: Some("alice".into()),
            org: None,
            journal_depth: 3,
            instance_id: "i-0123".into(),
            refused_events: 2,
            last_refusal: Some("prompt p-1 was withdrawn".into()),
        }
    }

    fn session() -> Session {
        Session {
            id: "s-00ff".into(),
            status: SessionStatus::Failed,
            created_at: 1_700_000_000_000,
            last_activity: u64::MAX,
            task: "fix the build — ünïcode".into(),
            visibility: Visibility::Team,
            repo_access: RepoAccess::Read,
            network_access: NetworkAccess::None,
            vm_image: "default".into(),
            owner: "alice".into(),
            org: "acme".into(),
            failure: Some("oom".into()),
            last_seq: 42,
            snapshot: None,
            auto_stop_minutes: 0,
            clients: Vec::new(),
            provider: Default::default(),
            allowed_domains: Vec::new(),
        }
    }

    fn responses() -> Vec<Response> {
        vec![
            Response::Hello(HelloReply {
                protocol: 1,
                daemon_version: "0.1.0".into(),
                pid: 77,
                supervisor: Supervisor::Systemd,
                binary_replaced: true,
            }),
            Response::Pong,
            Response::Status(Status {
                pid: 12345,
                version: "0.1.0".into(),
                protocol: 1,
                state: DaemonState::Draining,
                supervisor: Supervisor::None,
                uptime_ms: 99,
                socket: "/run/user/1000/cloudd.sock".into(),
                state_dir: "/home/u/.local/state/cloudd".into(),
                config_file: "/home/u/.config/cloudd/config.toml".into(),
                config_generation: 2,
                log_filter: "info,cloudd=debug".into(),
                log_file: None,
                clients: 1,
                relay: relay_status(),
            }),
            Response::ShuttingDown,
            Response::Subscribed(Subscribe {
                topics: vec![Topic::Sessions, Topic::State],
            }),
            Response::Identity(Identity {
                relay: relay_status(),
            }),
            Response::Sessions {
                sessions: vec![session(), session()],
                stale: true,
            },
            Response::Sessions {
                sessions: vec![],
                stale: false,
            },
            Response::Session {
                session: session(),
                stale: false,
            },
            Response::SessionDeleted,
            Response::Queued { seq: 5 },
            Response::Delivered { seq: u64::MAX },
            Response::Attached {
                session: "s-1".into(),
                last_seq: 9,
            },
            Response::Prompts(vec![Prompt {
                request_id: "r-1".into(),
                tool_name: "Bash".into(),
                input: r#"{"command":"ls"}"#.into(),
                seq: 4,
            }]),
            Response::Prompts(vec![]),
        ]
    }

    fn log_entries() -> Vec<LogEntry> {
        let entry = |event| LogEntry {
            seq: 3,
            at: 1_700_000_000_123,
            author: Author::User("bob".into()),
            event,
        };
        vec![
            entry(SessionEvent::Message(
                r#"{"type":"user","message":{"role":"user","content":"hi"},"b":[1,2.5,null]}"#
                    .into(),
            )),
            entry(SessionEvent::Message("not json {".into())),
            entry(SessionEvent::Message("\"a json string\"".into())),
            entry(SessionEvent::Status {
                status: SessionStatus::Failed,
                reason: Some("agent crashed".into()),
            }),
            LogEntry {
                author: Author::Agent,
                ..entry(SessionEvent::Status {
                    status: SessionStatus::Running,
                    reason: None,
                })
            },
            LogEntry {
                author: Author::Relay,
                ..entry(SessionEvent::Message(String::new()))
            },
        ]
    }

    fn notifications() -> Vec<Notification> {
        let mut notifications = vec![
            Notification::State(StateChange {
                state: DaemonState::Ready,
                config_generation: 1,
                message: "configuration reloaded".into(),
            }),
            Notification::Log(LogRecord {
                unix_ms: 1,
                level: "INFO".into(),
                target: "cloudd::ipc".into(),
                message: "client connected\tpid=3".into(),
            }),
            Notification::Closing(Closing {
                code: ErrorCode::SlowConsumer,
                message: "too slow".into(),
            }),
            Notification::SessionChanged(session()),
            Notification::SessionRemoved {
                session: "s-2".into(),
            },
            Notification::Relay(relay_status()),
            Notification::EventRefused {
                seq: 8,
                session: "s-3".into(),
                reason: "session is completed".into(),
            },
        ];
        notifications.extend(
            log_entries()
                .into_iter()
                .map(|entry| Notification::SessionLog {
                    session: "s-1".into(),
                    entry,
                }),
        );
        notifications
    }

    fn parse_line(line: &[u8]) -> Value {
        assert_eq!(line.last(), Some(&b'\n'), "one line, newline-terminated");
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1, "one line");
        serde_json::from_slice(line).unwrap()
    }

    #[test]
    fn replies_are_the_objects_the_value_encoding_gave() {
        let ids = [json!(1), json!("a\"b"), Value::Null, json!(-1.5)];
        for (n, response) in responses().into_iter().enumerate() {
            assert_eq!(
                response_value(&response),
                via_value::response_value(&response)
            );
            let id = &ids[n % ids.len()];
            let result = Ok(response);
            let mut out = b"previous line\n".to_vec();
            encode_reply(id, &result, &mut out);
            let out = &out[b"previous line\n".len()..];
            let expected = via_value::encode_reply(id, &result);
            assert_eq!(parse_line(out), parse_line(&expected), "{result:?}");
            // Only the keys of typed structs change order; the computed objects are
            // written with their keys sorted, byte for byte as before.
            if !matches!(
                result,
                Ok(Response::Hello(_)
                    | Response::Status(_)
                    | Response::Identity(_)
                    | Response::Sessions { .. }
                    | Response::Session { .. }
                    | Response::Prompts(_))
            ) {
                assert_eq!(out, expected, "{result:?}");
            }
        }
    }

    #[test]
    fn error_replies_are_unchanged_byte_for_byte() {
        for code in [
            ErrorCode::ParseError,
            ErrorCode::NotFound,
            ErrorCode::Timeout,
        ] {
            let error = ErrorBody::new(code, "went \"wrong\"\n\u{1}");
            assert_eq!(error_value(&error), via_value::error_value(&error));
            for id in [json!(7), json!("x"), Value::Null] {
                let result = Err(error.clone());
                let mut out = Vec::new();
                encode_reply(&id, &result, &mut out);
                assert_eq!(out, via_value::encode_reply(&id, &result));
            }
        }
    }

    #[test]
    fn notifications_are_the_objects_the_value_encoding_gave() {
        for entry in log_entries() {
            assert_eq!(log_entry_value(&entry), via_value::log_entry_value(&entry));
        }
        for notification in notifications() {
            let mut out = Vec::new();
            encode_notification(&notification, &mut out);
            let expected = via_value::encode_notification(&notification);
            assert_eq!(parse_line(&out), parse_line(&expected), "{notification:?}");
            if matches!(
                notification,
                Notification::SessionLog { .. }
                    | Notification::SessionRemoved { .. }
                    | Notification::EventRefused { .. }
            ) {
                assert_eq!(out, expected, "{notification:?}");
            }
        }
    }

    /// Lines the fast path must decide itself (and the same way as the `Value` path).
    const FAST_LINES: &[&str] = &[
        r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#,
        r#"{"jsonrpc":"2.0","method":"ping"}"#,
        r#"{"jsonrpc":"2.0","id":null,"method":"status"}"#,
        r#" { "method" : "status" , "id" : "abc" , "jsonrpc" : "2.0" } "#,
        r#"{"jsonrpc":"2.0","id":1,"method":"ping","params":{"ignored":[1,{"x":null}]}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"ping","extra":true}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"ping","id":2}"#,
        r#"{"jsonrpc":"2\u002e0","id":"\u0041","method":"p\u0069ng"}"#,
        r#"{"jsonrpc":"2.0","id":1e3,"method":"ping"}"#,
        r#"{"jsonrpc":"2.0","id":18446744073709551616,"method":"ping"}"#,
        r#"{"params":{"protocol":1,"client":"c","client_version":"0"},"jsonrpc":"2.0","id":1,"method":"hello"}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"hello","params":{"protocol":1,"client":"c","client_version":"0","more":{}}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"hello","params":[1,"c","0"]}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"subscribe","params":{"topics":["state","log",{"sessions":null}]}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"login","params":{"relay":"https://r","token":"t\"ok"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"session/create"}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"session/create","params":null}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"session/create","params":[]}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"session/create","params":{"task":"t","visibility":"public"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"session/show","params":{"session":"s-1"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"session/action","params":{"session":"s-1","action":"delete"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"session/share","params":{"session":"s-1","visibility":"team"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"send","params":{"session":"s-1","text":"line\nline \ud83d\ude00"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"delivery","params":{"seq":7}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"attach","params":{"session":"s-1"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"attach","params":{"session":"s-1","since":null}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"attach","params":{"session":"s-1","since":3}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"detach","params":{"session":"s-1"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"interrupt","params":{"session":"s-1"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"permissions","params":{"session":"s-1"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"answer","params":{"session":"s","request_id":"r","decision":{"behavior":"allow","updated_input":{"z":1,"a":[1.5,-2,{"q":"\u00e9"}]}}}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"answer","params":{"session":"s","request_id":"r","decision":{"updated_input":null,"behavior":"allow"}}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"answer","params":{"session":"s","request_id":"r","decision":{"behavior":"deny"}}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"send","params":{"session":"a","text":"b"},"params":{"session":"s-2","text":"last wins"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"send","params":{"session":"a","text":"b"},"params":null,"params":{"session":"s-2","text":"last"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"session/create","params":{"task":"x"},"params":null}"#,
    ];

    /// Lines the fast path must leave to the `Value` path, which decides them as before:
    /// errors, and repeated keys inside params (a `Value` keeps the last one; the typed
    /// structs refuse them, so the `Value` path reads those params).
    const SLOW_LINES: &[&str] = &[
        "",
        " ",
        "{oops",
        "[1,2]",
        "[]",
        r#""ping""#,
        "null",
        r#"{"jsonrpc":"2.0","id":1,"method":"ping"} x"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"ping"}{}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"ping",}"#,
        r#"{"jsonrpc":"2.0","id":[1],"method":"ping"}"#,
        r#"{"jsonrpc":"2.0","id":{},"method":"ping"}"#,
        r#"{"jsonrpc":"2.0","id":true,"method":"ping"}"#,
        r#"{"id":1,"method":"ping"}"#,
        r#"{"jsonrpc":2.0,"id":1,"method":"ping"}"#,
        r#"{"jsonrpc":null,"id":1,"method":"ping"}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"ping","jsonrpc":"1.0"}"#,
        r#"{"jsonrpc":"2.0","id":1}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":null}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":["ping"]}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"ping","method":7}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"frobnicate"}"#,
        r#"{"jsonrpc":"2.0","method":"frobnicate"}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"PING"}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"hello"}"#,
        r#"{"jsonrpc":"2.0","method":"hello","params":null}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"hello","params":{"protocol":"x"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"hello","params":{"protocol":1,"client":"c","client_version":"0","client":"d"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"hello","params":{"protocol":-1,"client":"c","client_version":"0"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"subscribe","params":{"topics":["weather"]}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"session/create","params":{"visibility":"everyone"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"session/show","params":{"session":1}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"session/show","params":{"session":"a","session":"b"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"delivery","params":{"seq":1.0}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"delivery","params":{"seq":-0}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"answer","params":{"session":"s","request_id":"r","decision":{"behavior":"maybe"}}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"answer","params":{"session":"s","request_id":"r","decision":{"behavior":"deny","behavior":"allow"}}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"send","params":{"session":"a","text":"b"},"params":{"session":"s-2"}}"#,
        // What a `Value` refuses but skipping a value would let through.
        r#"{"jsonrpc":"2.0","id":1,"method":"ping","x":"\ud800"}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"ping","params":["\udc00"]}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"ping","x":1e999}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"ping","params":{"n":-1e400}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"send","params":{"session":"s","text":"t","x":"\ud800"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"send","params":{"session":"s","text":"t","x":1E999}}"#,
        "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\",\"x\":\"\u{1}\"}",
        "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\",\"x\":\"\\q\"}",
    ];

    fn deep(key: &str, depth: usize) -> String {
        format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"ping","{key}":{}{}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        )
    }

    #[test]
    fn the_fast_path_decides_exactly_as_the_value_path() {
        for line in FAST_LINES {
            let fast = decode_fast(line.as_bytes());
            assert!(fast.is_some(), "not decided by the fast path: {line}");
            assert_eq!(
                Ok(fast.unwrap()),
                decode_via_value(line.as_bytes()),
                "{line}"
            );
        }
        for line in SLOW_LINES {
            assert_eq!(decode_fast(line.as_bytes()), None, "{line}");
        }
        // The nesting limit is the same (the request object counts as one level).
        for key in ["params", "x"] {
            let fits = deep(key, 126);
            assert!(decode_fast(fits.as_bytes()).is_some());
            assert!(decode_via_value(fits.as_bytes()).is_ok());
            let too_deep = deep(key, 127);
            assert_eq!(decode_fast(too_deep.as_bytes()), None);
            let err = decode_request(too_deep.as_bytes()).unwrap_err();
            assert_eq!(err.error.code, ErrorCode::ParseError);
        }
    }

    #[test]
    fn typed_params_are_read_as_before() {
        let line = br#"{"jsonrpc":"2.0","id":"q","method":"answer","params":{"session":"s","request_id":"r","decision":{"behavior":"allow","updated_input":{"z":1,"a":[1.5,-2]}}}}"#;
        assert_eq!(
            decode_request(line).unwrap(),
            JsonRequest {
                id: Some(json!("q")),
                request: Request::Answer {
                    session: "s".into(),
                    request_id: "r".into(),
                    decision: PermissionDecision::Allow {
                        updated_input: Some(r#"{"a":[1.5,-2],"z":1}"#.into()),
                    },
                    key: None,
                },
            }
        );
        let line = br#"{"jsonrpc":"2.0","id":1,"method":"session/show","params":{"session":"a","session":"b"}}"#;
        assert_eq!(
            decode_request(line).unwrap().request,
            Request::SessionShow {
                session: "b".into()
            }
        );
        let line = br#"{"jsonrpc":"2.0","id":1,"method":"session/create"}"#;
        assert_eq!(
            decode_request(line).unwrap().request,
            Request::SessionCreate(NewSession::default())
        );
        let line = br#"{"jsonrpc":"2.0","method":"send","params":{"session":"s","text":"a\nb"}}"#;
        assert_eq!(
            decode_request(line).unwrap(),
            JsonRequest {
                id: None,
                request: Request::Send {
                    session: "s".into(),
                    text: "a\nb".into(),
                    key: None,
                    wait: false,
                },
            }
        );
        let line = br#"{"jsonrpc":"2.0","id":2,"method":"send","params":{"session":"s","text":"t","key":"k-1","wait":true}}"#;
        assert_eq!(
            decode_request(line).unwrap().request,
            Request::Send {
                session: "s".into(),
                text: "t".into(),
                key: Some("k-1".into()),
                wait: true,
            }
        );
    }

    #[test]
    fn every_method_is_declared_once_and_decodes() {
        let mut names = crate::ipc::method::ALL.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), crate::ipc::method::ALL.len());
        for name in crate::ipc::method::ALL {
            let line = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"{name}","params":{{}}}}"#);
            // Known to both paths: a request or an invalid-params error, never "not found".
            match decode_request(line.as_bytes()) {
                Ok(request) => assert_eq!(request.request.method(), *name),
                Err(e) => assert_eq!(e.error.code, ErrorCode::InvalidParams, "{name}: {e:?}"),
            }
        }
    }

    #[test]
    fn every_error_keeps_its_code_and_id() {
        let null = Some(Value::Null);
        let one = Some(json!(1));
        let cases: &[(&str, ErrorCode, Option<Value>)] = &[
            ("", ErrorCode::ParseError, null.clone()),
            ("{oops", ErrorCode::ParseError, null.clone()),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"ping","x":"\ud800"}"#,
                ErrorCode::ParseError,
                null.clone(),
            ),
            ("[1,2]", ErrorCode::InvalidRequest, null.clone()),
            ("42", ErrorCode::InvalidRequest, null.clone()),
            (
                r#"{"jsonrpc":"2.0","id":[1],"method":"ping"}"#,
                ErrorCode::InvalidRequest,
                null.clone(),
            ),
            (
                r#"{"id":1,"method":"ping"}"#,
                ErrorCode::InvalidRequest,
                one.clone(),
            ),
            (
                r#"{"jsonrpc":"2.0","method":"ping","jsonrpc":"1.0"}"#,
                ErrorCode::InvalidRequest,
                null.clone(),
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":7}"#,
                ErrorCode::InvalidRequest,
                one.clone(),
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"frobnicate"}"#,
                ErrorCode::MethodNotFound,
                one.clone(),
            ),
            (
                r#"{"jsonrpc":"2.0","method":"frobnicate"}"#,
                ErrorCode::MethodNotFound,
                None,
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"hello"}"#,
                ErrorCode::InvalidParams,
                one.clone(),
            ),
            (
                r#"{"jsonrpc":"2.0","method":"send","params":{"session":"s"}}"#,
                ErrorCode::InvalidParams,
                None,
            ),
            (
                r#"{"jsonrpc":"2.0","id":"x","method":"delivery","params":{"seq":"1"}}"#,
                ErrorCode::InvalidParams,
                Some(json!("x")),
            ),
        ];
        for (line, code, id) in cases {
            let err = decode_request(line.as_bytes()).unwrap_err();
            assert_eq!((err.error.code, &err.id), (*code, id), "{line}");
            assert!(!err.error.message.is_empty());
        }
    }

    /// JSON snippets for each key of a generated request line.
    fn snippet(key: &'static str) -> BoxedStrategy<String> {
        let pick = |options: &'static [&'static str]| {
            proptest::sample::select(options)
                .prop_map(str::to_owned)
                .boxed()
        };
        match key {
            "id" => pick(&[
                "1",
                r#""a""#,
                "null",
                "1.5",
                "-0",
                "[1]",
                "{}",
                "true",
                "18446744073709551616",
                r#""\u0041""#,
            ]),
            "jsonrpc" => pick(&[
                r#""2.0""#,
                r#""2.0""#,
                r#""2\u002e0""#,
                r#""1.0""#,
                "2.0",
                "null",
            ]),
            "method" => pick(&[
                r#""hello""#,
                r#""ping""#,
                r#""status""#,
                r#""shutdown""#,
                r#""subscribe""#,
                r#""login""#,
                r#""logout""#,
                r#""whoami""#,
                r#""session/create""#,
                r#""session/list""#,
                r#""session/show""#,
                r#""session/action""#,
                r#""session/share""#,
                r#""send""#,
                r#""delivery""#,
                r#""attach""#,
                r#""detach""#,
                r#""session/unfollow""#,
                r#""interrupt""#,
                r#""permissions""#,
                r#""answer""#,
                r#""frob""#,
                "1",
                "null",
                r#""p\u0069ng""#,
            ]),
            "params" => pick(&[
                "null",
                "{}",
                "[]",
                r#"["s-1"]"#,
                r#"{"session":"s-1"}"#,
                r#"{"session":"s-1","session":"s-2"}"#,
                r#"{"session":1}"#,
                r#"{"session":"s-1","text":"hi\n\u00e9"}"#,
                r#"{"protocol":1,"client":"c","client_version":"0"}"#,
                r#"{"topics":["state","log"]}"#,
                r#"{"topics":[]}"#,
                r#"{"relay":"https://r","token":"t"}"#,
                r#"{"seq":3}"#,
                r#"{"seq":3.0}"#,
                r#"{"session":"s","since":null}"#,
                r#"{"session":"s","since":2}"#,
                r#"{"session":"s","action":"pause"}"#,
                r#"{"session":"s","visibility":"team"}"#,
                r#"{"task":"t","vm_image":"x"}"#,
                r#"{"session":"s","request_id":"r","decision":{"behavior":"allow","updated_input":{"b":1,"a":[1.5,-2],"b":2}}}"#,
                r#"{"session":"s","request_id":"r","decision":{"behavior":"deny"}}"#,
                r#"{"session":"s","request_id":"r","decision":{"behavior":"deny","message":"no"}}"#,
                r#"{"session":"s","extra":"\ud800"}"#,
                r#"{"session":"s","extra":1e999}"#,
                r#"{"session":"s","extra":[[[{}]]]}"#,
            ]),
            _ => pick(&[r#""\ud800""#, "1e999", r#"{"a":[]}"#, r#""ok""#, "-12.5e-3"]),
        }
    }

    fn request_line() -> impl Strategy<Value = String> {
        let key = proptest::sample::select(&["id", "jsonrpc", "method", "params", "x"][..]);
        let entry = key.prop_flat_map(|key| (Just(key), snippet(key)));
        let must = (snippet("jsonrpc"), snippet("method"));
        (
            must,
            proptest::collection::vec(entry, 0..5),
            any::<prop::sample::Index>(),
        )
            .prop_map(|((jsonrpc, method), mut entries, at)| {
                let at = at.index(entries.len() + 1);
                entries.insert(at, ("jsonrpc", jsonrpc));
                entries.insert(at, ("method", method));
                let body: Vec<String> = entries
                    .iter()
                    .map(|(key, value)| format!("\"{key}\":{value}"))
                    .collect();
                format!("{{{}}}", body.join(","))
            })
    }

    proptest! {
        /// Generated requests, well-formed or nearly: the fast path never disagrees with
        /// the `Value` path.
        #[test]
        fn generated_requests_decode_as_via_value(line in request_line()) {
            let expected = decode_via_value(line.as_bytes());
            if let Some(fast) = decode_fast(line.as_bytes()) {
                prop_assert_eq!(Ok(fast), expected.clone());
            }
            prop_assert_eq!(decode_request(line.as_bytes()), expected);
        }
    }

    #[test]
    fn ids_are_echoed_verbatim() {
        for id in [json!(1), json!("abc"), json!(18446744073709551615u64)] {
            let line = json!({"jsonrpc": "2.0", "id": id, "method": "ping"}).to_string();
            let request = decode_request(line.as_bytes()).unwrap();
            assert_eq!(request.id, Some(id.clone()));
            let mut out = Vec::new();
            encode_reply(&id, &Ok(Response::Pong), &mut out);
            let back: Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(back["id"], id);
            assert_eq!(back["result"], json!("pong"));
        }
    }

    #[test]
    fn errors_carry_their_codes() {
        let cases: [(&str, i64); 5] = [
            ("{not json", -32700),
            ("[1,2]", -32600),
            (r#"{"jsonrpc":"2.0","id":1,"method":"frobnicate"}"#, -32601),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"hello","params":{"protocol":"x"}}"#,
                -32602,
            ),
            (r#"{"jsonrpc":"1.0","id":1,"method":"ping"}"#, -32600),
        ];
        for (line, code) in cases {
            let err = decode_request(line.as_bytes()).unwrap_err();
            assert_eq!(err.error.code.jsonrpc_code(), code, "{line}");
        }
    }

    #[test]
    fn notifications_are_never_answered() {
        let err = decode_request(br#"{"jsonrpc":"2.0","method":"frobnicate"}"#).unwrap_err();
        assert_eq!(
            err.id, None,
            "no reply to a notification, even an unknown one"
        );
        let err =
            decode_request(br#"{"jsonrpc":"2.0","id":null,"method":"frobnicate"}"#).unwrap_err();
        assert_eq!(err.id, Some(Value::Null), "a null id is an id");
        let err = decode_request(b"{oops").unwrap_err();
        assert_eq!(
            err.id,
            Some(Value::Null),
            "parse errors are answered with a null id"
        );
    }

    #[test]
    fn lines_are_found_and_limited() {
        assert_eq!(find_line(b"{}\n{"), Ok(Some(2)));
        assert_eq!(find_line(b"{"), Ok(None));
        let long = vec![b'x'; MAX_MESSAGE_LEN + 1];
        assert!(find_line(&long).is_err());
    }

    proptest! {
        /// Arbitrary JSON-shaped text (the likelier garbage on this encoding) gives a request or
        /// a clean error; arbitrary bytes are in `tests/decoders.rs`.
        #[test]
        fn arbitrary_json_text_decodes_cleanly(text in r#"\{("(jsonrpc|id|method|params)"|[0-9a-z":,\[\]{} ])*\}?"#) {
            if let Err(err) = decode_request(text.as_bytes()) {
                prop_assert!(!err.error.message.is_empty());
            }
        }
    }
}
