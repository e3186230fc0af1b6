//! The newline-delimited JSON-RPC 2.0 encoding of the local-socket messages.
//!
//! One JSON object per line, in both directions. This is the encoding for editors and for
//! people with `socat`: a connection whose first byte is `{` speaks it. Request ids may be
//! numbers or strings and are echoed verbatim; a request without an id is a JSON-RPC
//! notification and gets no reply. The daemon's own notifications use the method names in
//! [`crate::ipc::notification`].

use serde_json::{json, Map, Value};

use crate::bridge::PermissionDecision;
use crate::ipc::{
    method, notification, ErrorBody, ErrorCode, Hello, Notification, Request, Response, Subscribe,
};
use crate::session::{LogEntry, SessionAction, SessionEvent, Visibility};
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
pub fn decode_request(line: &[u8]) -> Result<JsonRequest, JsonRequestError> {
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
    let invalid_params = |e: serde_json::Error| {
        fail(
            reply_id.clone(),
            ErrorCode::InvalidParams,
            format!("invalid params for {method_name}: {e}"),
        )
    };
    let request = match method_name.as_str() {
        method::HELLO => {
            Request::Hello(serde_json::from_value::<Hello>(params).map_err(invalid_params)?)
        }
        method::PING => Request::Ping,
        method::STATUS => Request::Status,
        method::SHUTDOWN => Request::Shutdown,
        method::SUBSCRIBE => {
            Request::Subscribe(serde_json::from_value::<Subscribe>(params).map_err(invalid_params)?)
        }
        method::LOGIN => {
            let p: LoginParams = serde_json::from_value(params).map_err(invalid_params)?;
            Request::Login {
                relay: p.relay,
                token: p.token,
            }
        }
        method::LOGOUT => Request::Logout,
        method::WHOAMI => Request::Whoami,
        method::SESSION_CREATE => {
            let params = if params.is_null() { json!({}) } else { params };
            Request::SessionCreate(serde_json::from_value(params).map_err(invalid_params)?)
        }
        method::SESSION_LIST => Request::SessionList,
        method::SESSION_SHOW => {
            let p: SessionParams = serde_json::from_value(params).map_err(invalid_params)?;
            Request::SessionShow { session: p.session }
        }
        method::SESSION_ACTION => {
            let p: ActionParams = serde_json::from_value(params).map_err(invalid_params)?;
            Request::SessionAction {
                session: p.session,
                action: p.action,
            }
        }
        method::SESSION_SHARE => {
            let p: ShareParams = serde_json::from_value(params).map_err(invalid_params)?;
            Request::SessionShare {
                session: p.session,
                visibility: p.visibility,
            }
        }
        method::SEND => {
            let p: SendParams = serde_json::from_value(params).map_err(invalid_params)?;
            Request::Send {
                session: p.session,
                text: p.text,
            }
        }
        method::DELIVERY => {
            let p: DeliveryParams = serde_json::from_value(params).map_err(invalid_params)?;
            Request::Delivery { seq: p.seq }
        }
        method::ATTACH => {
            let p: AttachParams = serde_json::from_value(params).map_err(invalid_params)?;
            Request::Attach {
                session: p.session,
                since: p.since,
            }
        }
        method::DETACH => {
            let p: SessionParams = serde_json::from_value(params).map_err(invalid_params)?;
            Request::Detach { session: p.session }
        }
        method::INTERRUPT => {
            let p: SessionParams = serde_json::from_value(params).map_err(invalid_params)?;
            Request::Interrupt { session: p.session }
        }
        method::PERMISSIONS => {
            let p: SessionParams = serde_json::from_value(params).map_err(invalid_params)?;
            Request::Permissions { session: p.session }
        }
        method::ANSWER => {
            let p: AnswerParams = serde_json::from_value(params).map_err(invalid_params)?;
            Request::Answer {
                session: p.session,
                request_id: p.request_id,
                decision: match p.decision {
                    JsonDecision::Allow { updated_input } => PermissionDecision::Allow {
                        updated_input: updated_input.map(|v| v.to_string()),
                    },
                    JsonDecision::Deny { message } => PermissionDecision::Deny { message },
                },
            }
        }
        other => {
            return Err(fail(
                reply_id,
                ErrorCode::MethodNotFound,
                format!("method not found: {other:?} (see docs/PROTOCOL.md for the methods)"),
            ))
        }
    };
    Ok(JsonRequest { id, request })
}

/// The JSON form of a successful response.
pub fn response_value(response: &Response) -> Value {
    match response {
        Response::Hello(reply) => json!(reply),
        Response::Pong => json!("pong"),
        Response::Status(status) => json!(status),
        Response::ShuttingDown => json!("shutting_down"),
        Response::Subscribed(subscribe) => json!(subscribe),
        Response::Identity(identity) => json!(identity),
        Response::Sessions { sessions, stale } => json!({"sessions": sessions, "stale": stale}),
        Response::Session { session, stale } => json!({"session": session, "stale": stale}),
        Response::SessionDeleted => json!("deleted"),
        Response::Queued { seq } => json!({"seq": seq, "state": "queued"}),
        Response::Delivered { seq } => json!({"seq": seq, "state": "delivered"}),
        Response::Attached { session, last_seq } => {
            json!({"session": session, "last_seq": last_seq})
        }
        Response::Prompts(prompts) => json!(prompts),
    }
}

/// The JSON form of a session log entry: stream-json messages are embedded as JSON
/// (not as text), so an editor reads them directly.
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
    }
    value
}

/// Appends the reply to request `id` as one line to `out`.
pub fn encode_reply(id: &Value, result: &Result<Response, ErrorBody>, out: &mut Vec<u8>) {
    let mut object = Map::new();
    object.insert("jsonrpc".into(), json!("2.0"));
    object.insert("id".into(), id.clone());
    match result {
        Ok(response) => {
            object.insert("result".into(), response_value(response));
        }
        Err(error) => {
            object.insert("error".into(), error_value(error));
        }
    }
    write_line(&Value::Object(object), out);
}

/// The JSON-RPC error object for `error`: the numeric code, the message, and the
/// symbolic code under `data.kind`.
pub fn error_value(error: &ErrorBody) -> Value {
    json!({
        "code": error.code.jsonrpc_code(),
        "message": error.message,
        "data": { "kind": error.code },
    })
}

/// Appends `notification` as one JSON-RPC notification line to `out`.
pub fn encode_notification(notification: &Notification, out: &mut Vec<u8>) {
    let (method_name, params) = match notification {
        Notification::State(change) => (notification::STATE, json!(change)),
        Notification::Log(record) => (notification::LOG, json!(record)),
        Notification::Closing(closing) => (notification::CLOSING, json!(closing)),
        Notification::SessionLog { session, entry } => (
            notification::SESSION_LOG,
            json!({"session": session, "entry": log_entry_value(entry)}),
        ),
        Notification::SessionChanged(session) => (notification::SESSION_CHANGED, json!(session)),
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
    };
    write_line(
        &json!({ "jsonrpc": "2.0", "method": method_name, "params": params }),
        out,
    );
}

#[derive(serde::Deserialize)]
struct LoginParams {
    relay: String,
    token: String,
}

#[derive(serde::Deserialize)]
struct SessionParams {
    session: String,
}

#[derive(serde::Deserialize)]
struct ActionParams {
    session: String,
    action: SessionAction,
}

#[derive(serde::Deserialize)]
struct ShareParams {
    session: String,
    visibility: Visibility,
}

#[derive(serde::Deserialize)]
struct SendParams {
    session: String,
    text: String,
}

#[derive(serde::Deserialize)]
struct DeliveryParams {
    seq: u64,
}

#[derive(serde::Deserialize)]
struct AttachParams {
    session: String,
    #[serde(default)]
    since: Option<u64>,
}

#[derive(serde::Deserialize)]
struct AnswerParams {
    session: String,
    request_id: String,
    decision: JsonDecision,
}

/// A permission answer as editors write it: `{"behavior": "allow", "updated_input": {..}}`
/// or `{"behavior": "deny", "message": ".."}`.
#[derive(serde::Deserialize)]
#[serde(tag = "behavior", rename_all = "snake_case")]
enum JsonDecision {
    Allow {
        #[serde(default)]
        updated_input: Option<Value>,
    },
    Deny {
        #[serde(default)]
        message: String,
    },
}

fn write_line(value: &Value, out: &mut Vec<u8>) {
    serde_json::to_writer(&mut *out, value).expect("serializing a Value to a Vec cannot fail");
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
        /// Arbitrary bytes give a request or a clean error, never a panic.
        #[test]
        fn arbitrary_lines_decode_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = find_line(&bytes);
            if let Err(err) = decode_request(&bytes) {
                prop_assert!(!err.error.message.is_empty());
            }
        }

        /// Arbitrary JSON-shaped text (the likelier garbage on this encoding) too.
        #[test]
        fn arbitrary_json_text_decodes_cleanly(text in r#"\{("(jsonrpc|id|method|params)"|[0-9a-z":,\[\]{} ])*\}?"#) {
            if let Err(err) = decode_request(text.as_bytes()) {
                prop_assert!(!err.error.message.is_empty());
            }
        }
    }
}
