//! The disconnect worker: one API call per session to close, a bounded number at once, retried with backoff until
//! done or no longer wanted (session gone, device restored, certificate no longer listed).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::SessionRegistry;
use super::registry::Session;
use super::vernemq_api::VernemqApi;
use crate::backoff::Backoff;

const FIRST_RETRY: Duration = Duration::from_millis(200);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// Why a session is closed (the `cause` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cause {
    Removed,
    Revoked,
    Operator,
}

impl Cause {
    /// Every variant, in declaration order (so `cause as usize` indexes it).
    pub(super) const ALL: [Self; 3] = [Self::Removed, Self::Revoked, Self::Operator];

    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Removed => "removed",
            Self::Revoked => "revoked",
            Self::Operator => "operator",
        }
    }
}

/// How a queued disconnect ended (the `outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    Done,
    /// The session went, or its device or certificate was restored, before the call was needed.
    NotNeeded,
}

impl Outcome {
    /// Every variant, in declaration order (so `outcome as usize` indexes it).
    pub(super) const ALL: [Self; 2] = [Self::Done, Self::NotNeeded];

    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Done => "done",
            Self::NotNeeded => "not_needed",
        }
    }
}

/// One session to close: its key, which connection under that key was meant, and whose it was.
#[derive(Debug, Clone)]
pub(super) struct Target {
    pub mountpoint: Box<str>,
    pub client_id: Box<str>,
    pub generation: u32,
    pub device: Box<str>,
    pub cause: Cause,
}

impl Target {
    pub(super) fn new(session: &Session<'_>, cause: Cause) -> Self {
        Self {
            mountpoint: session.recorded.mountpoint.into(),
            client_id: session.recorded.client_id.into(),
            generation: session.generation,
            device: session.recorded.device.into(),
            cause,
        }
    }

    pub(super) fn key(&self) -> (Box<str>, Box<str>) {
        (self.mountpoint.clone(), self.client_id.clone())
    }
}

pub(super) async fn run(
    api: VernemqApi,
    sessions: Arc<SessionRegistry>,
    mut queue: mpsc::UnboundedReceiver<Target>,
    concurrency: usize,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    loop {
        let target = tokio::select! {
            () = shutdown.cancelled() => return,
            target = queue.recv() => match target { Some(t) => t, None => return },
        };
        let Ok(permit) = permits.clone().acquire_owned().await else { return };
        let (api, sessions, shutdown) = (api.clone(), sessions.clone(), shutdown.clone());
        tokio::spawn(async move {
            close(&api, &sessions, &target, &shutdown).await;
            drop(permit);
        });
    }
}

async fn close(api: &VernemqApi, sessions: &SessionRegistry, target: &Target, shutdown: &CancellationToken) {
    // Jitter: after an API outage, thousands of pending calls must not come back in step.
    let mut backoff = Backoff::new(FIRST_RETRY, MAX_RETRY).with_jitter(0.2);
    loop {
        if !sessions.still_to_close(target) {
            sessions.closed(target, Outcome::NotNeeded);
            return;
        }
        match api.disconnect(&target.mountpoint, &target.client_id).await {
            Ok(()) => {
                tracing::info!(client_id = %target.client_id, cause = target.cause.name(), "session disconnected");
                sessions.closed(target, Outcome::Done);
                return;
            }
            Err(e) => {
                sessions.api_error(e.kind());
                let delay = backoff.next_delay();
                tracing::warn!(client_id = %target.client_id, error = %e, retry_in = ?delay, "disconnect failed");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}
