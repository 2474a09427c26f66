//! Retry delays: doubling from `min` up to `max` (the MQTT clients' reconnects, the VerneMQ API's disconnect retries);
//! a reconnect starts over only once the connection has stayed up for a while, so a flapping broker is not hammered.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
    /// Spread of each delay (0.2: ±20 %), so that many instances do not reconnect in step.
    jitter: f64,
    /// How long a connection must last before its loss starts over at `min`.
    stable: Duration,
    /// When the current connection was accepted, if it is up.
    connected_at: Option<Instant>,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Self { min, max, next: min, jitter: 0.0, stable: Duration::ZERO, connected_at: None }
    }

    /// Each delay anywhere within ±`fraction` of its nominal value.
    pub(crate) fn with_jitter(self, fraction: f64) -> Self {
        Self { jitter: fraction.clamp(0.0, 1.0), ..self }
    }

    /// A connection lost before it lasted `stable` does not reset the delay (refused or dropped at once: the
    /// next attempt would meet the same fate).
    pub(crate) fn with_stable_after(self, stable: Duration) -> Self {
        Self { stable, ..self }
    }

    /// The delay before the next attempt; the one after is twice as long, up to the maximum.
    pub(crate) fn next_delay(&mut self) -> Duration {
        self.next_delay_at(Instant::now())
    }

    /// [`Self::next_delay`] at a given instant (pure, for tests).
    pub(crate) fn next_delay_at(&mut self, now: Instant) -> Duration {
        if let Some(since) = self.connected_at.take()
            && now.saturating_duration_since(since) >= self.stable
        {
            self.next = self.min;
        }
        let nominal = self.next;
        self.next = (nominal * 2).min(self.max);
        if self.jitter == 0.0 {
            return nominal;
        }
        nominal.mul_f64(1.0 - self.jitter + 2.0 * self.jitter * rand::random::<f64>())
    }

    /// Connected: once the connection has lasted `stable`, its loss starts over at the minimum.
    pub(crate) fn connected(&mut self) {
        self.connected_at(Instant::now());
    }

    /// [`Self::connected`] at a given instant (pure, for tests).
    pub(crate) fn connected_at(&mut self, now: Instant) {
        self.connected_at = Some(now);
    }

    /// Success that proves the cause is gone (an accepted publish or subscription): start over at the minimum.
    pub(crate) fn reset(&mut self) {
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
    fn a_connection_lost_right_after_it_was_made_does_not_reset() {
        let start = Instant::now();
        let mut b = Backoff::new(100 * MS, 5000 * MS).with_stable_after(Duration::from_secs(5));
        let mut now = start;
        let mut delays = Vec::new();
        // Accepted, then dropped 50 ms later, six times in a row (a broker closing the connection at once).
        for _ in 0..6 {
            b.connected_at(now);
            now += 50 * MS;
            let delay = b.next_delay_at(now);
            delays.push(delay);
            now += delay;
        }
        assert_eq!(delays, [100 * MS, 200 * MS, 400 * MS, 800 * MS, 1600 * MS, 3200 * MS]);
        // A connection that lasted past the stable time starts over.
        b.connected_at(now);
        assert_eq!(b.next_delay_at(now + Duration::from_secs(6)), 100 * MS);
        // Failed attempts (no connection at all) keep doubling.
        assert_eq!(b.next_delay_at(now + Duration::from_secs(7)), 200 * MS);
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
