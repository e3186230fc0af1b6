//! What every test crate of the workspace shares, so each exists once: polling a condition
//! until a deadline ([`wait_for`], [`wait_for_async`]) and a plain HTTP/1.1 client for the
//! relay's REST API ([`http`]).
//!
//! Architecture invariant: nothing here stands in for a component of ours. Waiting is on a
//! condition with a deadline, never a bare sleep; the HTTP client speaks to the real relay.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a test waits for anything before failing.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// The pause between two looks at a condition: short at first, then up to 50 ms.
fn next_delay(delay: Duration) -> Duration {
    (delay * 2).min(Duration::from_millis(50))
}

/// Polls `condition` until it holds or `deadline` passes; panics with `what` on timeout.
pub fn wait_for(what: &str, deadline: Duration, mut condition: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    let mut delay = Duration::from_millis(1);
    while !condition() {
        assert!(
            Instant::now() < end,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(delay);
        delay = next_delay(delay);
    }
}

/// [`wait_for`] for async conditions: polls until `condition` gives `Some`, which is
/// returned; panics with `what` and the last value seen (`describe`) on timeout.
pub async fn wait_for_async<T, F, Fut>(what: &str, deadline: Duration, mut condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let end = Instant::now() + deadline;
    let mut delay = Duration::from_millis(1);
    loop {
        match condition().await {
            Ok(found) => return found,
            Err(last) => assert!(
                Instant::now() < end,
                "timed out after {deadline:?} waiting for {what}; last seen: {last}"
            ),
        }
        // The caller's runtime's timer: a test on a paused clock still advances.
        tokio::time::sleep(delay).await;
        delay = next_delay(delay);
    }
}

/// One HTTP/1.1 request on its own connection; returns the status code and the body as
/// JSON (a JSON string when it is not JSON, `null` when empty). Chunked bodies are
/// reassembled. Blocking: async tests call it through `spawn_blocking`.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    http_with_headers(addr, method, path, token, body, &[])
}

/// [`http`] with extra request headers.
pub fn http_with_headers(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let (status, _, value) = http_answer(addr, method, path, token, body, headers);
    (status, value)
}

/// [`http_with_headers`], also returning the answer's headers (lowercase names).
pub fn http_answer(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, Vec<(String, String)>, Value) {
    let mut stream = TcpStream::connect(addr).expect("connect to the relay");
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let body = body.unwrap_or("");
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        request.push_str("Content-Type: application/json\r\n");
    }
    if let Some(token) = token {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    let value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&body).unwrap_or(Value::String(body))
    };
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    (status, headers, value)
}

/// Reassembles a chunked body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}
