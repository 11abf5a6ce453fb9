//! When to try a deferred delivery again.

use std::time::Duration;

/// A retry schedule: the delay after the first failed attempt, after the
/// second, and so on; the last step repeats forever. Pure arithmetic, no
/// clock: the queue decides what "now" is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    schedule: Vec<Duration>,
}

impl RetryPolicy {
    /// A policy from explicit steps. An empty schedule means the default.
    pub fn new(schedule: Vec<Duration>) -> Self {
        if schedule.is_empty() {
            RetryPolicy::default()
        } else {
            RetryPolicy { schedule }
        }
    }

    pub fn schedule(&self) -> &[Duration] {
        &self.schedule
    }

    /// The delay before the next attempt, given the number of attempts
    /// recorded before the one that just failed, i.e. the queue's counter
    /// before it is bumped: 0 gives the first step, 1 the second, and
    /// anything past the end the last step.
    pub fn delay_for(&self, attempts_so_far: u32) -> Duration {
        let step = usize::try_from(attempts_so_far).unwrap_or(usize::MAX);
        let last = self.schedule.len().saturating_sub(1);
        self.schedule
            .get(step.min(last))
            .copied()
            .unwrap_or(Duration::ZERO)
    }
}

impl RetryPolicy {
    /// [`delay_for`](Self::delay_for) spread by up to ±10 %, so mail
    /// deferred together (a receiver's outage) does not come back together.
    /// The node computes it before proposing; the queue only stores the
    /// result, so applying entries stays deterministic.
    pub fn jittered(&self, attempts_so_far: u32, rng: &mut impl rand::Rng) -> Duration {
        let base = self.delay_for(attempts_so_far);
        base.mul_f64(rng.random_range(0.9..=1.1))
    }
}

impl Default for RetryPolicy {
    /// 5 m, 10 m, 20 m, 40 m, 1 h, 2 h, then every 4 h: quick at first for
    /// greylisting, then backing off like Postfix.
    fn default() -> Self {
        let min = |m: u64| Duration::from_secs(m * 60);
        RetryPolicy {
            schedule: vec![
                min(5),
                min(10),
                min(20),
                min(40),
                min(60),
                min(120),
                min(240),
            ],
        }
    }
}
