//! Webhook options, validated into [`CachePolicy`] and the body limit.

use crate::webhooks::CachePolicy;

/// What VerneMQ may cache and how large a request may be.
#[derive(Debug, Clone, clap::Args)]
pub struct WebhookArgs {
    /// `cache-control: max-age` (seconds) on allowed publish and subscribe decisions where caching is safe; 0 = off.
    #[arg(long, env = "WEBHOOK_CACHE_MAX_AGE", default_value_t = 300)]
    pub webhook_cache_max_age: u32,

    /// `cache-control: max-age` on accepted registrations; 0 (default) so a removed device cannot reconnect from
    /// VerneMQ's cache.
    #[arg(long, env = "REGISTER_CACHE_MAX_AGE", default_value_t = 0)]
    pub register_cache_max_age: u32,

    /// Largest webhook request body accepted (bytes); larger ones are refused with 400.
    #[arg(long, env = "WEBHOOK_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub webhook_max_body_bytes: usize,
}

impl WebhookArgs {
    /// Which decisions VerneMQ may cache, and for how long.
    pub fn cache(&self) -> CachePolicy {
        let max_age = |seconds: u32| (seconds > 0).then_some(seconds);
        CachePolicy {
            register: max_age(self.register_cache_max_age),
            publish: max_age(self.webhook_cache_max_age),
            subscribe: max_age(self.webhook_cache_max_age),
        }
    }
}
