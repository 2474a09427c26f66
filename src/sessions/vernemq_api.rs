//! VerneMQ's HTTP management API, as far as this service uses it: `GET /api/v1/session/disconnect` (reference §5.1),
//! without `--cleanup` so the hooks fire and a persistent session keeps its queue.

use std::time::Duration;

use reqwest::Url;

use crate::secret::Secret;

/// How long one API call may take; the worker retries after that.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("VerneMQ API unreachable: {0}")]
    Unreachable(#[source] reqwest::Error),
    #[error("VerneMQ API refused the API key (401): check VERNEMQ_API_KEY and its scope (mgmt)")]
    Unauthorized,
    #[error("VerneMQ API answered HTTP {0}")]
    Status(u16),
}

/// Why an API call failed: the `reason` label of `iotagent_vernemq_api_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiFailure {
    Unreachable,
    Unauthorized,
    Status,
}

impl ApiFailure {
    /// Every variant, in declaration order (so `reason as usize` indexes it).
    pub const ALL: [Self; 3] = [Self::Unreachable, Self::Unauthorized, Self::Status];

    pub fn name(self) -> &'static str {
        match self {
            Self::Unreachable => "unreachable",
            Self::Unauthorized => "unauthorized",
            Self::Status => "status",
        }
    }
}

impl ApiError {
    pub fn kind(&self) -> ApiFailure {
        match self {
            Self::Unreachable(_) => ApiFailure::Unreachable,
            Self::Unauthorized => ApiFailure::Unauthorized,
            Self::Status(_) => ApiFailure::Status,
        }
    }
}

/// A client of one VerneMQ node's API (any node will do for the v1 disconnect, which is cluster-wide; the webhook
/// cache is the node's own).
#[derive(Clone)]
pub struct VernemqApi {
    client: reqwest::Client,
    disconnect_url: Url,
    cache_clear_url: Url,
    key: Option<Secret>,
}

impl std::fmt::Debug for VernemqApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VernemqApi").field("disconnect_url", &self.disconnect_url.as_str()).finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiConfigError {
    #[error("{0:?} is not an http:// URL ({1})")]
    Url(String, String),
    #[error("cannot build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

impl VernemqApi {
    /// `base` is the API listener, e.g. `http://vernemq:8888`.
    ///
    /// # Errors
    /// Not an `http://` URL (the client is built without TLS: the API is reached on the internal network).
    pub fn new(base: &str, key: Option<Secret>) -> Result<Self, ApiConfigError> {
        let url = Url::parse(base).map_err(|e| ApiConfigError::Url(base.into(), e.to_string()))?;
        if url.scheme() != "http" || url.cannot_be_a_base() {
            return Err(ApiConfigError::Url(base.into(), "only http:// is supported".into()));
        }
        let endpoint = |path: &str| url.join(path).map_err(|e| ApiConfigError::Url(base.into(), e.to_string()));
        let (disconnect_url, cache_clear_url) =
            (endpoint("api/v1/session/disconnect")?, endpoint("api/v1/webhooks/cache/clear")?);
        let client = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .pool_max_idle_per_host(64)
            .build()
            .map_err(ApiConfigError::Client)?;
        Ok(Self { client, disconnect_url, cache_clear_url, key })
    }

    /// Disconnects one session. VerneMQ answers 200 whether or not it existed (NOTES.md scenario 4).
    ///
    /// # Errors
    /// Transport errors and non-2xx answers; the caller retries.
    pub async fn disconnect(&self, mountpoint: &str, client_id: &str) -> Result<(), ApiError> {
        // Every parameter goes through the URL encoder: a client id is never spliced into the URL by hand.
        let mut url = self.disconnect_url.clone();
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("client-id", client_id);
            if !mountpoint.is_empty() {
                query.append_pair("--mountpoint", mountpoint);
            }
        }
        self.call(url).await
    }

    /// Empties this node's webhook cache (`vmq-admin webhooks cache clear`).
    ///
    /// # Errors
    /// Transport errors and non-2xx answers.
    pub async fn clear_webhook_cache(&self) -> Result<(), ApiError> {
        self.call(self.cache_clear_url.clone()).await
    }

    async fn call(&self, url: Url) -> Result<(), ApiError> {
        let mut request = self.client.get(url);
        if let Some(key) = &self.key {
            request = request.header("x-api-key", key.expose());
        }
        let response = request.send().await.map_err(ApiError::Unreachable)?;
        match response.status().as_u16() {
            200..=299 => Ok(()),
            401 | 403 => Err(ApiError::Unauthorized),
            status => Err(ApiError::Status(status)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http_urls() {
        assert!(VernemqApi::new("http://vernemq:8888", None).is_ok());
        assert!(VernemqApi::new("http://vernemq:8888/prefix/", None).is_ok());
        for bad in ["https://vernemq:8888", "vernemq:8888", "", "mailto:x@y"] {
            assert!(VernemqApi::new(bad, None).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_key_is_not_in_debug() {
        let api = VernemqApi::new("http://vernemq:8888", Some(Secret::new("k3y-value"))).unwrap();
        assert!(!format!("{api:?}").contains("k3y-value"));
    }
}
