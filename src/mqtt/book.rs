//! The publisher's bookkeeping, pure: which message each packet id carries, which PUBACK acknowledges which
//! message, and what a lost connection dropped and must be sent again, in order. rumqttc's events come in as data.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use rumqttc::{Event, Outgoing, Packet, Publish, QoS};

/// One message not yet acknowledged by the broker.
#[derive(Debug, Clone)]
pub(super) struct Message {
    pub(super) topic: String,
    pub(super) payload: Bytes,
    pub(super) retain: bool,
}

/// The bookkeeping, shared by the submitting side and the event loop, and pure (rumqttc's events come in as data).
/// Publishes are written to rumqttc's request queue under this lock, so `unmatched` has exactly the queue's order,
/// which is the order of the `Outgoing::Publish(pkid)` events.
#[derive(Debug, Default)]
pub(super) struct Book {
    next_seq: u64,
    pub(super) closed: bool,
    /// Every message not yet acknowledged, by sequence number.
    pub(super) messages: HashMap<u64, Message>,
    /// Messages given to rumqttc (or to be re-sent at the next CONNACK) whose packet id is not yet known, oldest
    /// first. The first `resend` of them were lost with a connection and are queued again at the next CONNACK.
    unmatched: VecDeque<u64>,
    resend: usize,
    /// Sent on the current connection, awaiting PUBACK: packet id → sequence number.
    in_flight: HashMap<u16, u64>,
    /// A publish rumqttc holds back because its packet id is still in use (`Outgoing::AwaitAck`).
    collided: Option<(u16, u64)>,
    /// Publishes sent again after a connection loss, since start.
    pub(super) resent: u64,
}

impl Book {
    /// Records a message just written to rumqttc's request queue.
    pub(super) fn submitted(&mut self, message: Message) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.messages.insert(seq, message);
        self.unmatched.push_back(seq);
        seq
    }

    /// Matches packet ids to messages; returns the message a PUBACK acknowledges.
    pub(super) fn on_event(&mut self, event: &Event) -> Option<u64> {
        match event {
            Event::Outgoing(Outgoing::Publish(pkid)) if *pkid != 0 => {
                if let Some((held, seq)) = self.collided
                    && held == *pkid
                {
                    self.collided = None;
                    self.in_flight.insert(*pkid, seq);
                    return None;
                }
                match self.unmatched.pop_front() {
                    Some(seq) => {
                        self.in_flight.insert(*pkid, seq);
                    }
                    None => tracing::error!(pkid, "MQTT publish without a queued message"),
                }
                None
            }
            Event::Outgoing(Outgoing::AwaitAck(pkid)) => {
                if let Some(seq) = self.unmatched.pop_front() {
                    self.collided = Some((*pkid, seq));
                }
                None
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                let Some(seq) = self.in_flight.remove(&ack.pkid) else {
                    tracing::debug!(pkid = ack.pkid, "PUBACK for no message in flight (duplicate)");
                    return None;
                };
                self.messages.remove(&seq);
                Some(seq)
            }
            _ => None,
        }
    }

    /// After a connection error: nothing sent on that connection and un-acknowledged, nor anything rumqttc had
    /// queued, can be trusted to arrive (rumqttc drops its pending list when the session is not resumed, and
    /// resends it in packet-id order otherwise). `unnumbered` is how many of our publishes rumqttc had queued
    /// without a packet id (taken back from it): they are the oldest entries of `unmatched` after those already
    /// waiting to be re-sent. Everything lost goes back to the front, in submission order.
    pub(super) fn connection_lost(&mut self, unnumbered: usize) {
        let start = self.resend;
        let end = (start + unnumbered).min(self.unmatched.len());
        let mut lost: Vec<u64> = self.unmatched.drain(..end).collect();
        lost.extend(self.in_flight.drain().map(|(_, seq)| seq));
        lost.extend(self.collided.take().map(|(_, seq)| seq));
        lost.retain(|seq| self.messages.contains_key(seq));
        lost.sort_unstable();
        self.resend = lost.len();
        for seq in lost.into_iter().rev() {
            self.unmatched.push_front(seq);
        }
    }

    /// At CONNACK: the lost messages, oldest first, to be sent before anything still in the request queue.
    pub(super) fn requeue(&mut self) -> Vec<Publish> {
        let count = std::mem::take(&mut self.resend);
        self.resent += count as u64;
        self.unmatched
            .iter()
            .take(count)
            .filter_map(|seq| self.messages.get(seq))
            .map(|m| Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: m.retain,
                topic: m.topic.clone(),
                pkid: 0,
                payload: m.payload.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(n: u64) -> Message {
        Message { topic: "t:d/config".into(), payload: Bytes::from(n.to_string()), retain: false }
    }

    fn sent(pkid: u16) -> Event {
        Event::Outgoing(Outgoing::Publish(pkid))
    }

    fn acked(pkid: u16) -> Event {
        Event::Incoming(Packet::PubAck(rumqttc::PubAck { pkid }))
    }

    fn payloads(publishes: &[Publish]) -> Vec<String> {
        publishes.iter().map(|p| String::from_utf8_lossy(&p.payload).into_owned()).collect()
    }

    #[test]
    fn packet_ids_follow_the_queue_order() {
        let mut book = Book::default();
        let seqs: Vec<u64> = (0..3).map(|n| book.submitted(message(n))).collect();
        assert_eq!(seqs, [0, 1, 2]);
        for pkid in [7, 8, 9] {
            assert_eq!(book.on_event(&sent(pkid)), None);
        }
        assert_eq!(book.on_event(&acked(8)), Some(1));
        assert_eq!(book.on_event(&acked(8)), None, "a second PUBACK for the same id is a duplicate");
        assert_eq!(book.on_event(&acked(42)), None, "unknown id");
        assert_eq!(book.on_event(&acked(7)), Some(0));
        assert_eq!(book.on_event(&acked(9)), Some(2));
        assert!(book.messages.is_empty() && book.in_flight.is_empty() && book.unmatched.is_empty());
    }

    #[test]
    fn everything_unacknowledged_is_sent_again_in_order_ahead_of_newer_messages() {
        let mut book = Book::default();
        for n in 0..6 {
            book.submitted(message(n));
        }
        // 0 and 1 went out, 0 was acknowledged; 2 and 3 were still in rumqttc's queue (taken back, unnumbered);
        // 4 and 5 were submitted after the error and are still in the request channel.
        book.on_event(&sent(1));
        book.on_event(&sent(2));
        assert_eq!(book.on_event(&acked(1)), Some(0));
        book.connection_lost(2);
        // Reconnection attempts that fail change nothing.
        book.connection_lost(0);
        book.connection_lost(0);
        let again = book.requeue();
        assert_eq!(payloads(&again), ["1", "2", "3"]);
        assert_eq!(book.resent, 3);
        assert!(book.requeue().is_empty(), "re-sent once per connection");
        // rumqttc sends the re-queued ones first, then the channel's: packet ids map in that order.
        for pkid in 3..=7 {
            book.on_event(&sent(pkid));
        }
        let acks: Vec<Option<u64>> = (3..=7).map(|pkid| book.on_event(&acked(pkid))).collect();
        assert_eq!(acks, [Some(1), Some(2), Some(3), Some(4), Some(5)]);
        assert!(book.messages.is_empty());
    }

    #[test]
    fn a_second_loss_while_re_sending_keeps_the_order() {
        let mut book = Book::default();
        for n in 0..4 {
            book.submitted(message(n));
        }
        for pkid in 1..=4 {
            book.on_event(&sent(pkid));
        }
        book.connection_lost(0);
        assert_eq!(payloads(&book.requeue()), ["0", "1", "2", "3"]);
        book.submitted(message(4));
        // Only 0 and 1 went out again before the next error; 2 and 3 were still queued in rumqttc (taken back),
        // 4 was drained from the channel with them.
        book.on_event(&sent(5));
        book.on_event(&sent(6));
        assert_eq!(book.on_event(&acked(5)), Some(0));
        book.connection_lost(3);
        assert_eq!(payloads(&book.requeue()), ["1", "2", "3", "4"]);
    }

    #[test]
    fn a_collided_publish_keeps_its_place() {
        let mut book = Book::default();
        for n in 0..3 {
            book.submitted(message(n));
        }
        book.on_event(&sent(1));
        book.on_event(&sent(2));
        // rumqttc's next packet id (1) is still taken: it holds message 2 back until 1 is acknowledged.
        book.on_event(&Event::Outgoing(Outgoing::AwaitAck(1)));
        assert_eq!(book.on_event(&acked(1)), Some(0));
        book.on_event(&sent(1));
        assert_eq!(book.on_event(&acked(1)), Some(2));
        assert_eq!(book.on_event(&acked(2)), Some(1));
        // Lost while held back: it is re-sent like the others.
        book.submitted(message(3));
        book.on_event(&Event::Outgoing(Outgoing::AwaitAck(5)));
        book.connection_lost(0);
        assert_eq!(payloads(&book.requeue()), ["3"]);
    }
}
