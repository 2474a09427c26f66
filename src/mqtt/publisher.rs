//! The service's QoS 1 publisher (K2V): every publish is tracked until the broker's PUBACK and, after any reconnect,
//! sent again in its original order — rumqttc silently drops what it had pending when the session was not resumed.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use rumqttc::{AsyncClient, ClientError, Event, EventLoop, Outgoing, Packet, QoS, Request};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::backoff::Backoff;
use super::book::{Book, Message};
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
        let mut book = self.book.lock();
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
        self.book.lock().messages.len()
    }

    /// Publishes sent again after connection losses, since start.
    pub fn resent(&self) -> u64 {
        self.book.lock().resent
    }

    /// Follows the connection state (true once the broker accepted the connection).
    pub fn connected(&self) -> watch::Receiver<bool> {
        self.connected.clone()
    }

    /// Refuses new publishes, waits until every accepted one is acknowledged (or `deadline` passes), then
    /// disconnects cleanly. Returns how many stayed un-acknowledged.
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
    acks: mpsc::UnboundedSender<u64>,
    connected: watch::Sender<bool>,
    probe: Probe,
    stop: CancellationToken,
}

impl Driver {
    async fn run(mut self) {
        let mut backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF).with_jitter(0.2);
        loop {
            let event = tokio::select! {
                biased;
                () = self.stop.cancelled() => break,
                event = self.eventloop.poll() => event,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    tracing::info!(session_present = ack.session_present, "MQTT publisher connected");
                    backoff.reset();
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

    /// Reports acknowledgements.
    fn handle(&mut self, event: &Event) {
        if let Some(seq) = self.book.lock().on_event(event) {
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
}
