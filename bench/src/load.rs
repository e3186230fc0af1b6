//! The clients of a scenario and the closed loop that measures them.
//!
//! Every client has its own connection and its own OS thread, and sends one request at a
//! time, waiting for the reply before the next (a closed loop, no pipelining). A round
//! trip is timed from just before the request is written to just after the last byte of
//! its reply has been read; encoding the next request and checking a reply happen outside
//! that window, except in `cloudctl`'s [`Client`], which decodes as it reads.
//!
//! All clients connect and warm up first, then start together on a barrier, so the
//! measured phases of concurrent clients overlap.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context as _};
use cloud_protocol::frame;
use cloud_protocol::ipc::{
    method, ClientMessage, Hello, Request, Response, ServerMessage, PROTOCOL_VERSION,
};
use cloud_protocol::paths::Paths;
use cloudctl::client::Client;
use serde_json::Value;

/// The request a scenario repeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Req {
    /// `ping`: the smallest exchange.
    Ping,
    /// `status`: a small request with a reply of a few hundred bytes.
    Status,
}

impl Req {
    /// The method name.
    pub fn name(self) -> &'static str {
        match self {
            Req::Ping => method::PING,
            Req::Status => method::STATUS,
        }
    }

    fn request(self) -> Request {
        match self {
            Req::Ping => Request::Ping,
            Req::Status => Request::Status,
        }
    }

    fn matches(self, response: &Response) -> bool {
        matches!(
            (self, response),
            (Req::Ping, Response::Pong) | (Req::Status, Response::Status(_))
        )
    }
}

/// What a scenario's clients talk to, and how.
#[derive(Debug, Clone)]
pub enum Target {
    /// The daemon, through `cloudctl`'s [`Client`] (binary frames) on a current-thread
    /// tokio runtime of the client's thread.
    Cloudctl {
        /// The daemon's files.
        paths: Paths,
        /// The request.
        req: Req,
    },
    /// The daemon, binary frames on a blocking std socket.
    Binary {
        /// The daemon's socket.
        socket: PathBuf,
        /// The request.
        req: Req,
    },
    /// The daemon, JSON-RPC lines on a blocking std socket.
    Json {
        /// The daemon's socket.
        socket: PathBuf,
        /// The request.
        req: Req,
    },
    /// An echo server of [`crate::echo`], on a blocking std socket.
    Echo {
        /// The echo server's socket.
        socket: PathBuf,
        /// Bytes sent per request.
        request_len: usize,
        /// Bytes awaited per reply.
        response_len: usize,
        /// The CPU the server side is pinned to, if any.
        server_cpu: Option<usize>,
    },
}

/// The measured phase of one scenario run: every client's round trips, and the wall time
/// from the start barrier until the last client finished.
#[derive(Debug)]
pub struct Run {
    /// Round-trip times in nanoseconds, all clients.
    pub nanos: Vec<u64>,
    /// The measured phase's wall time.
    pub wall: Duration,
}

/// Runs `target` with `clients` concurrent clients, each doing `warmup` unmeasured then
/// `iterations` measured round trips, pinned to `client_cpu` if given.
pub fn run(
    target: &Target,
    clients: usize,
    client_cpu: Option<usize>,
    warmup: usize,
    iterations: usize,
) -> anyhow::Result<Run> {
    let start = Arc::new(Barrier::new(clients + 1));
    let mut handles = Vec::with_capacity(clients);
    for _ in 0..clients {
        let target = target.clone();
        let client_start = Arc::clone(&start);
        let handle = std::thread::Builder::new()
            .name("bench-client".into())
            .spawn(move || {
                if let Some(cpu) = client_cpu {
                    if let Err(e) = crate::affinity::pin(0, Some(cpu)) {
                        client_start.wait();
                        return Err(e).context("pin a client thread");
                    }
                }
                client_thread(&target, &client_start, warmup, iterations)
            });
        match handle {
            Ok(handle) => handles.push(handle),
            Err(e) => {
                // The barrier counts on every client; stand in for the missing ones.
                for _ in handles.len()..clients {
                    std::thread::spawn({
                        let start = Arc::clone(&start);
                        move || start.wait()
                    });
                }
                start.wait();
                return Err(e).context("spawn a client thread");
            }
        }
    }
    start.wait();
    let began = Instant::now();
    let mut nanos = Vec::with_capacity(clients * iterations);
    let mut first_error = None;
    for handle in handles {
        match handle.join() {
            Ok(Ok(samples)) => nanos.extend(samples),
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(_) => {
                first_error.get_or_insert(anyhow!("a client thread panicked"));
            }
        }
    }
    let wall = began.elapsed();
    match first_error {
        Some(e) => Err(e),
        None => Ok(Run { nanos, wall }),
    }
}

/// One client: connects and warms up, waits for the others, then measures. Reaches the
/// barrier exactly once whatever happens, so a failed client cannot hang the others.
fn client_thread(
    target: &Target,
    start: &Barrier,
    warmup: usize,
    iterations: usize,
) -> anyhow::Result<Vec<u64>> {
    match target {
        Target::Cloudctl { paths, req } => cloudctl_client(paths, *req, start, warmup, iterations),
        Target::Binary { socket, req } => {
            blocking_client(|| Blocking::binary(socket, *req), start, warmup, iterations)
        }
        Target::Json { socket, req } => {
            blocking_client(|| Blocking::json(socket, *req), start, warmup, iterations)
        }
        Target::Echo {
            socket,
            request_len,
            response_len,
            server_cpu,
        } => blocking_client(
            || Blocking::echo(socket, *request_len, *response_len, *server_cpu),
            start,
            warmup,
            iterations,
        ),
    }
}

fn cloudctl_client(
    paths: &Paths,
    req: Req,
    start: &Barrier,
    warmup: usize,
    iterations: usize,
) -> anyhow::Result<Vec<u64>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => {
            start.wait();
            return Err(e).context("build a client runtime");
        }
    };
    runtime.block_on(async {
        let ready = async {
            let mut client = Client::connect(paths, "bench").await?;
            for _ in 0..warmup {
                check(req, client.request(req.request()).await?)?;
            }
            anyhow::Ok(client)
        }
        .await;
        // Blocking on the barrier inside the runtime is fine: this runtime runs nothing else.
        start.wait();
        let mut client = ready?;
        let mut nanos = Vec::with_capacity(iterations);
        for _ in 0..iterations {
            let began = Instant::now();
            let response = client.request(req.request()).await;
            nanos.push(began.elapsed().as_nanos() as u64);
            check(req, response?)?;
        }
        Ok(nanos)
    })
}

fn check(req: Req, response: Response) -> anyhow::Result<()> {
    ensure!(
        req.matches(&response),
        "{} answered by {response:?}",
        req.name()
    );
    Ok(())
}

fn blocking_client(
    connect: impl FnOnce() -> anyhow::Result<Blocking>,
    start: &Barrier,
    warmup: usize,
    iterations: usize,
) -> anyhow::Result<Vec<u64>> {
    let ready = connect().and_then(|mut connection| {
        for _ in 0..warmup {
            connection.round_trip()?;
        }
        Ok(connection)
    });
    start.wait();
    let mut connection = ready?;
    let mut nanos = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        nanos.push(connection.round_trip()?.as_nanos() as u64);
    }
    Ok(nanos)
}

/// How a blocking connection frames its messages.
#[derive(Debug, Clone, Copy)]
enum Codec {
    /// Binary frames of `req`.
    Binary(Req),
    /// JSON-RPC lines of `req`.
    Json(Req),
    /// Fixed sizes, no content.
    Echo {
        request_len: usize,
        response_len: usize,
    },
}

/// The largest reply a blocking connection expects.
const READ_BUFFER: usize = 64 * 1024;

/// A connection on a blocking std socket.
#[derive(Debug)]
pub struct Blocking {
    stream: UnixStream,
    codec: Codec,
    /// The id of the next request.
    next_id: u64,
    /// The next request's bytes, encoded before its round trip starts.
    out: Vec<u8>,
    /// Bytes read.
    buf: Box<[u8]>,
    /// How many bytes of `buf` hold data.
    filled: usize,
}

impl Blocking {
    fn connect(socket: &PathBuf, codec: Codec) -> anyhow::Result<Blocking> {
        let stream = UnixStream::connect(socket)
            .with_context(|| format!("connect to {}", socket.display()))?;
        Ok(Blocking {
            stream,
            codec,
            next_id: 1,
            out: Vec::with_capacity(256),
            buf: vec![0u8; READ_BUFFER].into_boxed_slice(),
            filled: 0,
        })
    }

    /// A binary-framing connection to the daemon, greeted.
    pub fn binary(socket: &PathBuf, req: Req) -> anyhow::Result<Blocking> {
        let mut connection = Blocking::connect(socket, Codec::Binary(req))?;
        let hello = ClientMessage {
            id: 0,
            request: Request::Hello(Hello::new("bench", "0")),
        };
        connection
            .stream
            .write_all(&frame::encode_to_vec(&hello)?)?;
        let len = connection.read_message()?;
        let reply = frame::decode::<ServerMessage>(&connection.buf[..len])?;
        connection.consume(len);
        match reply {
            Some((
                ServerMessage::Reply {
                    id: 0,
                    result: Ok(Response::Hello(_)),
                },
                _,
            )) => {}
            other => bail!("hello answered by {other:?}"),
        }
        Ok(connection)
    }

    /// A JSON-RPC connection to the daemon, greeted.
    pub fn json(socket: &PathBuf, req: Req) -> anyhow::Result<Blocking> {
        let mut connection = Blocking::connect(socket, Codec::Json(req))?;
        let hello = format!(
            r#"{{"jsonrpc":"2.0","id":0,"method":"hello","params":{{"protocol":{PROTOCOL_VERSION},"client":"bench","client_version":"0"}}}}"#
        ) + "\n";
        connection.stream.write_all(hello.as_bytes())?;
        let len = connection.read_message()?;
        let reply: Value = serde_json::from_slice(&connection.buf[..len])?;
        connection.consume(len);
        ensure!(
            reply["id"] == 0 && reply.get("result").is_some(),
            "hello answered by {reply}"
        );
        Ok(connection)
    }

    /// A connection to an echo server, whose side of it runs on `server_cpu` if given.
    pub fn echo(
        socket: &PathBuf,
        request_len: usize,
        response_len: usize,
        server_cpu: Option<usize>,
    ) -> anyhow::Result<Blocking> {
        ensure!(
            response_len <= READ_BUFFER,
            "echo reply of {response_len} bytes is too large"
        );
        let mut connection = Blocking::connect(
            socket,
            Codec::Echo {
                request_len,
                response_len,
            },
        )?;
        connection
            .stream
            .write_all(&crate::echo::header(request_len, response_len, server_cpu))?;
        Ok(connection)
    }

    /// Sets the id the next request uses (the probe uses the ids the measured phase will).
    pub fn set_next_id(&mut self, id: u64) {
        self.next_id = id;
    }

    /// Encodes the next request into `out`.
    fn encode_next(&mut self, id: u64) -> anyhow::Result<()> {
        self.out.clear();
        match self.codec {
            Codec::Binary(req) => frame::encode(
                &ClientMessage {
                    id,
                    request: req.request(),
                },
                &mut self.out,
            )?,
            Codec::Json(req) => {
                self.out.extend_from_slice(
                    format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"{}"}}"#, req.name())
                        .as_bytes(),
                );
                self.out.push(b'\n');
            }
            Codec::Echo { request_len, .. } => self.out.resize(request_len, b'r'),
        }
        Ok(())
    }

    /// One measured request: returns its round-trip time. Also checks the reply (after the
    /// clock stopped).
    pub fn round_trip(&mut self) -> anyhow::Result<Duration> {
        let (elapsed, _, _) = self.round_trip_sized()?;
        Ok(elapsed)
    }

    /// Like [`Blocking::round_trip`], also returning the request's and the reply's length
    /// in bytes.
    pub fn round_trip_sized(&mut self) -> anyhow::Result<(Duration, usize, usize)> {
        let id = self.next_id;
        self.next_id += 1;
        self.encode_next(id)?;
        let began = Instant::now();
        self.stream.write_all(&self.out)?;
        let len = self.read_message()?;
        let elapsed = began.elapsed();
        self.check(id, len)?;
        self.consume(len);
        Ok((elapsed, self.out.len(), len))
    }

    /// Reads until a whole message is at the start of `buf`; returns its length.
    fn read_message(&mut self) -> anyhow::Result<usize> {
        loop {
            if let Some(len) = self.complete()? {
                return Ok(len);
            }
            ensure!(
                self.filled < self.buf.len(),
                "reply larger than {READ_BUFFER} bytes"
            );
            let n = self.stream.read(&mut self.buf[self.filled..])?;
            ensure!(n > 0, "the server closed the connection");
            self.filled += n;
        }
    }

    /// The length of the whole message at the start of `buf`, if it has all arrived.
    fn complete(&self) -> anyhow::Result<Option<usize>> {
        let data = &self.buf[..self.filled];
        Ok(match self.codec {
            Codec::Binary(_) => frame::frame_len(data)?.filter(|&len| len <= data.len()),
            Codec::Json(_) => data.iter().position(|&b| b == b'\n').map(|end| end + 1),
            Codec::Echo { response_len, .. } => {
                (data.len() >= response_len).then_some(response_len)
            }
        })
    }

    /// Checks that the message of `len` bytes answers request `id`.
    fn check(&self, id: u64, len: usize) -> anyhow::Result<()> {
        let message = &self.buf[..len];
        match self.codec {
            Codec::Binary(req) => match frame::decode::<ServerMessage>(message)? {
                Some((
                    ServerMessage::Reply {
                        id: reply_id,
                        result: Ok(response),
                    },
                    _,
                )) if reply_id == id && req.matches(&response) => {}
                other => bail!("{} {id} answered by {other:?}", req.name()),
            },
            Codec::Json(req) => {
                let reply: Value = serde_json::from_slice(message)?;
                let ok = reply["id"] == id
                    && match req {
                        Req::Ping => reply["result"] == "pong",
                        Req::Status => reply["result"].is_object(),
                    };
                ensure!(ok, "{} {id} answered by {reply}", req.name());
            }
            Codec::Echo { .. } => {}
        }
        Ok(())
    }

    /// Drops the first `len` bytes of `buf`.
    fn consume(&mut self, len: usize) {
        self.buf.copy_within(len..self.filled, 0);
        self.filled -= len;
    }
}
