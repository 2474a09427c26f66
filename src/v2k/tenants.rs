//! Per-tenant bound on records waiting for Kafka, so that one tenant's backlog never takes the others' room.
//! A sharded map of small per-tenant states; a message over the bound is refused (webhook modes) or waits its turn.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard, RwLock};

/// Shards of the tenant map: tenants on different shards never contend for one lock.
const SHARDS: usize = 16;

/// What a waiting message does once it has room: queue its record, or hand the slot to its task.
pub(super) type OnRoom = Box<dyn FnOnce(Slot) + Send>;

#[derive(Default)]
struct State {
    in_flight: usize,
    /// Messages waiting for room, in arrival order, run in that order as room is given back. Whoever gives room back
    /// runs them there (mostly librdkafka's polling thread, in a delivery report), so a waiting message costs no task
    /// wake-up of its own before its record is queued.
    queue: VecDeque<OnRoom>,
    /// A dispatch is handing room to the queue (with the lock released while each runs): arrivals queue behind it
    /// instead of overtaking, and room given back meanwhile is left to it.
    dispatching: bool,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("in_flight", &self.in_flight)
            .field("waiting", &self.queue.len())
            .field("dispatching", &self.dispatching)
            .finish()
    }
}

#[derive(Debug)]
struct Tenant {
    bound: usize,
    state: Mutex<State>,
}

impl Tenant {
    /// Hands the room there is to the waiting messages, in order, one dispatch at a time per tenant. Each runs with the
    /// lock released: it queues a record, which may give its slot straight back (that drop then only counts).
    fn dispatch<'a>(self: &'a Arc<Self>, mut state: MutexGuard<'a, State>) {
        if state.dispatching {
            return;
        }
        state.dispatching = true;
        while state.in_flight < self.bound {
            let Some(on_room) = state.queue.pop_front() else { break };
            state.in_flight += 1;
            drop(state);
            on_room(Slot(self.clone()));
            state = self.state.lock();
        }
        state.dispatching = false;
    }
}

/// One record of a tenant waiting for Kafka; the room is given back when it is dropped.
#[derive(Debug)]
pub(super) struct Slot(Arc<Tenant>);

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = self.0.state.lock();
        state.in_flight = state.in_flight.saturating_sub(1);
        self.0.dispatch(state);
    }
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

    /// A stable number for the tenant within this process (the subscription's acknowledgement lane).
    pub(super) fn lane(&self, tenant: &str) -> u64 {
        self.hasher.hash_one(tenant)
    }

    fn tenant(&self, name: &str) -> Arc<Tenant> {
        let shard = &self.shards[(self.lane(name) as usize) % SHARDS];
        if let Some(tenant) = shard.read().get(name) {
            return tenant.clone();
        }
        let bound = self.bound;
        shard
            .write()
            .entry(Box::from(name))
            .or_insert_with(|| Arc::new(Tenant { bound, state: Mutex::default() }))
            .clone()
    }

    /// Forgets tenants with nothing in flight and nothing waiting, so that the map holds the busy tenants only (with
    /// the tenant check off, any name a device uses would otherwise stay forever). Returns how many are left.
    pub(super) fn sweep(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| {
                let mut shard = shard.write();
                // Under the write lock nobody can take a new reference from the map; a count of one means no slot of
                // the tenant exists, so nothing waits either (messages wait only while the tenant is at its bound, or
                // while a dispatch, which holds a reference, runs): a later message starts it afresh.
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

    /// Subscription mode: a slot if the tenant is below its bound and none of its messages waits (otherwise the
    /// message goes behind them with `when_room`).
    pub(super) fn try_acquire(&self, name: &str) -> Option<Slot> {
        let tenant = self.tenant(name);
        let mut state = tenant.state.lock();
        if !state.queue.is_empty() || state.dispatching || state.in_flight >= self.bound {
            return None;
        }
        state.in_flight += 1;
        drop(state);
        Some(Slot(tenant))
    }

    /// Subscription mode: runs `on_room` with a slot of the tenant once every message that waited before it had its
    /// turn: here and now when there is room, else where room is given back.
    pub(super) fn when_room(&self, name: &str, on_room: OnRoom) {
        let tenant = self.tenant(name);
        let mut state = tenant.state.lock();
        state.queue.push_back(on_room);
        tenant.dispatch(state);
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
        assert!(a1.is_some() && a2.is_some());
        assert!(tenants.try_acquire("a").is_none(), "a is full");
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
        let first = tenants.try_acquire("queued").expect("room");
        let _second = tenants.try_acquire("queued").expect("room");
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ran.clone();
        tenants.when_room("queued", Box::new(move |_slot| flag.store(true, std::sync::atomic::Ordering::SeqCst)));
        assert_eq!(tenants.sweep(), 2, "busy and queued stay");
        // The kept state is the live one: the bound still holds for both, and the waiting message still gets its turn.
        let _busy_second = tenants.try_slot("busy").expect("room for a second");
        assert!(tenants.try_slot("busy").is_none(), "busy is at its bound of 2");
        assert!(tenants.try_slot("queued").is_none());
        drop((busy, _busy_second));
        assert_eq!(tenants.sweep(), 1, "queued still holds two slots");
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
        drop(first);
        assert!(ran.load(std::sync::atomic::Ordering::SeqCst), "the waiting message ran when room was given back");
    }

    /// A waiting message that records `n` and keeps its slot in `slots` (or gives it straight back).
    fn recorder(order: &Arc<Mutex<Vec<u64>>>, slots: Option<&Arc<Mutex<Vec<Slot>>>>, n: u64) -> OnRoom {
        let (order, slots) = (order.clone(), slots.cloned());
        Box::new(move |slot| {
            order.lock().push(n);
            if let Some(slots) = slots {
                slots.lock().push(slot);
            }
        })
    }

    #[test]
    fn waiting_messages_run_in_arrival_order_as_room_is_given_back() {
        let tenants = Tenants::new(2);
        let order = Arc::new(Mutex::new(Vec::new()));
        let slots = Arc::new(Mutex::new(Vec::new()));
        let held = [tenants.try_acquire("a").unwrap(), tenants.try_acquire("a").unwrap()];
        for n in 0..5 {
            tenants.when_room("a", recorder(&order, Some(&slots), n));
        }
        assert!(order.lock().is_empty(), "no room yet");
        assert!(tenants.try_acquire("a").is_none(), "an arrival goes behind the waiting ones");
        let [first, second] = held;
        drop(first);
        assert_eq!(*order.lock(), vec![0], "one slot given back: one message runs");
        drop(second);
        assert_eq!(*order.lock(), vec![0, 1]);
        // A message runs where room is given back: the slots are dropped with the test's lock released, as the
        // message takes it.
        let take = || std::mem::take(&mut *slots.lock());
        let freed = take();
        drop(freed);
        assert_eq!(*order.lock(), vec![0, 1, 2, 3]);
        let freed = take();
        drop(freed);
        assert_eq!(*order.lock(), vec![0, 1, 2, 3, 4]);
        let freed = take();
        drop(freed);
        assert_eq!(tenants.in_flight("a"), 0);
        assert!(tenants.try_acquire("a").is_some(), "nothing waits any more");
    }

    #[test]
    fn a_message_that_gives_its_slot_straight_back_lets_the_next_one_run() {
        let tenants = Tenants::new(1);
        let order = Arc::new(Mutex::new(Vec::new()));
        let held = tenants.try_acquire("a").unwrap();
        for n in 0..3 {
            // As a record Kafka refuses at once: its slot is dropped inside the dispatch.
            tenants.when_room("a", recorder(&order, None, n));
        }
        drop(held);
        assert_eq!(*order.lock(), vec![0, 1, 2]);
        assert_eq!(tenants.in_flight("a"), 0);
    }

    #[test]
    fn arrivals_during_a_dispatch_go_behind_it() {
        let tenants = Arc::new(Tenants::new(2));
        let order = Arc::new(Mutex::new(Vec::new()));
        let (held, other) = (tenants.try_acquire("a").unwrap(), tenants.try_acquire("a").unwrap());
        let (inner, log) = (tenants.clone(), order.clone());
        tenants.when_room(
            "a",
            Box::new(move |slot| {
                // Room given back while this message runs (its record not queued yet), and an arrival then: the
                // arrival must not take that room and overtake this message.
                drop(other);
                assert!(inner.try_acquire("a").is_none(), "no room taken past a running dispatch");
                inner.when_room("a", recorder(&log, None, 1));
                log.lock().push(0);
                drop(slot);
            }),
        );
        drop(held);
        assert_eq!(*order.lock(), vec![0, 1]);
        assert_eq!(tenants.in_flight("a"), 0);
    }

    #[test]
    fn order_holds_while_room_is_given_back_on_other_threads() {
        // Arrivals on this thread, slots given back on two others at random moments, as delivery reports would.
        let tenants = Arc::new(Tenants::new(4));
        let order = Arc::new(Mutex::new(Vec::new()));
        let (give_back, slots) = std::sync::mpsc::channel::<Slot>();
        let slots = Arc::new(Mutex::new(slots));
        let releasers: Vec<_> = (0..2)
            .map(|_| {
                let slots = slots.clone();
                std::thread::spawn(move || {
                    loop {
                        let next = slots.lock().recv();
                        let Ok(slot) = next else { break };
                        std::thread::yield_now();
                        drop(slot);
                    }
                })
            })
            .collect();
        const MESSAGES: u64 = 20_000;
        for n in 0..MESSAGES {
            match tenants.try_acquire("a") {
                Some(slot) => {
                    order.lock().push(n);
                    give_back.send(slot).unwrap();
                }
                None => {
                    let (order, give_back) = (order.clone(), give_back.clone());
                    tenants.when_room(
                        "a",
                        Box::new(move |slot| {
                            order.lock().push(n);
                            give_back.send(slot).unwrap();
                        }),
                    );
                }
            }
        }
        // Every message runs once the releasers have handed all room back.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while order.lock().len() < MESSAGES as usize {
            assert!(std::time::Instant::now() < deadline, "{} of {MESSAGES} ran", order.lock().len());
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        drop(give_back);
        let order = std::mem::take(&mut *order.lock());
        assert_eq!(order, (0..MESSAGES).collect::<Vec<_>>(), "the order of arrival");
        // The releasers stop once the last sender is gone and every slot is given back.
        for releaser in releasers {
            let _ = releaser.join();
        }
    }
}
