//! Test helpers: a real relay on 127.0.0.1:0 in a temp dir, a raw HTTP/1.1 client, a real
//! bridge client over tokio-tungstenite, and waiting on conditions with deadlines.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use cloud_protocol::bridge::{
    self, Channel, Envelope, FromRelay, InstanceSnapshot, ToRelay, BRIDGE_PATH, BRIDGE_VERSION,
};
use cloud_protocol::session::{LogEntry, SessionEvent};
use cloud_relay::{RelayConfig, RunningRelay};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::Message;

pub use cloudd_test_support::{wait_for_async, DEADLINE};

/// The built-in shell agent of the relay binary.
pub fn shell_agent() -> Vec<String> {
    vec![
        env!("CARGO_BIN_EXE_cloud-relay").to_owned(),
        "shell-agent".to_owned(),
    ]
}

/// A `sh -c SCRIPT` agent.
pub fn script_agent(script: &str) -> Vec<String> {
    vec!["sh".to_owned(), "-c".to_owned(), script.to_owned()]
}

/// A relay in a temp dir.
pub struct TestRelay {
    pub dir: tempfile::TempDir,
    pub relay: Option<RunningRelay>,
    pub addr: SocketAddr,
    pub agent_command: Vec<String>,
    pub access_token_ttl: std::time::Duration,
    pub limits: cloud_relay::limits::Limits,
    pub provider: cloud_relay::providers::ProviderConfig,
}

impl TestRelay {
    pub async fn start(agent_command: Vec<String>) -> TestRelay {
        TestRelay::start_with_ttl(agent_command, cloud_relay::auth::DEFAULT_ACCESS_TOKEN_TTL).await
    }

    /// A relay whose access tokens live `access_token_ttl`.
    pub async fn start_with_ttl(
        agent_command: Vec<String>,
        access_token_ttl: std::time::Duration,
    ) -> TestRelay {
        let limits = cloud_relay::limits::Limits::OFF;
        TestRelay::start_with_config(agent_command, access_token_ttl, limits).await
    }

    /// A relay with rate limits.
    pub async fn start_with_limits(
        agent_command: Vec<String>,
        limits: cloud_relay::limits::Limits,
    ) -> TestRelay {
        let ttl = cloud_relay::auth::DEFAULT_ACCESS_TOKEN_TTL;
        TestRelay::start_with_config(agent_command, ttl, limits).await
    }

    /// A relay whose sessions run with `provider`.
    pub async fn start_with_provider(
        agent_command: Vec<String>,
        provider: cloud_relay::providers::ProviderConfig,
    ) -> TestRelay {
        let ttl = cloud_relay::auth::DEFAULT_ACCESS_TOKEN_TTL;
        let limits = cloud_relay::limits::Limits::OFF;
        TestRelay::start_with_everything(agent_command, ttl, limits, provider).await
    }

    async fn start_with_config(
        agent_command: Vec<String>,
        access_token_ttl: std::time::Duration,
        limits: cloud_relay::limits::Limits,
    ) -> TestRelay {
        let provider = cloud_relay::providers::ProviderConfig::default();
        TestRelay::start_with_everything(agent_command, access_token_ttl, limits, provider).await
    }

    async fn start_with_everything(
        agent_command: Vec<String>,
        access_token_ttl: std::time::Duration,
        limits: cloud_relay::limits::Limits,
        provider: cloud_relay::providers::ProviderConfig,
    ) -> TestRelay {
        let dir = tempfile::tempdir().unwrap();
        let relay = cloud_relay::start(RelayConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().to_owned(),
            agent_command: agent_command.clone(),
            access_token_ttl,
            limits,
            device: Default::default(),
            presence: Default::default(),
            provider: provider.clone(),
        })
        .await
        .unwrap();
        TestRelay {
            addr: relay.local_addr(),
            relay: Some(relay),
            dir,
            agent_command,
            access_token_ttl,
            limits,
            provider,
        }
    }

    pub fn data(&self) -> &Path {
        self.dir.path()
    }

    pub fn token(&self, user: &str, org: &str) -> String {
        cloud_relay::tokens::create(self.data(), &cloud_relay::tokens::NewKey::new(user, org))
            .unwrap()
    }

    pub fn workspace(&self, session: &str) -> PathBuf {
        self.data().join("workspaces").join(session)
    }

    /// Shuts down and starts again on the same data directory.
    pub async fn restart(&mut self) {
        self.restart_after(|_| {}).await;
    }

    /// Shuts down, calls `between` with the data directory, and starts again on it.
    pub async fn restart_after(&mut self, between: impl FnOnce(&Path)) {
        self.relay.take().unwrap().shutdown().await;
        between(self.dir.path());
        let relay = cloud_relay::start(RelayConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: self.dir.path().to_owned(),
            agent_command: self.agent_command.clone(),
            access_token_ttl: self.access_token_ttl,
            limits: self.limits,
            device: Default::default(),
            presence: Default::default(),
            provider: self.provider.clone(),
        })
        .await
        .unwrap();
        self.addr = relay.local_addr();
        self.relay = Some(relay);
    }

    pub async fn stop(mut self) {
        if let Some(relay) = self.relay.take() {
            relay.shutdown().await;
        }
    }

    pub async fn http(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (u16, Value) {
        http(self.addr, method, path, token, body).await
    }

    /// Sends a message to session `id` over REST (it must be taken); returns its log seq.
    pub async fn send_message(&self, token: &str, id: &str, text: &str) -> u64 {
        let (status, sent) = self
            .http(
                "POST",
                &format!("/v1/sessions/{id}/messages"),
                Some(token),
                Some(&serde_json::json!({ "text": text }).to_string()),
            )
            .await;
        assert_eq!(status, 200, "{sent}");
        sent["seq"].as_u64().unwrap()
    }

    pub async fn create(&self, token: &str, body: &str) -> Value {
        let (status, session) = self
            .http("POST", "/v1/sessions", Some(token), Some(body))
            .await;
        assert_eq!(status, 201, "{session}");
        session
    }

    pub async fn log(&self, token: &str, session: &str) -> Vec<LogEntry> {
        let (status, log) = self
            .http(
                "GET",
                &format!("/v1/sessions/{session}/log?after=0"),
                Some(token),
                None,
            )
            .await;
        assert_eq!(status, 200, "{log}");
        serde_json::from_value(log).unwrap()
    }

    /// Waits until the session's log has an entry matching `find`; returns it.
    pub async fn wait_for_log(
        &self,
        token: &str,
        session: &str,
        what: &str,
        mut find: impl FnMut(&LogEntry) -> bool,
    ) -> LogEntry {
        let find = std::cell::RefCell::new(&mut find);
        wait_for_async(what, DEADLINE, || async {
            let log = self.log(token, session).await;
            let found = log.iter().find(|e| (find.borrow_mut())(e)).cloned();
            found.ok_or_else(|| format!("{log:#?}"))
        })
        .await
    }

    pub async fn wait_for_status(&self, token: &str, session: &str, status: &str) -> Value {
        wait_for_async(&format!("status {status}"), DEADLINE, || async {
            let (code, value) = self
                .http("GET", &format!("/v1/sessions/{session}"), Some(token), None)
                .await;
            assert_eq!(code, 200, "{value}");
            if value["status"] == status {
                Ok(value)
            } else {
                Err(value.to_string())
            }
        })
        .await
    }
}

/// The stream-json message of a log entry, parsed (None for status entries).
pub fn message(entry: &LogEntry) -> Option<Value> {
    match &entry.event {
        SessionEvent::Message(text) => serde_json::from_str(text).ok(),
        SessionEvent::Status { .. } | SessionEvent::Snapshot(_) => None,
    }
}

pub fn is_prompt(entry: &LogEntry) -> bool {
    message(entry).is_some_and(|m| {
        m["type"] == "control_request" && m["request"]["subtype"] == "can_use_tool"
    })
}

pub fn assistant_text(entry: &LogEntry) -> Option<String> {
    let m = message(entry)?;
    (m["type"] == "assistant").then(|| {
        m["message"]["content"][0]["text"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    })
}

pub fn is_result(entry: &LogEntry) -> bool {
    message(entry).is_some_and(|m| m["type"] == "result")
}

/// A REST call (the workspace's one test HTTP client, off the runtime's thread).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    http_with_headers(addr, method, path, token, body, &[]).await
}

/// [`http`] with extra request headers (the workspace's one test HTTP client, off the
/// runtime's thread).
pub async fn http_with_headers(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let (method, path) = (method.to_owned(), path.to_owned());
    let (token, body) = (token.map(str::to_owned), body.map(str::to_owned));
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        cloudd_test_support::http_with_headers(
            addr,
            &method,
            &path,
            token.as_deref(),
            body.as_deref(),
            &headers,
        )
    })
    .await
    .expect("the HTTP client panicked")
}

pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a WebSocket to `path` with a bearer token; Err is the HTTP status of a refusal.
pub async fn websocket(addr: SocketAddr, path: &str, token: &str) -> Result<Socket, u16> {
    let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => Ok(socket),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(e) => panic!("websocket connect failed: {e}"),
    }
}

/// A daemon-like bridge client.
pub struct Bridge {
    pub socket: Socket,
    /// The last ack seen.
    pub ack: u64,
}

impl Bridge {
    /// Connects and sends `Register` as `instance`, reading nothing yet.
    pub async fn register(addr: SocketAddr, token: &str, instance: &str) -> Bridge {
        let socket = websocket(addr, BRIDGE_PATH, token).await.unwrap();
        let mut bridge = Bridge { socket, ack: 0 };
        bridge
            .send(
                0,
                ToRelay::Register(InstanceSnapshot {
                    instance_id: instance.to_owned(),
                    hostname: "test".to_owned(),
                    daemon_version: "0".to_owned(),
                    bridge_version: BRIDGE_VERSION,
                    worktrees: vec![],
                    sessions: vec![],
                }),
            )
            .await;
        bridge
    }

    /// Connects and registers as `instance`; returns the client after `Registered`, the
    /// initial `Sessions` (skipping the instance's stored refusals and their `Ack`
    /// between them) and the initial `Settings`.
    pub async fn connect(
        addr: SocketAddr,
        token: &str,
        instance: &str,
    ) -> (Bridge, Vec<cloud_protocol::session::Session>) {
        let mut bridge = Bridge::register(addr, token, instance).await;
        assert!(matches!(
            bridge.recv().await,
            Some(FromRelay::Registered { .. })
        ));
        loop {
            match bridge.recv().await {
                Some(FromRelay::Sessions(sessions)) => {
                    let settings = bridge.recv().await;
                    assert!(
                        matches!(settings, Some(FromRelay::Settings(_))),
                        "no settings after the session list: {settings:?}"
                    );
                    return (bridge, sessions);
                }
                Some(FromRelay::EventRefused { .. } | FromRelay::Ack) => {}
                other => panic!("no session list: {other:?}"),
            }
        }
    }

    pub async fn send(&mut self, seq: u64, body: ToRelay) {
        let channel = match body {
            ToRelay::Register(_)
            | ToRelay::Heartbeat
            | ToRelay::CommandResult { .. }
            | ToRelay::Request { .. }
            | ToRelay::Authenticate { .. }
            | ToRelay::Settings { .. }
            | ToRelay::Attached { .. } => Channel::Extension,
            _ => Channel::Task,
        };
        let bytes = bridge::encode(&Envelope {
            channel,
            seq,
            ack: 0,
            body,
        })
        .unwrap();
        self.socket
            .send(Message::Binary(bytes.into()))
            .await
            .unwrap();
    }

    pub async fn send_raw(&mut self, message: Message) -> bool {
        self.socket.send(message).await.is_ok()
    }

    /// The next relay message; None when the connection closed.
    pub async fn recv(&mut self) -> Option<FromRelay> {
        loop {
            let message = tokio::time::timeout(DEADLINE, self.socket.next())
                .await
                .expect("timed out waiting for the relay");
            match message {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return None,
                Some(Ok(Message::Binary(bytes))) => {
                    let envelope = bridge::decode::<FromRelay>(&bytes).unwrap();
                    assert!(envelope.ack >= self.ack, "acks never go back");
                    self.ack = envelope.ack;
                    return Some(envelope.body);
                }
                Some(Ok(_)) => {}
            }
        }
    }

    /// Receives until `find` matches; returns the match.
    pub async fn recv_until<T>(
        &mut self,
        what: &str,
        mut find: impl FnMut(&FromRelay) -> Option<T>,
    ) -> T {
        let start = Instant::now();
        loop {
            let message = self
                .recv()
                .await
                .unwrap_or_else(|| panic!("closed while waiting for {what}"));
            if let Some(found) = find(&message) {
                return found;
            }
            assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        }
    }

    /// Waits until the ack covers `seq`.
    pub async fn wait_ack(&mut self, seq: u64) {
        while self.ack < seq {
            self.recv().await.expect("closed while waiting for an ack");
        }
    }
}
