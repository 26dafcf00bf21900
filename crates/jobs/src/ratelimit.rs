//! The token bucket behind a job's `speed` (bytes per second, 0 = unlimited).
//!
//! Like QEMU's block-job rate limit it allows a burst of one 100 ms slice: the bytes a worker has
//! sent are "paid for" at `speed`, and the worker waits only once that payment runs more than a
//! slice ahead of the clock. A new speed applies to the bytes sent from then on.

use std::time::{Duration, Instant};

/// How far ahead of the clock a worker may run before it has to wait.
pub const SLICE: Duration = Duration::from_millis(100);

/// A token bucket over wall-clock time.
#[derive(Debug, Clone)]
pub struct RateLimit {
    speed: u64,
    /// When everything accounted so far will have been paid for at `speed`.
    paid_until: Option<Instant>,
}

impl RateLimit {
    /// A limiter at `speed` bytes/s (0 = unlimited).
    pub fn new(speed: u64) -> Self {
        RateLimit {
            speed,
            paid_until: None,
        }
    }

    /// The current speed in bytes/s.
    pub fn speed(&self) -> u64 {
        self.speed
    }

    /// Changes the speed; 0 removes the limit and forgets the debt.
    pub fn set_speed(&mut self, speed: u64) {
        self.speed = speed;
        if speed == 0 {
            self.paid_until = None;
        }
    }

    /// Records that `bytes` were just processed.
    pub fn account(&mut self, bytes: u64, now: Instant) {
        if self.speed == 0 {
            return;
        }
        let cost = Duration::from_secs_f64(bytes as f64 / self.speed as f64);
        let start = self.paid_until.map_or(now, |t| t.max(now));
        self.paid_until = Some(start + cost);
    }

    /// How long to wait before more work may start.
    pub fn delay(&self, now: Instant) -> Duration {
        match self.paid_until {
            Some(until) if self.speed != 0 => until.saturating_duration_since(now + SLICE),
            _ => Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_delays() {
        let now = Instant::now();
        let mut limit = RateLimit::new(0);
        limit.account(1 << 30, now);
        assert_eq!(limit.delay(now), Duration::ZERO);
    }

    #[test]
    fn burst_within_one_slice_is_free() {
        let now = Instant::now();
        let mut limit = RateLimit::new(1_000_000);
        limit.account(100_000, now);
        assert_eq!(limit.delay(now), Duration::ZERO);
    }

    #[test]
    fn excess_waits_for_its_cost_minus_the_slice() {
        let now = Instant::now();
        let mut limit = RateLimit::new(1_000_000);
        limit.account(1_000_000, now);
        assert_eq!(limit.delay(now), Duration::from_millis(900));
    }

    #[test]
    fn idle_time_does_not_build_credit() {
        let now = Instant::now();
        let mut limit = RateLimit::new(1_000_000);
        limit.account(1_000_000, now);
        let later = now + Duration::from_secs(10);
        limit.account(1_000_000, later);
        assert_eq!(limit.delay(later), Duration::from_millis(900));
    }

    #[test]
    fn setting_speed_to_zero_clears_the_debt() {
        let now = Instant::now();
        let mut limit = RateLimit::new(1000);
        limit.account(1_000_000, now);
        limit.set_speed(0);
        assert_eq!(limit.delay(now), Duration::ZERO);
    }
}
