//! The HTTP layer's own figures, appended to the service's in `GET /metrics`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// Requests answered by status, and the time taken to answer them (to the response head, for
/// streams). Requests hyper rejects before they reach the router (unparsable heads, heads
/// too large) are not counted.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    by_status: BTreeMap<u16, u64>,
    seconds_sum: f64,
    count: u64,
}

impl Metrics {
    pub(crate) fn record(&self, status: u16, elapsed: Duration) {
        // A panic while holding this lock leaves counters, not invariants: keep going.
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        *inner.by_status.entry(status).or_default() += 1;
        inner.seconds_sum += elapsed.as_secs_f64();
        inner.count += 1;
    }

    /// Prometheus text exposition.
    pub(crate) fn render(&self) -> String {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        out.push_str("# HELP grove_api_requests_total API requests answered, by HTTP status.\n");
        out.push_str("# TYPE grove_api_requests_total counter\n");
        for (status, n) in &inner.by_status {
            let _ = writeln!(out, "grove_api_requests_total{{status=\"{status}\"}} {n}");
        }
        out.push_str(
            "# HELP grove_api_request_duration_seconds Time to answer an API request \
             (to the response head for streams).\n",
        );
        out.push_str("# TYPE grove_api_request_duration_seconds summary\n");
        let _ = writeln!(
            out,
            "grove_api_request_duration_seconds_sum {}",
            inner.seconds_sum
        );
        let _ = writeln!(
            out,
            "grove_api_request_duration_seconds_count {}",
            inner.count
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_by_status() {
        let m = Metrics::default();
        m.record(200, Duration::from_millis(500));
        m.record(200, Duration::from_millis(250));
        m.record(404, Duration::ZERO);
        let text = m.render();
        assert!(
            text.contains("grove_api_requests_total{status=\"200\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("grove_api_requests_total{status=\"404\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("grove_api_request_duration_seconds_sum 0.75\n"),
            "{text}"
        );
        assert!(
            text.contains("grove_api_request_duration_seconds_count 3\n"),
            "{text}"
        );
    }
}
