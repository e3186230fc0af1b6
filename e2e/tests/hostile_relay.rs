//! A relay that breaks the bridge protocol: the daemon refuses what it sends, says why, and
//! carries on serving its clients. (The peer here is a bare WebSocket server, not a stand-in
//! for `cloud-relay`: it plays a broken or hostile relay, which no real one would.)

use std::net::SocketAddr;

use cloudd_e2e::{Home, DEADLINE};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;

/// Serves WebSocket upgrades; for each connection, waits for the daemon's first message
/// and answers with `reply`.
fn hostile_relay(reply: Vec<u8>) -> SocketAddr {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        runtime.block_on(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let reply = reply.clone();
                tokio::spawn(async move {
                    // The token exchange comes first: answer it like a relay, so the
                    // daemon goes on to the bridge.
                    let mut head = [0u8; 4];
                    if stream.peek(&mut head).await.is_ok() && &head == b"POST" {
                        answer_token_request(stream).await;
                        return;
                    }
                    let Ok(mut socket) = tokio_tungstenite::accept_async(stream).await else {
                        return;
                    };
                    let _ = socket.next().await;
                    let _ = socket.send(Message::Binary(reply.into())).await;
                    while socket.next().await.is_some() {}
                });
            }
        });
    });
    address
}

/// Reads one HTTP request and answers it with tokens.
async fn answer_token_request(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut request = Vec::new();
    let mut buffer = [0u8; 4096];
    // The head, then the body's length of bytes after it.
    loop {
        let Ok(n) = stream.read(&mut buffer).await else {
            return;
        };
        if n == 0 {
            return;
        }
        request.extend_from_slice(&buffer[..n]);
        let text = String::from_utf8_lossy(&request);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|line| {
                    line.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap_or(0))
                })
                .unwrap_or(0);
            if body.len() >= length {
                break;
            }
        }
    }
    let body =
        r#"{"access_token":"cat_hostile","expires_in_ms":900000,"refresh_token":"crf_hostile"}"#;
    let answer = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(answer.as_bytes()).await;
}

fn login_fails_cleanly(reply: Vec<u8>, expected: &str) {
    let address = hostile_relay(reply);
    let home = Home::new();
    let output = home.cloudctl(&[
        "login",
        "--relay",
        &format!("http://{address}"),
        "--token",
        "t",
    ]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("login failed") && stderr.contains(expected),
        "{stderr}"
    );
    // The daemon is unharmed: it answers, and went back to its embedded relay.
    home.cloudctl_ok(&["ping"]);
    let mut identity = serde_json::Value::Null;
    cloudd_e2e::wait_for("the embedded relay again", DEADLINE, || {
        identity = home.cloudctl_json(&["whoami"]);
        identity["relay"]["state"] == "connected"
    });
    assert_eq!(identity["relay"]["mode"], "embedded");
}

#[test]
fn a_malformed_envelope_from_the_relay_is_refused() {
    login_fails_cleanly(vec![0xff; 64], "malformed bridge message");
}

#[test]
fn an_oversized_frame_from_the_relay_is_refused() {
    login_fails_cleanly(
        vec![0; cloud_protocol::bridge::MAX_BRIDGE_MESSAGE + 1],
        "too long",
    );
}
