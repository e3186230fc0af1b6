//! The harness shared by the end-to-end tests and the benchmark programs: real `cloudd`
//! and `cloudctl` binaries, each run with its own `CLOUDD_HOME` in a temp dir.
//!
//! Nothing here stands in for a component: the daemon is the real binary, clients are the
//! real `cloudctl` or raw sockets. Waiting is always on a condition with a deadline.

pub mod secrets;

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use cloud_protocol::paths::Paths;
use serde_json::{json, Value};

pub use cloudd_test_support::{wait_for, DEADLINE};

/// A built binary of this workspace (`cloudd`, `cloudctl`), found beside the running
/// executable: `target/<profile>/` holds the binaries and `target/<profile>/deps/` the tests.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    for _ in 0..2 {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
        if !dir.pop() {
            break;
        }
    }
    panic!("{name} is not built beside {}: run `cargo test --workspace` (or `cargo build --workspace`) first", exe.display());
}

/// An isolated `CLOUDD_HOME`, removed when dropped.
#[derive(Debug)]
pub struct Home {
    /// The temp dir (kept alive for the test's duration).
    pub dir: tempfile::TempDir,
    /// The daemon's files under it.
    pub paths: Paths,
}

impl Default for Home {
    fn default() -> Self {
        Self::new()
    }
}

impl Home {
    /// A fresh home in a new temp dir.
    pub fn new() -> Home {
        // Short names: a Unix socket path must fit in 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("cd")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let paths = Paths::under_home(dir.path());
        Home { dir, paths }
    }

    /// The pid of the daemon holding this home's lock, if one runs.
    pub fn daemon_pid(&self) -> Option<u32> {
        let mut file = std::fs::File::open(self.paths.lock_file()).ok()?;
        if file.try_lock_shared().is_ok() {
            return None;
        }
        let mut text = String::new();
        std::io::Read::read_to_string(&mut file, &mut text).ok()?;
        text.trim().parse().ok()
    }

    /// The home directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A `cloudctl` command with this home.
    pub fn cloudctl_command(&self) -> Command {
        let mut command = Command::new(binary("cloudctl"));
        command
            .env("CLOUDD_HOME", self.path())
            .env_remove("CLOUDD_SOCKET")
            .env_remove("CLOUDD_LOG")
            // Logins in the file: the same on every machine, whatever keychain it has
            // (e2e/tests/keychain.rs sets its own).
            .env("CLOUDD_CREDENTIAL_STORE", "file")
            .env("CLOUDD_BIN", binary("cloudd"));
        command
    }

    /// Runs `cloudctl ARGS` to completion.
    pub fn cloudctl(&self, args: &[&str]) -> Output {
        self.cloudctl_command()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run cloudctl")
    }

    /// Runs `cloudctl ARGS`, asserts success, returns stdout.
    pub fn cloudctl_ok(&self, args: &[&str]) -> String {
        let output = self.cloudctl(args);
        assert!(
            output.status.success(),
            "cloudctl {args:?} failed: {}\nstdout: {}\nstderr: {}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("utf-8 output")
    }

    /// Runs `cloudctl --json ARGS`, asserts success, parses stdout.
    pub fn cloudctl_json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let stdout = self.cloudctl_ok(&all);
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("bad JSON from cloudctl {args:?}: {e}: {stdout}"))
    }

    /// `cloudctl --json teleport ARGS`: its outcome (the last line, after the progress
    /// lines), or, when it fails, what it printed.
    pub fn teleport_outcome(&self, args: &[&str]) -> Result<Value, String> {
        let mut all = vec!["--json", "teleport"];
        all.extend_from_slice(args);
        let output = self.cloudctl(&all);
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            return Err(format!(
                "{stdout}{}",
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        let last = stdout.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
        Ok(serde_json::from_str(last)
            .unwrap_or_else(|e| panic!("bad JSON from cloudctl {args:?}: {e}: {stdout}")))
    }

    /// Waits for the session's permission prompt for the shell agent's `command` (sent
    /// before) and allows it with `cloudctl allow`.
    pub fn allow_command(&self, session: &str, command: &str) {
        let mut request_id = String::new();
        wait_for("the agent's prompt", DEADLINE, || {
            let prompts = self.cloudctl_json(&["permissions", session]);
            let found = prompts.as_array().and_then(|prompts| {
                prompts
                    .iter()
                    .find(|p| p["input"]["command"] == command)
                    .and_then(|p| p["request_id"].as_str())
            });
            if let Some(id) = found {
                request_id = id.to_owned();
            }
            found.is_some()
        });
        self.cloudctl_ok(&["allow", session, &request_id]);
    }

    /// `cloudctl teleport watch ROOT --session SESSION --detach`, asserted to succeed: the
    /// daemon keeps `root` in step with the session.
    pub fn teleport_watch_detached(&self, root: &Path, session: &str) {
        self.cloudctl_ok(&[
            "teleport",
            "watch",
            root.to_str().expect("a UTF-8 root"),
            "--session",
            session,
            "--detach",
        ]);
    }

    /// The teleport link of `root` as `cloudctl teleport status --json` shows it.
    pub fn teleport_link(&self, root: &Path) -> Value {
        let status = self.cloudctl_json(&["teleport", "status"]);
        let root = std::fs::canonicalize(root).unwrap();
        status["links"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["root"] == root.to_str().unwrap())
            .cloned()
            .unwrap_or_else(|| panic!("no link of {} in {status}", root.display()))
    }

    /// `cloudctl status --json` once the daemon's bridge is connected (waits with a
    /// deadline; starts the daemon if needed).
    pub fn wait_connected(&self) -> Value {
        let mut status = Value::Null;
        wait_for("the bridge to connect", DEADLINE, || {
            status = self.cloudctl_json(&["status"]);
            status["relay"]["state"] == "connected"
        });
        status
    }

    /// A `cloudd` command in the foreground with this home, logging to `daemon.log` in
    /// the home.
    pub fn cloudd_command(&self) -> Command {
        let mut command = Command::new(binary("cloudd"));
        command
            .env("CLOUDD_HOME", self.path())
            .env_remove("CLOUDD_SOCKET")
            .env_remove("CLOUDD_LOG")
            .env("CLOUDD_CREDENTIAL_STORE", "file")
            .stdin(Stdio::null());
        command
    }

    /// The file a [`Home::spawn_daemon`] daemon's stderr goes to.
    pub fn daemon_log(&self) -> PathBuf {
        self.path().join("daemon.log")
    }

    /// Starts `cloudd` in the foreground (stderr to [`Home::daemon_log`]) and waits until
    /// it answers.
    pub fn spawn_daemon(&self) -> Daemon {
        self.spawn_daemon_with(|_| {})
    }

    /// Like [`Home::spawn_daemon`], with the command adjusted by `adjust` first.
    pub fn spawn_daemon_with(&self, adjust: impl FnOnce(&mut Command)) -> Daemon {
        let mut command = self.cloudd_command();
        self.log_daemon(&mut command);
        adjust(&mut command);
        self.start_daemon(command)
    }

    /// Like [`Home::spawn_daemon`], with `cloudd` run by `wrapper` (its program and
    /// arguments, `cloudd`'s path appended), in the same environment.
    pub fn spawn_daemon_under(&self, wrapper: &[String]) -> Daemon {
        let cloudd = self.cloudd_command();
        let mut command = Command::new(&wrapper[0]);
        command.args(&wrapper[1..]).arg(cloudd.get_program());
        for (key, value) in cloudd.get_envs() {
            match value {
                Some(value) => command.env(key, value),
                None => command.env_remove(key),
            };
        }
        command.stdin(Stdio::null());
        self.log_daemon(&mut command);
        self.start_daemon(command)
    }

    /// Sends a daemon command's stderr to [`Home::daemon_log`] (stdout to nowhere).
    fn log_daemon(&self, command: &mut Command) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.daemon_log())
            .expect("daemon log");
        command.stdout(Stdio::null()).stderr(log);
    }

    /// Starts `command` (a daemon) and waits until it answers.
    fn start_daemon(&self, mut command: Command) -> Daemon {
        let child = command.spawn().expect("spawn cloudd");
        let daemon = Daemon { child };
        let socket = self.paths.socket.clone();
        wait_for("cloudd to answer", DEADLINE, || {
            JsonClient::connect(&socket).is_ok_and(|mut c| c.hello().is_ok())
        });
        daemon
    }

    /// What the foreground daemon has logged so far.
    pub fn read_daemon_log(&self) -> String {
        std::fs::read_to_string(self.daemon_log()).unwrap_or_default()
    }
}

impl Drop for Home {
    /// A daemon that `cloudctl` started detached in this home must not outlive the test,
    /// even when the test fails before `cloudctl down`.
    fn drop(&mut self) {
        if let Some(pid) = self.daemon_pid() {
            // SAFETY: the pid holds this home's lock, so it is a daemon this test started.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

/// A daemon process started by a test; killed when dropped if it still runs.
#[derive(Debug)]
pub struct Daemon {
    /// The process.
    pub child: Child,
}

impl Daemon {
    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to it.
    pub fn signal(&self, signal: i32) {
        // SAFETY: sending a signal to a child we own.
        let result = unsafe { libc::kill(self.pid() as libc::pid_t, signal) };
        assert_eq!(result, 0, "kill({}, {signal}) failed", self.pid());
    }

    /// Waits for it to exit, failing after `deadline`.
    pub fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let mut exited = None;
        let what = format!("cloudd (pid {}) to exit", self.pid());
        wait_for(&what, deadline, || {
            exited = self.child.try_wait().expect("try_wait");
            exited.is_some()
        });
        exited.expect("it exited")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Binary frames for `requests`, each with its id, in order.
pub fn frames(requests: impl IntoIterator<Item = (u64, cloud_protocol::ipc::Request)>) -> Vec<u8> {
    let mut bytes = Vec::new();
    for (id, request) in requests {
        cloud_protocol::frame::encode(
            &cloud_protocol::ipc::ClientMessage { id, request },
            &mut bytes,
        )
        .expect("a request always encodes");
    }
    bytes
}

/// A raw binary-framing connection whose hello (id 0) is already written; reads time out
/// after [`DEADLINE`].
pub fn binary_connect(socket: &Path) -> UnixStream {
    let hello = cloud_protocol::ipc::Request::Hello(cloud_protocol::ipc::Hello::new("e2e", "0"));
    let mut stream = UnixStream::connect(socket).expect("connect to cloudd");
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream.write_all(&frames([(0, hello)])).unwrap();
    stream
}

/// Queues one `send` per text to `session` on one binary connection, pipelined 100 at a
/// time (far faster than a `cloudctl` per message), and asserts every one was queued.
pub fn queue_sends(home: &Home, session: &str, texts: &[String]) {
    use cloud_protocol::ipc::{Request, Response, ServerMessage};
    use std::io::Read as _;
    let mut stream = binary_connect(&home.paths.socket);
    let mut buf = Vec::new();
    let mut read_one = |stream: &mut UnixStream| -> ServerMessage {
        loop {
            if let Some((message, used)) =
                cloud_protocol::frame::decode::<ServerMessage>(&buf).expect("a valid frame")
            {
                buf.drain(..used);
                return message;
            }
            let mut chunk = [0u8; 65536];
            let n = stream.read(&mut chunk).expect("cloudd answers");
            assert!(n > 0, "cloudd closed the connection");
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    let hello = read_one(&mut stream);
    assert!(
        matches!(
            hello,
            ServerMessage::Reply {
                id: 0,
                result: Ok(_)
            }
        ),
        "{hello:?}"
    );
    for (n_batch, batch) in texts.chunks(100).enumerate() {
        let first_id = (n_batch * 100) as u64 + 1;
        let requests = batch.iter().enumerate().map(|(n, text)| {
            let request = Request::Send {
                session: session.to_owned(),
                text: text.clone(),
                key: None,
                wait: false,
            };
            (first_id + n as u64, request)
        });
        stream.write_all(&frames(requests)).unwrap();
        for _ in batch {
            match read_one(&mut stream) {
                ServerMessage::Reply {
                    result: Ok(Response::Queued { .. }),
                    ..
                } => {}
                other => panic!("a send was not queued: {other:?}"),
            }
        }
    }
}

/// A newline-delimited JSON-RPC client on a raw Unix socket, as an editor would be.
#[derive(Debug)]
pub struct JsonClient {
    /// For writing.
    stream: UnixStream,
    /// For reading lines.
    reader: BufReader<UnixStream>,
    /// The next request id.
    next_id: u64,
}

impl JsonClient {
    /// Connects (no hello yet). Reads time out after [`DEADLINE`].
    pub fn connect(socket: &Path) -> std::io::Result<JsonClient> {
        let stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(DEADLINE))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(JsonClient {
            stream,
            reader,
            next_id: 1,
        })
    }

    /// Writes raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads one line as JSON; `Ok(None)` at end of stream.
    pub fn recv(&mut self) -> std::io::Result<Option<Value>> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        serde_json::from_str(&line).map(Some).map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{e}: {line:?}"))
        })
    }

    /// Sends a request and returns the whole reply object (skipping notifications).
    pub fn call(&mut self, method: &str, params: Value) -> std::io::Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let line = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
            .to_string()
            + "\n";
        self.send_raw(line.as_bytes())?;
        loop {
            match self.recv()? {
                Some(reply) if reply.get("id") == Some(&json!(id)) => return Ok(reply),
                Some(_) => continue,
                None => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            }
        }
    }

    /// The hello of this build's protocol; returns the result object.
    pub fn hello(&mut self) -> std::io::Result<Value> {
        let reply = self.call(
            "hello",
            json!({"protocol": cloud_protocol::ipc::PROTOCOL_VERSION, "client": "e2e", "client_version": "0"}),
        )?;
        reply
            .get("result")
            .cloned()
            .ok_or_else(|| std::io::Error::other(format!("hello failed: {reply}")))
    }
}

/// A standalone `cloud-relay serve` process on a loopback port, with its data in a temp
/// dir; killed when dropped.
#[derive(Debug)]
pub struct Relay {
    /// Its data directory (kept across restarts).
    pub data: tempfile::TempDir,
    /// The port it listens on (kept across restarts).
    pub port: u16,
    /// The process, while it runs.
    pub child: Option<Child>,
    /// Extra `serve` arguments (an agent command).
    args: Vec<String>,
    /// Its `RELAY_LOG` filter.
    log_filter: &'static str,
    /// Extra environment variables (a `HOME` of its own).
    env: Vec<(String, String)>,
}

impl Relay {
    /// Starts a relay with the built-in shell agent.
    pub fn start() -> Relay {
        Relay::start_with(&[])
    }

    /// Starts a relay with extra `serve` arguments.
    pub fn start_with(args: &[&str]) -> Relay {
        Relay::start_logging(args, "info")
    }

    /// Starts a relay with extra `serve` arguments, logging at `log_filter` (`RELAY_LOG`).
    pub fn start_logging(args: &[&str], log_filter: &'static str) -> Relay {
        Relay::start_in(Path::new("/tmp"), args, log_filter)
    }

    /// Starts a relay whose data directory is a new temp dir in `parent`, with extra
    /// `serve` arguments, logging at `log_filter`.
    pub fn start_in(parent: &Path, args: &[&str], log_filter: &'static str) -> Relay {
        let data = tempfile::Builder::new()
            .prefix("cr")
            .tempdir_in(parent)
            .expect("temp dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut relay = Relay {
            data,
            port,
            child: None,
            args: args.iter().map(|a| a.to_string()).collect(),
            log_filter,
            env: Vec::new(),
        };
        relay.restart();
        relay
    }

    /// Restarts it with these environment variables added (for the programs it runs: a
    /// shell reads its startup files from `HOME`).
    pub fn restart_with_env(&mut self, env: &[(&str, &str)]) {
        self.kill();
        self.env = env
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        self.restart();
    }

    /// Its base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The file its stderr goes to.
    pub fn log_path(&self) -> PathBuf {
        self.data.path().join("relay.log")
    }

    /// What it has logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// (Re)starts the process on the same port and data, and waits until it accepts. The
    /// port is free while no relay holds it, and another test's outgoing connection can
    /// take it as its own local port for a moment: a relay that exits because the address
    /// is in use is started again (a relay that exits for any other reason fails the test
    /// with its log).
    pub fn restart(&mut self) {
        let mut log_seen = self.log().len();
        self.spawn();
        let port = self.port;
        wait_for("cloud-relay to listen", DEADLINE, || {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return true;
            }
            let exited = self
                .child
                .as_mut()
                .is_some_and(|child| child.try_wait().ok().flatten().is_some());
            if exited {
                let log = self.log();
                let said = log.get(log_seen..).unwrap_or_default().to_owned();
                assert!(
                    said.contains("Address already in use"),
                    "cloud-relay exited before it listened: {said}"
                );
                log_seen = log.len();
                self.spawn();
            }
            false
        });
    }

    /// (Re)starts the process on the same port and data, without waiting for it to listen
    /// (for a caller that times the moment it does).
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("relay log");
        let child = Command::new(binary("cloud-relay"))
            .arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data")
            .arg(self.data.path())
            .args(&self.args)
            .env("RELAY_LOG", self.log_filter)
            .envs(self.env.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn cloud-relay");
        self.child = Some(child);
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `cloud-relay token create`: a new API key for `user` in `org`.
    pub fn token(&self, user: &str, org: &str) -> String {
        self.token_with_scopes(user, org, &[])
    }

    /// `cloud-relay token create` with these `--scope`s (none: the default scopes).
    pub fn token_with_scopes(&self, user: &str, org: &str, scopes: &[&str]) -> String {
        let output = Command::new(binary("cloud-relay"))
            .args(["token", "create", "--user", user, "--org", org])
            .args(scopes.iter().flat_map(|scope| ["--scope", scope]))
            .arg("--data")
            .arg(self.data.path())
            .output()
            .expect("cloud-relay token create");
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    }

    /// `cloud-relay token revoke --user`.
    pub fn revoke(&self, user: &str) {
        let output = Command::new(binary("cloud-relay"))
            .args(["token", "revoke", "--user", user, "--data"])
            .arg(self.data.path())
            .output()
            .expect("cloud-relay token revoke");
        assert!(output.status.success(), "{output:?}");
    }

    /// `cloud-relay ARGS --data DATA` (an operator's command, such as `org add-member`),
    /// asserted to succeed.
    pub fn admin(&self, args: &[&str]) {
        let output = Command::new(binary("cloud-relay"))
            .args(args)
            .arg("--data")
            .arg(self.data.path())
            .output()
            .expect("cloud-relay");
        assert!(output.status.success(), "cloud-relay {args:?}: {output:?}");
    }

    /// The user messages the relay holds for a session, in log order (reading every page).
    pub fn user_messages(&self, token: &str, session: &str) -> Vec<String> {
        self.user_messages_at(token, session)
            .into_iter()
            .map(|(_, text)| text)
            .collect()
    }

    /// [`Relay::user_messages`], each with the time the relay logged it (ms).
    pub fn user_messages_at(&self, token: &str, session: &str) -> Vec<(u64, String)> {
        let mut messages = Vec::new();
        let mut after = 0;
        loop {
            let (code, log) = self.http(
                "GET",
                &format!("/v1/sessions/{session}/log?after={after}"),
                token,
                None,
            );
            assert_eq!(code, 200, "{log}");
            let entries = log.as_array().unwrap();
            let Some(last) = entries.last() else {
                return messages;
            };
            after = last["seq"].as_u64().unwrap();
            messages.extend(entries.iter().filter_map(|entry| {
                let text = entry["event"]["message"].as_str()?;
                let value: Value = serde_json::from_str(text).ok()?;
                (value["type"] == "user").then(|| {
                    let text = value["message"]["content"].as_str().unwrap_or("");
                    (entry["at"].as_u64().unwrap_or(0), text.to_owned())
                })
            }));
        }
    }

    /// A REST call; returns (status code, JSON body).
    pub fn http(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let body = body.map(Value::to_string);
        cloudd_test_support::http(
            ([127, 0, 0, 1], self.port).into(),
            method,
            path,
            Some(token),
            body.as_deref(),
        )
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
    }
}
