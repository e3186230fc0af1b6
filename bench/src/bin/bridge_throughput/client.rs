//! Clients of the daemon's socket, as `cloudctl` and editors are: binary framing (u32-LE
//! length + postcard) for the `Send`s and `Delivery`s, JSON-RPC for polling `status`.
//!
//! [`pipelined`] is the load: several connections, each on its own thread, each writing a
//! batch of `Send` requests in one write and then reading the batch's `Queued` replies
//! (like `send_pipelined` in `e2e/tests/relay.rs`). [`one_at_a_time`] is the latency probe:
//! one connection, one event in flight, `Send` then `Delivery {seq}`.

use std::io::{Read as _, Write as _};
use std::ops::Range;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use cloud_protocol::frame;
use cloud_protocol::ipc::{ClientMessage, Hello, Request, Response, ServerMessage};
use cloudd_e2e::JsonClient;
use serde_json::{json, Value};

/// How long any single read from the daemon may take before the run fails.
const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// The text of event `n`: `prefix`, `n` in ten digits, padded with `x` to `len` bytes, so
/// every event of a run has the same size.
pub fn text(prefix: char, n: usize, len: usize) -> String {
    let mut text = format!("{prefix}{n:010}");
    while text.len() < len {
        text.push('x');
    }
    text
}

/// One binary connection, past its hello.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    /// Bytes read and not yet decoded start at `start`.
    buf: Vec<u8>,
    start: usize,
    next_id: u64,
}

impl Connection {
    /// Connects and exchanges hellos.
    pub fn connect(socket: &Path) -> anyhow::Result<Connection> {
        let stream = UnixStream::connect(socket)
            .with_context(|| format!("connect to {}", socket.display()))?;
        stream.set_read_timeout(Some(READ_TIMEOUT))?;
        let mut connection = Connection {
            stream,
            buf: Vec::with_capacity(1 << 16),
            start: 0,
            next_id: 1,
        };
        let mut bytes = Vec::new();
        connection.push(Request::Hello(Hello::new("bench", "0")), &mut bytes)?;
        connection.stream.write_all(&bytes)?;
        match connection.reply()? {
            Ok(Response::Hello(_)) => Ok(connection),
            other => bail!("hello: unexpected {other:?}"),
        }
    }

    /// Appends one request frame to `out`.
    fn push(&mut self, request: Request, out: &mut Vec<u8>) -> anyhow::Result<()> {
        let id = self.next_id;
        self.next_id += 1;
        frame::encode(&ClientMessage { id, request }, out)?;
        Ok(())
    }

    /// Appends a `Send` frame to `out`.
    pub fn push_send(
        &mut self,
        session: &str,
        text: String,
        out: &mut Vec<u8>,
    ) -> anyhow::Result<()> {
        self.push(
            Request::Send {
                session: session.to_owned(),
                text,
                key: None,
                wait: false,
            },
            out,
        )
    }

    /// Writes `bytes` (whole frames).
    pub fn write(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.stream.write_all(bytes).context("write to the daemon")
    }

    /// Reads the next reply (notifications are skipped).
    pub fn reply(&mut self) -> anyhow::Result<Result<Response, String>> {
        loop {
            if let Some((message, used)) =
                frame::decode::<ServerMessage>(&self.buf[self.start..])
                    .map_err(|e| anyhow::anyhow!("bad frame from the daemon: {e}"))?
            {
                self.start += used;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                }
                match message {
                    ServerMessage::Reply { result, .. } => {
                        return Ok(result.map_err(|e| format!("{e:?}")))
                    }
                    ServerMessage::Notify(_) => continue,
                }
            }
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            let len = self.buf.len();
            self.buf.resize(len + (1 << 16), 0);
            let n = self
                .stream
                .read(&mut self.buf[len..])
                .context("read from the daemon")?;
            self.buf.truncate(len + n);
            if n == 0 {
                bail!("the daemon closed the connection");
            }
        }
    }

    /// Reads a reply that must be `Queued`; returns its seq.
    pub fn queued(&mut self) -> anyhow::Result<u64> {
        match self.reply()? {
            Ok(Response::Queued { seq }) => Ok(seq),
            other => bail!("expected Queued, got {other:?}"),
        }
    }
}

/// What a pipelined load saw.
#[derive(Debug, Clone)]
pub struct Pipelined {
    /// Events sent (each confirmed `Queued`).
    pub events: usize,
    /// From the start to the last `Queued` reply.
    pub queued: Duration,
    /// From the start to the first `status` that showed journal depth 0 after the last
    /// `Queued` (`None` when not waited for).
    pub acked: Option<Duration>,
    /// The highest journal depth seen while sending.
    pub max_depth: u64,
}

/// Where and how a load sends: the daemon's socket, the session, the events' text length,
/// and for pipelined loads the connections and the requests written per batch.
#[derive(Debug, Clone)]
pub struct Load<'a> {
    /// The daemon's socket.
    pub socket: &'a Path,
    /// The session every event goes to.
    pub session: &'a str,
    /// Bytes of text per event.
    pub text_len: usize,
    /// Concurrent connections of a pipelined load.
    pub connections: usize,
    /// Requests written at once per connection.
    pub batch: usize,
}

/// Sends events `range` (texts `prefix`…) as `load` says; with `wait_acked`, then polls
/// `status` until the journal is empty. Connections connect and say hello before the
/// clock starts.
pub fn pipelined(
    load: &Load<'_>,
    prefix: char,
    range: Range<usize>,
    wait_acked: bool,
) -> anyhow::Result<Pipelined> {
    let Load {
        socket,
        session,
        text_len,
        connections,
        batch,
    } = *load;
    let connections = connections.max(1);
    let total = range.len();
    let barrier = Arc::new(Barrier::new(connections + 1));
    let finished = Arc::new(AtomicUsize::new(0));
    let mut threads = Vec::new();
    for part in 0..connections {
        let from = range.start + total * part / connections;
        let to = range.start + total * (part + 1) / connections;
        let mut connection = Connection::connect(socket)?;
        let barrier = Arc::clone(&barrier);
        let finished = Arc::clone(&finished);
        let session = session.to_owned();
        threads.push(std::thread::spawn(move || -> anyhow::Result<Instant> {
            barrier.wait();
            let result = (|| {
                let mut bytes = Vec::with_capacity(batch * (text_len + 64));
                let mut n = from;
                while n < to {
                    let end = (n + batch).min(to);
                    bytes.clear();
                    for i in n..end {
                        connection.push_send(&session, text(prefix, i, text_len), &mut bytes)?;
                    }
                    connection.write(&bytes)?;
                    for _ in n..end {
                        connection.queued()?;
                    }
                    n = end;
                }
                Ok(Instant::now())
            })();
            finished.fetch_add(1, Ordering::Release);
            result
        }));
    }
    let mut poller = Poller::connect(socket)?;
    barrier.wait();
    let start = Instant::now();
    let mut max_depth = 0;
    // Poll while sending, to see how far the relay falls behind the journal.
    while finished.load(Ordering::Acquire) < connections {
        std::thread::sleep(Duration::from_millis(5));
        max_depth = max_depth.max(poller.depth()?);
    }
    let mut last_queued = start;
    for thread in threads {
        let done = thread
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
        last_queued = last_queued.max(done);
    }
    let acked = if wait_acked {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let depth = poller.depth()?;
            if depth == 0 {
                break Some(start.elapsed());
            }
            max_depth = max_depth.max(depth);
            if Instant::now() > deadline {
                bail!("the journal did not drain within 600 s (depth {depth})");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    } else {
        None
    };
    Ok(Pipelined {
        events: total,
        queued: last_queued - start,
        acked,
        max_depth,
    })
}

/// Latencies of one-at-a-time events, in nanoseconds.
#[derive(Debug, Default, Clone)]
pub struct Latencies {
    /// From writing `Send` to reading `Queued` (the event is durable in the journal).
    pub queued: Vec<u64>,
    /// From writing `Send` to reading `Delivered` (the relay acknowledged it).
    pub delivered: Vec<u64>,
}

/// Sends `count` events one at a time (after `warmup` unmeasured ones) on one
/// connection: `Send`, then `Delivery {seq}` as soon as `Queued` arrives.
pub fn one_at_a_time(
    load: &Load<'_>,
    prefix: char,
    first: usize,
    warmup: usize,
    count: usize,
) -> anyhow::Result<Latencies> {
    let Load {
        socket,
        session,
        text_len,
        ..
    } = *load;
    let mut connection = Connection::connect(socket)?;
    let mut latencies = Latencies::default();
    let mut bytes = Vec::new();
    for i in 0..warmup + count {
        bytes.clear();
        connection.push_send(session, text(prefix, first + i, text_len), &mut bytes)?;
        let start = Instant::now();
        connection.write(&bytes)?;
        let seq = connection.queued()?;
        let queued = start.elapsed();
        bytes.clear();
        connection.push(Request::Delivery { seq }, &mut bytes)?;
        connection.write(&bytes)?;
        match connection.reply()? {
            Ok(Response::Delivered { seq: delivered }) if delivered == seq => {}
            other => bail!("expected Delivered {{ seq: {seq} }}, got {other:?}"),
        }
        let delivered = start.elapsed();
        if i >= warmup {
            latencies.queued.push(queued.as_nanos() as u64);
            latencies.delivered.push(delivered.as_nanos() as u64);
        }
    }
    Ok(latencies)
}

/// A JSON-RPC connection that asks `status`.
#[derive(Debug)]
pub struct Poller {
    client: JsonClient,
}

impl Poller {
    /// Connects and says hello.
    pub fn connect(socket: &Path) -> anyhow::Result<Poller> {
        let mut client = JsonClient::connect(socket).context("connect the status poller")?;
        client.hello().context("hello")?;
        Ok(Poller { client })
    }

    /// The daemon's `status` result.
    pub fn status(&mut self) -> anyhow::Result<Value> {
        let reply = self.client.call("status", json!(null))?;
        reply
            .get("result")
            .cloned()
            .with_context(|| format!("status failed: {reply}"))
    }

    /// The journal depth (events not yet acknowledged by the relay).
    pub fn depth(&mut self) -> anyhow::Result<u64> {
        let status = self.status()?;
        status["relay"]["journal_depth"]
            .as_u64()
            .with_context(|| format!("no relay.journal_depth in {status}"))
    }

    /// Waits until the bridge is connected (in `mode`, when given) and the journal is
    /// empty.
    pub fn wait_drained(&mut self, mode: Option<&str>, deadline: Duration) -> anyhow::Result<()> {
        let end = Instant::now() + deadline;
        loop {
            let status = self.status()?;
            let relay = &status["relay"];
            if relay["state"] == "connected"
                && mode.is_none_or(|mode| relay["mode"] == mode)
                && relay["journal_depth"] == 0
            {
                return Ok(());
            }
            if Instant::now() > end {
                bail!("not connected and drained within {deadline:?}: {relay}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until the bridge is connected (the journal may hold events).
    pub fn wait_connected(&mut self, deadline: Duration) -> anyhow::Result<()> {
        let end = Instant::now() + deadline;
        loop {
            let status = self.status()?;
            if status["relay"]["state"] == "connected" {
                return Ok(());
            }
            if Instant::now() > end {
                bail!("not connected within {deadline:?}: {}", status["relay"]);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// The daemon's store directory under a `CLOUDD_HOME`'s state dir.
pub fn journal_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("journal")
}
