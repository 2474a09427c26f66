//! Empties VerneMQ's webhook cache on a schedule: VerneMQ 2.1 removes an expired row only when its key is looked up
//! again, so rows of client ids that never come back would stay for the node's lifetime (README "Caching").

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::sessions::VernemqApi;

/// Clears the cache of `api`'s node every `every`, until `shutdown`; a failed clear is logged and counted, and the next
/// one comes on schedule.
pub async fn run(api: VernemqApi, every: Duration, metrics: &Metrics, shutdown: CancellationToken) {
    let help = "Clears of VerneMQ's webhook cache through its API, by result";
    let cleared = metrics.counter("iotagent_webhook_cache_clears_total", help, &[("result", "ok")]);
    let failed = metrics.counter("iotagent_webhook_cache_clears_total", help, &[("result", "failed")]);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match api.clear_webhook_cache().await {
            Ok(()) => {
                cleared.increment(1);
                tracing::debug!("VerneMQ's webhook cache cleared");
            }
            Err(error) => {
                failed.increment(1);
                tracing::warn!(%error, next_in_s = every.as_secs(), "cannot clear VerneMQ's webhook cache");
            }
        }
    }
}
