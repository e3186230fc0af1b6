//! The local socket with raw clients, as an editor or a broken program would talk to it:
//! JSON-RPC by hand, binary frames by hand, garbage, oversized messages, many clients at
//! once, and a subscriber that stops reading.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;

use cloud_protocol::frame;
use cloud_protocol::ipc::{
    ClientMessage, ErrorCode, Hello, Notification, Request, Response, ServerMessage,
};
use cloud_protocol::MAX_MESSAGE_LEN;
use cloudctl::client::Client;
use cloudd_e2e::{wait_for, Home, JsonClient, DEADLINE};
use serde_json::{json, Value};

fn json_client(home: &Home) -> JsonClient {
    JsonClient::connect(&home.paths.socket).expect("connect")
}

/// Reads until end of stream; returns the JSON lines read.
fn read_to_end(client: &mut JsonClient) -> Vec<Value> {
    let mut lines = Vec::new();
    while let Some(line) = client.recv().expect("read until the daemon closes") {
        lines.push(line);
    }
    lines
}

#[test]
fn json_rpc_by_hand() {
    let home = Home::new();
    let _daemon = home.spawn_daemon();
    let mut client = json_client(&home);

    let early = client.call("ping", Value::Null).unwrap();
    assert_eq!(
        early["error"]["code"], -32001,
        "requests before hello are refused: {early}"
    );

    let hello = client.hello().unwrap();
    assert_eq!(hello["protocol"], 1);
    assert!(hello["pid"].as_u64().is_some());

    // String ids are echoed as strings; a request without an id gets no reply.
    client
        .send_raw(b"{\"jsonrpc\":\"2.0\",\"method\":\"ping\"}\n{\"jsonrpc\":\"2.0\",\"id\":\"s-1\",\"method\":\"ping\"}\n")
        .unwrap();
    let reply = client.recv().unwrap().unwrap();
    assert_eq!(
        reply,
        json!({"jsonrpc": "2.0", "id": "s-1", "result": "pong"})
    );

    let status = client.call("status", Value::Null).unwrap();
    assert_eq!(status["result"]["state"], "ready");
    assert_eq!(status["result"]["clients"], 1);

    let subscribed = client
        .call("subscribe", json!({"topics": ["state", "log"]}))
        .unwrap();
    assert_eq!(subscribed["result"], json!({"topics": ["state", "log"]}));
}

#[test]
fn bad_input_gets_clear_errors_and_other_clients_carry_on() {
    let home = Home::new();
    let _daemon = home.spawn_daemon();
    let mut bystander = json_client(&home);
    bystander.hello().unwrap();

    // Malformed JSON: a parse error, and the connection carries on.
    let mut client = json_client(&home);
    client.hello().unwrap();
    client
        .send_raw(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"\n")
        .unwrap();
    let reply = client.recv().unwrap().unwrap();
    assert_eq!(reply["error"]["code"], -32700, "{reply}");
    assert_eq!(reply["id"], Value::Null);
    let unknown = client.call("frobnicate", json!({})).unwrap();
    assert_eq!(unknown["error"]["code"], -32601);
    assert!(unknown["error"]["message"]
        .as_str()
        .unwrap()
        .contains("frobnicate"));
    let bad_params = client
        .call("subscribe", json!({"topics": ["weather"]}))
        .unwrap();
    assert_eq!(bad_params["error"]["code"], -32602, "{bad_params}");
    assert_eq!(client.call("ping", Value::Null).unwrap()["result"], "pong");

    // A hello of another protocol version: an error naming both versions, then a close.
    let mut old = json_client(&home);
    let reply = old
        .call(
            "hello",
            json!({"protocol": 999, "client": "old", "client_version": "9"}),
        )
        .unwrap();
    let message = reply["error"]["message"].as_str().unwrap();
    assert_eq!(reply["error"]["code"], -32000);
    assert!(
        message.contains("999") && message.contains("speaks 1"),
        "{message}"
    );
    let rest = read_to_end(&mut old);
    assert_eq!(rest.last().unwrap()["params"]["code"], "version_mismatch");

    // A JSON line longer than the limit: closed with a reason once the limit is passed.
    let mut flood = json_client(&home);
    let mut chunk = vec![b'{'];
    chunk.resize(1 << 20, b' ');
    let mut sent = 0;
    let closing = loop {
        if flood.send_raw(&chunk).is_err() {
            break read_to_end(&mut flood);
        }
        sent += chunk.len();
        chunk[0] = b' ';
        if sent > MAX_MESSAGE_LEN + (1 << 20) {
            break read_to_end(&mut flood);
        }
    };
    assert_eq!(
        closing.last().unwrap()["params"]["code"],
        "message_too_large",
        "{closing:?}"
    );

    // Binary: an oversized frame header is refused before any body is sent.
    let mut binary = UnixStream::connect(&home.paths.socket).unwrap();
    binary.set_read_timeout(Some(DEADLINE)).unwrap();
    binary
        .write_all(&((MAX_MESSAGE_LEN as u32) + 1).to_le_bytes())
        .unwrap();
    let notification = read_binary_until_eof(&mut binary);
    assert!(
        matches!(notification.as_slice(), [ServerMessage::Notify(Notification::Closing(c))] if c.code == ErrorCode::MessageTooLarge),
        "{notification:?}"
    );

    // Binary: garbage that frames but does not decode.
    let mut garbage = UnixStream::connect(&home.paths.socket).unwrap();
    garbage.set_read_timeout(Some(DEADLINE)).unwrap();
    garbage
        .write_all(&[5, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff])
        .unwrap();
    let notification = read_binary_until_eof(&mut garbage);
    assert!(
        matches!(notification.as_slice(), [ServerMessage::Notify(Notification::Closing(c))] if c.code == ErrorCode::ParseError),
        "{notification:?}"
    );

    // A binary client that leaves mid-frame disturbs nobody.
    let mut partial = UnixStream::connect(&home.paths.socket).unwrap();
    partial.write_all(&[100, 0, 0, 0, 1, 2]).unwrap();
    drop(partial);

    // Through all of it the bystander was served, and still is.
    assert_eq!(
        bystander.call("ping", Value::Null).unwrap()["result"],
        "pong"
    );
    let status = bystander.call("status", Value::Null).unwrap();
    assert_eq!(status["result"]["state"], "ready");
}

fn read_binary_until_eof(stream: &mut UnixStream) -> Vec<ServerMessage> {
    let mut bytes = Vec::new();
    stream
        .read_to_end(&mut bytes)
        .expect("the daemon closes the connection");
    let mut messages = Vec::new();
    let mut rest = &bytes[..];
    while let Some((message, used)) = frame::decode::<ServerMessage>(rest).unwrap() {
        messages.push(message);
        rest = &rest[used..];
    }
    assert!(rest.is_empty(), "trailing bytes after the last frame");
    messages
}

#[test]
fn binary_framing_by_hand() {
    let home = Home::new();
    let _daemon = home.spawn_daemon();
    let mut stream = UnixStream::connect(&home.paths.socket).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    // Three pipelined requests in one write; replies come back in order with their ids.
    let mut bytes = Vec::new();
    for (id, request) in [
        (10, Request::Hello(Hello::new("e2e", "0"))),
        (11, Request::Ping),
        (12, Request::Shutdown),
    ] {
        frame::encode(&ClientMessage { id, request }, &mut bytes).unwrap();
    }
    stream.write_all(&bytes).unwrap();
    let messages = read_binary_until_eof(&mut stream);
    let ids: Vec<u64> = messages
        .iter()
        .filter_map(|m| match m {
            ServerMessage::Reply { id, result: Ok(_) } => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(ids, [10, 11, 12], "{messages:?}");
    assert!(matches!(
        messages.last(),
        Some(ServerMessage::Notify(Notification::Closing(c))) if c.code == ErrorCode::ShuttingDown
    ));
}

#[test]
fn sixty_four_concurrent_clients() {
    let home = Home::new();
    let _daemon = home.spawn_daemon();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let paths = home.paths.clone();
    let max_seen = runtime.block_on(async move {
        let mut tasks = Vec::new();
        for n in 0..64u32 {
            let paths = paths.clone();
            tasks.push(tokio::spawn(async move {
                let mut client = Client::connect(&paths, &format!("client-{n}"))
                    .await
                    .unwrap();
                let mut max_clients = 0;
                for i in 0..200 {
                    let request = if i % 10 == 0 {
                        Request::Status
                    } else {
                        Request::Ping
                    };
                    match client.request(request).await.unwrap() {
                        Response::Pong => {}
                        Response::Status(status) => max_clients = max_clients.max(status.clients),
                        other => panic!("unexpected {other:?}"),
                    }
                }
                max_clients
            }));
        }
        let mut max_seen = 0;
        for task in tasks {
            max_seen = max_seen.max(task.await.unwrap());
        }
        max_seen
    });
    assert!(
        max_seen > 1,
        "clients were served concurrently (saw at most {max_seen})"
    );

    // And 16 real cloudctl processes at once, beside JSON clients.
    let children: Vec<_> = (0..16)
        .map(|_| {
            home.cloudctl_command()
                .args(["ping", "--count", "20"])
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut json_clients: Vec<_> = (0..16).map(|_| json_client(&home)).collect();
    for client in &mut json_clients {
        client.hello().unwrap();
    }
    for client in &mut json_clients {
        assert_eq!(client.call("ping", Value::Null).unwrap()["result"], "pong");
    }
    for mut child in children {
        assert!(child.wait().unwrap().success());
    }
}

#[test]
fn a_stalled_subscriber_is_cut_off_without_slowing_anyone() {
    let home = Home::new();
    // At debug level every request is logged, so every ping feeds the log topic.
    let _daemon = home.spawn_daemon_with(|command| {
        command.env("CLOUDD_LOG", "debug");
    });
    let mut stalled = json_client(&home);
    stalled.hello().unwrap();
    let subscribed = stalled
        .call("subscribe", json!({"topics": ["log"]}))
        .unwrap();
    assert_eq!(subscribed["result"]["topics"], json!(["log"]));
    // From here on, `stalled` reads nothing.

    let mut busy = json_client(&home);
    busy.hello().unwrap();
    let start = std::time::Instant::now();
    let mut n_pings = 0;
    while !home.read_daemon_log().contains("slow subscriber")
        && !home
            .read_daemon_log()
            .contains("disconnecting stalled client")
    {
        for _ in 0..1000 {
            assert_eq!(busy.call("ping", Value::Null).unwrap()["result"], "pong");
        }
        n_pings += 1000;
        assert!(
            start.elapsed() < DEADLINE,
            "the stalled subscriber was never cut off ({n_pings} pings)"
        );
    }
    // The busy client never waited on the stalled one: it is still served at once.
    assert_eq!(busy.call("ping", Value::Null).unwrap()["result"], "pong");

    // The stalled client finds its stream ended, with the reason if it could still be
    // written.
    let lines = read_to_end(&mut stalled);
    if let Some(last) = lines.last().filter(|l| l["method"] == "closing") {
        assert_eq!(last["params"]["code"], "slow_consumer", "{last}");
    }
    wait_for(
        "the daemon to count the stalled client gone",
        DEADLINE,
        || busy.call("status", Value::Null).unwrap()["result"]["clients"] == 1,
    );
}
