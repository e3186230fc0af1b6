//! A blocking client of the daemon's socket, as `cloudctl` speaks to it (u32-LE length +
//! postcard frames), for the probes: `ping`, `send` with `wait`, and `teleport/push`.
//! Notifications (a push's progress) are read and dropped.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use cloud_protocol::frame;
use cloud_protocol::ipc::{
    ClientMessage, Hello, Request, Response, ServerMessage, TeleportOutcome,
};

/// How long any one reply may take.
const READ_TIMEOUT: Duration = Duration::from_secs(600);

/// One connection, past its hello.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    buf: Vec<u8>,
    next_id: u64,
    out: Vec<u8>,
}

impl Connection {
    pub fn connect(socket: &Path) -> anyhow::Result<Connection> {
        let stream = UnixStream::connect(socket)
            .with_context(|| format!("connect to {}", socket.display()))?;
        stream.set_read_timeout(Some(READ_TIMEOUT))?;
        let mut connection = Connection {
            stream,
            buf: Vec::with_capacity(1 << 16),
            next_id: 0,
            out: Vec::with_capacity(256),
        };
        match connection.call(Request::Hello(Hello::new("bench", "0")))? {
            Ok(Response::Hello(_)) => Ok(connection),
            other => bail!("hello answered by {other:?}"),
        }
    }

    /// Sends `request` and waits for its reply (the error as text).
    pub fn call(&mut self, request: Request) -> anyhow::Result<Result<Response, String>> {
        let id = self.next_id;
        self.next_id += 1;
        self.out.clear();
        frame::encode(&ClientMessage { id, request }, &mut self.out)?;
        self.stream
            .write_all(&self.out)
            .context("write to cloudd")?;
        loop {
            if let Some((message, used)) = frame::decode::<ServerMessage>(&self.buf)
                .map_err(|e| anyhow::anyhow!("bad frame from cloudd: {e}"))?
            {
                self.buf.drain(..used);
                match message {
                    ServerMessage::Reply { id: got, result } if got == id => {
                        return Ok(result.map_err(|e| format!("{e:?}")))
                    }
                    ServerMessage::Reply { id: got, .. } => {
                        bail!("reply {got} while waiting for {id}")
                    }
                    ServerMessage::Notify(_) => continue,
                }
            }
            let len = self.buf.len();
            self.buf.resize(len + (1 << 16), 0);
            let n = self
                .stream
                .read(&mut self.buf[len..])
                .context("read from cloudd")?;
            self.buf.truncate(len + n);
            if n == 0 {
                bail!("cloudd closed the connection");
            }
        }
    }

    /// One `ping`, timed from the request's write to its reply.
    pub fn ping(&mut self) -> anyhow::Result<Duration> {
        let began = Instant::now();
        match self.call(Request::Ping)? {
            Ok(Response::Pong) => Ok(began.elapsed()),
            other => bail!("ping answered by {other:?}"),
        }
    }

    /// One message, `send` with `wait`: timed until the relay took it.
    pub fn send_delivered(&mut self, session: &str, text: String) -> anyhow::Result<Duration> {
        let began = Instant::now();
        match self.call(Request::Send {
            session: session.to_owned(),
            text,
            key: None,
            wait: true,
        })? {
            Ok(Response::Delivered { .. }) => Ok(began.elapsed()),
            other => bail!("send answered by {other:?}"),
        }
    }

    /// `teleport/push` of `root` to `session`.
    pub fn push(&mut self, root: &Path, session: &str) -> anyhow::Result<TeleportOutcome> {
        let path = root.to_str().context("a UTF-8 root")?.to_owned();
        match self.call(Request::TeleportPush {
            path,
            session: session.to_owned(),
        })? {
            Ok(Response::Teleported(outcome)) => Ok(outcome),
            other => bail!("teleport push answered by {other:?}"),
        }
    }
}
