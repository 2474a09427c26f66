//! The K2V consumer's offset tracker: per partition, the consumed offsets complete in any order and the commit point
//! moves over the done prefix only, so a commit never passes a message still waiting for its MQTT acknowledgement.
//! Pure bookkeeping: the consumer feeds it offsets and hands the moved commit points to librdkafka.

use std::collections::HashMap;
use std::sync::Arc;

use rdkafka::{Offset, TopicPartitionList};

use crate::ordered::InOrder;

/// Where a message came from, to complete it later. `generation` tells apart the same offset consumed again after
/// the partition was revoked and re-assigned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    generation: u64,
}

/// Per-partition completion: offsets in consumption order, each done or not. The commit point is the end of the
/// done prefix, so completions out of order (a skipped message before a publish still awaiting its ack) are fine.
#[derive(Debug, Default)]
pub(super) struct Tracker {
    partitions: HashMap<(Arc<str>, i32), Track>,
    next_generation: u64,
    /// Commit points that moved since they were last handed to librdkafka (stored in batches: one store per ack).
    moved: HashMap<(Arc<str>, i32), i64>,
}

#[derive(Debug)]
struct Track {
    generation: u64,
    pending: InOrder<i64, ()>,
    /// Last offset consumed, to log jumps.
    last: Option<i64>,
}

impl Tracker {
    fn fresh(&mut self) -> Track {
        self.next_generation += 1;
        Track { generation: self.next_generation, pending: InOrder::default(), last: None }
    }

    /// A partition was (re-)assigned: anything still in flight from before is stale.
    pub(super) fn assign(&mut self, topic: &str, partition: i32) {
        let track = self.fresh();
        self.partitions.insert((Arc::from(topic), partition), track);
    }

    pub(super) fn revoke(&mut self, topic: &str, partition: i32) {
        let key = (Arc::from(topic), partition);
        self.partitions.remove(&key);
        self.moved.remove(&key);
    }

    /// Registers a consumed offset. An offset not after the last one means the consumer went back (offset reset,
    /// re-assignment we did not see): start over, so acks of the earlier pass cannot complete the new one.
    pub(super) fn begin(&mut self, topic: &str, partition: i32, offset: i64) -> Position {
        // Reuse the tracked topic name: one allocation per partition, not per message.
        let name = match self.partitions.keys().find(|(t, _)| &**t == topic) {
            Some((t, _)) => t.clone(),
            None => Arc::from(topic),
        };
        let key = (name, partition);
        let start_over =
            self.partitions.get(&key).is_none_or(|t| t.pending.last_key().is_some_and(|last| last >= offset));
        if start_over {
            let track = self.fresh();
            self.partitions.insert(key.clone(), track);
        }
        let generation = self.partitions.get_mut(&key).map_or(0, |t| {
            if let Some(last) = t.last
                && offset != last + 1
            {
                tracing::debug!(topic, partition, last, offset, "offsets skipped (compaction or transaction markers)");
            }
            t.last = Some(offset);
            t.pending.push(offset, ());
            t.generation
        });
        Position { topic: key.0, partition, offset, generation }
    }

    /// Marks a message done; returns the new commit point (next offset to consume) if the done prefix grew, and
    /// remembers it for the next [`Tracker::take_moved`].
    pub(super) fn complete(&mut self, position: &Position) -> Option<i64> {
        let key = (position.topic.clone(), position.partition);
        let track = self.partitions.get_mut(&key)?;
        if track.generation != position.generation || !track.pending.complete(position.offset) {
            return None;
        }
        let advanced = track.pending.release().last().map(|(offset, ())| offset + 1);
        if let Some(next) = advanced {
            self.moved.insert(key, next);
        }
        advanced
    }

    /// The commit points that moved, as a list to store.
    pub(super) fn take_moved(&mut self) -> Option<TopicPartitionList> {
        if self.moved.is_empty() {
            return None;
        }
        let mut tpl = TopicPartitionList::with_capacity(self.moved.len());
        for ((topic, partition), next) in self.moved.drain() {
            if let Err(error) = tpl.add_partition_offset(&topic, partition, Offset::Offset(next)) {
                tracing::warn!(%error, "cannot store offset");
            }
        }
        Some(tpl)
    }

    /// Per partition consumed so far, the first offset not yet completed (the next to consume if all are).
    pub(super) fn first_open(&self) -> Vec<(Arc<str>, i32, i64)> {
        self.partitions
            .iter()
            .filter_map(|((topic, partition), t)| {
                let next = t.pending.first_key().or(t.last.map(|last| last + 1))?;
                Some((topic.clone(), *partition, next))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_point_is_the_end_of_the_done_prefix() {
        let mut t = Tracker::default();
        t.assign("a.dojot.device-manager.device", 0);
        let p: Vec<Position> = (10..15).map(|o| t.begin("a.dojot.device-manager.device", 0, o)).collect();
        assert_eq!(t.complete(&p[1]), None, "10 still open");
        assert_eq!(t.complete(&p[2]), None);
        assert_eq!(t.complete(&p[0]), Some(13), "10, 11, 12 done");
        assert_eq!(t.complete(&p[4]), None);
        assert_eq!(t.complete(&p[3]), Some(15));
        assert_eq!(t.complete(&p[3]), None, "completing twice changes nothing");
    }

    #[test]
    fn partitions_are_independent() {
        let mut t = Tracker::default();
        let a = t.begin("t", 0, 5);
        let b = t.begin("t", 1, 7);
        let a2 = t.begin("t", 0, 6);
        assert_eq!(t.complete(&b), Some(8));
        assert_eq!(t.complete(&a2), None);
        assert_eq!(t.complete(&a), Some(7));
    }

    #[test]
    fn acks_from_before_a_reassignment_are_ignored() {
        let mut t = Tracker::default();
        t.assign("t", 0);
        let old = t.begin("t", 0, 3);
        t.revoke("t", 0);
        assert_eq!(t.complete(&old), None, "revoked");
        t.assign("t", 0);
        let new = t.begin("t", 0, 3);
        assert_eq!(t.complete(&old), None, "stale generation");
        assert_eq!(t.complete(&new), Some(4));
    }

    #[test]
    fn consuming_backwards_starts_over() {
        let mut t = Tracker::default();
        let first = t.begin("t", 0, 8);
        let rewound = t.begin("t", 0, 4);
        assert_eq!(t.complete(&first), None);
        assert_eq!(t.complete(&rewound), Some(5));
    }

    #[test]
    fn gaps_in_offsets_are_fine() {
        // Compacted topics and transaction markers leave holes; only consumed offsets count.
        let mut t = Tracker::default();
        let a = t.begin("t", 0, 1);
        let b = t.begin("t", 0, 9);
        assert_eq!(t.complete(&b), None);
        assert_eq!(t.complete(&a), Some(10));
    }
}
