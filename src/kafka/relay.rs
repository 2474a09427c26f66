//! Delivery reports handed to their waiters in batches, from a task on the waiters' runtime: librdkafka's polling
//! thread then wakes that runtime once per burst of reports instead of once per record.

use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{Notify, oneshot};

use super::producer::{Delivery, OnDelivery, ProduceError};

type Report = Result<(), ProduceError>;

/// Every waiter woken from librdkafka's thread costs a wake-up of the runtime (a syscall, often a context switch);
/// woken from a task of that runtime it costs a push on its run queue. Reports of one produce response arrive
/// together, so they are collected here and handed over by one task, woken once for them all.
pub struct ReportRelay(Arc<Shared>);

struct Shared {
    pending: Mutex<Pending>,
    arrived: Notify,
}

#[derive(Default)]
struct Pending {
    reports: Vec<(oneshot::Sender<Report>, Report)>,
    /// The relay's task is gone (its runtime stopped): reports go straight to their waiters.
    closed: bool,
}

/// Owned by the relay's task: when the task is dropped with its runtime, what it held is handed over and the relay
/// stops collecting.
struct Handover(Arc<Shared>);

impl Drop for Handover {
    fn drop(&mut self) {
        let reports = {
            let mut pending = self.0.pending.lock();
            pending.closed = true;
            std::mem::take(&mut pending.reports)
        };
        hand_over(reports);
    }
}

fn hand_over(reports: impl IntoIterator<Item = (oneshot::Sender<Report>, Report)>) {
    for (waiter, report) in reports {
        // The waiter may have stopped waiting (its deadline passed): nothing to do then.
        drop(waiter.send(report));
    }
}

impl ReportRelay {
    /// Starts the relay's task on the current runtime (the one whose tasks wait for the reports). It runs until that
    /// runtime stops; after that, reports go to their waiters directly.
    pub fn start() -> Self {
        let relay = Self(Arc::new(Shared { pending: Mutex::default(), arrived: Notify::new() }));
        let handover = Handover(relay.0.clone());
        tokio::spawn(async move {
            let mut batch = Vec::new();
            loop {
                handover.0.arrived.notified().await;
                std::mem::swap(&mut batch, &mut handover.0.pending.lock().reports);
                hand_over(batch.drain(..));
            }
        });
        relay
    }

    /// A report callback and the delivery it completes: the callback first shows the report to `observe` where it
    /// arrives (librdkafka's polling thread: it must not block; counters do not wait for the relay), then hands it to
    /// the delivery through this relay.
    pub fn observed(&self, observe: impl FnOnce(&Report) + Send + Sync + 'static) -> (OnDelivery, Delivery) {
        let (waiter, delivery) = Delivery::waiter();
        let shared = self.0.clone();
        let on_delivery = Box::new(move |report: Report| {
            observe(&report);
            let mut pending = shared.pending.lock();
            if pending.closed {
                drop(pending);
                hand_over([(waiter, report)]);
                return;
            }
            pending.reports.push((waiter, report));
            let first = pending.reports.len() == 1;
            drop(pending);
            // A relay task busy with the previous batch holds a permit and comes back for this one.
            if first {
                shared.arrived.notify_one();
            }
        });
        (on_delivery, delivery)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn every_report_reaches_its_waiter_from_another_thread() {
        let relay = ReportRelay::start();
        let observed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut callbacks = Vec::new();
        let mut deliveries = Vec::new();
        for _ in 0..1_000 {
            let observed = observed.clone();
            let (on_delivery, delivery) = relay.observed(move |_| {
                observed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            });
            callbacks.push(on_delivery);
            deliveries.push(delivery);
        }
        // Reports arrive on a foreign thread in bursts, some while the relay is handing over the previous ones.
        let reporter = std::thread::spawn(move || {
            for (index, on_delivery) in callbacks.into_iter().enumerate() {
                let report = if index % 10 == 0 { Err(ProduceError::QueueFull) } else { Ok(()) };
                on_delivery(report);
                if index % 97 == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        });
        for (index, delivery) in deliveries.into_iter().enumerate() {
            let report = delivery.wait(Some(Duration::from_secs(10))).await;
            if index % 10 == 0 {
                assert!(matches!(report, Err(ProduceError::QueueFull)), "{index}: {report:?}");
            } else {
                assert!(report.is_ok(), "{index}: {report:?}");
            }
        }
        reporter.join().expect("reporter");
        assert_eq!(observed.load(std::sync::atomic::Ordering::Relaxed), 1_000);
    }

    #[test]
    fn reports_still_reach_their_waiters_once_the_relay_runtime_stopped() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let relay = runtime.block_on(async { ReportRelay::start() });
        let (held, held_delivery) = relay.observed(|_| {});
        // Arrives while the relay's task is not being polled: the task holds it when its runtime stops.
        held(Ok(()));
        drop(runtime);
        let (late, late_delivery) = relay.observed(|_| {});
        late(Err(ProduceError::QueueFull));
        let other = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let (held_report, late_report) = other.block_on(async {
            let limit = Some(Duration::from_secs(1));
            (held_delivery.wait(limit).await, late_delivery.wait(limit).await)
        });
        assert!(held_report.is_ok(), "{held_report:?}");
        assert!(matches!(late_report, Err(ProduceError::QueueFull)), "{late_report:?}");
    }
}
