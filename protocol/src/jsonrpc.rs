//! The newline-delimited JSON-RPC 2.0 encoding of the local-socket messages.
//!
//! One JSON object per line, in both directions. This is the encoding for editors and for
//! people with `socat`: a connection whose first byte is `{` speaks it. Request ids may be
//! numbers or strings and are echoed verbatim; a request without an id is a JSON-RPC
//! notification and gets no reply. The daemon's own notifications use the method names in
//! [`crate::ipc::notification`].

use serde_json::{json, Map, Value};

use crate::ipc::{
    method, notification, ErrorBody, ErrorCode, Hello, Notification, Request, Response, Subscribe,
};
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
        other => {
            return Err(fail(
                reply_id,
                ErrorCode::MethodNotFound,
                format!(
                    "method not found: {other:?} (known: hello, ping, status, shutdown, subscribe)"
                ),
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
    }
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
    };
    write_line(
        &json!({ "jsonrpc": "2.0", "method": method_name, "params": params }),
        out,
    );
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
