//! Per-process counters from `/proc`: CPU time and bytes written to storage, read before
//! and after a phase so the report can say which process spent the time.

use anyhow::Context as _;

/// A process's counters at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    /// User + system CPU time, seconds (all threads).
    pub cpu: f64,
    /// Bytes this process caused to be sent to the storage layer (`write_bytes`).
    pub written: u64,
}

impl std::ops::Sub for Counters {
    type Output = Counters;

    fn sub(self, earlier: Counters) -> Counters {
        Counters {
            cpu: self.cpu - earlier.cpu,
            written: self.written.saturating_sub(earlier.written),
        }
    }
}

/// The counters of process `pid` (`None`: this process).
pub fn read(pid: Option<u32>) -> anyhow::Result<Counters> {
    let dir = pid.map_or_else(|| "/proc/self".to_owned(), |pid| format!("/proc/{pid}"));
    let stat = std::fs::read_to_string(format!("{dir}/stat"))
        .with_context(|| format!("read {dir}/stat"))?;
    // The command name is in parentheses and may contain spaces: fields start after it.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("bad {dir}/stat"))
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu = (ticks(11)? + ticks(12)?) as f64 / hz;
    let written = std::fs::read_to_string(format!("{dir}/io"))
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|line| line.strip_prefix("write_bytes:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0);
    Ok(Counters { cpu, written })
}
