//! The relay's operator figures, served as Prometheus text at `GET /metrics` (admin scope):
//! counters kept here with atomics (events accepted, refused and rate limited, HTTP answers
//! by status class, requests rate limited, the opted-in daemons' telemetry totals) and the
//! gauges read when rendering (sessions, connected instances).
//!
//! Counts only: nothing here is labelled with a user, a session, a path or a token, and
//! telemetry reports are added to totals, never kept one by one.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use cloud_protocol::bridge::{TelemetryReport, TELEMETRY_LATENCY_BUCKETS_MS};

/// How many latency buckets a telemetry report may carry (the bounds and one above).
const LATENCY_BUCKETS: usize = TELEMETRY_LATENCY_BUCKETS_MS.len() + 1;

/// The relay's counters.
#[derive(Debug, Default)]
pub struct RelayMetrics {
    /// Journaled events handed to the core (not resends).
    pub events_accepted: AtomicU64,
    /// Journaled events the core refused.
    pub events_refused: AtomicU64,
    /// Journaled events dropped over the events limit (the daemon resends them).
    pub events_rate_limited: AtomicU64,
    /// Requests (HTTP, bridge session requests) refused over the requests limit.
    pub requests_rate_limited: AtomicU64,
    /// HTTP answers by status class: 1xx (upgrades) to 5xx.
    http: [AtomicU64; 5],
    /// Telemetry reports received from opted-in daemons.
    telemetry_reports: AtomicU64,
    /// The reports' totals, in [`TelemetryReport`]'s field order.
    telemetry: [AtomicU64; 6],
    /// The reports' latency buckets, summed.
    telemetry_latency: [AtomicU64; LATENCY_BUCKETS],
}

impl RelayMetrics {
    /// Counts an HTTP answer of `status`.
    pub fn http_answer(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.http[class].fetch_add(1, Ordering::Relaxed);
    }

    /// Adds an opted-in daemon's report to the totals (extra latency buckets are ignored).
    pub fn telemetry(&self, report: &TelemetryReport) {
        self.telemetry_reports.fetch_add(1, Ordering::Relaxed);
        let counts = [
            report.sends,
            report.deliveries,
            report.refusals,
            report.retries,
            report.reconnects,
            report.slow_downs,
        ];
        for (total, count) in self.telemetry.iter().zip(counts) {
            total.fetch_add(count, Ordering::Relaxed);
        }
        for (total, count) in self.telemetry_latency.iter().zip(&report.latency_buckets) {
            total.fetch_add(*count, Ordering::Relaxed);
        }
    }

    /// Every figure in Prometheus' text format, with the gauges read by the caller.
    pub fn render(&self, sessions: usize, instances: usize) -> String {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        metric(
            "cloud_relay_sessions",
            "gauge",
            "Sessions the relay holds.",
            &[("", sessions as u64)],
        );
        metric(
            "cloud_relay_instances_connected",
            "gauge",
            "Daemon instances connected on the bridge.",
            &[("", instances as u64)],
        );
        metric(
            "cloud_relay_events_accepted_total",
            "counter",
            "Journaled events taken from daemons (resends excluded).",
            &[("", get(&self.events_accepted))],
        );
        metric(
            "cloud_relay_events_refused_total",
            "counter",
            "Journaled events refused (a viewer sending, a prompt already answered, ...).",
            &[("", get(&self.events_refused))],
        );
        metric(
            "cloud_relay_events_rate_limited_total",
            "counter",
            "Journaled events dropped over the events limit (their daemons resend them).",
            &[("", get(&self.events_rate_limited))],
        );
        metric(
            "cloud_relay_requests_rate_limited_total",
            "counter",
            "Requests refused over the requests limit (HTTP 429, bridge slow-downs).",
            &[("", get(&self.requests_rate_limited))],
        );
        let classes = ["1xx", "2xx", "3xx", "4xx", "5xx"];
        let labels: Vec<String> = classes
            .iter()
            .map(|class| format!("{{class=\"{class}\"}}"))
            .collect();
        let samples: Vec<(&str, u64)> = labels
            .iter()
            .zip(&self.http)
            .map(|(labels, count)| (labels.as_str(), get(count)))
            .collect();
        metric(
            "cloud_relay_http_requests_total",
            "counter",
            "HTTP requests answered, by status class.",
            &samples,
        );
        metric(
            "cloud_relay_telemetry_reports_total",
            "counter",
            "Anonymous reports received from daemons that opted in (telemetry = true).",
            &[("", get(&self.telemetry_reports))],
        );
        let names = [
            "sends",
            "deliveries",
            "refusals",
            "retries",
            "reconnects",
            "slow_downs",
        ];
        for (name, total) in names.iter().zip(&self.telemetry) {
            metric(
                &format!("cloud_relay_telemetry_{name}_total"),
                "counter",
                &format!("The {name} opted-in daemons reported, summed."),
                &[("", get(total))],
            );
        }
        // A Prometheus histogram's buckets are cumulative.
        let mut cumulative = 0;
        let mut labels = Vec::new();
        for (n, total) in self.telemetry_latency.iter().enumerate() {
            cumulative += get(total);
            let bound = TELEMETRY_LATENCY_BUCKETS_MS
                .get(n)
                .map(|ms| format!("{}", *ms as f64 / 1000.0))
                .unwrap_or_else(|| "+Inf".to_owned());
            labels.push((format!("_bucket{{le=\"{bound}\"}}"), cumulative));
        }
        let _ = writeln!(
            out,
            "# HELP cloud_relay_telemetry_latency_seconds Send-to-delivered latency opted-in daemons reported."
        );
        let _ = writeln!(
            out,
            "# TYPE cloud_relay_telemetry_latency_seconds histogram"
        );
        for (labels, value) in &labels {
            let _ = writeln!(out, "cloud_relay_telemetry_latency_seconds{labels} {value}");
        }
        let _ = writeln!(
            out,
            "cloud_relay_telemetry_latency_seconds_count {cumulative}"
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let metrics = RelayMetrics::default();
        metrics.http_answer(200);
        metrics.http_answer(429);
        metrics.http_answer(101);
        metrics.telemetry(&TelemetryReport {
            sends: 3,
            deliveries: 2,
            latency_buckets: vec![1, 0, 1],
            ..TelemetryReport::default()
        });
        let text = metrics.render(4, 1);
        assert!(text.contains("cloud_relay_sessions 4\n"), "{text}");
        assert!(text.contains("cloud_relay_http_requests_total{class=\"4xx\"} 1\n"));
        assert!(text.contains("cloud_relay_http_requests_total{class=\"1xx\"} 1\n"));
        assert!(text.contains("cloud_relay_telemetry_sends_total 3\n"));
        assert!(text.contains("cloud_relay_telemetry_latency_seconds_bucket{le=\"0.005\"} 2\n"));
        assert!(text.contains("cloud_relay_telemetry_latency_seconds_bucket{le=\"+Inf\"} 2\n"));
    }
}
