//! When each polling source is due: a fixed grid per source from the agent's start, missed
//! slots skipped (never run twice to catch up).

use std::time::Duration;

/// When each polling source is due: a fixed grid per source from the first cycle
/// (`start`, `start + interval`, …), so that a source's samples stay evenly spaced
/// whatever the cycles cost.
#[derive(Debug)]
pub struct Schedule {
    intervals: Vec<Duration>,
    due: Vec<tokio::time::Instant>,
}

impl Schedule {
    /// Every source due at `start`. Intervals are at least 1 ms.
    pub fn new(intervals: Vec<Duration>, start: tokio::time::Instant) -> Schedule {
        let intervals: Vec<Duration> = intervals
            .into_iter()
            .map(|i| i.max(Duration::from_millis(1)))
            .collect();
        Schedule {
            due: vec![start; intervals.len()],
            intervals,
        }
    }

    /// The earliest time a source is due.
    pub fn next(&self) -> tokio::time::Instant {
        *self.due.iter().min().expect("at least one source")
    }

    /// The sources due at `now` (by index), each moved to its next slot on its grid after
    /// `now`: slots missed while a cycle ran long are skipped, not made up.
    pub fn take_due(&mut self, now: tokio::time::Instant) -> Vec<usize> {
        let active: Vec<usize> = (0..self.due.len())
            .filter(|&i| self.due[i] <= now)
            .collect();
        for &i in &active {
            while self.due[i] <= now {
                self.due[i] += self.intervals[i];
            }
        }
        active
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The schedule on tokio's paused clock: sleeping until `next()` advances virtual time
    /// exactly, so the grid is checked to the millisecond without waiting for it.
    #[tokio::test(start_paused = true)]
    async fn sources_fire_on_their_grids_and_skip_missed_slots() {
        let t0 = tokio::time::Instant::now();
        let mut s = Schedule::new(vec![Duration::from_secs(1), Duration::from_secs(3)], t0);
        let mut fired: Vec<(u64, Vec<usize>)> = Vec::new();
        while fired.len() < 7 {
            tokio::time::sleep_until(s.next()).await;
            let now = tokio::time::Instant::now();
            fired.push(((now - t0).as_millis() as u64, s.take_due(now)));
        }
        assert_eq!(
            fired,
            vec![
                (0, vec![0, 1]),
                (1000, vec![0]),
                (2000, vec![0]),
                (3000, vec![0, 1]),
                (4000, vec![0]),
                (5000, vec![0]),
                (6000, vec![0, 1]),
            ]
        );
        // A cycle that overruns by 2.5 s: source 0 missed 7 s and 8 s; it runs once now and
        // goes back to its grid (9 s), as does source 1 (due at 9 s, not yet).
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let now = tokio::time::Instant::now();
        assert_eq!((now - t0).as_millis(), 8500);
        assert_eq!(s.take_due(now), vec![0]);
        assert_eq!((s.next() - t0).as_millis(), 9000);
        tokio::time::sleep_until(s.next()).await;
        assert_eq!(s.take_due(tokio::time::Instant::now()), vec![0, 1]);
        assert_eq!((s.next() - t0).as_millis(), 10_000);
    }
}
