//! The service's QoS 1 publisher (K2V), MQTT 5: every publish is tracked until the broker's PUBACK, whose reason code
//! says delivered, refused for good, or "not now"; after any reconnect the unanswered ones are sent again in order.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::{Error as PacketError, QoS};
use rumqttc::v5::{AsyncClient, ClientError, ConnectionError, Event, EventLoop, Incoming, Request, StateError};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::backoff::Backoff;
pub use super::book::Refusal;
use super::book::{Answer, Book, Message};
use super::reload::{self, Reload};
use super::{MAX_PACKET_BYTES, MqttConfigError, MqttSettings};
use crate::readiness::ReadyFlag;

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A connection lost sooner than this after the CONNACK does not reset the reconnect delay.
const STABLE_CONNECTION: Duration = Duration::from_secs(5);
/// Pause before re-sending publishes the broker answered "quota exceeded"; doubles while it keeps answering so.
const MIN_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(5);
/// Room for the MQTT fixed header, topic length, packet id and properties length around topic and payload.
const PACKET_OVERHEAD: usize = 16;

/// Why a message was not taken.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Larger than the client may send (its own limit, or the broker's Maximum Packet Size): rumqttc would fail the
    /// connection with it.
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

/// What became of an accepted publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// PUBACK 0x00 (or 0x10, no matching subscribers).
    Delivered,
    /// Refused for good: the message is not sent again.
    Refused(Refusal),
}

/// The broker's final answer for one publish, on the receiver [`Publisher::start`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub seq: u64,
    pub outcome: Outcome,
}

/// Handle to the publisher.
pub struct Publisher {
    client: AsyncClient,
    book: Arc<Mutex<Book>>,
    connected: watch::Receiver<bool>,
    /// The broker's Maximum Packet Size (CONNACK), or ours.
    max_packet: Arc<AtomicUsize>,
    stop: CancellationToken,
    task: Mutex<Option<AbortOnDropHandle<()>>>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").field("connected", &*self.connected.borrow()).finish_non_exhaustive()
    }
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
        probe: ReadyFlag,
    ) -> Result<(Self, mpsc::UnboundedReceiver<Ack>), MqttConfigError> {
        // Before the options are built: a renewal in between is then seen as a change.
        let reload = Reload::new(settings.tls.as_ref(), reload::POLL_EVERY);
        let mut options = settings.options(role, true)?;
        // Packet ids cycle over the in-flight window (the broker's Receive Maximum may lower it); twice the
        // caller's bound keeps a slow ack from colliding.
        options.set_outgoing_inflight_upper_limit(max_in_flight.saturating_mul(2).saturating_add(10));
        let (client, eventloop) = super::client(options, usize::from(max_in_flight) + 64);
        let book = Arc::new(Mutex::new(Book::default()));
        let (connected_tx, connected) = watch::channel(false);
        let (acks_tx, acks) = mpsc::unbounded_channel();
        let max_packet = Arc::new(AtomicUsize::new(MAX_PACKET_BYTES));
        let stop = CancellationToken::new();
        let driver = Driver {
            eventloop,
            book: book.clone(),
            acks: acks_tx,
            connected: connected_tx,
            max_packet: max_packet.clone(),
            probe,
            stop: stop.clone(),
            reload,
            cycling: false,
        };
        let task = AbortOnDropHandle::new(tokio::spawn(driver.run()));
        Ok((Self { client, book, connected, max_packet, stop, task: Mutex::new(Some(task)) }, acks))
    }

    /// Queues a QoS 1 publish and returns its sequence number, which comes back on the ack receiver once the broker
    /// answered it for good. Accepted while disconnected too: it goes out after the reconnect.
    ///
    /// # Errors
    /// Too large for an MQTT packet, queue full, or closed.
    pub fn publish(&self, topic: &str, payload: Bytes, retain: bool) -> Result<u64, PublishError> {
        let size = topic.len() + payload.len() + PACKET_OVERHEAD;
        if size > self.max_packet.load(Ordering::Relaxed) {
            return Err(PublishError::TooLarge(size));
        }
        if topic.is_empty() || topic.contains('\0') || !rumqttc::v5::mqttbytes::valid_topic(topic) {
            return Err(PublishError::InvalidTopic(topic.to_string()));
        }
        let mut book = self.book.lock();
        if book.closed {
            return Err(PublishError::Closed);
        }
        match self.client.try_publish(topic, QoS::AtLeastOnce, retain, payload.clone()) {
            Ok(()) => {}
            // Full, or the event loop is gone (its watch sender went with it).
            Err(ClientError::TryRequest(_) | ClientError::Request(_)) => {
                let gone = self.stop.is_cancelled() || self.connected.has_changed().is_err();
                return Err(if gone { PublishError::Closed } else { PublishError::Busy });
            }
        }
        Ok(book.submitted(Message { topic: topic.to_string(), payload, retain }))
    }

    /// Publishes not yet answered for good.
    pub fn in_flight(&self) -> usize {
        self.book.lock().messages.len()
    }

    /// Publishes sent again (after connection losses or a "quota exceeded" answer), since start.
    pub fn resent(&self) -> u64 {
        self.book.lock().resent
    }

    /// Follows the connection state (true once the broker accepted the connection).
    pub fn connected(&self) -> watch::Receiver<bool> {
        self.connected.clone()
    }

    /// Refuses new publishes, waits until every accepted one is answered (or `deadline` passes), then
    /// disconnects cleanly. Returns how many stayed unanswered.
    pub async fn close(&self, deadline: Duration) -> usize {
        self.book.lock().closed = true;
        let until = tokio::time::Instant::now() + deadline;
        while self.in_flight() > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let left = self.in_flight();
        let task = self.task.lock().take();
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

/// Owns rumqttc's event loop: feeds its events to the bookkeeping and its lost messages back to it.
struct Driver {
    eventloop: EventLoop,
    book: Arc<Mutex<Book>>,
    acks: mpsc::UnboundedSender<Ack>,
    connected: watch::Sender<bool>,
    max_packet: Arc<AtomicUsize>,
    probe: ReadyFlag,
    stop: CancellationToken,
    /// Renewed TLS files (mutual TLS only).
    reload: Option<Reload>,
    /// A DISCONNECT is on its way to reconnect with renewed TLS files.
    cycling: bool,
}

impl Driver {
    async fn run(mut self) {
        let mut backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF).with_jitter(0.2).with_stable_after(STABLE_CONNECTION);
        let mut quota = Backoff::new(MIN_RETRY, MAX_RETRY);
        let mut retry_at: Option<tokio::time::Instant> = None;
        loop {
            let event = tokio::select! {
                biased;
                () = self.stop.cancelled() => break,
                () = async { if let Some(at) = retry_at { tokio::time::sleep_until(at).await } }, if retry_at.is_some() => {
                    retry_at = None;
                    self.retry_now();
                    continue;
                }
                transport = reload::next(&mut self.reload) => {
                    // The next connect presents the renewed certificate; a live connection is cycled for it now.
                    self.eventloop.options.set_transport(transport);
                    if *self.connected.borrow() && !self.cycling {
                        self.cycling = true;
                        reload::start_cycle(&mut self.eventloop);
                    }
                    continue;
                }
                event = self.eventloop.poll() => event,
            };
            match event {
                Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                    tracing::info!(session_present = ack.session_present, "MQTT publisher connected");
                    let broker_max = ack.properties.as_ref().and_then(|p| p.max_packet_size);
                    let limit = broker_max.map_or(MAX_PACKET_BYTES, |m| (m as usize).min(MAX_PACKET_BYTES));
                    self.max_packet.store(limit, Ordering::Relaxed);
                    backoff.connected();
                    self.requeue_lost();
                    self.connected.send_replace(true);
                    self.probe.set(true);
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) if self.cycling && !self.book.lock().closed => {
                    // Everything unanswered is sent again after the reconnect, in order, as after a lost connection.
                    self.cycling = false;
                    reload::end_cycle(&mut self.eventloop);
                    self.connected.send_replace(false);
                    retry_at = None;
                    self.connection_lost(None);
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                    tracing::info!("MQTT publisher disconnected");
                    break;
                }
                Ok(event) => match self.handle(&event) {
                    Some(Answer::Delivered(_)) => quota.reset(),
                    Some(Answer::Retry(seq)) => {
                        if retry_at.is_none() {
                            let delay = quota.next_delay();
                            tracing::warn!(seq, retry_in = ?delay, "MQTT publish answered quota exceeded; sent again later");
                            retry_at = Some(tokio::time::Instant::now() + delay);
                        }
                    }
                    Some(Answer::Refused(..)) | None => {}
                },
                Err(error) => {
                    self.connected.send_replace(false);
                    self.probe.down(format!("connection lost: {error}"));
                    retry_at = None;
                    // A cycle's DISCONNECT not sent yet goes with the pending queue the bookkeeping takes back.
                    self.cycling = false;
                    self.connection_lost(Some(&error));
                    if self.book.lock().closed && self.book.lock().messages.is_empty() {
                        break;
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(%error, retry_in = ?delay, "MQTT publisher connection lost");
                    tokio::select! {
                        () = self.stop.cancelled() => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        self.connected.send_replace(false);
        self.probe.set(false);
    }

    /// Reports final answers.
    fn handle(&mut self, event: &Event) -> Option<Answer> {
        let answer = self.book.lock().on_event(event)?;
        match answer {
            Answer::Delivered(seq) => {
                let _ = self.acks.send(Ack { seq, outcome: Outcome::Delivered });
            }
            Answer::Refused(seq, refusal) => {
                let _ = self.acks.send(Ack { seq, outcome: Outcome::Refused(refusal) });
            }
            Answer::Retry(_) => {}
        }
        Some(answer)
    }

    /// Takes back from rumqttc everything it still holds of the lost connection (see [`Book::connection_lost`]).
    fn connection_lost(&mut self, error: Option<&ConnectionError>) {
        // Events read before the error are still buffered: PUBACKs among them are real acknowledgements of the old
        // connection and must be counted now, not mistaken for acks of new packets with the same id later.
        while let Some(event) = self.eventloop.state.events.pop_front() {
            self.handle(&event);
        }
        if let Some(ConnectionError::MqttState(StateError::Deserialization(PacketError::OutgoingPacketTooLarge {
            pkt_size,
            max,
        }))) = error
        {
            // Sending it again would fail the next connection the same way.
            if let Some(seq) = self.book.lock().refuse_last_sent() {
                tracing::warn!(seq, pkt_size, max, "MQTT publish larger than the broker accepts; given up");
                let _ = self.acks.send(Ack { seq, outcome: Outcome::Refused(Refusal::PacketTooLarge) });
            }
        }
        let taken = std::mem::take(&mut self.eventloop.pending);
        self.eventloop.state.collision = None;
        let unnumbered = taken.iter().filter(|r| matches!(r, Request::Publish(p) if p.pkid == 0)).count();
        self.book.lock().connection_lost(unnumbered);
    }

    /// Puts the lost messages in front of everything still in the request queue, oldest first.
    fn requeue_lost(&mut self) {
        let publishes = self.book.lock().requeue();
        if !publishes.is_empty() {
            tracing::info!(count = publishes.len(), "re-sending MQTT publishes not acknowledged before the reconnect");
        }
        self.eventloop.pending.extend(publishes.into_iter().map(Request::Publish));
    }

    /// Sends the "quota exceeded" publishes again, after what rumqttc already holds and before the request queue.
    fn retry_now(&mut self) {
        let queued = self.eventloop.pending.iter().filter(|r| matches!(r, Request::Publish(_))).count();
        let publishes = self.book.lock().take_retries(queued);
        self.eventloop.pending.extend(publishes.into_iter().map(Request::Publish));
    }
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
        let (publisher, _acks) = Publisher::start(&settings(), "k2v", 10, ReadyFlag::default()).unwrap();
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
}
