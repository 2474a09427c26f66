//! The node-local session table: one compact entry per connected device session, keyed by VerneMQ's session key
//! (mountpoint, client id after the client-id policy's rewrite). Pure data structure: the caller passes the clock.

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

/// One session, as recorded. Layout of `blob`: `mountpoint \0 client_id`, then the device name unless it is the start
/// of the client id (the `scoped`, `equal` and `prefix` policies), then the certificate serial (big-endian bytes).
/// 32 bytes inline plus one allocation: see the `sessions` bench.
#[derive(Debug)]
struct Entry {
    blob: Box<[u8]>,
    key_len: u32,
    expires: Secs,
    generation: u32,
    issuer: u16,
    device_len: u8,
    device_in_client_id: bool,
}

const _: () = assert!(std::mem::size_of::<Entry>() == 32, "the per-session figure in README assumes it");

impl Entry {
    fn key(&self) -> &[u8] {
        &self.blob[..self.key_len as usize]
    }

    fn view(&self) -> Session<'_> {
        let key = self.key();
        let split = key.iter().position(|&b| b == 0).unwrap_or(key.len());
        // The blob was built from two `&str` and a NUL, so both halves are valid UTF-8.
        let mountpoint = std::str::from_utf8(&key[..split]).unwrap_or_default();
        let client_id = std::str::from_utf8(key.get(split + 1..).unwrap_or_default()).unwrap_or_default();
        let device_len = usize::from(self.device_len);
        let (device, rest_start) = if self.device_in_client_id {
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
    /// Which connection under this key: a reconnect under the same key gets a new one.
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
    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    /// Records a session, replacing one with the same key (a takeover: the new connection is the session now); its
    /// generation.
    ///
    /// # Errors
    /// A key that cannot be encoded; nothing is recorded then.
    pub fn insert(&mut self, session: NewSession<'_>) -> Result<u32, RecordError> {
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
            device_in_client_id,
        };
        let hash = self.hash(entry.key());
        let hasher = &self.hasher;
        match self.table.entry(hash, |e| e.key() == entry.key(), |e| hasher.hash_one(e.key())) {
            hashbrown::hash_table::Entry::Occupied(mut occupied) => *occupied.get_mut() = entry,
            hashbrown::hash_table::Entry::Vacant(vacant) => {
                vacant.insert(entry);
            }
        }
        Ok(generation)
    }

    /// Forgets a session; whether it was there.
    pub fn remove(&mut self, mountpoint: &str, client_id: &str) -> bool {
        let key = encode_key(mountpoint, client_id);
        let hash = self.hash(&key);
        self.table.find_entry(hash, |e| e.key() == key.as_slice()).map(|e| e.remove()).is_ok()
    }

    /// Forgets a session only if it is still the connection `generation` names: a disconnect that completes after the
    /// device reconnected under the same key must not forget the new connection. Whether it was removed.
    pub fn remove_generation(&mut self, mountpoint: &str, client_id: &str, generation: u32) -> bool {
        let key = encode_key(mountpoint, client_id);
        let hash = self.hash(&key);
        self.table
            .find_entry(hash, |e| e.key() == key.as_slice() && e.generation == generation)
            .map(|e| e.remove())
            .is_ok()
    }

    /// Sets a session's expiry (`on_register` confirming a connection when lifetimes are off); whether it was there.
    pub fn set_expiry(&mut self, mountpoint: &str, client_id: &str, expires: Secs) -> bool {
        let key = encode_key(mountpoint, client_id);
        let hash = self.hash(&key);
        match self.table.find_mut(hash, |e| e.key() == key.as_slice()) {
            Some(entry) => {
                entry.expires = expires;
                true
            }
            None => false,
        }
    }

    /// The live session under this key.
    pub fn get(&self, mountpoint: &str, client_id: &str, now: Secs) -> Option<Session<'_>> {
        let key = encode_key(mountpoint, client_id);
        self.table.find(self.hash(&key), |e| e.key() == key.as_slice()).filter(|e| e.expires > now).map(Entry::view)
    }

    /// Every live session `wanted` picks, in no particular order. One pass over the table: the callers batch their
    /// questions (all revoked serials, all newly removed devices) into one predicate.
    pub fn select<T>(&self, now: Secs, mut wanted: impl FnMut(&Session<'_>) -> Option<T>) -> Vec<T> {
        self.table.iter().filter(|e| e.expires > now).filter_map(|e| wanted(&e.view())).collect()
    }

    /// Drops expired entries: VerneMQ closed those connections at the lifetime the service handed out.
    pub fn sweep(&mut self, now: Secs) -> usize {
        let before = self.table.len();
        self.table.retain(|e| e.expires > now);
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

    #[test]
    fn records_and_reads_back_every_field() {
        let mut r = Registry::default();
        r.insert(session("admin:a1998e|x", "admin:a1998e", &[0x10, 0x01], 100)).unwrap();
        r.insert(NewSession { mountpoint: "site", ..session("free-id", "admin:b", &[], NEVER) }).unwrap();
        let a = r.get("", "admin:a1998e|x", 0).unwrap().recorded;
        assert_eq!((a.device, a.serial, a.issuer, a.expires), ("admin:a1998e", &[0x10, 0x01][..], 1, 100));
        let b = r.get("site", "free-id", 0).unwrap().recorded;
        assert_eq!((b.mountpoint, b.client_id, b.device, b.serial), ("site", "free-id", "admin:b", &[][..]));
        assert!(r.get("", "free-id", 0).is_none(), "the mountpoint is part of the key");
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn takeover_by_the_same_key_replaces_the_entry() {
        let mut r = Registry::default();
        r.insert(session("k", "t:d", &[1], 100)).unwrap();
        r.insert(session("k", "t:e", &[2], 200)).unwrap();
        assert_eq!(r.len(), 1);
        let s = r.get("", "k", 0).unwrap().recorded;
        assert_eq!((s.device, s.serial, s.expires), ("t:e", &[2][..], 200));
    }

    #[test]
    fn expired_entries_are_invisible_then_swept() {
        let mut r = Registry::default();
        r.insert(session("a", "t:a", &[], 10)).unwrap();
        r.insert(session("b", "t:b", &[], NEVER)).unwrap();
        assert!(r.get("", "a", 9).is_some());
        assert!(r.get("", "a", 10).is_none());
        assert_eq!(r.select(10, |s| Some(s.recorded.device.to_string())), vec!["t:b".to_string()]);
        assert_eq!(r.sweep(10), 1);
        assert_eq!(r.len(), 1);
        assert!(r.set_expiry("", "b", 20));
        assert!(!r.set_expiry("", "a", 20));
        assert_eq!(r.sweep(20), 1);
        assert!(r.is_empty());
    }

    #[test]
    fn a_reconnect_under_the_same_key_is_not_forgotten_by_the_old_connections_removal() {
        let mut r = Registry::default();
        let old = r.insert(session("k", "t:d", &[], NEVER)).unwrap();
        let new = r.insert(session("k", "t:d", &[], NEVER)).unwrap();
        assert_ne!(old, new);
        assert_eq!(r.get("", "k", 0).unwrap().generation, new);
        assert!(!r.remove_generation("", "k", old));
        assert!(r.get("", "k", 0).is_some());
        assert!(r.remove_generation("", "k", new));
        assert!(r.is_empty());
    }

    #[test]
    fn remove_forgets_only_that_key() {
        let mut r = Registry::default();
        r.insert(session("a", "t:a", &[], NEVER)).unwrap();
        r.insert(session("b", "t:b", &[], NEVER)).unwrap();
        assert!(r.remove("", "a"));
        assert!(!r.remove("", "a"));
        assert!(r.get("", "b", 0).is_some());
    }

    #[test]
    fn a_nul_in_the_client_id_cannot_forge_another_key() {
        let mut r = Registry::default();
        r.insert(NewSession { mountpoint: "mp", ..session("c", "t:c", &[], NEVER) }).unwrap();
        assert!(r.get("", "mp\0c", 0).is_none(), "empty mountpoint + \"mp\\0c\" is a different key");
        assert_eq!(
            r.insert(NewSession { mountpoint: "a\0b", ..session("c", "t:c", &[], NEVER) }),
            Err(RecordError::Mountpoint)
        );
        assert_eq!(r.insert(session("c", &"x".repeat(256), &[], NEVER)), Err(RecordError::Device));
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
