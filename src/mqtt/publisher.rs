//! The service's QoS 1 publisher (K2V), MQTT 5: every publish is tracked until the broker's PUBACK, whose reason code
//! says delivered, refused for good, or "not now"; after any reconnect the unanswered ones are sent again in order.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::{Error as PacketError, QoS};
use rumqttc::v5::{
    AsyncClient, ClientError, ConnectionError, Event, EventLoop, Incoming, MqttState, Request, StateError,
};
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
        let inflight_limit = max_in_flight.saturating_mul(2).saturating_add(10);
        options.set_outgoing_inflight_upper_limit(inflight_limit);
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
            inflight_limit,
            window: inflight_limit,
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
    /// The in-flight limit set on rumqttc.
    inflight_limit: u16,
    /// rumqttc's window on the current connection: the in-flight limit, lowered to the broker's Receive Maximum.
    window: u16,
}

impl Driver {
    async fn run(mut self) {
        let mut backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF).with_jitter(0.2).with_stable_after(STABLE_CONNECTION);
        let mut quota = Backoff::new(MIN_RETRY, MAX_RETRY);
        let mut retry_at: Option<tokio::time::Instant> = None;
        loop {
            self.feed_resend();
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
                    // As rumqttc sets its own (`handle_incoming_connack`): a CONNACK without one keeps the last.
                    if let Some(receive_max) = ack.properties.as_ref().and_then(|p| p.receive_max) {
                        self.window = receive_max.min(self.inflight_limit);
                    }
                    backoff.connected();
                    let to_resend = self.book.lock().to_resend();
                    if to_resend > 0 {
                        tracing::info!(
                            count = to_resend,
                            window = self.window,
                            "re-sending MQTT publishes not acknowledged before the reconnect"
                        );
                    }
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
        let answer = self.book.lock().on_event(event);
        if let Event::Incoming(Incoming::PubAck(ack)) = event {
            self.release_held(ack.pkid);
        }
        let answer = answer?;
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
        // A fresh state for the next connection, and the window back at the upper limit until its CONNACK says
        // otherwise. rumqttc numbers packets on from where it stopped and wraps only at exactly its window: after a
        // broker with a smaller Receive Maximum than the last one, ids would pass the window and every first publish
        // fail (`Unsolicited`). What it held is in `taken` (or was held on a collision, which the Book keeps).
        self.eventloop.state = MqttState::new(self.inflight_limit, self.eventloop.state.manual_acks);
        self.window = self.inflight_limit;
        let unnumbered = taken.iter().filter(|r| matches!(r, Request::Publish(p) if p.pkid == 0)).count();
        self.book.lock().connection_lost(unnumbered);
    }

    /// Sends the "quota exceeded" publishes again, with the other messages waiting for that.
    fn retry_now(&mut self) {
        self.book.lock().release_retries();
    }

    /// Gives rumqttc the next message to send again, if it can send it now. rumqttc takes its pending list before its
    /// request queue but without its flow control (see [`Book`]), so a message goes there only when rumqttc's window
    /// has room and no publish is held back on a packet id collision, one at a time. (Its id may still be in use,
    /// answered out of order: rumqttc then holds it, the one publish it can hold, and nothing more is handed over
    /// until that is released.) Newer messages cannot overtake: rumqttc reads its request queue only when its
    /// pending list is empty and under those same two conditions, in which the next message to send again is handed
    /// over first.
    fn feed_resend(&mut self) {
        let state = &self.eventloop.state;
        let can_send_now = *self.connected.borrow()
            // Every event rumqttc buffered has reached the bookkeeping: no publish it numbered is still unmatched,
            // so the one given now is numbered next.
            && state.events.is_empty()
            && state.collision.is_none()
            && state.inflight() < self.window
            && !self.eventloop.pending.iter().any(|request| matches!(request, Request::Publish(_)));
        if !can_send_now {
            return;
        }
        if let Some(publish) = self.book.lock().next_resend() {
            self.eventloop.pending.push_back(Request::Publish(publish));
        }
    }

    /// After a PUBACK for `pkid`: rumqttc sends the publish it held back on that packet id only when the PUBACK
    /// is a success, and after a refusal or "not now" would hold it (and the request queue behind it) until its
    /// collision timeout drops the connection. The id is free either way: the held publish goes first, with its id.
    fn release_held(&mut self, pkid: u16) {
        let eventloop = &mut self.eventloop;
        if eventloop.state.collision.as_ref().is_some_and(|held| held.pkid == pkid)
            && let Some(held) = eventloop.state.collision.take()
        {
            eventloop.state.collision_ping_count = 0;
            eventloop.pending.push_front(Request::Publish(held));
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use rumqttc::v5::mqttbytes::v5::{
        ConnAck, ConnAckProperties, ConnectReturnCode, Packet, PingResp, PubAck, PubAckReason,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    fn settings() -> MqttSettings {
        // Nothing listens on port 1 of the loopback: the publisher stays disconnected.
        settings_for(1)
    }

    fn settings_for(port: u16) -> MqttSettings {
        MqttSettings {
            host: "127.0.0.1".into(),
            port,
            tls: None,
            username: "k2v-bridge".into(),
            password: None,
            client_id: "unit".into(),
            keep_alive: Duration::from_secs(30),
        }
    }

    /// The broker's side of one connection, played by the test: it decides when and how each publish is answered.
    struct BrokerSide {
        stream: TcpStream,
        received: BytesMut,
    }

    impl BrokerSide {
        /// Accepts the publisher's connection and answers its CONNECT, announcing `receive_max`.
        async fn accept(listener: &TcpListener, receive_max: u16) -> Self {
            let (stream, _) = listener.accept().await.expect("the publisher connects");
            let mut side = Self { stream, received: BytesMut::new() };
            assert!(matches!(side.next().await, Packet::Connect(..)));
            let properties = ConnAckProperties {
                session_expiry_interval: None,
                receive_max: Some(receive_max),
                max_qos: None,
                retain_available: None,
                max_packet_size: None,
                assigned_client_identifier: None,
                topic_alias_max: None,
                reason_string: None,
                user_properties: Vec::new(),
                wildcard_subscription_available: None,
                subscription_identifiers_available: None,
                shared_subscription_available: None,
                server_keep_alive: None,
                response_information: None,
                server_reference: None,
                authentication_method: None,
                authentication_data: None,
            };
            let connack =
                ConnAck { session_present: false, code: ConnectReturnCode::Success, properties: Some(properties) };
            side.send(Packet::ConnAck(connack)).await;
            side
        }

        async fn next(&mut self) -> Packet {
            loop {
                match Packet::read(&mut self.received, None) {
                    Ok(packet) => return packet,
                    Err(PacketError::InsufficientBytes(_)) => {}
                    Err(error) => panic!("malformed packet from the publisher: {error}"),
                }
                let read = self.stream.read_buf(&mut self.received).await.expect("read from the publisher");
                assert!(read > 0, "the publisher closed the connection");
            }
        }

        /// The next PUBLISH: its packet id and payload.
        async fn publish(&mut self) -> (u16, String) {
            self.publish_within(Duration::from_secs(2)).await.expect("a publish within 2 s")
        }

        /// The next PUBLISH if one comes within `wait`.
        async fn publish_within(&mut self, wait: Duration) -> Option<(u16, String)> {
            tokio::time::timeout(wait, self.next_publish()).await.ok()
        }

        async fn next_publish(&mut self) -> (u16, String) {
            loop {
                match self.next().await {
                    Packet::Publish(publish) => {
                        return (publish.pkid, String::from_utf8_lossy(&publish.payload).into_owned());
                    }
                    Packet::PingReq(_) => self.send(Packet::PingResp(PingResp)).await,
                    other => panic!("unexpected packet from the publisher: {other:?}"),
                }
            }
        }

        async fn answer(&mut self, pkid: u16, reason: PubAckReason) {
            self.send(Packet::PubAck(PubAck { pkid, reason, properties: None })).await;
        }

        async fn send(&mut self, packet: Packet) {
            let mut bytes = BytesMut::new();
            packet.write(&mut bytes, None).expect("encode");
            self.stream.write_all(&bytes).await.expect("write to the publisher");
        }
    }

    /// A publisher (window 10) connected to a broker played by the test that announces `receive_max`.
    async fn connected(receive_max: u16) -> (TcpListener, Publisher, mpsc::UnboundedReceiver<Ack>, BrokerSide) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let settings = settings_for(listener.local_addr().unwrap().port());
        let (publisher, acks) = Publisher::start(&settings, "k2v", 10, ReadyFlag::default()).unwrap();
        let broker = BrokerSide::accept(&listener, receive_max).await;
        publisher.connected().wait_for(|up| *up).await.unwrap();
        (listener, publisher, acks, broker)
    }

    /// Publishes `n`, lets the broker take it and acknowledge it: its packet id and payload there, and the answer.
    async fn round_trip(
        publisher: &Publisher,
        broker: &mut BrokerSide,
        acks: &mut mpsc::UnboundedReceiver<Ack>,
        n: u64,
    ) -> (u16, String, Ack) {
        publisher.publish("t:d/config", Bytes::from(n.to_string()), false).unwrap();
        let (pkid, payload) = broker.publish().await;
        broker.answer(pkid, PubAckReason::Success).await;
        (pkid, payload, next_ack(acks).await)
    }

    async fn next_ack(acks: &mut mpsc::UnboundedReceiver<Ack>) -> Ack {
        tokio::time::timeout(Duration::from_secs(2), acks.recv()).await.expect("an answer").expect("publisher alive")
    }

    #[tokio::test]
    async fn publishes_lost_with_a_connection_go_out_again_in_order_within_the_broker_window() {
        let (listener, publisher, mut acks, mut broker) = connected(2).await;
        for n in 0..6 {
            publisher.publish("t:d/config", Bytes::from(n.to_string()), false).unwrap();
        }
        // The broker lets two be unacknowledged: two go out, the rest wait; then the connection goes.
        assert_eq!(broker.publish().await.1, "0");
        assert_eq!(broker.publish().await.1, "1");
        assert_eq!(broker.publish_within(Duration::from_millis(100)).await, None, "beyond the Receive Maximum");
        drop(broker);
        // All six are sent again, two at a time as the broker answers, in order: none is numbered while the
        // window is full (rumqttc would hold it back on a packet id in use and replace it with the next one).
        let mut broker = BrokerSide::accept(&listener, 2).await;
        for pair in [["0", "1"], ["2", "3"], ["4", "5"]] {
            let first = broker.publish().await;
            let second = broker.publish().await;
            assert_eq!([first.1.as_str(), second.1.as_str()], pair);
            assert_eq!(broker.publish_within(Duration::from_millis(300)).await, None, "beyond the Receive Maximum");
            broker.answer(first.0, PubAckReason::Success).await;
            broker.answer(second.0, PubAckReason::Success).await;
        }
        let mut answered = Vec::new();
        for _ in 0..6 {
            let ack = next_ack(&mut acks).await;
            assert_eq!(ack.outcome, Outcome::Delivered);
            answered.push(ack.seq);
        }
        assert_eq!(answered, [0, 1, 2, 3, 4, 5]);
        assert_eq!(publisher.resent(), 6);
        assert_eq!(publisher.close(Duration::from_secs(1)).await, 0);
    }

    #[tokio::test]
    async fn a_broker_with_a_smaller_receive_maximum_than_the_last_gets_ids_within_its_own() {
        let (listener, publisher, mut acks, mut broker) = connected(30).await;
        for n in 0..12 {
            let (_, _, ack) = round_trip(&publisher, &mut broker, &mut acks, n).await;
            assert_eq!(ack.seq, n);
        }
        drop(broker);
        // The next broker lets two be unacknowledged; rumqttc had numbered up to 12.
        let mut broker = BrokerSide::accept(&listener, 2).await;
        for n in 12..20 {
            let (pkid, payload, ack) = round_trip(&publisher, &mut broker, &mut acks, n).await;
            assert!((1..=2).contains(&pkid), "packet id {pkid} within the Receive Maximum");
            assert_eq!(payload, n.to_string());
            assert_eq!(ack, Ack { seq: n, outcome: Outcome::Delivered });
        }
        assert_eq!(publisher.close(Duration::from_secs(1)).await, 0);
    }

    #[tokio::test]
    async fn a_publish_held_on_a_refused_packet_id_goes_out_at_once() {
        let (_listener, publisher, mut acks, mut broker) = connected(2).await;
        for n in 0..3 {
            publisher.publish("t:d/config", Bytes::from(n.to_string()), false).unwrap();
        }
        assert_eq!(broker.publish().await, (1, "0".to_string()));
        assert_eq!(broker.publish().await, (2, "1".to_string()));
        // Answered out of order: rumqttc numbers the third 1 again, still taken, and holds it back.
        broker.answer(2, PubAckReason::Success).await;
        assert_eq!(broker.publish_within(Duration::from_millis(200)).await, None, "held back while 1 is taken");
        // A refusal frees 1 too; rumqttc itself would keep the third until its collision timeout (two keep-alives)
        // dropped the connection.
        broker.answer(1, PubAckReason::NotAuthorized).await;
        assert_eq!(broker.publish_within(Duration::from_secs(2)).await, Some((1, "2".to_string())));
        broker.answer(1, PubAckReason::Success).await;
        let answers = [next_ack(&mut acks).await, next_ack(&mut acks).await, next_ack(&mut acks).await];
        assert_eq!(
            answers,
            [
                Ack { seq: 1, outcome: Outcome::Delivered },
                Ack { seq: 0, outcome: Outcome::Refused(Refusal::NotAuthorized) },
                Ack { seq: 2, outcome: Outcome::Delivered }
            ]
        );
        assert_eq!(publisher.close(Duration::from_secs(1)).await, 0);
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
