//! The shutdown budget: one deadline for the whole stop (SHUTDOWN_TIMEOUT), fixed when shutdown starts and shared by
//! every step, so that the steps together never take longer than the budget; and what starts a shutdown: the failures
//! of parts the service cannot run without, and signals.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Watches the tasks the service cannot run without. One that fails (a panic: they end otherwise only when asked)
/// starts the shutdown, and the service then stops with an error, so that its supervisor restarts it instead of it
/// running on, alive to its probes, without that part.
#[derive(Debug, Clone)]
pub struct Critical {
    shutdown: CancellationToken,
    failure: Arc<OnceLock<String>>,
}

impl Critical {
    pub fn new(shutdown: CancellationToken) -> Self {
        Self { shutdown, failure: Arc::default() }
    }

    /// `task`, run as a task of its own on the runtime that runs the returned future, and watched.
    pub fn watch(
        &self,
        name: &'static str,
        task: impl Future<Output = ()> + Send + 'static,
    ) -> impl Future<Output = ()> + Send + 'static {
        let critical = self.clone();
        async move { critical.report(name, tokio::spawn(task)).await }
    }

    /// Waits for a task already spawned, and reports it if it failed.
    pub fn watch_handle(&self, name: &'static str, task: JoinHandle<()>) -> impl Future<Output = ()> + Send + 'static {
        self.clone().report(name, task)
    }

    /// Watches a task already spawned, which the caller stops with the handle returned (an abort is no failure).
    pub fn watch_spawned(&self, name: &'static str, task: JoinHandle<()>) -> AbortHandle {
        let abort = task.abort_handle();
        tokio::spawn(self.watch_handle(name, task));
        abort
    }

    async fn report(self, name: &'static str, task: JoinHandle<()>) {
        if let Err(error) = task.await
            && error.is_panic()
        {
            self.failed(format!("{name} failed: {error}"));
        }
    }

    /// Starts the shutdown for `reason`; the first reason is the one kept.
    pub fn failed(&self, reason: String) {
        tracing::error!(%reason, "a part the service cannot run without failed; stopping");
        let _ = self.failure.set(reason);
        self.shutdown.cancel();
    }

    /// Why the service stopped, if a part failed.
    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }
}

/// A budget whose deadline is fixed by the first call to [`Budget::deadline`]; clones share it.
#[derive(Debug, Clone)]
pub struct Budget {
    total: Duration,
    deadline: Arc<OnceLock<Instant>>,
    /// How long before the shared deadline this view of the budget ends (see [`Budget::holding_back`]).
    held_back: Duration,
}

impl Budget {
    pub fn new(total: Duration) -> Self {
        Self { total, deadline: Arc::new(OnceLock::new()), held_back: Duration::ZERO }
    }

    /// The same budget for a step that must end `reserve` (at most half the budget) before the shared deadline, so
    /// the steps after it keep that much: its deadline, `before` and `remaining` all count to the earlier end.
    pub fn holding_back(&self, reserve: Duration) -> Self {
        Self { held_back: self.held_back + reserve.min(self.total / 2), ..self.clone() }
    }

    /// The whole budget.
    pub fn total(&self) -> Duration {
        self.total
    }

    /// The deadline: the first call (when shutdown starts) fixes it at now + the budget; later calls return it.
    pub fn deadline(&self) -> Instant {
        let shared = *self.deadline.get_or_init(|| Instant::now() + self.total);
        shared.checked_sub(self.held_back).unwrap_or(shared)
    }

    /// What is left of the budget.
    pub fn remaining(&self) -> Duration {
        self.deadline().saturating_duration_since(Instant::now())
    }

    /// `reserve` before the deadline, bounded by half the budget (so a short budget still leaves time to wait) and
    /// never before now: steps that must run last (a final commit) keep their share of the budget.
    pub fn before(&self, reserve: Duration) -> Instant {
        let reserve = reserve.min(self.total / 2);
        self.deadline().checked_sub(reserve).unwrap_or_else(Instant::now).max(Instant::now())
    }
}

/// Cancels `shutdown` at the first SIGTERM or SIGINT, which starts the ordered stop; returns at the second one, with
/// the status the process should exit with at once: 128 + the signal's number, as a shell reports a process that
/// signal ended (143 for SIGTERM, 130 for SIGINT). An operator who signals again (Ctrl-C twice) wants out now, not at
/// the end of SHUTDOWN_TIMEOUT.
///
/// # Errors
/// The signal handlers cannot be installed.
pub async fn on_signals(shutdown: CancellationToken) -> std::io::Result<u8> {
    use tokio::signal::unix::{Signal, SignalKind, signal};
    async fn next(term: &mut Signal, int: &mut Signal) -> (&'static str, u8) {
        tokio::select! {
            _ = term.recv() => ("SIGTERM", 128 + 15),
            _ = int.recv() => ("SIGINT", 128 + 2),
        }
    }
    let (mut term, mut int) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
    let (name, _) = next(&mut term, &mut int).await;
    tracing::info!("{name}: shutting down (a second signal exits at once)");
    shutdown.cancel();
    let (name, status) = next(&mut term, &mut int).await;
    tracing::warn!(status, "{name} again: exiting at once, without finishing the ordered stop");
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_deadline_for_every_step() {
        let budget = Budget::new(Duration::from_secs(10));
        let step = budget.clone();
        let deadline = budget.deadline();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(step.deadline(), deadline, "fixed once, shared by clones");
        assert!((Duration::from_secs(9)..Duration::from_secs(10)).contains(&step.remaining()));
        assert_eq!(step.before(Duration::from_secs(2)), deadline - Duration::from_secs(2));
        let short = Budget::new(Duration::from_secs(2));
        assert_eq!(short.before(Duration::from_secs(2)), short.deadline() - Duration::from_secs(1), "half at most");
        let spent = Budget::new(Duration::ZERO);
        assert!(spent.before(Duration::from_secs(2)) >= spent.deadline());
        assert_eq!(spent.remaining(), Duration::ZERO);
    }

    #[test]
    fn a_step_holding_back_ends_first_and_leaves_the_rest() {
        let budget = Budget::new(Duration::from_secs(10));
        let first = budget.holding_back(Duration::from_secs(3));
        let deadline = first.deadline();
        assert_eq!(budget.deadline(), deadline + Duration::from_secs(3), "one shared deadline, fixed by either view");
        assert_eq!(first.before(Duration::from_secs(2)), deadline - Duration::from_secs(2));
        assert!(first.remaining() <= Duration::from_secs(7));
        let greedy = Budget::new(Duration::from_secs(4)).holding_back(Duration::from_secs(60));
        assert_eq!(greedy.total() / 2, Duration::from_secs(2));
        assert!(greedy.remaining() <= Duration::from_secs(2), "holds back half the budget at most");
    }

    #[tokio::test]
    async fn a_critical_task_that_fails_starts_the_shutdown_and_says_why() {
        let shutdown = CancellationToken::new();
        let critical = Critical::new(shutdown.clone());
        critical.watch("ends when asked", async {}).await;
        assert!(!shutdown.is_cancelled() && critical.failure().is_none());
        critical.watch("the subscription", async { panic!("a bug") }).await;
        assert!(shutdown.is_cancelled());
        let failure = critical.failure().expect("a failure");
        assert!(failure.contains("the subscription") && failure.contains("a bug"), "{failure}");
        critical.failed("later".into());
        assert_eq!(critical.failure(), Some(failure), "the first reason is kept");
    }

    #[tokio::test]
    async fn a_spawned_task_is_watched_and_its_abort_is_no_failure() {
        let shutdown = CancellationToken::new();
        let critical = Critical::new(shutdown.clone());
        let abort = critical.watch_spawned("session control", tokio::spawn(std::future::pending()));
        abort.abort();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!shutdown.is_cancelled(), "stopped by its owner");
        critical.watch_spawned("session control", tokio::spawn(async { panic!("a bug") }));
        tokio::time::timeout(Duration::from_secs(5), shutdown.cancelled()).await.expect("the shutdown starts");
        assert!(critical.failure().is_some_and(|f| f.contains("session control")));
    }
}
