//! V2K plain subscription: `+/attrs` on one persistent session for the whole cluster, connected only by the holder
//! of a Kafka lease; the others stand by. Handover keeps the session, so the next holder drains VerneMQ's queue.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::V2k;
use super::subscription::{self, SubscriptionSettings};
use crate::kafka::lease::{Lease, LeaseSettings};
use crate::policy::Policy;
use crate::readiness::ReadyFlag;

/// At most this long, after the lease is revoked, for messages in hand to be acknowledged by Kafka before the
/// session is disconnected (the rest is redelivered to the next holder: duplicates, not losses).
pub(crate) const HANDOVER_DRAIN: Duration = Duration::from_secs(5);
/// How long a revocation waits for the session to be disconnected: the drain and the DISCONNECT (2 s at most).
pub(crate) const RELEASE_TIMEOUT: Duration = Duration::from_secs(8);

#[derive(Debug, Clone)]
pub struct PlainSettings {
    pub lease: LeaseSettings,
    /// `max_online_messages` / `max_offline_messages` for the session (given by the policy at register).
    pub max_queued: u32,
}

/// Readiness of the plain subscription. `mqtt` is up (with a note) on a standby: a standby is ready. `lease` says
/// which role this instance has, and is down only while the lease topic is missing.
#[derive(Debug, Clone)]
pub(crate) struct ReadyFlags {
    pub mqtt: ReadyFlag,
    pub lease: ReadyFlag,
}

/// Stands by until this instance holds the lease, then runs the subscription until the lease is revoked or
/// `shutdown`.
pub(crate) async fn run(
    settings: SubscriptionSettings,
    plain: PlainSettings,
    v2k: Arc<V2k>,
    policy: Arc<Policy>,
    probes: ReadyFlags,
    shutdown: CancellationToken,
    drain: Duration,
) {
    let ReadyFlags { mqtt: mqtt_probe, lease: lease_probe } = probes;
    let lease = match Lease::start(&plain.lease, lease_probe.clone()) {
        Ok(lease) => lease,
        Err(e) => {
            tracing::error!(error = %e, "V2K plain subscription cannot start");
            lease_probe.down(e.to_string());
            return;
        }
    };
    let mut held = lease.held();
    let drain = drain.min(HANDOVER_DRAIN);
    loop {
        mqtt_probe.up_with("standby: another instance holds the lease and the subscription");
        note(&lease_probe, "standby", &plain.lease);
        tokio::select! {
            () = shutdown.cancelled() => break,
            open = async { held.wait_for(|held| *held).await.is_ok() } => if !open { break },
        }
        note(&lease_probe, "held", &plain.lease);
        mqtt_probe.down("lease acquired: connecting the subscription");
        lease.set_in_use(true);
        let stop = shutdown.child_token();
        let mut running = tokio::spawn(subscription::run(
            settings.clone(),
            v2k.clone(),
            policy.clone(),
            mqtt_probe.clone(),
            stop.clone(),
            drain,
        ));
        tokio::select! {
            _ = &mut running => if !stop.is_cancelled() {
                // The subscription could not start (its settings): let another instance hold the lease.
                mqtt_probe.down("the plain subscription cannot start; lease released");
                lease.close().await;
                return;
            },
            _ = async { held.wait_for(|held| !*held).await.is_ok() } => {
                tracing::info!("V2K lease revoked: disconnecting the plain subscription");
                stop.cancel();
                let _ = running.await;
            }
        }
        // Disconnected: a revocation waiting in the lease's callback may now hand the lease over.
        lease.set_in_use(false);
        if shutdown.is_cancelled() {
            break;
        }
    }
    lease.close().await;
    mqtt_probe.set(false);
}

fn note(probe: &ReadyFlag, role: &str, lease: &LeaseSettings) {
    if probe.is_up() || probe.reason().is_none() {
        probe.up_with(format!("{role}: lease {} in group {}", lease.topic, lease.group_id));
    }
}
