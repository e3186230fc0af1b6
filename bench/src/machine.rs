//! The machine a run is made on, as the reports describe it.

/// The 1-, 5- and 15-minute load averages (`/proc/loadavg`), or `?`.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// The CPU model (`/proc/cpuinfo`), or `unknown CPU`.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// The report's `machine:` line: CPUs, model, kernel, and the load averages around the run.
pub fn describe(load_before: &str, load_after: &str) -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "machine: {cpus} CPUs ({}), Linux {}; load average {load_before} before, {load_after} after",
        cpu_model(),
        kernel.trim()
    )
}
