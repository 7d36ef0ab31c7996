//! The session's clock: when time-based transformer state is flushed (aggregator retention,
//! arithmetic windows) and when the state of quiet series is forgotten.

use std::time::Duration;

use tokio::time::{Instant, Interval, MissedTickBehavior};

/// How often quiet series are looked for (`pipeline.state_ttl_secs`).
pub(super) const EVICT_EVERY: Duration = Duration::from_secs(60);

/// A flush every `flush_every`, and with it an eviction once at least [`EVICT_EVERY`] has
/// passed since the last one. A flush that falls due while the loop is busy (a long chunk)
/// comes as soon as the loop is free, and the grid starts again from there: no burst of
/// missed flushes.
pub(super) struct Cadence {
    timer: Interval,
    last_eviction: Instant,
}

/// What a tick asks of the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Tick {
    /// Forget the state of quiet series before flushing.
    pub evict: bool,
}

impl Cadence {
    /// The first flush comes at once; the first eviction [`EVICT_EVERY`] from now.
    pub fn new(flush_every: Duration) -> Self {
        let mut timer = tokio::time::interval(flush_every);
        timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Cadence {
            timer,
            last_eviction: Instant::now(),
        }
    }

    /// A new broker session: flush at once (outputs wait for no one), evictions unchanged.
    pub fn restart(&mut self) {
        self.timer.reset_immediately();
    }

    /// Waits for the next flush. Cancel-safe (a `select!` branch).
    pub async fn tick(&mut self) -> Tick {
        let now = self.timer.tick().await;
        let evict = now.duration_since(self.last_eviction) >= EVICT_EVERY;
        if evict {
            self.last_eviction = now;
        }
        Tick { evict }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On tokio's paused clock: flushes on the grid, evictions every minute, and a busy
    /// loop delaying the grid instead of bursting.
    #[tokio::test(start_paused = true)]
    async fn flushes_on_the_grid_evicts_every_minute_and_never_bursts() {
        let t0 = Instant::now();
        let mut c = Cadence::new(Duration::from_secs(1));
        let mut seen: Vec<(u128, bool)> = Vec::new();
        while seen.len() < 62 {
            let t = c.tick().await;
            seen.push(((Instant::now() - t0).as_millis(), t.evict));
        }
        assert_eq!(seen[0], (0, false), "the first flush at once");
        assert_eq!(seen[1], (1000, false));
        let evictions: Vec<u128> = seen.iter().filter(|s| s.1).map(|s| s.0).collect();
        assert_eq!(evictions, [60_000], "{seen:?}");

        // A chunk keeps the loop busy for 2.5 s: one flush as soon as it is free, then the
        // grid from there (not three flushes at once).
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        let busy_until = (Instant::now() - t0).as_millis();
        let mut after = Vec::new();
        for _ in 0..3 {
            c.tick().await;
            after.push((Instant::now() - t0).as_millis() - busy_until);
        }
        assert_eq!(after, [0, 1000, 2000]);

        // A new session flushes at once.
        c.restart();
        let before = Instant::now();
        c.tick().await;
        assert_eq!(Instant::now(), before);
    }
}
