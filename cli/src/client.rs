//! The binary-framing client of the local socket.
//!
//! [`Client::connect`] connects and exchanges hellos; [`Client::request`] sends one request
//! and waits for its reply, keeping any notification that arrives meanwhile for
//! [`Client::next_notification`]. A request that needs the relay may wait while the daemon's
//! bridge connects: after [`RELAY_NOTICE_AFTER`] the client says so on stderr.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Duration;

use cloud_protocol::frame;
use cloud_protocol::ipc::{
    BridgeState, ClientMessage, Closing, ErrorBody, ErrorCode, Hello, HelloReply, Notification,
    RelayStatus, Request, Response, ServerMessage,
};
use cloud_protocol::paths::Paths;
use interprocess::local_socket::tokio::Stream;
use interprocess::local_socket::traits::tokio::Stream as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// How long a request that needs the relay runs before the client tells the user that the
/// daemon is waiting for its relay to connect.
pub const RELAY_NOTICE_AFTER: Duration = Duration::from_secs(1);

/// A request could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket.
    #[error("cloudd is not running (no daemon at {socket}); start it with `cloudctl up`")]
    NotRunning {
        /// The socket path.
        socket: PathBuf,
    },
    /// Connecting failed for another reason.
    #[error("cannot connect to cloudd at {socket}: {source}")]
    Connect {
        /// The socket path.
        socket: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The daemon speaks another protocol version.
    #[error("{0}")]
    VersionMismatch(String),
    /// The daemon closed the connection and said why.
    #[error("cloudd closed the connection: {}", .0.message)]
    Closed(Closing),
    /// The daemon closed the connection without a reason.
    #[error("cloudd closed the connection unexpectedly")]
    Disconnected,
    /// The daemon refused the request.
    #[error("{0}")]
    Daemon(ErrorBody),
    /// Reading or writing the socket failed.
    #[error("local socket error: {0}")]
    Io(#[from] std::io::Error),
    /// The daemon sent something this client cannot read.
    #[error("unreadable reply from cloudd ({0}); if cloudd was upgraded, restart it: `cloudctl down && cloudctl up`")]
    Protocol(String),
}

impl ClientError {
    /// Whether a request's reply was lost with the connection (the daemon died or closed
    /// it): the request may or may not have been carried out.
    pub fn reply_lost(&self) -> bool {
        matches!(
            self,
            ClientError::Closed(_) | ClientError::Disconnected | ClientError::Io(_)
        )
    }

    /// Whether the daemon is simply absent (so it can be started).
    pub fn is_not_running(&self) -> bool {
        matches!(self, ClientError::NotRunning { .. })
    }
}

/// A connection to the daemon that has completed the hello.
#[derive(Debug)]
pub struct Client {
    /// The socket.
    stream: Stream,
    /// Bytes read but not yet decoded.
    buf: Vec<u8>,
    /// The id of the next request.
    next_id: u64,
    /// Notifications that arrived while waiting for a reply.
    notifications: VecDeque<Notification>,
    /// The daemon's half of the hello (set by `connect` before the client is returned).
    hello: Option<HelloReply>,
    /// The daemon's files (a second connection asks it about the relay).
    paths: Paths,
}

impl Client {
    /// Connects to the daemon of `paths` and exchanges hellos as `client_name`.
    pub async fn connect(paths: &Paths, client_name: &str) -> Result<Client, ClientError> {
        let stream = connect_stream(paths).await?;
        let mut client = Client {
            stream,
            buf: Vec::with_capacity(4096),
            next_id: 1,
            notifications: VecDeque::new(),
            hello: None,
            paths: paths.clone(),
        };
        match client
            .call(Request::Hello(Hello::new(client_name, crate::VERSION)))
            .await
        {
            Ok(Response::Hello(hello)) => {
                client.hello = Some(hello);
                Ok(client)
            }
            Ok(other) => Err(ClientError::Protocol(format!(
                "expected a hello reply, got {other:?}"
            ))),
            Err(ClientError::Daemon(error)) if error.code == ErrorCode::VersionMismatch => {
                Err(ClientError::VersionMismatch(error.message))
            }
            // A daemon of another protocol version may not even frame its hello reply the
            // way this build reads it: that is a version mismatch too.
            Err(ClientError::Protocol(detail)) => Err(ClientError::VersionMismatch(format!(
                "cloudd answered the hello in a format this cloudctl (protocol {}) cannot read ({detail}); it is probably another version: restart it with `cloudctl down && cloudctl up`",
                cloud_protocol::ipc::PROTOCOL_VERSION
            ))),
            Err(e) => Err(e),
        }
    }

    /// The socket and the bytes read from it but not decoded yet, for a connection that
    /// stops carrying requests (after `session/shell`'s reply, terminal frames).
    pub fn into_parts(self) -> (Stream, Vec<u8>) {
        (self.stream, self.buf)
    }

    /// The daemon's half of the hello (its pid and version).
    pub fn daemon(&self) -> &HelloReply {
        self.hello
            .as_ref()
            .expect("a connected client has completed the hello")
    }

    /// Sends `request` and waits for its reply. When it needs the relay and has no reply
    /// after [`RELAY_NOTICE_AFTER`], says on stderr that the daemon waits for the relay to
    /// connect, if that is why.
    ///
    /// A request the relay refuses with `rate_limited` is sent again once the relay's
    /// slow-down is over (saying so on stderr), for up to [`RATE_LIMITED_PATIENCE`].
    pub async fn request(&mut self, request: Request) -> Result<Response, ClientError> {
        if !needs_relay(&request) {
            return self.call(request).await;
        }
        let started = std::time::Instant::now();
        loop {
            match self.request_once(request.clone()).await {
                Err(ClientError::Daemon(error))
                    if error.code == ErrorCode::RateLimited
                        && started.elapsed() < RATE_LIMITED_PATIENCE =>
                {
                    let delay = self.rate_limit_delay().await;
                    eprintln!(
                        "cloudctl: rate limited, retrying in {:.1} s…",
                        delay.as_secs_f64()
                    );
                    tokio::time::sleep(delay).await;
                }
                result => return result,
            }
        }
    }

    /// How long the relay asks this daemon to wait (the daemon's `metrics` say until
    /// when), at least a little and at most a minute.
    async fn rate_limit_delay(&mut self) -> Duration {
        let until = match self.call(Request::Metrics).await {
            Ok(Response::Metrics(metrics)) => metrics.rate_limited_until_ms,
            _ => None,
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let delay = until.map_or(1000, |until| until.saturating_sub(now));
        Duration::from_millis(delay).clamp(Duration::from_millis(50), Duration::from_secs(60))
    }

    /// [`Client::request`] without the retries.
    async fn request_once(&mut self, request: Request) -> Result<Response, ClientError> {
        let paths = self.paths.clone();
        let reply = self.call(request);
        tokio::pin!(reply);
        if let Ok(result) = tokio::time::timeout(RELAY_NOTICE_AFTER, &mut reply).await {
            return result;
        }
        if let Some(relay) = relay_not_connected(&paths).await {
            let reason = relay
                .reason
                .as_deref()
                .map(|r| format!(" (last failure: {r})"))
                .unwrap_or_default();
            eprintln!(
                "cloudctl: waiting for {} to connect{reason}…",
                relay.describe()
            );
        }
        reply.await
    }

    /// Sends `request` and waits for its reply, handing every notification that arrives
    /// meanwhile to `on_notification` (progress of a long request).
    pub async fn request_with(
        &mut self,
        request: Request,
        mut on_notification: impl FnMut(&Notification),
    ) -> Result<Response, ClientError> {
        let id = self.send(request).await?;
        loop {
            match self.read_message().await? {
                ServerMessage::Reply {
                    id: reply_id,
                    result,
                } if reply_id == id => return result.map_err(ClientError::Daemon),
                ServerMessage::Reply { id: other, .. } => {
                    return Err(ClientError::Protocol(format!(
                        "reply to request {other} while waiting for {id}"
                    )))
                }
                ServerMessage::Notify(Notification::Closing(closing)) => {
                    return Err(ClientError::Closed(closing))
                }
                ServerMessage::Notify(notification) => on_notification(&notification),
            }
        }
    }

    /// Writes `request` with a fresh id, and returns the id.
    async fn send(&mut self, request: Request) -> Result<u64, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let bytes = frame::encode_to_vec(&ClientMessage { id, request })
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.stream.write_all(&bytes).await?;
        Ok(id)
    }

    /// Sends `request` and waits for its reply, whatever it is; notifications that arrive
    /// meanwhile wait for [`Client::next_notification`].
    async fn call(&mut self, request: Request) -> Result<Response, ClientError> {
        let mut early = Vec::new();
        let result = self.request_with(request, |n| early.push(n.clone())).await;
        self.notifications.extend(early);
        result
    }

    /// The next notification; `Ok(None)` when the daemon closed the connection.
    pub async fn next_notification(&mut self) -> Result<Option<Notification>, ClientError> {
        if let Some(notification) = self.notifications.pop_front() {
            return Ok(Some(notification));
        }
        match self.read_message().await {
            Ok(ServerMessage::Notify(notification)) => Ok(Some(notification)),
            Ok(ServerMessage::Reply { id, .. }) => Err(ClientError::Protocol(format!(
                "unexpected reply to request {id}"
            ))),
            Err(ClientError::Disconnected) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reads one message from the daemon.
    async fn read_message(&mut self) -> Result<ServerMessage, ClientError> {
        loop {
            match frame::decode::<ServerMessage>(&self.buf) {
                Ok(Some((message, used))) => {
                    self.buf.drain(..used);
                    return Ok(message);
                }
                Ok(None) => {}
                Err(e) => return Err(ClientError::Protocol(e.to_string())),
            }
            self.buf.reserve(4096);
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(ClientError::Disconnected);
            }
        }
    }
}

/// The socket as an `interprocess` name: [`Paths::socket`] on Unix, [`Paths::pipe_name`]
/// on Windows (the location rule itself is in `cloud_protocol::paths`).
fn socket_name(paths: &Paths) -> std::io::Result<interprocess::local_socket::Name<'_>> {
    #[cfg(unix)]
    {
        use interprocess::local_socket::{GenericFilePath, ToFsName as _};
        paths.socket.as_path().to_fs_name::<GenericFilePath>()
    }
    #[cfg(windows)]
    {
        use interprocess::local_socket::{GenericNamespaced, ToNsName as _};
        paths.pipe_name().to_ns_name::<GenericNamespaced>()
    }
}

/// Whether the daemon serves `request` through the relay (and so may wait for the bridge).
/// How long a request the relay rate-limits is retried before its error is shown.
pub const RATE_LIMITED_PATIENCE: Duration = Duration::from_secs(120);

fn needs_relay(request: &Request) -> bool {
    matches!(
        request,
        Request::SessionCreate(_)
            | Request::SessionAction { .. }
            | Request::SessionShare { .. }
            | Request::SessionShell { .. }
    )
}

/// The relay connection, asked on a second connection (the first one is waiting), when the
/// bridge is not connected.
async fn relay_not_connected(paths: &Paths) -> Option<RelayStatus> {
    let mut client = Client::connect(paths, "cloudctl").await.ok()?;
    match client.call(Request::Whoami).await {
        Ok(Response::Identity(identity)) if identity.relay.state != BridgeState::Connected => {
            Some(identity.relay)
        }
        _ => None,
    }
}

/// Connects to the daemon's socket, telling "not running" apart from other failures.
pub async fn connect_stream(paths: &Paths) -> Result<Stream, ClientError> {
    let socket = &paths.socket;
    let name = socket_name(paths).map_err(|source| ClientError::Connect {
        socket: socket.to_owned(),
        source,
    })?;
    Stream::connect(name).await.map_err(|source| {
        use std::io::ErrorKind::{ConnectionRefused, NotFound};
        if matches!(source.kind(), NotFound | ConnectionRefused) {
            ClientError::NotRunning {
                socket: socket.to_owned(),
            }
        } else {
            ClientError::Connect {
                socket: socket.to_owned(),
                source,
            }
        }
    })
}
