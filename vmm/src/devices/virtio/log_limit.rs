//! Rate limiting for log lines a guest can cause.
//!
//! A guest that keeps misbehaving (resetting a device and corrupting its ring in a loop, say)
//! must not be able to flood the host's logs. Every virtio device owns one [`LogLimiter`]
//! (inside its [`super::IrqTrigger`], which the transport and the device share): at most
//! [`MAX_LINES_PER_WINDOW`] warnings per [`WINDOW`]; the rest are counted, and the first line
//! of the next window says how many were suppressed.

use std::time::{Duration, Instant};

/// Length of one rate-limiting window.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Guest-caused log lines a device may emit per [`WINDOW`].
pub const MAX_LINES_PER_WINDOW: u32 = 10;

/// Counts log lines per time window; see the module documentation.
#[derive(Debug)]
pub struct LogLimiter {
    max_per_window: u32,
    window: Duration,
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

/// What the caller may log for one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogDecision {
    /// Log the line; `suppressed` lines were dropped since the last one logged (0: none).
    Log { suppressed: u64 },
    /// Drop the line (it was counted).
    Suppress,
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new(MAX_LINES_PER_WINDOW, WINDOW)
    }
}

impl LogLimiter {
    /// At most `max_per_window` lines per `window`.
    pub fn new(max_per_window: u32, window: Duration) -> Self {
        Self {
            max_per_window,
            window,
            window_start: None,
            in_window: 0,
            suppressed: 0,
        }
    }

    /// Decides about one line at time `now`.
    pub fn check(&mut self, now: Instant) -> LogDecision {
        let expired = self
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= self.window);
        if expired {
            self.window_start = Some(now);
            self.in_window = 0;
        }
        if self.in_window >= self.max_per_window {
            self.suppressed = self.suppressed.saturating_add(1);
            return LogDecision::Suppress;
        }
        self.in_window += 1;
        LogDecision::Log {
            suppressed: std::mem::take(&mut self.suppressed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_beyond_the_limit_are_counted_and_reported_in_the_next_window() {
        let mut l = LogLimiter::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.check(t0), LogDecision::Log { suppressed: 0 });
        }
        for i in 1..=5u64 {
            assert_eq!(
                l.check(t0 + Duration::from_millis(i)),
                LogDecision::Suppress
            );
        }
        // Still inside the window: still suppressed.
        assert_eq!(l.check(t0 + Duration::from_secs(9)), LogDecision::Suppress);
        // A new window: one line, carrying the count of the dropped ones.
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(l.check(t1), LogDecision::Log { suppressed: 6 });
        assert_eq!(l.check(t1), LogDecision::Log { suppressed: 0 });
        assert_eq!(l.check(t1), LogDecision::Log { suppressed: 0 });
        assert_eq!(l.check(t1), LogDecision::Suppress);
    }

    #[test]
    fn a_flood_logs_a_bounded_number_of_lines() {
        let mut l = LogLimiter::default();
        let t0 = Instant::now();
        let logged = (0..100_000u64)
            .filter(|i| {
                // 100 000 events over 60 s: six windows.
                let t = t0 + Duration::from_micros(i * 600);
                matches!(l.check(t), LogDecision::Log { .. })
            })
            .count();
        assert_eq!(logged, 6 * MAX_LINES_PER_WINDOW as usize);
    }
}
