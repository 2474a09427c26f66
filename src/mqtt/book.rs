//! The publisher's bookkeeping, pure: which message each packet id carries, what each PUBACK (MQTT 5 reason code)
//! means for its message, and what a lost connection dropped and must be sent again, in order.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use rumqttc::Outgoing;
use rumqttc::v5::Event;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, Publish};

/// A PUBACK reason code ≥ 0x80 that sending the same message again cannot change: the message is given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 0x80
    Unspecified,
    /// 0x83
    ImplementationSpecific,
    /// 0x87 (VerneMQ's answer to a denied `auth_on_publish_m5`, Mosquitto's to an ACL denial)
    NotAuthorized,
    /// 0x90
    TopicNameInvalid,
    /// 0x95: not a PUBACK code; the client refuses to send a packet above the broker's Maximum Packet Size.
    PacketTooLarge,
    /// 0x99
    PayloadFormatInvalid,
}

impl Refusal {
    /// The MQTT 5 reason code.
    pub fn code(self) -> u8 {
        match self {
            Refusal::Unspecified => 0x80,
            Refusal::ImplementationSpecific => 0x83,
            Refusal::NotAuthorized => 0x87,
            Refusal::TopicNameInvalid => 0x90,
            Refusal::PacketTooLarge => 0x95,
            Refusal::PayloadFormatInvalid => 0x99,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Refusal::Unspecified => "unspecified_error",
            Refusal::ImplementationSpecific => "implementation_specific_error",
            Refusal::NotAuthorized => "not_authorized",
            Refusal::TopicNameInvalid => "topic_name_invalid",
            Refusal::PacketTooLarge => "packet_too_large",
            Refusal::PayloadFormatInvalid => "payload_format_invalid",
        }
    }
}

/// What a PUBACK means for its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Answer {
    /// Accepted (0x00, or 0x10 no matching subscribers).
    Delivered(u64),
    /// Refused for good: the message is forgotten.
    Refused(u64, Refusal),
    /// Refused for now (0x97 quota exceeded, 0x91 packet id in use): kept, and sent again after a pause
    /// ([`Book::release_retries`]) or with the rest after a reconnect.
    Retry(u64),
}

fn answer(seq: u64, reason: PubAckReason) -> Answer {
    match reason {
        PubAckReason::Success | PubAckReason::NoMatchingSubscribers => Answer::Delivered(seq),
        PubAckReason::QuotaExceeded | PubAckReason::PacketIdentifierInUse => Answer::Retry(seq),
        PubAckReason::UnspecifiedError => Answer::Refused(seq, Refusal::Unspecified),
        PubAckReason::ImplementationSpecificError => Answer::Refused(seq, Refusal::ImplementationSpecific),
        PubAckReason::NotAuthorized => Answer::Refused(seq, Refusal::NotAuthorized),
        PubAckReason::TopicNameInvalid => Answer::Refused(seq, Refusal::TopicNameInvalid),
        PubAckReason::PayloadFormatInvalid => Answer::Refused(seq, Refusal::PayloadFormatInvalid),
    }
}

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
///
/// Messages sent again go through rumqttc's pending list instead, which rumqttc empties ahead of its request queue
/// but without its flow control: it numbers each at once even with its window full, and one whose packet id is
/// still taken replaces the publish it held back before on such a collision (it holds one), which is then never
/// sent. So they wait here, in `resend`, and the event loop hands them over one at a time, when rumqttc can send one
/// at once ([`Book::next_resend`]).
#[derive(Debug, Default)]
pub(super) struct Book {
    next_seq: u64,
    pub(super) closed: bool,
    /// Every message not yet acknowledged, by sequence number.
    pub(super) messages: HashMap<u64, Message>,
    /// Messages given to rumqttc whose packet id is not yet known, in the order rumqttc numbers them.
    unmatched: VecDeque<u64>,
    /// Messages to send again (lost with a connection, answered "not now" once their pause is over, or dropped by
    /// rumqttc), oldest first, not yet given to rumqttc: they go out ahead of its request queue.
    resend: VecDeque<u64>,
    /// Sent on the current connection, awaiting PUBACK: packet id → sequence number.
    in_flight: HashMap<u16, u64>,
    /// A publish rumqttc holds back because its packet id is still in use (`Outgoing::AwaitAck`).
    collided: Option<(u16, u64)>,
    /// Answered "not now" (see [`Answer::Retry`]), waiting to be sent again.
    retry: Vec<u64>,
    /// The message of the last `Outgoing::Publish`: the one a write failure (packet too large) is about.
    last_sent: Option<u64>,
    /// Publishes given to rumqttc again (lost with a connection, answered "not now", dropped by rumqttc), since start.
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

    /// Matches packet ids to messages; returns what a PUBACK means for its message.
    pub(super) fn on_event(&mut self, event: &Event) -> Option<Answer> {
        match event {
            Event::Outgoing(Outgoing::Publish(pkid)) if *pkid != 0 => {
                if let Some((held, seq)) = self.collided
                    && held == *pkid
                {
                    self.collided = None;
                    self.in_flight.insert(*pkid, seq);
                    self.last_sent = Some(seq);
                    return None;
                }
                match self.unmatched.pop_front() {
                    Some(seq) => {
                        self.in_flight.insert(*pkid, seq);
                        self.last_sent = Some(seq);
                    }
                    None => tracing::error!(pkid, "MQTT publish without a queued message"),
                }
                None
            }
            Event::Outgoing(Outgoing::AwaitAck(pkid)) => {
                if let Some(seq) = self.unmatched.pop_front()
                    && let Some((_, dropped)) = self.collided.replace((*pkid, seq))
                {
                    // rumqttc holds one publish per collision and replaced the one it held with this one: that
                    // message is nowhere in rumqttc any more, and would never be sent nor acknowledged.
                    tracing::error!(
                        seq = dropped,
                        "MQTT publish dropped by rumqttc on a packet id collision; sent again"
                    );
                    self.queue_resend([dropped]);
                }
                None
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                let Some(seq) = self.in_flight.remove(&ack.pkid) else {
                    tracing::debug!(pkid = ack.pkid, "PUBACK for no message in flight (duplicate)");
                    return None;
                };
                let answer = answer(seq, ack.reason);
                if !matches!(answer, Answer::Retry(_)) {
                    self.messages.remove(&seq);
                } else {
                    self.retry.push(seq);
                }
                Some(answer)
            }
            _ => None,
        }
    }

    /// Gives up the message of the last publish written (the client refused to send it: larger than the broker's
    /// Maximum Packet Size). Returns it, unless it was already answered.
    pub(super) fn refuse_last_sent(&mut self) -> Option<u64> {
        let seq = self.last_sent.take()?;
        self.messages.remove(&seq)?;
        self.in_flight.retain(|_, s| *s != seq);
        self.unmatched.retain(|s| *s != seq);
        Some(seq)
    }

    /// Whether messages wait for a retry ([`Answer::Retry`]).
    #[cfg(test)]
    pub(super) fn has_retries(&self) -> bool {
        !self.retry.is_empty()
    }

    /// The pause after [`Answer::Retry`] is over: those messages are sent again, in order with any others waiting
    /// for that.
    pub(super) fn release_retries(&mut self) {
        let retry = std::mem::take(&mut self.retry);
        self.queue_resend(retry);
    }

    fn queue_resend(&mut self, seqs: impl IntoIterator<Item = u64>) {
        self.resend.extend(seqs);
        self.resend.make_contiguous().sort_unstable();
    }

    /// How many messages wait to be sent again.
    pub(super) fn to_resend(&self) -> usize {
        self.resend.len()
    }

    /// The oldest message waiting to be sent again, now given to rumqttc. Only when rumqttc holds none of our
    /// publishes without a packet id: it numbers this one next, before anything in its request queue.
    pub(super) fn next_resend(&mut self) -> Option<Publish> {
        while let Some(seq) = self.resend.pop_front() {
            // A message given up meanwhile (too large to write) is not sent again.
            if let Some(message) = self.messages.get(&seq) {
                self.unmatched.push_front(seq);
                self.resent += 1;
                return Some(message.publish());
            }
        }
        None
    }

    /// After a connection error: nothing sent on that connection and un-acknowledged, nor anything rumqttc had
    /// queued, can be trusted to arrive (rumqttc drops its pending list when the session is not resumed, and
    /// resends it in packet-id order otherwise). `unnumbered` is how many of our publishes rumqttc had queued
    /// without a packet id (taken back from it): they are the oldest entries of `unmatched`. Everything lost joins
    /// what already waited to be sent again, in submission order.
    pub(super) fn connection_lost(&mut self, unnumbered: usize) {
        let end = unnumbered.min(self.unmatched.len());
        let mut lost: Vec<u64> = self.unmatched.drain(..end).collect();
        lost.extend(self.in_flight.drain().map(|(_, seq)| seq));
        lost.extend(self.collided.take().map(|(_, seq)| seq));
        lost.append(&mut self.retry);
        lost.retain(|seq| self.messages.contains_key(seq));
        self.queue_resend(lost);
    }
}

impl Message {
    /// A fresh QoS 1 publish of the message (rumqttc numbers it).
    fn publish(&self) -> Publish {
        let mut publish = Publish::new(self.topic.as_str(), QoS::AtLeastOnce, self.payload.clone(), None);
        publish.retain = self.retain;
        publish
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

    fn answered(pkid: u16, reason: PubAckReason) -> Event {
        Event::Incoming(Packet::PubAck(rumqttc::v5::mqttbytes::v5::PubAck { pkid, reason, properties: None }))
    }

    fn acked(pkid: u16) -> Event {
        answered(pkid, PubAckReason::Success)
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
        assert_eq!(book.on_event(&acked(8)), Some(Answer::Delivered(1)));
        assert_eq!(book.on_event(&acked(8)), None, "a second PUBACK for the same id is a duplicate");
        assert_eq!(book.on_event(&acked(42)), None, "unknown id");
        assert_eq!(book.on_event(&acked(7)), Some(Answer::Delivered(0)));
        assert_eq!(book.on_event(&acked(9)), Some(Answer::Delivered(2)));
        assert!(book.messages.is_empty() && book.in_flight.is_empty() && book.unmatched.is_empty());
    }

    /// The payloads waiting to be sent again, in the order they will be handed to rumqttc.
    fn to_resend(book: &Book) -> Vec<String> {
        book.resend.iter().map(|seq| String::from_utf8_lossy(&book.messages[seq].payload).into_owned()).collect()
    }

    /// Hands the next message to send again to rumqttc, which numbers it `pkid` at once, as the event loop does
    /// when rumqttc's window has room; returns its payload.
    fn resend_next(book: &mut Book, pkid: u16) -> String {
        let publish = book.next_resend().expect("a message to send again");
        book.on_event(&sent(pkid));
        payloads(&[publish]).remove(0)
    }

    #[test]
    fn everything_unacknowledged_is_sent_again_in_order_ahead_of_newer_messages() {
        // 0 and 1 went out, 0 was acknowledged; 2 and 3 were still in rumqttc's queue (taken back, unnumbered);
        // 4 and 5 were submitted after the error and are still in the request channel.
        let mut book = first_two_sent_of(6);
        assert_eq!(book.on_event(&acked(1)), Some(Answer::Delivered(0)));
        book.connection_lost(2);
        // Reconnection attempts that fail change nothing.
        book.connection_lost(0);
        book.connection_lost(0);
        assert_eq!(to_resend(&book), ["1", "2", "3"]);
        // Handed over one at a time, each numbered before anything in the channel; then the channel's.
        let again: Vec<String> = (3..=5).map(|pkid| resend_next(&mut book, pkid)).collect();
        assert_eq!(again, ["1", "2", "3"]);
        assert!(book.next_resend().is_none(), "sent again once");
        assert_eq!(book.resent, 3);
        for pkid in 6..=7 {
            book.on_event(&sent(pkid));
        }
        let acks: Vec<Option<Answer>> = (3..=7).map(|pkid| book.on_event(&acked(pkid))).collect();
        assert_eq!(
            acks,
            [
                Some(Answer::Delivered(1)),
                Some(Answer::Delivered(2)),
                Some(Answer::Delivered(3)),
                Some(Answer::Delivered(4)),
                Some(Answer::Delivered(5))
            ]
        );
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
        assert_eq!(to_resend(&book), ["0", "1", "2", "3"]);
        book.submitted(message(4));
        // 0 and 1 went out again and 0 was acknowledged; 2 was in rumqttc's pending list and 4 in its channel (both
        // taken back, unnumbered); 3 had not been handed over yet.
        assert_eq!(resend_next(&mut book, 5), "0");
        assert_eq!(resend_next(&mut book, 6), "1");
        assert_eq!(book.on_event(&acked(5)), Some(Answer::Delivered(0)));
        assert!(book.next_resend().is_some());
        book.connection_lost(2);
        assert_eq!(to_resend(&book), ["1", "2", "3", "4"]);
    }

    /// A book with messages `0..count` submitted, the first two sent with packet ids 1 and 2.
    fn first_two_sent_of(count: u64) -> Book {
        let mut book = Book::default();
        for n in 0..count {
            book.submitted(message(n));
        }
        book.on_event(&sent(1));
        book.on_event(&sent(2));
        book
    }

    #[test]
    fn a_collided_publish_keeps_its_place() {
        let mut book = first_two_sent_of(3);
        // rumqttc's next packet id (1) is still taken: it holds message 2 back until 1 is acknowledged.
        book.on_event(&Event::Outgoing(Outgoing::AwaitAck(1)));
        assert_eq!(book.on_event(&acked(1)), Some(Answer::Delivered(0)));
        book.on_event(&sent(1));
        assert_eq!(book.on_event(&acked(1)), Some(Answer::Delivered(2)));
        assert_eq!(book.on_event(&acked(2)), Some(Answer::Delivered(1)));
        // Lost while held back: it is re-sent like the others.
        book.submitted(message(3));
        book.on_event(&Event::Outgoing(Outgoing::AwaitAck(5)));
        book.connection_lost(0);
        assert_eq!(to_resend(&book), ["3"]);
    }

    #[test]
    fn a_held_publish_that_rumqttc_replaces_is_sent_again() {
        let mut book = first_two_sent_of(4);
        // Window of two, both ids taken: rumqttc holds message 2 back on id 1, then message 3 on id 2, which
        // replaces message 2 (it holds one): 2 is no longer anywhere in rumqttc.
        book.on_event(&Event::Outgoing(Outgoing::AwaitAck(1)));
        book.on_event(&Event::Outgoing(Outgoing::AwaitAck(2)));
        assert_eq!(to_resend(&book), ["2"], "given to rumqttc again on this connection");
        // The connection goes before that: every unacknowledged message comes back, in order.
        book.connection_lost(0);
        assert_eq!(to_resend(&book), ["0", "1", "2", "3"]);
        let again: Vec<String> = (3..=6).map(|pkid| resend_next(&mut book, pkid)).collect();
        assert_eq!(again, ["0", "1", "2", "3"]);
        let acks: Vec<Option<Answer>> = (3..=6).map(|pkid| book.on_event(&acked(pkid))).collect();
        assert_eq!(
            acks,
            [
                Some(Answer::Delivered(0)),
                Some(Answer::Delivered(1)),
                Some(Answer::Delivered(2)),
                Some(Answer::Delivered(3))
            ]
        );
        assert!(book.messages.is_empty());
    }

    #[test]
    fn a_refused_publish_is_given_up_in_its_place() {
        let mut book = Book::default();
        for n in 0..3 {
            book.submitted(message(n));
        }
        for pkid in 1..=3 {
            book.on_event(&sent(pkid));
        }
        assert_eq!(book.on_event(&acked(1)), Some(Answer::Delivered(0)));
        assert_eq!(
            book.on_event(&answered(2, PubAckReason::NotAuthorized)),
            Some(Answer::Refused(1, Refusal::NotAuthorized))
        );
        assert_eq!(book.on_event(&acked(3)), Some(Answer::Delivered(2)));
        assert!(book.messages.is_empty(), "nothing is kept for a resend");
        // A refusal followed by a lost connection: only the unanswered message comes back.
        book.submitted(message(3));
        book.submitted(message(4));
        book.on_event(&sent(4));
        book.on_event(&sent(5));
        assert_eq!(
            book.on_event(&answered(4, PubAckReason::UnspecifiedError)),
            Some(Answer::Refused(3, Refusal::Unspecified))
        );
        book.connection_lost(0);
        assert_eq!(to_resend(&book), ["4"]);
        assert_eq!(Refusal::NotAuthorized.code(), 0x87);
        assert_eq!(answer(9, PubAckReason::NoMatchingSubscribers), Answer::Delivered(9));
    }

    #[test]
    fn a_quota_answer_is_sent_again_ahead_of_the_request_queue() {
        let mut book = first_two_sent_of(4);
        assert_eq!(book.on_event(&answered(1, PubAckReason::QuotaExceeded)), Some(Answer::Retry(0)));
        assert_eq!(book.on_event(&acked(2)), Some(Answer::Delivered(1)));
        assert!(book.has_retries());
        assert!(book.next_resend().is_none(), "not before its pause is over");
        book.release_retries();
        assert!(!book.has_retries());
        // Messages 2 and 3 are still in rumqttc's channel: the retry goes before them.
        assert_eq!(resend_next(&mut book, 3), "0");
        for pkid in 4..=5 {
            book.on_event(&sent(pkid));
        }
        let acks: Vec<Option<Answer>> = (3..=5).map(|pkid| book.on_event(&acked(pkid))).collect();
        assert_eq!(acks, [Some(Answer::Delivered(0)), Some(Answer::Delivered(2)), Some(Answer::Delivered(3))]);
        // Waiting for a retry when the connection goes: sent again with the others, in order.
        book.submitted(message(4));
        book.submitted(message(5));
        book.on_event(&sent(6));
        book.on_event(&sent(7));
        book.on_event(&answered(7, PubAckReason::QuotaExceeded));
        book.connection_lost(0);
        assert_eq!(to_resend(&book), ["4", "5"]);
    }

    #[test]
    fn a_publish_too_large_to_write_is_given_up() {
        let mut book = Book::default();
        book.submitted(message(0));
        book.submitted(message(1));
        book.on_event(&sent(1));
        book.on_event(&sent(2));
        assert_eq!(book.refuse_last_sent(), Some(1));
        assert_eq!(book.refuse_last_sent(), None);
        book.connection_lost(0);
        assert_eq!(to_resend(&book), ["0"]);
    }
}
