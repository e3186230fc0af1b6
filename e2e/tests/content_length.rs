//! JSON-RPC framed by `Content-Length` headers (LSP's base protocol, what `vscode-jsonrpc`
//! writes) on the real daemon's socket: the same methods, notifications and errors as the
//! newline-delimited encoding, and a client that breaks the framing is told why and cut
//! off without disturbing the others.
//!
//! The reader here is written from docs/PROTOCOL.md, not from the daemon's decoder, so it
//! checks what the daemon writes independently.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;

use cloud_protocol::MAX_MESSAGE_LEN;
use cloudd_e2e::{Home, JsonClient, DEADLINE};
use serde_json::{json, Value};

/// A Content-Length framed JSON-RPC client on a raw Unix socket, as an LSP library is.
struct LspClient {
    stream: UnixStream,
    /// Bytes read but not yet taken as a message.
    buf: Vec<u8>,
    next_id: u64,
}

impl LspClient {
    fn connect(socket: &Path) -> LspClient {
        let stream = UnixStream::connect(socket).expect("connect to cloudd");
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        LspClient {
            stream,
            buf: Vec::new(),
            next_id: 1,
        }
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write to cloudd");
    }

    fn framed(message: &Value) -> Vec<u8> {
        let body = message.to_string();
        format!("Content-Length: {}\r\n\r\n{body}", body.len()).into_bytes()
    }

    /// Reads one message; `None` at end of stream. Panics on anything but
    /// `Content-Length: N` CRLF CRLF and N bytes of JSON, which is all the daemon writes.
    fn recv(&mut self) -> Option<Value> {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let header = std::str::from_utf8(&self.buf[..end]).expect("ASCII headers");
                let len: usize = header
                    .strip_prefix("Content-Length: ")
                    .unwrap_or_else(|| panic!("unexpected header section {header:?}"))
                    .parse()
                    .expect("a decimal length");
                let start = end + 4;
                if self.buf.len() >= start + len {
                    let message = serde_json::from_slice(&self.buf[start..start + len])
                        .expect("one JSON message per body");
                    self.buf.drain(..start + len);
                    return Some(message);
                }
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).expect("read from cloudd");
            if n == 0 {
                assert!(self.buf.is_empty(), "cut off mid-message: {:?}", self.buf);
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Sends a request; returns its reply, skipping notifications.
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let request = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        self.send_raw(&LspClient::framed(&request));
        loop {
            let message = self.recv().expect("a reply before the end of stream");
            if message.get("id") == Some(&json!(id)) {
                return message;
            }
        }
    }

    fn hello(&mut self) -> Value {
        let reply = self.call(
            "hello",
            json!({"protocol": cloud_protocol::ipc::PROTOCOL_VERSION, "client": "lsp", "client_version": "0"}),
        );
        reply["result"].clone()
    }

    /// Everything until the daemon closes the connection.
    fn read_to_end(&mut self) -> Vec<Value> {
        std::iter::from_fn(|| self.recv()).collect()
    }
}

#[test]
fn content_length_framing_speaks_the_same_json_rpc() {
    let home = Home::new();
    let daemon = home.spawn_daemon();
    let mut client = LspClient::connect(&home.paths.socket);

    let early = client.call("ping", Value::Null);
    assert_eq!(early["error"]["data"]["kind"], "hello_required", "{early}");
    let hello = client.hello();
    assert_eq!(hello["protocol"], 1, "{hello}");
    assert_eq!(client.call("ping", Value::Null)["result"], "pong");

    // Other headers, any case, several messages in one write and one message across
    // writes; a request without an id gets no reply, a body that is not JSON a parse error.
    let mut bytes =
        b"content-type: application/vscode-jsonrpc; charset=utf-8\r\nCONTENT-LENGTH:  33\r\n\r\n{\"jsonrpc\":\"2.0\",\"method\":\"ping\"}".to_vec();
    bytes.extend_from_slice(b"Content-Length: 5\r\n\r\n{\"jso");
    bytes.extend_from_slice(&LspClient::framed(
        &json!({"jsonrpc": "2.0", "id": "s-1", "method": "ping"}),
    ));
    let (first, second) = bytes.split_at(bytes.len() - 7);
    client.send_raw(first);
    client.send_raw(second);
    let parse_error = client.recv().unwrap();
    assert_eq!(parse_error["error"]["code"], -32700, "{parse_error}");
    assert_eq!(parse_error["id"], Value::Null);
    assert_eq!(
        client.recv().unwrap(),
        json!({"jsonrpc": "2.0", "id": "s-1", "result": "pong"})
    );

    let unknown = client.call("frobnicate", json!({}));
    assert_eq!(unknown["error"]["data"]["kind"], "method_not_found");

    // A subscription's notifications come framed the same way.
    let subscribed = client.call("subscribe", json!({"topics": ["state"]}));
    assert_eq!(subscribed["result"], json!({"topics": ["state"]}));
    std::fs::create_dir_all(&home.paths.config_dir).unwrap();
    std::fs::write(home.paths.config_file(), "log = \"debug\"\n").unwrap();
    daemon.signal(libc::SIGHUP);
    let change = client.recv().unwrap();
    assert_eq!(change["method"], "state", "{change}");
    assert_eq!(change["params"]["message"], "configuration reloaded");
    assert_eq!(change["params"]["config_generation"], 2);
}

#[test]
fn a_broken_header_closes_that_connection_with_a_reason_and_no_other() {
    let home = Home::new();
    let _daemon = home.spawn_daemon();
    let mut json_bystander = JsonClient::connect(&home.paths.socket).unwrap();
    json_bystander.hello().unwrap();
    let mut lsp_bystander = LspClient::connect(&home.paths.socket);
    lsp_bystander.hello();

    // A misspelt header: closed with a reason, in the client's framing.
    let mut broken = LspClient::connect(&home.paths.socket);
    broken.hello();
    broken.send_raw(b"Content-Lenght 2\r\n\r\n{}");
    let rest = broken.read_to_end();
    let closing = rest.last().expect("a closing notification");
    assert_eq!(closing["method"], "closing", "{rest:?}");
    assert_eq!(closing["params"]["code"], "parse_error");
    let message = closing["params"]["message"].as_str().unwrap();
    assert!(
        message.contains("malformed header") && message.contains("Content-Length: N"),
        "{message}"
    );

    // A length over the limit is refused from the header alone.
    let mut greedy = LspClient::connect(&home.paths.socket);
    greedy.send_raw(format!("Content-Length: {}\r\n\r\n", MAX_MESSAGE_LEN + 1).as_bytes());
    let rest = greedy.read_to_end();
    assert_eq!(rest.last().unwrap()["params"]["code"], "message_too_large");

    // Headers that never end: closed once they pass their own limit.
    let mut endless = LspClient::connect(&home.paths.socket);
    endless.send_raw(b"Content-Length: 2\r\n");
    let filler = format!("X-Filler: {}\r\n", "x".repeat(1000));
    for _ in 0..10 {
        endless.send_raw(filler.as_bytes());
    }
    let rest = endless.read_to_end();
    let closing = &rest.last().unwrap()["params"];
    assert_eq!(closing["code"], "message_too_large", "{closing}");
    assert!(
        closing["message"]
            .as_str()
            .unwrap()
            .contains("header section"),
        "{closing}"
    );

    assert_eq!(
        json_bystander.call("ping", Value::Null).unwrap()["result"],
        "pong"
    );
    assert_eq!(lsp_bystander.call("ping", Value::Null)["result"], "pong");
}
