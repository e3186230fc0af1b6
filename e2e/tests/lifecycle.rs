//! Signals: SIGTERM and SIGINT drain and exit 0 within the bound; SIGHUP reloads the
//! configuration and tells `state` subscribers.

use std::io::{Read as _, Write as _};
use std::time::{Duration, Instant};

use cloud_protocol::frame;
use cloud_protocol::ipc::{ErrorCode, Notification, Request, ServerMessage};
use cloudd_e2e::{Home, JsonClient};
use serde_json::{json, Value};

/// The drain is bounded by 5 s; allow for a loaded CI machine on top.
const EXIT_BOUND: Duration = Duration::from_secs(8);

fn drains_on(signal: i32) {
    let home = Home::new();
    let mut daemon = home.spawn_daemon();

    // Subscribers hear the drain start, then the closing, then the end of the stream.
    let mut subscribers: Vec<JsonClient> = (0..8)
        .map(|_| {
            let mut client = JsonClient::connect(&home.paths.socket).unwrap();
            client.hello().unwrap();
            client
                .call("subscribe", json!({"topics": ["state"]}))
                .unwrap();
            client
        })
        .collect();

    // A binary client with a batch of requests on the wire when the signal lands: every
    // reply it gets is whole and in order, and the stream ends with a closing.
    let busy = cloudd_e2e::binary_connect(&home.paths.socket);
    let bytes = cloudd_e2e::frames((1..=2000).map(|id| (id, Request::Status)));
    let writer = {
        let mut busy = busy.try_clone().unwrap();
        std::thread::spawn(move || {
            // The daemon may close before reading it all; that is not an error here.
            let _ = busy.write_all(&bytes);
        })
    };

    // The client reads as it goes, as a live client does (one that does not read is cut off
    // by the write deadline instead).
    let reader = {
        let mut busy = busy.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut received = Vec::new();
            let mut chunk = [0u8; 65536];
            loop {
                match busy.read(&mut chunk) {
                    Ok(0) => break Ok(received),
                    Ok(n) => received.extend_from_slice(&chunk[..n]),
                    // The daemon closed with some of our requests unread: Linux reports the
                    // reset once everything it did send has been read.
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                        break Ok(received)
                    }
                    Err(e) => break Err(e),
                }
            }
        })
    };

    let start = Instant::now();
    daemon.signal(signal);
    let status = daemon.wait_exit(EXIT_BOUND);
    assert!(status.success(), "cloudd exited with {status}");
    assert!(start.elapsed() < EXIT_BOUND);
    assert!(!home.paths.socket.exists(), "the socket is removed on exit");
    writer.join().unwrap();

    let received = reader.join().unwrap().unwrap();
    let mut rest = &received[..];
    let mut ids = Vec::new();
    let mut last = None;
    while let Some((message, used)) = frame::decode::<ServerMessage>(rest).unwrap() {
        rest = &rest[used..];
        if let ServerMessage::Reply { id, result } = &message {
            assert!(result.is_ok(), "{message:?}");
            ids.push(*id);
        }
        last = Some(message);
    }
    assert!(rest.is_empty(), "a reply was cut in half");
    assert_eq!(
        ids,
        (0..ids.len() as u64).collect::<Vec<_>>(),
        "replies in order, none skipped"
    );
    assert!(
        matches!(&last, Some(ServerMessage::Notify(Notification::Closing(c))) if c.code == ErrorCode::ShuttingDown),
        "{last:?}"
    );

    for subscriber in &mut subscribers {
        let mut lines = Vec::new();
        while let Some(line) = subscriber.recv().unwrap() {
            lines.push(line);
        }
        let methods: Vec<&str> = lines
            .iter()
            .map(|l| l["method"].as_str().unwrap())
            .collect();
        assert_eq!(methods, ["state", "closing"], "{lines:?}");
        assert_eq!(lines[0]["params"]["state"], "draining");
        assert_eq!(lines[1]["params"]["code"], "shutting_down");
    }
    assert!(home.read_daemon_log().contains("cloudd stopped"));
}

#[test]
fn sigterm_drains_and_exits_zero() {
    drains_on(libc::SIGTERM);
}

#[test]
fn sigint_drains_and_exits_zero() {
    drains_on(libc::SIGINT);
}

#[test]
fn sighup_reloads_the_config_file() {
    let home = Home::new();
    let daemon = home.spawn_daemon();
    let mut client = JsonClient::connect(&home.paths.socket).unwrap();
    client.hello().unwrap();
    client
        .call("subscribe", json!({"topics": ["state"]}))
        .unwrap();
    let status = client.call("status", Value::Null).unwrap();
    assert_eq!(status["result"]["config_generation"], 1);
    assert_eq!(status["result"]["log_filter"], "info");

    std::fs::create_dir_all(&home.paths.config_dir).unwrap();
    std::fs::write(
        home.paths.config_file(),
        "log = \"debug\"\nmax_clients = 8\n",
    )
    .unwrap();
    daemon.signal(libc::SIGHUP);
    let change = client.recv().unwrap().unwrap();
    assert_eq!(change["method"], "state");
    assert_eq!(change["params"]["message"], "configuration reloaded");
    assert_eq!(change["params"]["config_generation"], 2);
    let status = client.call("status", Value::Null).unwrap();
    assert_eq!(status["result"]["log_filter"], "debug");

    // An invalid file is reported and the configuration in effect is kept.
    std::fs::write(home.paths.config_file(), "log = [\n").unwrap();
    daemon.signal(libc::SIGHUP);
    let change = client.recv().unwrap().unwrap();
    let message = change["params"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("configuration not reloaded: invalid config file"),
        "{message}"
    );
    assert_eq!(change["params"]["config_generation"], 2);
    let status = client.call("status", Value::Null).unwrap();
    assert_eq!(status["result"]["log_filter"], "debug");
}
