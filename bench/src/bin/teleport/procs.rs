//! Per-process figures from `/proc`: CPU time (`stat`'s utime + stime, and the reaped
//! children's cutime + cstime) and memory (`status`'s VmRSS and VmHWM).

use anyhow::Context as _;

/// The fields of `/proc/<pid>/stat` after the command name (field 3 is index 0).
fn stat_fields(pid: Option<u32>) -> anyhow::Result<Vec<u64>> {
    let dir = pid.map_or_else(|| "/proc/self".to_owned(), |pid| format!("/proc/{pid}"));
    let stat = std::fs::read_to_string(format!("{dir}/stat"))
        .with_context(|| format!("read {dir}/stat"))?;
    // The command name is in parentheses and may contain spaces: fields start after it.
    Ok(stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .map(|f| f.parse().unwrap_or(0))
                .collect()
        })
        .unwrap_or_default())
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

/// Seconds from stat fields `a` and `b` (1-based field numbers of the whole line).
fn seconds(fields: &[u64], a: usize, b: usize) -> f64 {
    let get = |n: usize| fields.get(n - 3).copied().unwrap_or(0);
    (get(a) + get(b)) as f64 / ticks_per_second()
}

/// User + system CPU seconds of `pid` (all its threads): fields 14 and 15.
/// The kind of file system `path` is on, in words (`tmpfs`, `ext4`, or its magic
/// number).
pub fn file_system(path: &std::path::Path) -> String {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return "unknown".into();
    };
    // SAFETY: a NUL-terminated path and a zeroed statfs for the kernel to fill in.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return "unknown".into();
    }
    match stat.f_type as i64 {
        0x0102_1994 => "tmpfs".into(),
        0xEF53 => "ext4".into(),
        0x9123_683E => "btrfs".into(),
        0x5846_5342 => "xfs".into(),
        other => format!("file system {other:#x}"),
    }
}

pub fn cpu(pid: u32) -> anyhow::Result<f64> {
    Ok(seconds(&stat_fields(Some(pid))?, 14, 15))
}

/// CPU seconds of `pid`'s reaped children: fields 16 and 17.
pub fn children_cpu(pid: u32) -> anyhow::Result<f64> {
    Ok(seconds(&stat_fields(Some(pid))?, 16, 17))
}

/// CPU seconds of this process's reaped children (`rsync`, `cloudctl`).
pub fn children_cpu_of_self() -> f64 {
    stat_fields(None).map_or(0.0, |f| seconds(&f, 16, 17))
}

/// Whether `pid` has a live child.
pub fn has_children(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .is_ok_and(|c| !c.trim().is_empty())
}

/// Memory of a process, KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

impl Memory {
    pub fn rss_mib(&self) -> f64 {
        self.rss_kib as f64 / 1024.0
    }

    pub fn hwm_mib(&self) -> f64 {
        self.hwm_kib as f64 / 1024.0
    }
}

/// VmRSS and VmHWM of `pid`.
pub fn memory(pid: u32) -> anyhow::Result<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(Memory {
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
    })
}
