//! Per-tenant bound on records waiting for Kafka, so that one tenant's backlog never takes the others' room.
//! A sharded map of small per-tenant states; a message over the bound is refused (webhook modes) or waits its turn.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use tokio::sync::Notify;

const SHARDS: usize = 16;

#[derive(Debug, Default)]
struct State {
    in_flight: usize,
    /// Messages waiting for room, in arrival order; the front one is the next allowed to take a slot. Only the front
    /// is ever woken (one wake-up per freed slot, not one per waiter).
    queue: VecDeque<Arc<Notify>>,
}

#[derive(Debug, Default)]
struct Tenant {
    state: Mutex<State>,
}

/// One record of a tenant waiting for Kafka; the room is given back when it is dropped.
#[derive(Debug)]
pub(super) struct Slot(Arc<Tenant>);

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = self.0.state.lock();
        state.in_flight = state.in_flight.saturating_sub(1);
        if let Some(front) = state.queue.front() {
            front.notify_one();
        }
    }
}

/// A place in a tenant's queue of waiting messages (subscription mode).
#[derive(Debug)]
pub(super) struct Ticket {
    tenant: Arc<Tenant>,
    wake: Arc<Notify>,
}

/// The turn of a waiting message: the next message waits until this is dropped, so that the caller queues its
/// record before any later message of the tenant (per-device order in Kafka).
#[derive(Debug)]
pub(super) struct Turn {
    tenant: Arc<Tenant>,
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut state = self.tenant.state.lock();
        state.queue.pop_front();
        if let Some(next) = state.queue.front() {
            next.notify_one();
        }
    }
}

impl Ticket {
    /// Waits until every earlier waiting message of the tenant had its turn and a slot is free. A ticket whose
    /// wait is abandoned stalls the tenant's later messages: the subscription's tasks are never cancelled.
    pub(super) async fn turn(self, bound: usize) -> (Turn, Slot) {
        loop {
            {
                let mut state = self.tenant.state.lock();
                let first = state.queue.front().is_some_and(|front| Arc::ptr_eq(front, &self.wake));
                if first && state.in_flight < bound {
                    state.in_flight += 1;
                    drop(state);
                    return (Turn { tenant: self.tenant.clone() }, Slot(self.tenant.clone()));
                }
            }
            // notify_one keeps a permit when nobody waits yet: a wake-up between the check and here is not lost.
            self.wake.notified().await;
        }
    }
}

/// Room for a tenant's record, or the reason there is none.
#[derive(Debug)]
pub(super) enum Room {
    Slot(Slot),
    /// The tenant is at its bound (or messages of it already wait): refuse, or wait with the ticket.
    Full(Ticket),
}

/// Every tenant's state, sharded by tenant name.
#[derive(Debug)]
pub(super) struct Tenants {
    bound: usize,
    hasher: RandomState,
    shards: [RwLock<HashMap<Box<str>, Arc<Tenant>>>; SHARDS],
}

impl Tenants {
    pub(super) fn new(bound: usize) -> Self {
        Self { bound: bound.max(1), hasher: RandomState::new(), shards: Default::default() }
    }

    pub(super) fn bound(&self) -> usize {
        self.bound
    }

    /// A stable number for the tenant within this process (the subscription's acknowledgement lane).
    pub(super) fn lane(&self, tenant: &str) -> u64 {
        self.hasher.hash_one(tenant)
    }

    fn tenant(&self, name: &str) -> Arc<Tenant> {
        let shard = &self.shards[(self.lane(name) as usize) % SHARDS];
        if let Some(tenant) = shard.read().get(name) {
            return tenant.clone();
        }
        shard.write().entry(Box::from(name)).or_default().clone()
    }

    /// Forgets tenants with nothing in flight and nothing waiting, so that the map holds the busy tenants only (with
    /// the tenant check off, any name a device uses would otherwise stay forever). Returns how many are left.
    pub(super) fn sweep(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| {
                let mut shard = shard.write();
                // Under the write lock nobody can take a new reference from the map; a count of one means no slot,
                // ticket or turn of the tenant exists, so its state is idle and a later message starts it afresh.
                shard.retain(|_, tenant| Arc::strong_count(tenant) > 1);
                shard.len()
            })
            .sum()
    }

    /// Webhook modes, which never wait: a slot if the tenant is below its bound.
    pub(super) fn try_slot(&self, name: &str) -> Option<Slot> {
        let tenant = self.tenant(name);
        let mut state = tenant.state.lock();
        if state.in_flight >= self.bound {
            return None;
        }
        state.in_flight += 1;
        drop(state);
        Some(Slot(tenant))
    }

    /// Subscription mode: a slot if the tenant is below its bound and none of its messages waits; otherwise a
    /// ticket, which must then wait for its turn (dropping it unused would stall the tenant's later messages).
    pub(super) fn try_acquire(&self, name: &str) -> Room {
        let tenant = self.tenant(name);
        let mut state = tenant.state.lock();
        if state.queue.is_empty() && state.in_flight < self.bound {
            state.in_flight += 1;
            drop(state);
            return Room::Slot(Slot(tenant));
        }
        let wake = Arc::new(Notify::new());
        state.queue.push_back(wake.clone());
        drop(state);
        Room::Full(Ticket { tenant, wake })
    }

    /// Whether the tenant is below its bound (the gate of on_publish mode).
    pub(super) fn has_room(&self, name: &str) -> bool {
        self.tenant(name).state.lock().in_flight < self.bound
    }

    /// Records of this tenant waiting for Kafka.
    #[cfg(test)]
    pub(super) fn in_flight(&self, name: &str) -> usize {
        self.tenant(name).state.lock().in_flight
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_is_per_tenant() {
        let tenants = Tenants::new(2);
        let a1 = tenants.try_acquire("a");
        let a2 = tenants.try_acquire("a");
        assert!(matches!((&a1, &a2), (Room::Slot(_), Room::Slot(_))));
        assert!(tenants.try_slot("a").is_none(), "a is full");
        assert!(tenants.try_slot("b").is_some(), "b is not affected by a");
        assert!(!tenants.has_room("a"));
        drop(a1);
        assert!(tenants.has_room("a"));
        assert!(tenants.try_slot("a").is_some());
        drop(a2);
        assert_eq!(tenants.in_flight("a"), 0);
    }

    #[test]
    fn idle_tenants_are_forgotten_busy_ones_kept() {
        let tenants = Tenants::new(2);
        let busy = tenants.try_slot("busy").unwrap();
        for n in 0..100 {
            drop(tenants.try_slot(&format!("once{n}")));
        }
        let Room::Slot(_first) = tenants.try_acquire("queued") else { panic!() };
        let Room::Slot(_second) = tenants.try_acquire("queued") else { panic!() };
        let Room::Full(_ticket) = tenants.try_acquire("queued") else { panic!() };
        assert_eq!(tenants.sweep(), 2, "busy and queued stay");
        // The kept state is the live one: the bound still holds for both.
        let _busy_second = tenants.try_slot("busy").expect("room for a second");
        assert!(tenants.try_slot("busy").is_none(), "busy is at its bound of 2");
        assert!(tenants.try_slot("queued").is_none());
        drop((busy, _busy_second));
        assert_eq!(tenants.sweep(), 1, "queued still holds two slots");
    }

    #[tokio::test]
    async fn waiting_messages_take_their_turn_in_arrival_order() {
        let tenants = Arc::new(Tenants::new(1));
        let Room::Slot(first) = tenants.try_acquire("a") else { panic!() };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for n in 0..5 {
            let Room::Full(ticket) = tenants.try_acquire("a") else { panic!("queued behind the first") };
            let tx = tx.clone();
            // Started in reverse order: the turns must still follow the tickets.
            tasks.push(async move {
                let (turn, slot) = ticket.turn(1).await;
                tx.send(n).unwrap();
                drop(turn);
                tokio::task::yield_now().await;
                drop(slot);
            });
        }
        let handles: Vec<_> = tasks.into_iter().rev().map(tokio::spawn).collect();
        tokio::task::yield_now().await;
        drop(first);
        for h in handles {
            h.await.unwrap();
        }
        let order: Vec<i32> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(order, vec![0, 1, 2, 3, 4]);
        assert!(matches!(tenants.try_acquire("a"), Room::Slot(_)), "every turn advanced");
    }
}
