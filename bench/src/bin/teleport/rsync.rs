//! The baseline: `rsync -a SRC/ rsync://127.0.0.1:PORT/bench/` to a loopback
//! `rsync --daemon --no-detach` this program starts, with its own config, module directory
//! and log in a temp dir, on a free port, `use chroot = no`.
//!
//! This module never touches the source tree; it only writes in its temp dir.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::procs;

/// How long the daemon may take to listen.
const LISTEN_DEADLINE: Duration = Duration::from_secs(30);

/// A running `rsync --daemon`; killed when dropped.
#[derive(Debug)]
pub struct RsyncDaemon {
    dir: tempfile::TempDir,
    port: u16,
    child: Child,
}

/// One `rsync -a` run.
#[derive(Debug, Clone, Copy)]
pub struct RsyncRun {
    pub wall: Duration,
    /// CPU seconds of the client and of the daemon's connection process.
    pub cpu: f64,
}

impl RsyncDaemon {
    /// Starts the daemon with an empty module `bench`, in a new temp dir in `parent`.
    pub fn start_in(parent: &Path) -> anyhow::Result<RsyncDaemon> {
        let dir = tempfile::Builder::new()
            .prefix("rsyncd")
            .tempdir_in(parent)
            .context("temp dir")?;
        let module = dir.path().join("module");
        std::fs::create_dir(&module)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("a free port")?
            .port();
        // SAFETY: geteuid and getegid have no preconditions.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        // As root the daemon would switch to `nobody` by default: stay who we are.
        let identity = if uid == 0 {
            format!("  uid = {uid}\n  gid = {gid}\n")
        } else {
            String::new()
        };
        let config = format!(
            "pid file = {dir}/rsyncd.pid\nlog file = {dir}/rsyncd.log\nuse chroot = no\n\
             munge symlinks = no\n[bench]\n  path = {module}\n  read only = false\n{identity}",
            dir = dir.path().display(),
            module = module.display(),
        );
        let config_path = dir.path().join("rsyncd.conf");
        std::fs::write(&config_path, config)?;
        let child = Command::new("rsync")
            .arg("--daemon")
            .arg("--no-detach")
            .arg(format!("--config={}", config_path.display()))
            .arg(format!("--port={port}"))
            .arg("--address=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start `rsync --daemon` (install it: apt-get install -y rsync)")?;
        let daemon = RsyncDaemon { dir, port, child };
        let end = Instant::now() + LISTEN_DEADLINE;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > end {
                bail!("rsync --daemon did not listen on {port} within {LISTEN_DEADLINE:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(daemon)
    }

    /// The module's directory (where a copy lands).
    pub fn module(&self) -> PathBuf {
        self.dir.path().join("module")
    }

    /// The module's URL.
    pub fn url(&self) -> String {
        format!("rsync://127.0.0.1:{}/bench/", self.port)
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `rsync --version`'s first line.
    pub fn version() -> String {
        Command::new("rsync")
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.lines().next().map(str::to_owned))
            .unwrap_or_else(|| "rsync (version unknown)".into())
    }

    /// Runs `rsync -a SRC/ URL`, timed.
    pub fn sync(&self, source: &Path) -> anyhow::Result<RsyncRun> {
        self.sync_to(source, &self.url())
    }

    /// Runs `rsync -a SRC/ URL/DIR/` (a directory of the module, made by rsync), timed.
    pub fn sync_into(&self, source: &Path, dir: &str) -> anyhow::Result<RsyncRun> {
        self.sync_to(source, &format!("{}{dir}/", self.url()))
    }

    fn sync_to(&self, source: &Path, url: &str) -> anyhow::Result<RsyncRun> {
        let daemon_before = procs::children_cpu(self.pid())?;
        let client_before = procs::children_cpu_of_self();
        let began = Instant::now();
        let output = Command::new("rsync")
            .arg("-a")
            .arg(format!("{}/", source.display()))
            .arg(url)
            .stdin(Stdio::null())
            .output()
            .context("run rsync")?;
        let wall = began.elapsed();
        if !output.status.success() {
            bail!(
                "rsync failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        // The daemon's connection process is counted once it has exited and been reaped.
        let end = Instant::now() + Duration::from_secs(10);
        while procs::has_children(self.pid()) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(1));
        }
        let cpu = procs::children_cpu(self.pid())? - daemon_before + procs::children_cpu_of_self()
            - client_before;
        Ok(RsyncRun { wall, cpu })
    }
}

impl Drop for RsyncDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
