//! `cloudctl metrics`: the daemon's own health figures (the `metrics` request), as an
//! aligned block for people or, with `--json`, the reply as it is. They stay on this
//! machine; the `telemetry` line says whether anonymous aggregates go to the relay.

use anyhow::bail;
use cloud_protocol::ipc::{Metrics, Request, Response};
use cloudctl::client::Client;

use crate::table;

/// Asks the daemon for its figures and prints them.
pub async fn metrics(client: &mut Client, json_output: bool) -> anyhow::Result<()> {
    let Response::Metrics(metrics) = client.request(Request::Metrics).await? else {
        bail!("unexpected reply to metrics");
    };
    if json_output {
        println!("{}", serde_json::to_string_pretty(&metrics)?);
    } else {
        print(&metrics);
    }
    Ok(())
}

fn print(metrics: &Metrics) {
    let latency = &metrics.latency;
    let ms = |value: Option<u64>| value.map_or_else(|| "-".to_owned(), |ms| format!("{ms} ms"));
    let rows = [
        ("uptime", format!("{} s", metrics.uptime_ms / 1000)),
        ("sends", metrics.sends.to_string()),
        ("deliveries", metrics.deliveries.to_string()),
        ("refusals", metrics.refusals.to_string()),
        ("retries", metrics.retries.to_string()),
        ("reconnects", metrics.reconnects.to_string()),
        ("slow-downs", metrics.slow_downs.to_string()),
        ("journal depth", metrics.journal_depth.to_string()),
        ("clients", metrics.clients.to_string()),
        (
            "latency",
            format!(
                "p50 {}, p99 {} ({} delivered, send to acknowledged)",
                ms(latency.p50_ms),
                ms(latency.p99_ms),
                latency.count
            ),
        ),
        (
            "rate limited",
            match metrics.rate_limited_until_ms {
                Some(until) => format!("until {}", utc_time(until)),
                None => "no".to_owned(),
            },
        ),
        (
            "telemetry",
            if metrics.telemetry {
                "on: anonymous counts go to the relay (telemetry = true)".to_owned()
            } else {
                "off: nothing leaves this machine".to_owned()
            },
        ),
    ];
    table::print(rows.map(|(name, value)| [name.to_owned(), value]));
}

/// `HH:MM:SS UTC` of a time in milliseconds since the Unix epoch.
fn utc_time(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    format!(
        "{:02}:{:02}:{:02} UTC",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60
    )
}
