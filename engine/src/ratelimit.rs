//! A per-queue budget for log lines: a failing backend or a misbehaving driver must not turn
//! every request into a log line. At most `BURST` lines per second; the lines dropped are
//! counted and reported with the next line that gets through.

/// Lines allowed per one-second window.
const BURST: u32 = 10;
const WINDOW_NS: u64 = 1_000_000_000;

#[derive(Default)]
pub struct RateLimit {
    window_start_ns: u64,
    used: u32,
    dropped: u64,
}

impl RateLimit {
    /// Whether a line may be logged at `now_ns`; `Some(n)` with the lines dropped since the
    /// last one that got through.
    pub fn admit(&mut self, now_ns: u64) -> Option<u64> {
        if now_ns.saturating_sub(self.window_start_ns) >= WINDOW_NS {
            self.window_start_ns = now_ns;
            self.used = 0;
        }
        if self.used >= BURST {
            self.dropped += 1;
            return None;
        }
        self.used += 1;
        Some(std::mem::take(&mut self.dropped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_pass_then_lines_are_counted_until_the_next_window() {
        let mut r = RateLimit::default();
        let t0 = 5 * WINDOW_NS;
        for i in 0..BURST {
            assert_eq!(r.admit(t0 + u64::from(i)), Some(0));
        }
        assert_eq!(r.admit(t0 + 100), None);
        assert_eq!(r.admit(t0 + 200), None);
        assert_eq!(r.admit(t0 + WINDOW_NS), Some(2), "the next window reports what was dropped");
        assert_eq!(r.admit(t0 + WINDOW_NS + 1), Some(0));
    }
}
