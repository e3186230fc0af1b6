//! The stream-json agent protocol: newline-delimited JSON on an agent's stdio.
//!
//! SDK messages (`user`, `assistant`, `result`, `system`) and the control messages
//! (`control_request`, `control_response`, `control_cancel_request`). This module builds
//! the lines the relay writes to an agent and reads the fields the relay and the daemon
//! need from the lines an agent writes (type, request id, control subtype). Everything
//! else is carried verbatim.

use serde_json::{json, Value};

use crate::bridge::PermissionDecision;

/// The control subtype of a permission prompt.
pub const CAN_USE_TOOL: &str = "can_use_tool";
/// The control subtype of an interrupt.
pub const INTERRUPT: &str = "interrupt";

/// A user message line.
pub fn user_message(text: &str) -> String {
    json!({"type": "user", "message": {"role": "user", "content": text}}).to_string()
}

/// The control_response answering permission prompt `request_id`.
pub fn permission_response(request_id: &str, decision: &PermissionDecision) -> String {
    let response = match decision {
        PermissionDecision::Allow { updated_input } => {
            let mut response = json!({"behavior": "allow"});
            if let Some(input) = updated_input
                .as_deref()
                .and_then(|i| serde_json::from_str::<Value>(i).ok())
            {
                response["updatedInput"] = input;
            }
            response
        }
        PermissionDecision::Deny { message } => json!({"behavior": "deny", "message": message}),
    };
    json!({
        "type": "control_response",
        "response": {"subtype": "success", "request_id": request_id, "response": response},
    })
    .to_string()
}

/// The control_response refusing a control request of an unknown subtype.
pub fn error_response(request_id: &str, error: &str) -> String {
    json!({
        "type": "control_response",
        "response": {"subtype": "error", "request_id": request_id, "error": error},
    })
    .to_string()
}

/// The control_request that interrupts the agent's current work.
pub fn interrupt_request(request_id: &str) -> String {
    json!({"type": "control_request", "request_id": request_id, "request": {"subtype": INTERRUPT}})
        .to_string()
}

/// The fields of a stream-json line that routing needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// `type`.
    pub kind: String,
    /// `request_id` (control messages; for a control_response, `response.request_id`).
    pub request_id: Option<String>,
    /// `request.subtype` (control requests) or `response.subtype` (control responses).
    pub subtype: Option<String>,
}

/// Reads the routing fields of a line; `None` when it is not a JSON object with a string
/// `type`.
pub fn parse(line: &str) -> Option<Parsed> {
    let value: Value = serde_json::from_str(line).ok()?;
    let kind = value.get("type")?.as_str()?.to_owned();
    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
    let (request_id, subtype) = match kind.as_str() {
        "control_response" => {
            let response = value.get("response");
            (
                text(response.and_then(|r| r.get("request_id"))),
                text(response.and_then(|r| r.get("subtype"))),
            )
        }
        _ => (
            text(value.get("request_id")),
            text(value.get("request").and_then(|r| r.get("subtype"))),
        ),
    };
    Some(Parsed {
        kind,
        request_id,
        subtype,
    })
}

/// What an agent's line means for its permission prompts: the one place the daemon and
/// the clients learn which prompts are pending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// A `can_use_tool` request: the agent waits for an answer.
    Prompt {
        /// The prompt's request id.
        request_id: String,
        /// The tool it wants to use.
        tool_name: String,
        /// The tool's input, as JSON text.
        input: String,
    },
    /// A prompt was answered (a `control_response`).
    Answered {
        /// The prompt's request id.
        request_id: String,
    },
    /// The agent withdrew a prompt (a `control_cancel_request`).
    Withdrawn {
        /// The prompt's request id.
        request_id: String,
    },
}

/// The prompt-related meaning of an agent's or a user's line, if it has one.
pub fn control(line: &str) -> Option<Control> {
    let value: Value = serde_json::from_str(line).ok()?;
    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
    match value.get("type")?.as_str()? {
        "control_request" => {
            let request = value.get("request")?;
            if request.get("subtype")?.as_str()? != CAN_USE_TOOL {
                return None;
            }
            Some(Control::Prompt {
                request_id: text(value.get("request_id"))?,
                tool_name: text(request.get("tool_name")).unwrap_or_else(|| "?".into()),
                input: request.get("input").unwrap_or(&Value::Null).to_string(),
            })
        }
        "control_response" => Some(Control::Answered {
            request_id: text(value.get("response").and_then(|r| r.get("request_id")))?,
        }),
        "control_cancel_request" => Some(Control::Withdrawn {
            request_id: text(value.get("request_id"))?,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_carry_the_request_id() {
        let line = permission_response(
            "r1",
            &PermissionDecision::Deny {
                message: "no".into(),
            },
        );
        let parsed = parse(&line).unwrap();
        assert_eq!(parsed.kind, "control_response");
        assert_eq!(parsed.request_id.as_deref(), Some("r1"));
        let value: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["response"]["response"]["behavior"], "deny");

        let allow = permission_response(
            "r2",
            &PermissionDecision::Allow {
                updated_input: Some(r#"{"command":"ls -a"}"#.into()),
            },
        );
        let value: Value = serde_json::from_str(&allow).unwrap();
        assert_eq!(
            value["response"]["response"]["updatedInput"]["command"],
            "ls -a"
        );
    }

    #[test]
    fn control_requests_parse() {
        let line = r#"{"type":"control_request","request_id":"r9","request":{"subtype":"can_use_tool","tool_name":"Bash","input":{"command":"ls"}}}"#;
        let parsed = parse(line).unwrap();
        assert_eq!(parsed.subtype.as_deref(), Some(CAN_USE_TOOL));
        assert_eq!(parsed.request_id.as_deref(), Some("r9"));
        assert!(parse("not json").is_none());
    }
}
