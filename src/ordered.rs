//! Work that completes in any order but must be released in the order it started: the subscriber's MQTT acks and
//! the K2V consumer's Kafka commit points both wait for the done prefix. Pure, no I/O.

use std::collections::VecDeque;

/// Entries keyed by increasing keys (gaps allowed), each open until completed. [`InOrder::release`] hands out the
/// completed entries at the front, oldest first, and stops at the first one still open.
#[derive(Debug)]
pub(crate) struct InOrder<K, V> {
    entries: VecDeque<Entry<K, V>>,
}

#[derive(Debug)]
struct Entry<K, V> {
    key: K,
    value: V,
    done: bool,
}

impl<K, V> Default for InOrder<K, V> {
    fn default() -> Self {
        Self { entries: VecDeque::new() }
    }
}

impl<K: Ord + Copy, V> InOrder<K, V> {
    /// Adds an open entry. Its key must be greater than every key it holds.
    pub(crate) fn push(&mut self, key: K, value: V) {
        debug_assert!(self.last_key().is_none_or(|last| last < key), "keys must increase");
        self.entries.push_back(Entry { key, value, done: false });
    }

    /// Marks an entry done. False when no such entry is held (never added, already released, or cleared).
    pub(crate) fn complete(&mut self, key: K) -> bool {
        match self.entries.binary_search_by(|e| e.key.cmp(&key)) {
            Ok(index) => {
                self.entries[index].done = true;
                true
            }
            Err(_) => false,
        }
    }

    /// Removes and yields the done prefix, oldest first.
    pub(crate) fn release(&mut self) -> impl Iterator<Item = (K, V)> + '_ {
        std::iter::from_fn(move || {
            if !self.entries.front()?.done {
                return None;
            }
            self.entries.pop_front().map(|e| (e.key, e.value))
        })
    }

    /// The oldest entry still held (the first one open, once released).
    pub(crate) fn first_key(&self) -> Option<K> {
        self.entries.front().map(|e| e.key)
    }

    /// The newest entry still held.
    pub(crate) fn last_key(&self) -> Option<K> {
        self.entries.back().map(|e| e.key)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Forgets every entry, done or not.
    #[cfg(test)]
    fn clear(&mut self) {
        self.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn released<V>(o: &mut InOrder<u64, V>) -> Vec<u64> {
        o.release().map(|(k, _)| k).collect()
    }

    #[test]
    fn only_the_done_prefix_is_released_in_order() {
        let mut o = InOrder::default();
        for k in 10..15 {
            o.push(k, k * 2);
        }
        assert!(o.complete(11));
        assert!(o.complete(12));
        assert!(released(&mut o).is_empty(), "10 still open");
        assert!(o.complete(10));
        assert_eq!(o.release().collect::<Vec<_>>(), [(10, 20), (11, 22), (12, 24)]);
        assert_eq!(o.first_key(), Some(13));
        assert!(o.complete(14));
        assert!(released(&mut o).is_empty());
        assert!(o.complete(13));
        assert_eq!(released(&mut o), [13, 14]);
        assert!(o.is_empty());
    }

    #[test]
    fn unknown_and_released_keys_change_nothing() {
        let mut o = InOrder::default();
        o.push(1, ());
        o.push(5, ());
        assert!(!o.complete(3), "a gap");
        assert!(!o.complete(9));
        assert!(o.complete(1));
        assert_eq!(released(&mut o), [1]);
        assert!(!o.complete(1), "released already");
        assert!(o.complete(5));
        assert!(o.complete(5), "completing twice is harmless");
        assert_eq!(released(&mut o), [5]);
        assert_eq!((o.first_key(), o.last_key(), o.len()), (None, None, 0));
    }

    #[test]
    fn a_partly_read_release_keeps_the_rest() {
        let mut o = InOrder::default();
        for k in 0..3 {
            o.push(k, ());
            o.complete(k);
        }
        assert_eq!(o.release().next(), Some((0, ())));
        assert_eq!(o.len(), 2);
        o.push(3, ());
        assert_eq!(released(&mut o), [1, 2]);
        assert_eq!(o.last_key(), Some(3));
        o.clear();
        assert!(o.is_empty());
        o.push(0, ());
        assert_eq!(o.len(), 1, "keys start over after a clear");
    }
}
