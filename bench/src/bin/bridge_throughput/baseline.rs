//! The baselines, measured in this process beside the end-to-end runs: a raw sled insert
//! loop with the journal's value size, and a raw tokio-tungstenite echo over loopback with
//! the bridge envelope's size.
//!
//! Neither does any of the daemon's or relay's work: no framing, no decoding, no second
//! store, no acknowledgement. They are what the two halves of the pipeline (the journal
//! and the WebSocket) cost on this machine when they do nothing else.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::{Sink, SinkExt as _, Stream, StreamExt as _};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Bytes, Error as WsError, Message};

/// The daemon's sled cache (`cloudd::store::CACHE_BYTES`): the baseline uses the
/// daemon's configuration, so the comparison is of the work, not of the settings.
pub const SLED_CACHE_BYTES: u64 = 8 * 1024 * 1024;

/// When a raw sled loop flushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// Never inside the timed loop.
    Never,
    /// After every `n` inserts (and the timed loop ends with a flush).
    Every(usize),
}

/// What a raw sled loop did.
#[derive(Debug, Clone)]
pub struct SledRun {
    /// Inserts per second over the timed loop.
    pub rate: f64,
    /// Per-flush durations in nanoseconds (empty for [`Flush::Never`]).
    pub flushes: Vec<u64>,
}

/// Inserts `count` copies of `value` under u64 big-endian keys into a fresh store in a temp
/// dir (the daemon's sled configuration: `cache_capacity` 8 MiB, `Mode::LowSpace`), after
/// 1,000 unmeasured inserts.
pub fn sled_loop(value: &[u8], count: usize, flush: Flush) -> anyhow::Result<SledRun> {
    let dir = tempfile::Builder::new()
        .prefix("bs")
        .tempdir_in("/tmp")
        .context("temp dir")?;
    let db = sled::Config::new()
        .path(dir.path())
        .cache_capacity(SLED_CACHE_BYTES)
        .mode(sled::Mode::LowSpace)
        .open()
        .context("open sled")?;
    let tree = db.open_tree("journal")?;
    let warmup = 1_000u64;
    for key in 0..warmup {
        tree.insert(key.to_be_bytes(), value)?;
    }
    db.flush()?;
    let mut flushes = Vec::new();
    let start = Instant::now();
    for i in 0..count as u64 {
        tree.insert((warmup + i).to_be_bytes(), value)?;
        if let Flush::Every(n) = flush {
            if (i + 1).is_multiple_of(n as u64) {
                let flushed = Instant::now();
                db.flush()?;
                flushes.push(flushed.elapsed().as_nanos() as u64);
            }
        }
    }
    if let Flush::Every(n) = flush {
        if !count.is_multiple_of(n) {
            db.flush()?;
        }
    }
    let elapsed = start.elapsed();
    drop(tree);
    drop(db);
    Ok(SledRun {
        rate: count as f64 / elapsed.as_secs_f64(),
        flushes,
    })
}

/// The raw sled store's size in the backlog case, without the daemon.
#[derive(Debug, Clone, Copy)]
pub struct SledBacklog {
    /// With `count` entries inserted and flushed.
    pub with_backlog: crate::disk::DiskSize,
    /// Right after all of them were removed (in batches of 512, as acks come) and flushed.
    pub trimmed: crate::disk::DiskSize,
    /// Two seconds later.
    pub trimmed_later: crate::disk::DiskSize,
    /// After closing and reopening the store.
    pub reopened: crate::disk::DiskSize,
    /// The live bytes with the backlog (keys + values).
    pub live: u64,
}

/// The backlog case on a bare store: inserts `count` copies of `value` (9-byte journal
/// keys, a flush per 100), removes them all, and measures the files at each step.
pub fn sled_backlog(value: &[u8], count: usize) -> anyhow::Result<SledBacklog> {
    let dir = tempfile::Builder::new()
        .prefix("bb")
        .tempdir_in("/tmp")
        .context("temp dir")?;
    let open = || {
        sled::Config::new()
            .path(dir.path())
            .cache_capacity(SLED_CACHE_BYTES)
            .mode(sled::Mode::LowSpace)
            .open()
    };
    let key = |seq: u64| {
        let mut key = [b'e'; 9];
        key[1..].copy_from_slice(&seq.to_be_bytes());
        key
    };
    let db = open().context("open sled")?;
    let tree = db.open_tree("journal")?;
    for seq in 1..=count as u64 {
        tree.insert(key(seq), value)?;
        if seq % 100 == 0 {
            db.flush()?;
        }
    }
    db.flush()?;
    let with_backlog = crate::disk::size(dir.path())?;
    for chunk in (1..=count as u64).collect::<Vec<_>>().chunks(512) {
        let mut batch = sled::Batch::default();
        for &seq in chunk {
            batch.remove(&key(seq));
        }
        tree.apply_batch(batch)?;
        db.flush()?;
    }
    let trimmed = crate::disk::size(dir.path())?;
    std::thread::sleep(Duration::from_secs(2));
    let trimmed_later = crate::disk::size(dir.path())?;
    drop(tree);
    drop(db);
    // sled's background threads let go of the lock shortly after the last handle.
    let deadline = Instant::now() + Duration::from_secs(10);
    let db = loop {
        match open() {
            Ok(db) => break db,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(e).context("reopen sled"),
        }
    };
    drop(db);
    std::thread::sleep(Duration::from_millis(200));
    let reopened = crate::disk::size(dir.path())?;
    Ok(SledBacklog {
        with_backlog,
        trimmed,
        trimmed_later,
        reopened,
        live: count as u64 * (9 + value.len() as u64),
    })
}

/// Echoes `count` binary messages of `size` bytes over a loopback WebSocket, pipelined: the
/// client (its own thread and current-thread runtime, like the daemon's bridge) writes
/// them all, flushing every 100, while it counts the echoes; the server (another thread
/// and runtime, like the relay) writes back every message, flushing when no further
/// message is ready. Returns messages per second, from the first send to the last echo,
/// after `warmup` unmeasured ones on the same connection.
pub fn ws_echo(size: usize, count: usize, warmup: usize) -> anyhow::Result<f64> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("bind")?;
    listener.set_nonblocking(true)?;
    let address = listener.local_addr()?;
    let server = std::thread::spawn(move || -> anyhow::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            let mut socket =
                tokio_tungstenite::accept_async_with_config(stream, Some(ws_config())).await?;
            while let Some(message) = socket.next().await {
                let mut message = message?;
                loop {
                    match message {
                        Message::Binary(_) => socket.feed(message).await?,
                        Message::Close(_) => return Ok(()),
                        _ => {}
                    }
                    // Only what has already arrived: then flush the batch.
                    match futures_util::FutureExt::now_or_never(socket.next()) {
                        Some(Some(next)) => message = next?,
                        Some(None) => return Ok(()),
                        None => break,
                    }
                }
                socket.flush().await?;
            }
            Ok(())
        })
    });
    let client = std::thread::spawn(move || -> anyhow::Result<Duration> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let url = format!("ws://{address}/");
            let (socket, _) =
                tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), true)
                    .await
                    .context("connect")?;
            let (mut sink, mut stream) = socket.split();
            let payload = Bytes::from(vec![0x5a; size]);
            echo_round(&mut sink, &mut stream, &payload, warmup).await?;
            let elapsed = echo_round(&mut sink, &mut stream, &payload, count).await?;
            let mut socket = sink
                .reunite(stream)
                .map_err(|_| anyhow::anyhow!("reunite"))?;
            let _ = socket.close(None).await;
            Ok(elapsed)
        })
    });
    let elapsed = client
        .join()
        .map_err(|_| anyhow::anyhow!("the echo client panicked"))??;
    server
        .join()
        .map_err(|_| anyhow::anyhow!("the echo server panicked"))??;
    Ok(count as f64 / elapsed.as_secs_f64())
}

/// One pipelined round on the client: sends `n` copies of `payload` while counting the
/// echoes; returns the time from the first send to the last echo.
async fn echo_round<S, R>(
    sink: &mut S,
    stream: &mut R,
    payload: &Bytes,
    n: usize,
) -> anyhow::Result<Duration>
where
    S: Sink<Message, Error = WsError> + Unpin,
    R: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let start = Instant::now();
    let send = async {
        for i in 0..n {
            sink.feed(Message::Binary(payload.clone())).await?;
            if i % 100 == 99 {
                sink.flush().await?;
            }
        }
        sink.flush().await?;
        anyhow::Ok(())
    };
    let receive = async {
        let mut echoed = 0;
        while echoed < n {
            match stream.next().await {
                Some(Ok(Message::Binary(bytes))) => {
                    anyhow::ensure!(bytes.len() == payload.len(), "an echo of the wrong size");
                    echoed += 1;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => anyhow::bail!("the echo server closed"),
            }
        }
        anyhow::Ok(())
    };
    let (sent, received) = tokio::join!(send, receive);
    sent?;
    received?;
    Ok(start.elapsed())
}

/// The daemon's WebSocket limits (16 MiB messages), so framing checks are the same.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(cloud_protocol::bridge::MAX_BRIDGE_MESSAGE))
        .max_frame_size(Some(cloud_protocol::bridge::MAX_BRIDGE_MESSAGE))
}
