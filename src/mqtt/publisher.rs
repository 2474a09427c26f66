//! The service's QoS 1 publisher (K2V): every publish is tracked until the broker's PUBACK and, after any reconnect,
//! sent again in its original order — rumqttc silently drops what it had pending when the session was not resumed.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{AsyncClient, ClientError, Event, EventLoop, Outgoing, Packet, Publish, QoS, Request};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::{MAX_PACKET_BYTES, MqttConfigError, MqttSettings};
use crate::health::Probe;

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Room for the MQTT fixed header, topic length and packet id around topic and payload.
const PACKET_OVERHEAD: usize = 16;

/// Why a message was not taken.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Larger than the client may send: rumqttc would keep it and fail the connection with it after every reconnect.
    #[error("message of {0} bytes exceeds the MQTT packet limit")]
    TooLarge(usize),
    /// Not a topic one can publish to (empty, or with a wildcard or NUL).
    #[error("invalid topic {0:?}")]
    InvalidTopic(String),
    /// The request queue is full; retry shortly.
    #[error("publisher queue is full")]
    Busy,
    /// The publisher is closing or closed.
    #[error("publisher is closed")]
    Closed,
}

/// One message not yet acknowledged by the broker.
#[derive(Debug, Clone)]
struct Message {
    topic: String,
    payload: Bytes,
    retain: bool,
}

/// The bookkeeping, shared by the submitting side and the event loop, and pure (rumqttc's events come in as data).
/// Publishes are written to rumqttc's request queue under this lock, so `unmatched` has exactly the queue's order,
/// which is the order of the `Outgoing::Publish(pkid)` events.
#[derive(Debug, Default)]
struct Book {
    next_seq: u64,
    closed: bool,
    /// Every message not yet acknowledged, by sequence number.
    messages: HashMap<u64, Message>,
    /// Messages given to rumqttc (or to be re-sent at the next CONNACK) whose packet id is not yet known, oldest
    /// first. The first `resend` of them were lost with a connection and are queued again at the next CONNACK.
    unmatched: VecDeque<u64>,
    resend: usize,
    /// Sent on the current connection, awaiting PUBACK: packet id → sequence number.
    in_flight: HashMap<u16, u64>,
    /// A publish rumqttc holds back because its packet id is still in use (`Outgoing::AwaitAck`).
    collided: Option<(u16, u64)>,
    /// Publishes sent again after a connection loss, since start.
    resent: u64,
}

impl Book {
    /// Records a message just written to rumqttc's request queue.
    fn submitted(&mut self, message: Message) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.messages.insert(seq, message);
        self.unmatched.push_back(seq);
        seq
    }

    /// Matches packet ids to messages; returns the message a PUBACK acknowledges.
    fn on_event(&mut self, event: &Event) -> Option<u64> {
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
    fn connection_lost(&mut self, unnumbered: usize) {
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
    fn requeue(&mut self) -> Vec<Publish> {
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

/// Handle to the publisher. Acknowledged sequence numbers arrive on the receiver [`Publisher::start`] returns.
pub struct Publisher {
    client: AsyncClient,
    book: Arc<Mutex<Book>>,
    connected: watch::Receiver<bool>,
    stop: CancellationToken,
    task: Mutex<Option<AbortOnDropHandle<()>>>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").field("connected", &*self.connected.borrow()).finish_non_exhaustive()
    }
}

fn lock(book: &Mutex<Book>) -> MutexGuard<'_, Book> {
    // A panic while holding the lock leaves plain bookkeeping behind; it stays usable.
    book.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Publisher {
    /// Starts the client (persistent session) and its event loop; it connects and reconnects by itself.
    /// `max_in_flight` bounds the un-acknowledged publishes the caller will submit.
    ///
    /// # Errors
    /// Unusable TLS files.
    pub fn start(
        settings: &MqttSettings,
        role: &str,
        max_in_flight: u16,
        probe: Probe,
    ) -> Result<(Self, mpsc::UnboundedReceiver<u64>), MqttConfigError> {
        let mut options = settings.options(role, false)?;
        // Packet ids cycle over the in-flight window; twice the caller's bound keeps a slow ack from colliding.
        options.set_inflight(max_in_flight.saturating_mul(2).saturating_add(10));
        // Nagle off: a lone configuration must not wait for the broker's delayed ACK.
        let (client, eventloop) = super::client(options, usize::from(max_in_flight) + 64);
        let book = Arc::new(Mutex::new(Book::default()));
        let (connected_tx, connected) = watch::channel(false);
        let (acks_tx, acks) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let driver =
            Driver { eventloop, book: book.clone(), acks: acks_tx, connected: connected_tx, probe, stop: stop.clone() };
        let task = AbortOnDropHandle::new(tokio::spawn(driver.run()));
        Ok((Self { client, book, connected, stop, task: Mutex::new(Some(task)) }, acks))
    }

    /// Queues a QoS 1 publish and returns its sequence number, which comes back on the ack receiver once the broker
    /// acknowledged it. Accepted while disconnected too: it goes out after the reconnect.
    ///
    /// # Errors
    /// Too large for an MQTT packet, queue full, or closed.
    pub fn publish(&self, topic: &str, payload: Bytes, retain: bool) -> Result<u64, PublishError> {
        let size = topic.len() + payload.len() + PACKET_OVERHEAD;
        if size > MAX_PACKET_BYTES {
            return Err(PublishError::TooLarge(size));
        }
        if topic.is_empty() || topic.contains('\0') || !rumqttc::valid_topic(topic) {
            return Err(PublishError::InvalidTopic(topic.to_string()));
        }
        let mut book = lock(&self.book);
        if book.closed {
            return Err(PublishError::Closed);
        }
        match self.client.try_publish(topic, QoS::AtLeastOnce, retain, payload.to_vec()) {
            Ok(()) => {}
            // Full, or the event loop is gone (its watch sender went with it).
            Err(ClientError::TryRequest(_) | ClientError::Request(_)) => {
                let gone = self.stop.is_cancelled() || self.connected.has_changed().is_err();
                return Err(if gone { PublishError::Closed } else { PublishError::Busy });
            }
        }
        Ok(book.submitted(Message { topic: topic.to_string(), payload, retain }))
    }

    /// Publishes not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        lock(&self.book).messages.len()
    }

    /// Publishes sent again after connection losses, since start.
    pub fn resent(&self) -> u64 {
        lock(&self.book).resent
    }

    /// Follows the connection state (true once the broker accepted the connection).
    pub fn connected(&self) -> watch::Receiver<bool> {
        self.connected.clone()
    }

    /// Refuses new publishes, waits until every accepted one is acknowledged (or `deadline` passes), then
    /// disconnects cleanly. Returns how many stayed un-acknowledged.
    pub async fn close(&self, deadline: Duration) -> usize {
        lock(&self.book).closed = true;
        let until = tokio::time::Instant::now() + deadline;
        while self.in_flight() > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let left = self.in_flight();
        let task = lock_task(&self.task).take();
        if *self.connected.borrow() {
            let _ = self.client.try_disconnect();
        } else {
            self.stop.cancel();
        }
        if let Some(task) = task {
            let remaining = until.saturating_duration_since(tokio::time::Instant::now()).max(Duration::from_secs(1));
            if tokio::time::timeout(remaining, task).await.is_err() {
                tracing::warn!("MQTT publisher did not disconnect in time");
            }
        }
        self.stop.cancel();
        left
    }
}

fn lock_task(task: &Mutex<Option<AbortOnDropHandle<()>>>) -> MutexGuard<'_, Option<AbortOnDropHandle<()>>> {
    task.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Owns rumqttc's event loop: feeds its events to the bookkeeping and its lost messages back to it.
struct Driver {
    eventloop: EventLoop,
    book: Arc<Mutex<Book>>,
    acks: mpsc::UnboundedSender<u64>,
    connected: watch::Sender<bool>,
    probe: Probe,
    stop: CancellationToken,
}

impl Driver {
    async fn run(mut self) {
        let mut backoff = MIN_BACKOFF;
        loop {
            let event = tokio::select! {
                biased;
                () = self.stop.cancelled() => break,
                event = self.eventloop.poll() => event,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    tracing::info!(session_present = ack.session_present, "MQTT publisher connected");
                    backoff = MIN_BACKOFF;
                    self.requeue_lost();
                    self.connected.send_replace(true);
                    self.probe.set(true);
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                    tracing::info!("MQTT publisher disconnected");
                    break;
                }
                Ok(event) => self.handle(&event),
                Err(error) => {
                    self.connected.send_replace(false);
                    self.probe.set(false);
                    self.connection_lost();
                    if lock(&self.book).closed && lock(&self.book).messages.is_empty() {
                        break;
                    }
                    tracing::warn!(%error, retry_in = ?backoff, "MQTT publisher connection lost");
                    tokio::select! {
                        () = self.stop.cancelled() => break,
                        () = tokio::time::sleep(jitter(backoff)) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        self.connected.send_replace(false);
        self.probe.set(false);
    }

    /// Reports acknowledgements.
    fn handle(&mut self, event: &Event) {
        if let Some(seq) = lock(&self.book).on_event(event) {
            let _ = self.acks.send(seq);
        }
    }

    /// Takes back from rumqttc everything it still holds of the lost connection (see [`Book::connection_lost`]).
    fn connection_lost(&mut self) {
        // Events read before the error are still buffered: PUBACKs among them are real acknowledgements of the old
        // connection and must be counted now, not mistaken for acks of new packets with the same id later.
        while let Some(event) = self.eventloop.state.events.pop_front() {
            self.handle(&event);
        }
        let taken = std::mem::take(&mut self.eventloop.pending);
        self.eventloop.state.collision = None;
        let unnumbered = taken.iter().filter(|r| matches!(r, Request::Publish(p) if p.pkid == 0)).count();
        lock(&self.book).connection_lost(unnumbered);
    }

    /// Puts the lost messages in front of everything still in the request queue, oldest first.
    fn requeue_lost(&mut self) {
        let publishes = lock(&self.book).requeue();
        if !publishes.is_empty() {
            tracing::info!(count = publishes.len(), "re-sending MQTT publishes not acknowledged before the reconnect");
        }
        self.eventloop.pending.extend(publishes.into_iter().map(Request::Publish));
    }
}

/// ±20 % so that many instances do not reconnect in step.
fn jitter(backoff: Duration) -> Duration {
    backoff.mul_f64(0.8 + 0.4 * rand::random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> MqttSettings {
        // Nothing listens on port 1 of the loopback: the publisher stays disconnected.
        MqttSettings {
            host: "127.0.0.1".into(),
            port: 1,
            tls: None,
            username: "k2v-bridge".into(),
            password: None,
            client_id: "unit".into(),
            keep_alive: Duration::from_secs(30),
        }
    }

    #[tokio::test]
    async fn refuses_what_could_never_be_sent_and_queues_the_rest_while_disconnected() {
        let (publisher, _acks) = Publisher::start(&settings(), "k2v", 10, Probe::default()).unwrap();
        for topic in ["", "a/+/config", "a/#", "a\0b"] {
            assert!(matches!(publisher.publish(topic, Bytes::new(), false), Err(PublishError::InvalidTopic(_))));
        }
        let huge = Bytes::from(vec![b'x'; MAX_PACKET_BYTES]);
        assert!(matches!(publisher.publish("t:d/config", huge, false), Err(PublishError::TooLarge(_))));
        assert_eq!(publisher.publish("t:d/config", Bytes::from_static(b"{}"), false).unwrap(), 0);
        assert_eq!(publisher.publish("t:d/config", Bytes::from_static(b"{}"), true).unwrap(), 1);
        assert_eq!(publisher.in_flight(), 2);
        assert!(!*publisher.connected().borrow());
        // Closing while disconnected gives up at once on what can no longer be delivered, and says how much.
        assert_eq!(publisher.close(Duration::from_millis(50)).await, 2);
        assert!(matches!(publisher.publish("t:d/config", Bytes::new(), false), Err(PublishError::Closed)));
    }

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
