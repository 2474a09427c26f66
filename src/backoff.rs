//! Retry delays: doubling from `min` up to `max`, back to `min` after a success (the MQTT clients' reconnects, the
//! VerneMQ API's disconnect retries).

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
    /// Spread of each delay (0.2: ±20 %), so that many instances do not reconnect in step.
    jitter: f64,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self { min, max, next: min, jitter: 0.0 }
    }

    /// Each delay anywhere within ±`fraction` of its nominal value.
    pub fn with_jitter(self, fraction: f64) -> Self {
        Self { jitter: fraction.clamp(0.0, 1.0), ..self }
    }

    /// The delay before the next attempt; the one after is twice as long, up to the maximum.
    pub fn next_delay(&mut self) -> Duration {
        let nominal = self.next;
        self.next = (nominal * 2).min(self.max);
        if self.jitter == 0.0 {
            return nominal;
        }
        nominal.mul_f64(1.0 - self.jitter + 2.0 * self.jitter * rand::random::<f64>())
    }

    /// Succeeded: the next failure starts over at the minimum.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_up_to_the_maximum_and_resets() {
        let mut b = Backoff::new(100 * MS, 500 * MS);
        let delays: Vec<Duration> = (0..5).map(|_| b.next_delay()).collect();
        assert_eq!(delays, [100 * MS, 200 * MS, 400 * MS, 500 * MS, 500 * MS]);
        b.reset();
        assert_eq!(b.next_delay(), 100 * MS);
    }

    #[test]
    fn jitter_stays_within_its_bounds() {
        let mut b = Backoff::new(100 * MS, 100 * MS).with_jitter(0.2);
        for _ in 0..1000 {
            let d = b.next_delay();
            assert!((80 * MS..=120 * MS).contains(&d), "{d:?}");
        }
    }
}
