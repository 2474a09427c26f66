//! The node-local session table: one compact entry per device connection, keyed by VerneMQ's session key
//! (mountpoint, client id after the client-id policy's rewrite). Pure data structure: the caller passes the clock.
//!
//! A key holds up to two entries, because `auth_on_register` comes before VerneMQ has decided anything: the
//! connection VerneMQ registered last under it (`on_register`), and one admitted since, which takes the registered
//! one's place only when it registers in turn. A connection that is admitted but never registers (VerneMQ refused it
//! further on, or its client left during the hook) so cannot hide the connection it would have taken over.
//!
//! Gone hooks (`on_client_gone`, `on_client_offline`) carry only the key, and on a takeover VerneMQ sends the old
//! connection's after the new one's `auth_on_register`, racing its `on_register`. A registration that takes a
//! registered entry over therefore notes that the old connection's gone hook is still owed, and that hook settles the
//! debt instead of removing the new connection's entry.
//!
//! A connection that leaves with no hook at all (`--cleanup`, a lost hook call) cannot be told from one whose hook is
//! on its way, so the next registration under its key owes a gone that never comes. With lifetimes, entries expire
//! anyway. Without, nothing else ends an entry, and this is what bounds the cost: one gone owed at most, never a
//! count (see `registered`); forfeited after two sweeps, so an owing connection that stays longer is removed by its
//! own gone hook; otherwise its entry outlives it, one per key, until the key registers again or a done disconnect.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};

use hashbrown::HashTable;

/// Seconds since the registry's epoch (chosen by the owner); `NEVER` marks an entry without expiry.
pub type Secs = u32;
pub const NEVER: Secs = Secs::MAX;

/// Issuer names (DER) mapped to small ids, so that each entry stores 2 bytes instead of a name. There are as many
/// issuers as CAs VerneMQ trusts; the bound only guards against a misconfiguration growing it without end.
#[derive(Debug, Default)]
pub struct Issuers {
    ids: HashMap<Box<[u8]>, u16>,
}

/// Issuer id 0 means "no certificate".
pub const NO_ISSUER: u16 = 0;
const MAX_ISSUERS: usize = u16::MAX as usize;

impl Issuers {
    /// The id of `issuer_der`, interning it; `None` once the bound is reached.
    pub fn intern(&mut self, issuer_der: &[u8]) -> Option<u16> {
        if let Some(id) = self.ids.get(issuer_der) {
            return Some(*id);
        }
        if self.ids.len() >= MAX_ISSUERS {
            return None;
        }
        let id = u16::try_from(self.ids.len() + 1).ok()?;
        self.ids.insert(issuer_der.into(), id);
        Some(id)
    }

    /// The id of an issuer already seen, without interning.
    #[cfg(test)]
    pub fn get(&self, issuer_der: &[u8]) -> Option<u16> {
        self.ids.get(issuer_der).copied()
    }
}

/// `Entry::flags`: VerneMQ registered this connection (`on_register`). Without it the entry is an admitted one:
/// `auth_on_register` let it in, and VerneMQ may still refuse it or lose its client before registering it.
const REGISTERED: u8 = 1 << 0;
/// The device name is the start of the client id (the `scoped`, `equal` and `prefix` policies), so the blob does not
/// repeat it.
const DEVICE_IN_CLIENT_ID: u8 = 1 << 1;
/// This connection took a registered one over whose gone hook has not come yet: the next gone hook under the key is
/// that one's.
const OWES_GONE: u8 = 1 << 2;
/// A sweep saw `OWES_GONE` set; the next sweep forfeits it.
const OWED_AT_LAST_SWEEP: u8 = 1 << 3;

/// One connection, as recorded. Layout of `blob`: `mountpoint \0 client_id`, then the device name unless it is the
/// start of the client id, then the certificate serial (big-endian bytes). 32 bytes inline plus one allocation: see
/// the `sessions` bench.
#[derive(Debug)]
struct Entry {
    blob: Box<[u8]>,
    key_len: u32,
    expires: Secs,
    generation: u32,
    issuer: u16,
    device_len: u8,
    flags: u8,
}

const _: () = assert!(std::mem::size_of::<Entry>() == 32, "the per-session figure in README assumes it");

impl Entry {
    fn key(&self) -> &[u8] {
        &self.blob[..self.key_len as usize]
    }

    fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    fn is_registered(&self, registered: bool) -> bool {
        self.has(REGISTERED) == registered
    }

    fn view(&self) -> Session<'_> {
        let key = self.key();
        let split = key.iter().position(|&b| b == 0).unwrap_or(key.len());
        // The blob was built from two `&str` and a NUL, so both halves are valid UTF-8.
        let mountpoint = std::str::from_utf8(&key[..split]).unwrap_or_default();
        let client_id = std::str::from_utf8(key.get(split + 1..).unwrap_or_default()).unwrap_or_default();
        let device_len = usize::from(self.device_len);
        let (device, rest_start) = if self.has(DEVICE_IN_CLIENT_ID) {
            (client_id.get(..device_len).unwrap_or_default(), key.len())
        } else {
            let end = key.len() + device_len;
            (std::str::from_utf8(&self.blob[key.len()..end]).unwrap_or_default(), end)
        };
        Session {
            recorded: NewSession {
                mountpoint,
                client_id,
                device,
                issuer: self.issuer,
                serial: &self.blob[rest_start..],
                expires: self.expires,
            },
            generation: self.generation,
        }
    }
}

/// A session to record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewSession<'a> {
    pub mountpoint: &'a str,
    pub client_id: &'a str,
    /// `tenant:device`.
    pub device: &'a str,
    /// `NO_ISSUER` when the session has no forwarded certificate.
    pub issuer: u16,
    /// Certificate serial, big-endian without leading zeros; empty without certificate.
    pub serial: &'a [u8],
    pub expires: Secs,
}

/// A recorded session, borrowed from the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session<'a> {
    /// What was recorded.
    pub recorded: NewSession<'a>,
    /// Which connection under this key: each admitted connection gets a new one.
    pub generation: u32,
}

/// Why a session was not recorded (logged and counted by the caller; the connection itself is not refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("the mountpoint contains a NUL byte")]
    Mountpoint,
    #[error("the device name is longer than 255 bytes")]
    Device,
    #[error("the session key is longer than 4 GiB")]
    Key,
}

/// What an `on_register` under a key did to the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    /// The admitted entry is now the registered one; no registered connection was left under the key.
    Confirmed,
    /// As `Confirmed`, but it took a registered connection over, whose gone hook is now owed.
    TookOver,
    /// No admitted entry (the `auth_on_register` reply came from VerneMQ's cache, or was not recorded): the
    /// registered entry stays, standing for the new connection, and owes the gone hook of the one it took over.
    Unadmitted,
    /// Nothing recorded under the key.
    Unknown,
}

/// What a gone hook (`on_client_gone`, `on_client_offline`) under a key did to the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gone {
    /// The registered entry is gone.
    Removed,
    /// It was the gone hook of the connection the registered one took over: the entry stays.
    Settled,
    /// No registered entry under the key (admitted entries are not VerneMQ's yet, so not what went).
    Unknown,
}

/// How many generations `later` is after `earlier`, or `None` when it is before: generations wrap, so "after" is a
/// wrapping distance in the lower half of the range.
pub(super) fn generations_apart(later: u32, earlier: u32) -> Option<u32> {
    Some(later.wrapping_sub(earlier)).filter(|&apart| apart <= i32::MAX as u32)
}

fn encode_key(mountpoint: &str, client_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(mountpoint.len() + 1 + client_id.len());
    key.extend_from_slice(mountpoint.as_bytes());
    key.push(0);
    key.extend_from_slice(client_id.as_bytes());
    key
}

/// The sessions of one node.
#[derive(Debug, Default)]
pub struct Registry {
    table: HashTable<Entry>,
    hasher: RandomState,
    next_generation: u32,
}

impl Registry {
    fn hash(&self, bytes: &[u8]) -> u64 {
        self.hasher.hash_one(bytes)
    }

    fn find(&self, key: &[u8], registered: bool) -> Option<&Entry> {
        self.table.find(self.hash(key), |e| e.key() == key && e.is_registered(registered))
    }

    fn find_mut(&mut self, key: &[u8], registered: bool) -> Option<&mut Entry> {
        let hash = self.hash(key);
        self.table.find_mut(hash, |e| e.key() == key && e.is_registered(registered))
    }

    /// Removes the registered or the admitted entry under `key`; whether there was one.
    fn remove(&mut self, key: &[u8], registered: bool) -> bool {
        let hash = self.hash(key);
        self.table.find_entry(hash, |e| e.key() == key && e.is_registered(registered)).map(|e| e.remove()).is_ok()
    }

    /// Records a connection `auth_on_register` let in, and its generation. It replaces an earlier admitted entry under
    /// the key (the later CONNECT is the one VerneMQ goes on with), but not the registered one, which it replaces only
    /// once it registers in turn (`registered`).
    ///
    /// # Errors
    /// A key that cannot be encoded; nothing is recorded then.
    pub fn admit(&mut self, session: NewSession<'_>) -> Result<u32, RecordError> {
        if session.mountpoint.as_bytes().contains(&0) {
            return Err(RecordError::Mountpoint);
        }
        let device_len = u8::try_from(session.device.len()).map_err(|_| RecordError::Device)?;
        let mut blob = encode_key(session.mountpoint, session.client_id);
        let key_len = u32::try_from(blob.len()).map_err(|_| RecordError::Key)?;
        let device_in_client_id = session.client_id.starts_with(session.device);
        if !device_in_client_id {
            blob.extend_from_slice(session.device.as_bytes());
        }
        blob.extend_from_slice(session.serial);
        let generation = self.next_generation;
        self.next_generation = generation.wrapping_add(1);
        let entry = Entry {
            blob: blob.into_boxed_slice(),
            key_len,
            expires: session.expires,
            generation,
            issuer: session.issuer,
            device_len,
            flags: if device_in_client_id { DEVICE_IN_CLIENT_ID } else { 0 },
        };
        let hash = self.hash(entry.key());
        let hasher = &self.hasher;
        let admitted_before = |e: &Entry| e.key() == entry.key() && !e.has(REGISTERED);
        match self.table.entry(hash, admitted_before, |e| hasher.hash_one(e.key())) {
            hashbrown::hash_table::Entry::Occupied(mut occupied) => *occupied.get_mut() = entry,
            hashbrown::hash_table::Entry::Vacant(vacant) => {
                vacant.insert(entry);
            }
        }
        Ok(generation)
    }

    /// `on_register` under a key: the admitted entry becomes the registered one. Expiry becomes `expires` if given
    /// (without lifetimes, a registered connection stays until it goes), else stays.
    ///
    /// One owed gone at most, not a count: VerneMQ runs the gone hook of a taken-over connection in that
    /// connection's queue process and does not complete the next registration under the key before the hook call
    /// has returned (`vmq_queue` replies to the waiting registration, then calls the hook, and the next takeover
    /// waits on the same queue or, for a clean session, on the old queue's exit). So when a connection registers, the
    /// gone hooks of connections before the one it takes over have been delivered; one still owed then was lost.
    pub fn registered(&mut self, mountpoint: &str, client_id: &str, now: Secs, expires: Option<Secs>) -> Registration {
        let key = encode_key(mountpoint, client_id);
        let live = self.find(&key, true).is_some_and(|e| e.expires > now);
        if self.find(&key, false).is_none() {
            return match self.find_mut(&key, true).filter(|_| live) {
                Some(entry) => {
                    entry.flags = (entry.flags & !OWED_AT_LAST_SWEEP) | OWES_GONE;
                    Registration::Unadmitted
                }
                None => Registration::Unknown,
            };
        }
        self.remove(&key, true);
        let Some(entry) = self.find_mut(&key, false) else { return Registration::Unknown };
        entry.flags = (entry.flags & DEVICE_IN_CLIENT_ID) | REGISTERED | if live { OWES_GONE } else { 0 };
        if let Some(expires) = expires {
            entry.expires = expires;
        }
        if live { Registration::TookOver } else { Registration::Confirmed }
    }

    /// A gone hook under a key: the registered connection went, unless this is the owed gone of the one it took over.
    pub fn gone(&mut self, mountpoint: &str, client_id: &str, now: Secs) -> Gone {
        let key = encode_key(mountpoint, client_id);
        let Some(entry) = self.find_mut(&key, true) else { return Gone::Unknown };
        if entry.expires > now && entry.has(OWES_GONE) {
            entry.flags &= !(OWES_GONE | OWED_AT_LAST_SWEEP);
            return Gone::Settled;
        }
        self.remove(&key, true);
        Gone::Removed
    }

    /// Forgets a session after a done disconnect, only if it is still the connection `generation` names: a disconnect
    /// that completes after the device reconnected under the same key must not forget the new connection. Nor during a
    /// takeover (two entries under the key): the call closed whichever connection VerneMQ held, and the hooks tell
    /// which (its gone hook, the newer one's `on_register`). Whether it was removed.
    pub fn remove_generation(&mut self, mountpoint: &str, client_id: &str, generation: u32) -> bool {
        let key = encode_key(mountpoint, client_id);
        if self.find(&key, true).is_some() && self.find(&key, false).is_some() {
            return false;
        }
        let hash = self.hash(&key);
        self.table
            .find_entry(hash, |e| e.key() == key.as_slice() && e.generation == generation)
            .map(|e| e.remove())
            .is_ok()
    }

    /// The live session under this key: the registered connection, else the admitted one.
    pub fn get(&self, mountpoint: &str, client_id: &str, now: Secs) -> Option<Session<'_>> {
        let key = encode_key(mountpoint, client_id);
        [true, false]
            .into_iter()
            .find_map(|registered| self.find(&key, registered).filter(|e| e.expires > now))
            .map(Entry::view)
    }

    /// The live connection under this key that a disconnect queued for `generation` still concerns: that one, else
    /// one from before it still there (an admitted connection that never registered leaves the registered one it
    /// would have taken over). A later one is a reconnect since, which is not what the disconnect was queued for.
    pub fn get_for(&self, mountpoint: &str, client_id: &str, generation: u32, now: Secs) -> Option<Session<'_>> {
        let key = encode_key(mountpoint, client_id);
        [true, false]
            .into_iter()
            .filter_map(|registered| self.find(&key, registered))
            .filter(|e| e.expires > now)
            .filter_map(|e| Some((generations_apart(generation, e.generation)?, e)))
            .min_by_key(|(age, _)| *age)
            .map(|(_, e)| e.view())
    }

    /// Every live session `wanted` picks, in no particular order (a key in a takeover may give two). One pass over
    /// the table: the callers batch their questions (all revoked serials, all newly removed devices) into one
    /// predicate.
    pub fn select<T>(&self, now: Secs, mut wanted: impl FnMut(&Session<'_>) -> Option<T>) -> Vec<T> {
        self.table.iter().filter(|e| e.expires > now).filter_map(|e| wanted(&e.view())).collect()
    }

    /// Drops expired entries: VerneMQ closed those connections at the lifetime the service handed out, or never
    /// registered them. Also forfeits owed gone hooks that two sweeps have seen: a taken-over connection's hook is
    /// sent within VerneMQ's hook timeout of the takeover, so one that has not come by then was lost, and would
    /// otherwise keep the entry when its own connection goes.
    pub fn sweep(&mut self, now: Secs) -> usize {
        let before = self.table.len();
        self.table.retain(|e| e.expires > now);
        for entry in self.table.iter_mut().filter(|e| e.has(OWES_GONE)) {
            if entry.has(OWED_AT_LAST_SWEEP) {
                entry.flags &= !(OWES_GONE | OWED_AT_LAST_SWEEP);
            } else {
                entry.flags |= OWED_AT_LAST_SWEEP;
            }
        }
        before - self.table.len()
    }

    /// Entries held, expired ones not yet swept included.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session<'a>(client_id: &'a str, device: &'a str, serial: &'a [u8], expires: Secs) -> NewSession<'a> {
        NewSession { mountpoint: "", client_id, device, issuer: if serial.is_empty() { 0 } else { 1 }, serial, expires }
    }

    /// Admits `client_id` for device `t:d`; its generation.
    fn admit(r: &mut Registry, client_id: &str, expires: Secs) -> u32 {
        r.admit(session(client_id, "t:d", &[7], expires)).unwrap()
    }

    fn registered(r: &mut Registry, client_id: &str, now: Secs) -> Registration {
        r.registered("", client_id, now, Some(NEVER))
    }

    fn gone(r: &mut Registry, client_id: &str, now: Secs) -> Gone {
        r.gone("", client_id, now)
    }

    fn generation(r: &Registry, client_id: &str, now: Secs) -> Option<u32> {
        r.get("", client_id, now).map(|s| s.generation)
    }

    #[test]
    fn records_and_reads_back_every_field() {
        let mut r = Registry::default();
        r.admit(session("admin:a1998e|x", "admin:a1998e", &[0x10, 0x01], 100)).unwrap();
        r.admit(NewSession { mountpoint: "site", ..session("free-id", "admin:b", &[], NEVER) }).unwrap();
        let a = r.get("", "admin:a1998e|x", 0).unwrap().recorded;
        assert_eq!((a.device, a.serial, a.issuer, a.expires), ("admin:a1998e", &[0x10, 0x01][..], 1, 100));
        let b = r.get("site", "free-id", 0).unwrap().recorded;
        assert_eq!((b.mountpoint, b.client_id, b.device, b.serial), ("site", "free-id", "admin:b", &[][..]));
        assert!(r.get("", "free-id", 0).is_none(), "the mountpoint is part of the key");
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn a_later_connect_replaces_an_admitted_entry_but_not_the_registered_one() {
        let mut r = Registry::default();
        r.admit(session("k", "t:d", &[1], 100)).unwrap();
        let second = r.admit(session("k", "t:e", &[2], 200)).unwrap();
        assert_eq!(r.len(), 1, "the later CONNECT is the one VerneMQ goes on with");
        let s = r.get("", "k", 0).unwrap();
        assert_eq!(
            (s.recorded.device, s.recorded.serial, s.recorded.expires, s.generation),
            ("t:e", &[2][..], 200, second)
        );
        assert_eq!(r.registered("", "k", 0, None), Registration::Confirmed);
        r.admit(session("k", "t:f", &[3], 300)).unwrap();
        assert_eq!(r.len(), 2, "registered and admitted side by side");
        assert_eq!(
            r.get("", "k", 0).unwrap().recorded.device,
            "t:e",
            "the registered connection is what VerneMQ holds"
        );
    }

    #[test]
    fn registration_keeps_the_lifetime_unless_told_otherwise() {
        let mut r = Registry::default();
        r.admit(session("a", "t:a", &[], 100)).unwrap();
        r.admit(session("b", "t:b", &[], 60)).unwrap();
        assert_eq!(r.registered("", "a", 0, None), Registration::Confirmed);
        assert_eq!(r.registered("", "b", 0, Some(NEVER)), Registration::Confirmed);
        assert_eq!(r.get("", "a", 0).unwrap().recorded.expires, 100);
        assert_eq!(r.get("", "b", 0).unwrap().recorded.expires, NEVER);
    }

    #[test]
    fn expired_entries_are_invisible_then_swept() {
        let mut r = Registry::default();
        r.admit(session("a", "t:a", &[], 10)).unwrap();
        r.admit(session("b", "t:b", &[], NEVER)).unwrap();
        assert!(r.get("", "a", 9).is_some());
        assert!(r.get("", "a", 10).is_none());
        assert_eq!(r.select(10, |s| Some(s.recorded.device.to_string())), vec!["t:b".to_string()]);
        assert_eq!(r.sweep(10), 1);
        assert_eq!(r.len(), 1);
        assert_eq!(r.registered("", "b", 10, Some(20)), Registration::Confirmed);
        assert_eq!(r.registered("", "a", 10, Some(20)), Registration::Unknown);
        assert_eq!(r.sweep(20), 1);
        assert!(r.is_empty());
    }

    // The orders VerneMQ produces on a takeover (lifetimes off: registered entries never expire). A is registered
    // under key k; B connects under k. VerneMQ sends A's gone hook after B's auth_on_register, racing B's
    // on_register.

    #[test]
    fn takeover_with_the_old_gone_before_the_new_on_register() {
        let mut r = Registry::default();
        admit(&mut r, "k", 60);
        assert_eq!(registered(&mut r, "k", 0), Registration::Confirmed);
        let b = admit(&mut r, "k", 60);
        assert_eq!(gone(&mut r, "k", 0), Gone::Removed, "A's gone removes A, not the admitted B");
        assert_eq!(generation(&r, "k", 0), Some(b));
        assert_eq!(registered(&mut r, "k", 0), Registration::Confirmed);
        assert_eq!(generation(&r, "k", 1000), Some(b), "B registered, kept without lifetime");
        assert_eq!(gone(&mut r, "k", 1000), Gone::Removed, "B's own gone");
        assert!(r.is_empty());
    }

    #[test]
    fn takeover_with_the_new_on_register_before_the_old_gone() {
        let mut r = Registry::default();
        admit(&mut r, "k", 60);
        registered(&mut r, "k", 0);
        let b = admit(&mut r, "k", 60);
        assert_eq!(registered(&mut r, "k", 0), Registration::TookOver);
        assert_eq!(r.len(), 1, "A's entry gave way to B's");
        assert_eq!(gone(&mut r, "k", 0), Gone::Settled, "A's gone is the one B owes");
        assert_eq!(generation(&r, "k", 1000), Some(b));
        assert_eq!(gone(&mut r, "k", 1000), Gone::Removed, "B's own gone");
        assert!(r.is_empty());
    }

    #[test]
    fn an_admitted_connection_that_never_registers_leaves_the_registered_one_in_place() {
        let mut r = Registry::default();
        let (a, b) = registered_then_admitted(&mut r);
        assert_eq!(generation(&r, "k", 10), Some(a), "A is what VerneMQ holds");
        let mut listed = r.select(10, |s| Some(s.generation));
        listed.sort_unstable();
        assert_eq!(listed, [a, b], "both are closed by a scan: B may still register");
        assert_eq!(r.select(70, |s| Some(s.generation)), [a], "B never registered: its entry lapses");
        assert_eq!(r.sweep(70), 1);
        assert_eq!(gone(&mut r, "k", 80), Gone::Removed, "A's gone, when it goes");
        assert!(r.is_empty());
    }

    #[test]
    fn a_gone_hook_for_no_registered_connection_changes_nothing() {
        let mut r = Registry::default();
        assert_eq!(gone(&mut r, "nobody", 0), Gone::Unknown);
        admit(&mut r, "k", 60);
        assert_eq!(gone(&mut r, "k", 0), Gone::Unknown, "an admitted connection is not VerneMQ's yet");
        assert_eq!(r.len(), 1);
        registered(&mut r, "k", 0);
        assert_eq!(gone(&mut r, "other", 0), Gone::Unknown);
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn a_registration_without_admission_owes_the_gone_of_the_connection_it_took_over() {
        // VerneMQ answered auth_on_register from its cache (REGISTER_CACHE_MAX_AGE): no admit, only on_register.
        let mut r = Registry::default();
        let a = admit(&mut r, "k", 60);
        registered(&mut r, "k", 0);
        assert_eq!(registered(&mut r, "k", 0), Registration::Unadmitted);
        assert_eq!(gone(&mut r, "k", 0), Gone::Settled);
        assert_eq!(generation(&r, "k", 0), Some(a), "the entry stands for the new connection");
        assert_eq!(gone(&mut r, "k", 0), Gone::Removed);
        assert_eq!(registered(&mut r, "k", 0), Registration::Unknown);
        assert!(r.is_empty());
    }

    /// A connection registered under "k" and another one admitted since: their generations.
    fn registered_then_admitted(r: &mut Registry) -> (u32, u32) {
        let registered_one = admit(r, "k", 60);
        registered(r, "k", 0);
        (registered_one, admit(r, "k", 60))
    }

    /// A connection registered under "k", then another one registered in its place, owing the first one's gone.
    fn take_over(r: &mut Registry) {
        registered_then_admitted(r);
        assert_eq!(registered(r, "k", 0), Registration::TookOver);
    }

    #[test]
    fn one_gone_is_owed_at_most() {
        // B took A over and A's gone was lost (VerneMQ's `--cleanup` sends none); C then takes B over. Only B's gone
        // is still to come (VerneMQ does not complete a registration before the previous hook call returned), then
        // C's own.
        let mut r = Registry::default();
        take_over(&mut r);
        let c = admit(&mut r, "k", 60);
        assert_eq!(registered(&mut r, "k", 0), Registration::TookOver);
        assert_eq!(gone(&mut r, "k", 0), Gone::Settled);
        assert_eq!(generation(&r, "k", 0), Some(c));
        assert_eq!(gone(&mut r, "k", 0), Gone::Removed);
    }

    #[test]
    fn an_owed_gone_is_forfeited_after_two_sweeps() {
        // Bounds what a lost gone hook costs without lifetimes: the entry of the connection that owes it would
        // otherwise survive its own gone hook.
        let mut r = Registry::default();
        take_over(&mut r);
        r.sweep(30);
        let mut settled = Registry::default();
        admit(&mut settled, "k", 60);
        registered(&mut settled, "k", 0);
        admit(&mut settled, "k", 60);
        registered(&mut settled, "k", 0);
        settled.sweep(30);
        assert_eq!(gone(&mut settled, "k", 31), Gone::Settled, "one sweep: still owed");
        r.sweep(60);
        assert_eq!(gone(&mut r, "k", 61), Gone::Removed, "two sweeps: forfeited");
        assert!(r.is_empty());
    }

    #[test]
    fn an_expired_registered_entry_is_taken_over_without_debt() {
        // With lifetimes, VerneMQ closed it at its lifetime and sent its gone then.
        let mut r = Registry::default();
        admit(&mut r, "k", 100);
        assert_eq!(r.registered("", "k", 0, None), Registration::Confirmed);
        admit(&mut r, "k", 300);
        assert_eq!(r.registered("", "k", 150, None), Registration::Confirmed);
        assert_eq!(r.len(), 1);
        assert_eq!(gone(&mut r, "k", 160), Gone::Removed);
    }

    #[test]
    fn a_reconnect_under_the_same_key_is_not_forgotten_by_the_old_connections_removal() {
        let mut r = Registry::default();
        let old = r.admit(session("k", "t:d", &[], NEVER)).unwrap();
        let new = r.admit(session("k", "t:d", &[], NEVER)).unwrap();
        assert_ne!(old, new);
        assert_eq!(r.get("", "k", 0).unwrap().generation, new);
        assert!(!r.remove_generation("", "k", old));
        assert!(r.get("", "k", 0).is_some());
        assert!(!r.remove_generation("", "other", new), "the generation is looked up under its own key only");
        assert!(r.remove_generation("", "k", new));
        assert!(r.is_empty());
    }

    #[test]
    fn a_disconnect_concerns_its_connection_or_the_registered_one_before_it_never_a_later_one() {
        let mut r = Registry::default();
        let (a, b) = registered_then_admitted(&mut r);
        let for_target = |r: &Registry, target, now| r.get_for("", "k", target, now).map(|s| s.generation);
        assert_eq!(for_target(&r, a, 0), Some(a));
        assert_eq!(for_target(&r, b, 0), Some(b));
        assert_eq!(for_target(&r, b, 61), Some(a), "B lapsed unregistered: A is still there to close");
        registered(&mut r, "k", 0);
        assert_eq!(for_target(&r, a, 0), None, "B took A over: a reconnect since");
        assert_eq!(for_target(&r, b, 0), Some(b));
        assert_eq!(r.get_for("", "other", b, 0), None);
    }

    #[test]
    fn a_disconnect_done_during_a_takeover_leaves_both_entries_to_the_hooks() {
        // The call closed A, which VerneMQ still held; forgetting B would leave it unrecorded once it registers after
        // A's gone hook, and forgetting A would let A's gone hook remove B once B registered before it.
        let mut r = Registry::default();
        let a = admit(&mut r, "k", NEVER);
        registered(&mut r, "k", 0);
        let b = admit(&mut r, "k", NEVER);
        assert!(!r.remove_generation("", "k", b));
        assert!(!r.remove_generation("", "k", a));
        assert_eq!(r.len(), 2);
        assert_eq!(gone(&mut r, "k", 0), Gone::Removed, "A's gone, after the call");
        assert_eq!(registered(&mut r, "k", 0), Registration::Confirmed);
        assert_eq!(generation(&r, "k", 0), Some(b), "B registered: still recorded, still closable");
    }

    #[test]
    fn remove_forgets_only_that_key() {
        let mut r = Registry::default();
        for k in ["a", "b"] {
            r.admit(session(k, "t:d", &[], NEVER)).unwrap();
            r.registered("", k, 0, None);
        }
        assert_eq!(r.gone("", "a", 0), Gone::Removed);
        assert_eq!(r.gone("", "a", 0), Gone::Unknown);
        assert!(r.get("", "b", 0).is_some());
    }

    #[test]
    fn a_nul_in_the_client_id_cannot_forge_another_key() {
        let mut r = Registry::default();
        r.admit(NewSession { mountpoint: "mp", ..session("c", "t:c", &[], NEVER) }).unwrap();
        assert!(r.get("", "mp\0c", 0).is_none(), "empty mountpoint + \"mp\\0c\" is a different key");
        assert_eq!(
            r.admit(NewSession { mountpoint: "a\0b", ..session("c", "t:c", &[], NEVER) }),
            Err(RecordError::Mountpoint)
        );
        assert_eq!(r.admit(session("c", &"x".repeat(256), &[], NEVER)), Err(RecordError::Device));
    }

    #[test]
    fn issuers_are_interned() {
        let mut issuers = Issuers::default();
        let a = issuers.intern(b"CA-A").unwrap();
        assert_ne!(a, NO_ISSUER);
        assert_eq!(issuers.intern(b"CA-A"), Some(a));
        assert_ne!(issuers.intern(b"CA-B"), Some(a));
        assert_eq!(issuers.get(b"CA-B"), Some(a + 1));
        assert_eq!(issuers.get(b"CA-C"), None);
    }
}
