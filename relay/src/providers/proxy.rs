//! The filtering proxy of `limited` sandboxes: one Unix socket per session
//! (`DATA/sandbox/<session>/proxy.sock`, bound into that session's sandboxes only, so a
//! connection's session is the socket it came through and cannot be claimed), speaking
//! HTTP proxy: `CONNECT host:port` (HTTPS and any other TCP) and absolute-form plain HTTP
//! requests (`GET http://host/path`). A host in the allow-list (the session's
//! `allowed_domains` and the relay's `--allowed-domain`s: `crates.io` is that host,
//! `*.npmjs.org` any host under it) is resolved and connected to by the relay; any other
//! gets `403 Forbidden`. Names are matched as written (an IP literal only if listed).
//!
//! One request per connection: after the head the bytes are relayed both ways as they are,
//! so a second request on a kept-alive connection reaches the same, allowed, host.
//!
//! This module never reads a token and never connects anywhere the allow-list does not
//! name. The request head is read with a size limit ([`MAX_HEAD`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpStream, UnixListener, UnixStream};

/// The socket's name in a session's proxy directory.
pub const SOCKET_NAME: &str = "proxy.sock";

/// The largest request head read.
pub const MAX_HEAD: usize = 16 * 1024;

/// How long connecting to an allowed host may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// The hosts a session may reach.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    /// Hosts allowed as they are.
    exact: Vec<String>,
    /// `*.suffix` entries: the suffix with its leading dot.
    under: Vec<String>,
}

impl AllowList {
    /// From entries like `crates.io` and `*.npmjs.org` (case and a final dot ignored;
    /// blanks skipped).
    pub fn new(entries: &[String]) -> AllowList {
        let mut list = AllowList::default();
        for entry in entries {
            let entry = normalise(entry);
            if entry.is_empty() {
                continue;
            }
            match entry.strip_prefix('*') {
                Some(suffix) if suffix.starts_with('.') && suffix.len() > 1 => {
                    list.under.push(suffix.to_owned())
                }
                _ => list.exact.push(entry),
            }
        }
        list
    }

    /// Whether `host` may be reached.
    pub fn allows(&self, host: &str) -> bool {
        let host = normalise(host);
        !host.is_empty()
            && (self.exact.contains(&host) || self.under.iter().any(|s| host.ends_with(s.as_str())))
    }
}

fn normalise(host: &str) -> String {
    host.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// What a client asked of the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `CONNECT host:port`: a tunnel.
    Connect {
        /// The host.
        host: String,
        /// The port.
        port: u16,
    },
    /// An absolute-form plain HTTP request, to be sent on in origin form.
    Forward {
        /// The host.
        host: String,
        /// The port (80 unless given).
        port: u16,
        /// The head to send the host: the request line in origin form, then the
        /// client's header lines and the blank line.
        head: Vec<u8>,
    },
}

/// A request the proxy refuses to parse (answered with 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadRequest(pub String);

/// Parses a request head from the start of `bytes`: `Ok(None)` while it is incomplete
/// (and under [`MAX_HEAD`]); otherwise the request and how many bytes its head took.
pub fn parse_head(bytes: &[u8]) -> Result<Option<(Request, usize)>, BadRequest> {
    let window = &bytes[..bytes.len().min(MAX_HEAD)];
    let Some(end) = window.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if bytes.len() >= MAX_HEAD {
            Err(BadRequest(format!("request head over {MAX_HEAD} bytes")))
        } else {
            Ok(None)
        };
    };
    let head_len = end + 4;
    let head = &bytes[..head_len];
    let line_end = head.windows(2).position(|w| w == b"\r\n").unwrap_or(end);
    let line = std::str::from_utf8(&head[..line_end])
        .map_err(|_| BadRequest("the request line is not UTF-8".into()))?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(BadRequest("a request line is METHOD TARGET VERSION".into()));
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() {
        return Err(BadRequest("only HTTP/1 requests are proxied".into()));
    }
    if method.eq_ignore_ascii_case("CONNECT") {
        let (host, port) = split_host_port(target, None)?;
        return Ok(Some((Request::Connect { host, port }, head_len)));
    }
    let rest = target.strip_prefix("http://").ok_or_else(|| {
        BadRequest("a proxied request names an http:// URL, or uses CONNECT".into())
    })?;
    let (authority, path) = match rest.find('/') {
        Some(slash) => (&rest[..slash], &rest[slash..]),
        None => (rest, "/"),
    };
    if authority.contains('@') {
        return Err(BadRequest("credentials in a URL are not proxied".into()));
    }
    let (host, port) = split_host_port(authority, Some(80))?;
    let mut out = format!("{method} {path} {version}").into_bytes();
    out.extend_from_slice(&head[line_end..]);
    Ok(Some((
        Request::Forward {
            host,
            port,
            head: out,
        },
        head_len,
    )))
}

/// `host:port` or `[v6]:port` (the port may be left out when `default` is given).
fn split_host_port(text: &str, default: Option<u16>) -> Result<(String, u16), BadRequest> {
    let bad = || BadRequest(format!("bad host and port {text:?}"));
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(bad)?;
        (host, after.strip_prefix(':'))
    } else {
        match text.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        }
    };
    let port = match port {
        Some(port) => port.parse::<u16>().map_err(|_| bad())?,
        None => default.ok_or_else(bad)?,
    };
    if host.is_empty() || port == 0 || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

/// The running proxies, by session.
#[derive(Debug, Default)]
pub struct Proxies {
    running: Mutex<HashMap<String, Running>>,
}

#[derive(Debug)]
struct Running {
    socket: PathBuf,
    task: tokio::task::AbortHandle,
}

impl Proxies {
    /// The session's proxy socket in `dir`, started now unless it runs (must be called
    /// inside a tokio runtime).
    pub fn ensure(&self, session: &str, dir: &Path, allow: AllowList) -> Result<PathBuf, String> {
        let mut running = self.running.lock().unwrap();
        if let Some(proxy) = running.get(session) {
            if !proxy.task.is_finished() {
                return Ok(proxy.socket.clone());
            }
        }
        let socket = dir.join(SOCKET_NAME);
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder
            .create(dir)
            .map_err(|e| format!("cannot create the proxy directory {}: {e}", dir.display()))?;
        // A socket left by an earlier relay.
        let _ = std::fs::remove_file(&socket);
        let listener = std::os::unix::net::UnixListener::bind(&socket)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(UnixListener::from_std)
            .map_err(|e| format!("cannot listen on {}: {e}", socket.display()))?;
        let allow = Arc::new(allow);
        let id = session.to_owned();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    // Out of descriptors, most likely: let some close.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let (allow, id) = (Arc::clone(&allow), id.clone());
                tokio::spawn(async move {
                    if let Err(e) = serve(client, &allow).await {
                        tracing::debug!(session = %id, error = %e, "proxy connection ended");
                    }
                });
            }
        })
        .abort_handle();
        running.insert(
            session.to_owned(),
            Running {
                socket: socket.clone(),
                task,
            },
        );
        Ok(socket)
    }

    /// Ends a session's proxy.
    pub fn remove(&self, session: &str) {
        if let Some(proxy) = self.running.lock().unwrap().remove(session) {
            proxy.task.abort();
        }
    }

    /// Ends every proxy.
    pub fn clear(&self) {
        for (_, proxy) in self.running.lock().unwrap().drain() {
            proxy.task.abort();
        }
    }
}

/// Serves one client connection.
async fn serve(mut client: UnixStream, allow: &AllowList) -> std::io::Result<()> {
    let mut buffer = Vec::with_capacity(1024);
    let parsed = tokio::time::timeout(HEAD_TIMEOUT, async {
        loop {
            match parse_head(&buffer) {
                Ok(Some(found)) => return Ok(found),
                Ok(None) => {}
                Err(e) => return Err(e.0),
            }
            let mut chunk = [0u8; 4096];
            let n = client
                .read(&mut chunk)
                .await
                .map_err(|e| format!("cannot read the request: {e}"))?;
            if n == 0 {
                return Err("the client closed before its request ended".into());
            }
            buffer.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| Err("the request head took too long".into()));
    let (request, head_len) = match parsed {
        Ok(found) => found,
        Err(reason) => {
            return answer(&mut client, "400 Bad Request", &format!("{reason}\n")).await;
        }
    };
    let (host, port) = match &request {
        Request::Connect { host, port } | Request::Forward { host, port, .. } => {
            (host.clone(), *port)
        }
    };
    if !allow.allows(&host) {
        tracing::info!(%host, port, "proxy refused a host outside the allow-list");
        let text = format!(
            "cloudd: {host} is not in this session's allowed domains (its allowed_domains setting, or the relay's --allowed-domain)\n"
        );
        return answer(&mut client, "403 Forbidden", &text).await;
    }
    let connected =
        tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host.as_str(), port))).await;
    let mut upstream = match connected {
        Ok(Ok(upstream)) => upstream,
        Ok(Err(e)) => {
            return answer(
                &mut client,
                "502 Bad Gateway",
                &format!("cannot reach {host}:{port}: {e}\n"),
            )
            .await;
        }
        Err(_) => {
            return answer(
                &mut client,
                "504 Gateway Timeout",
                &format!("{host}:{port} did not answer\n"),
            )
            .await;
        }
    };
    match request {
        Request::Connect { .. } => {
            client
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await?;
        }
        Request::Forward { head, .. } => upstream.write_all(&head).await?,
    }
    upstream.write_all(&buffer[head_len..]).await?;
    drop(buffer);
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}

async fn answer(client: &mut UnixStream, status: &str, text: &str) -> std::io::Result<()> {
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
    client.write_all(response.as_bytes()).await?;
    client.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn allow_list_matches_hosts_and_wildcards() {
        let list = AllowList::new(&[
            "Crates.io".into(),
            "*.npmjs.org".into(),
            " ".into(),
            "localhost.".into(),
        ]);
        for host in [
            "crates.io",
            "CRATES.IO.",
            "registry.npmjs.org",
            "a.b.npmjs.org",
            "localhost",
        ] {
            assert!(list.allows(host), "{host}");
        }
        for host in [
            "static.crates.io",
            "npmjs.org",
            "evilnpmjs.org",
            "127.0.0.1",
            "",
        ] {
            assert!(!list.allows(host), "{host}");
        }
    }

    #[test]
    fn heads_parse() {
        assert_eq!(parse_head(b"CONNECT localhost:4").unwrap(), None);
        assert_eq!(
            parse_head(b"CONNECT [::1]:443 HTTP/1.1\r\nHost: x\r\n\r\nrest").unwrap(),
            Some((
                Request::Connect {
                    host: "::1".into(),
                    port: 443
                },
                39
            ))
        );
        let (request, used) =
            parse_head(b"GET http://Example.org:8080/a?b HTTP/1.1\r\nHost: example.org\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(used, 63);
        assert_eq!(
            request,
            Request::Forward {
                host: "Example.org".into(),
                port: 8080,
                head: b"GET /a?b HTTP/1.1\r\nHost: example.org\r\n\r\n".to_vec()
            }
        );
        for bad in [
            &b"GET /relative HTTP/1.1\r\n\r\n"[..],
            b"CONNECT host HTTP/1.1\r\n\r\n",
            b"CONNECT host:0 HTTP/1.1\r\n\r\n",
            b"CONNECT :80 HTTP/1.1\r\n\r\n",
            b"GET http://u@h/ HTTP/1.1\r\n\r\n",
            b"GET http://h/ SPDY\r\n\r\n",
            b"\r\n\r\n",
        ] {
            assert!(parse_head(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert!(
            parse_head(&vec![b'a'; MAX_HEAD]).is_err(),
            "an endless head is refused"
        );
    }

    proptest! {
        #[test]
        fn any_bytes_parse_within_the_limit(bytes in proptest::collection::vec(any::<u8>(), 0..(MAX_HEAD + 64))) {
            match parse_head(&bytes) {
                Ok(Some((_, used))) => prop_assert!(used <= bytes.len().min(MAX_HEAD)),
                Ok(None) => prop_assert!(bytes.len() < MAX_HEAD),
                Err(_) => {}
            }
        }

        #[test]
        fn connect_round_trips(host in "[a-z0-9.-]{1,40}", port in 1u16..) {
            let head = format!("CONNECT {host}:{port} HTTP/1.1\r\n\r\n");
            let parsed = parse_head(head.as_bytes()).unwrap().unwrap();
            prop_assert_eq!(parsed, (Request::Connect { host, port }, head.len()));
        }
    }
}
