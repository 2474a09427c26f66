//! A subscription with manual acknowledgements: each QoS 1 message is acknowledged to the broker only after its
//! handler finished, in the order the messages arrived within their lane, so the broker keeps every message not yet
//! handled and a slow lane never holds the others' acknowledgements.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Filter, Publish, RetainForwardRule, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, Event, Incoming, MqttOptions};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::backoff::Backoff;
use super::reload::{self, Reload};
use super::{MqttConfigError, MqttSettings};
use crate::ordered::InOrder;
use crate::readiness::ReadyFlag;

/// A message handed to the handler.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    /// 0 or 1 (the subscription's QoS caps it): a QoS 0 message is neither acknowledged nor kept by the broker.
    pub qos: u8,
}

/// Room in the client's request queue. Acknowledgements that find it full wait in [`InOrderAcks`] for the event loop
/// to take some (a lane may release up to the whole window, 65 535, at once).
const REQUEST_CAPACITY: usize = 10_000;

/// What the client subscribes to, and how much the broker may send it unacknowledged.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// Subscribed at QoS 1.
    pub filter: String,
    /// QoS 1 messages the broker may send before an acknowledgement: the CONNECT's Receive Maximum. An MQTT 5 broker
    /// takes its window from it alone (VerneMQ's MQTT 5 session ignores the `max_inflight_messages` modifier and,
    /// without a Receive Maximum, sends up to 65 535).
    pub window: u16,
}

/// The connection options of a subscription: a persistent session, manual acknowledgements and its window.
///
/// # Errors
/// Unreadable or invalid TLS files.
fn options(settings: &MqttSettings, role: &str, window: u16) -> Result<MqttOptions, MqttConfigError> {
    let mut options = settings.options(role, true)?;
    options.set_manual_acks(true);
    options.set_receive_maximum(Some(window));
    Ok(options)
}
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A connection lost sooner than this after the CONNACK counts as dropped at once: the reconnect delay keeps growing.
const STABLE_CONNECTION: Duration = Duration::from_secs(5);
/// A refused SUBSCRIBE is tried again on the same connection after this, doubling up to the maximum (an operator
/// may fix the broker's ACL; the readiness report says why meanwhile).
const MIN_RESUBSCRIBE: Duration = Duration::from_secs(5);
const MAX_RESUBSCRIBE: Duration = Duration::from_secs(300);
/// A SUBSCRIBE that found the client's request queue full is tried again after this.
const SUBSCRIBE_QUEUE_FULL_PAUSE: Duration = Duration::from_millis(50);

/// Subscribes `filter` at QoS 1, without the retained messages: a retained message was delivered when it was published,
/// and sent again at every subscribe (each reconnect, restart or handover) it would be handled again as new. Returns
/// when to try again if the client's request queue had no room (acknowledgements can fill it).
fn subscribe(client: &AsyncClient, filter: &str) -> Option<tokio::time::Instant> {
    let filter = Filter { retain_forward_rule: RetainForwardRule::Never, ..Filter::new(filter, QoS::AtLeastOnce) };
    match client.try_subscribe_many([filter]) {
        Ok(()) => None,
        Err(e) => {
            tracing::warn!(error = %e, "cannot subscribe yet; trying again");
            Some(tokio::time::Instant::now() + SUBSCRIBE_QUEUE_FULL_PAUSE)
        }
    }
}

/// The reason code of a SUBACK entry, and its name; `None` when granted.
fn refused(code: &SubscribeReasonCode) -> Option<(u8, &'static str)> {
    Some(match code {
        SubscribeReasonCode::Success(_) => return None,
        SubscribeReasonCode::Failure | SubscribeReasonCode::Unspecified => (0x80, "unspecified_error"),
        SubscribeReasonCode::ImplementationSpecific => (0x83, "implementation_specific_error"),
        SubscribeReasonCode::NotAuthorized => (0x87, "not_authorized"),
        SubscribeReasonCode::TopicFilterInvalid => (0x8F, "topic_filter_invalid"),
        SubscribeReasonCode::PkidInUse => (0x91, "packet_identifier_in_use"),
        SubscribeReasonCode::QuotaExceeded => (0x97, "quota_exceeded"),
        SubscribeReasonCode::SharedSubscriptionsNotSupported => (0x9E, "shared_subscriptions_not_supported"),
        SubscribeReasonCode::SubscriptionIdNotSupported => (0xA1, "subscription_identifiers_not_supported"),
        SubscribeReasonCode::WildcardSubscriptionsNotSupported => (0xA2, "wildcard_subscriptions_not_supported"),
    })
}

/// Connections that ended soon after they were made, in a row: a broker closing the connection at once (a
/// disconnect loop) is reported as such rather than as one more lost connection.
#[derive(Debug, Default)]
struct ShortLived {
    connected_at: Option<Instant>,
    in_a_row: u32,
}

impl ShortLived {
    fn connected(&mut self, now: Instant) {
        self.connected_at = Some(now);
    }

    /// The readiness reason for a lost connection.
    fn lost(&mut self, now: Instant, error: &dyn std::fmt::Display) -> String {
        match self.connected_at.take() {
            Some(at) if now.saturating_duration_since(at) < STABLE_CONNECTION => self.in_a_row += 1,
            Some(_) => self.in_a_row = 0,
            None => {}
        }
        if self.in_a_row >= 3 {
            format!(
                "disconnect loop: {} connections in a row closed within {STABLE_CONNECTION:?}: {error}",
                self.in_a_row
            )
        } else {
            format!("connection lost: {error}")
        }
    }
}

/// Which messages must be acknowledged in order among themselves (V2K: one lane per tenant).
pub type Lane = u64;

/// Messages received on the current connection, oldest first per lane, until their acknowledgement is in the client's
/// request queue.
struct InOrderAcks {
    connection: u64,
    next: u64,
    waiting: HashMap<Lane, InOrder<u64, Publish>>,
    /// Released, in order, and not yet taken by the client's request queue (it was full). None is ever dropped: an
    /// MQTT 5 broker sends an unacknowledged message again only on the next connection, so a lost acknowledgement
    /// would hold a place of the window until then and bring the message back as a duplicate.
    unsent: VecDeque<Publish>,
}

impl InOrderAcks {
    fn new() -> Self {
        Self { connection: 0, next: 0, waiting: HashMap::new(), unsent: VecDeque::new() }
    }

    /// A new connection: acknowledgements for messages of the old one would hit unrelated packet ids, and the
    /// broker redelivers those messages anyway (persistent session). rumqttc drops those still in its queue too.
    fn reconnected(&mut self) {
        self.connection += 1;
        self.waiting.clear();
        self.unsent.clear();
    }

    fn received(&mut self, lane: Lane, publish: Publish) -> Done {
        let seq = self.next;
        self.next += 1;
        self.waiting.entry(lane).or_default().push(seq, publish);
        Done { connection: self.connection, lane, seq }
    }

    /// Marks a message handled; those of its lane that can now be acknowledged join the ones to send, in order.
    fn handled(&mut self, done: Done) {
        if done.connection != self.connection {
            return;
        }
        let Some(lane) = self.waiting.get_mut(&done.lane) else { return };
        if !lane.complete(done.seq) {
            return;
        }
        self.unsent.extend(lane.release().map(|(_, publish)| publish));
        if lane.is_empty() {
            self.waiting.remove(&done.lane);
        }
    }

    /// Queues the released acknowledgements, oldest first, as far as the client's request queue has room; the rest
    /// wait for the next call (after the event loop took some).
    fn send(&mut self, client: &AsyncClient) {
        while let Some(publish) = self.unsent.front() {
            // Full (the only error while the event loop lives).
            if client.try_ack(publish).is_err() {
                return;
            }
            self.unsent.pop_front();
        }
    }

    fn is_empty(&self) -> bool {
        self.waiting.is_empty() && self.unsent.is_empty()
    }
}

/// A handled message: its connection, lane and arrival number.
#[derive(Debug, Clone, Copy)]
struct Done {
    connection: u64,
    lane: Lane,
    seq: u64,
}

/// Runs until `shutdown`: connects (persistent session), subscribes at QoS 1, hands every message to
/// `handle` and acknowledges it once the returned future completes and every earlier message of the same lane was
/// acknowledged. `handle` runs when the message arrives (so its synchronous part sees messages in order); the future
/// may finish in any order. At shutdown, messages still
/// being handled get `drain` to finish; the rest stay unacknowledged in the broker.
pub async fn run<H, F>(
    settings: MqttSettings,
    role: &str,
    subscription: Subscription,
    probe: ReadyFlag,
    handle: H,
    shutdown: CancellationToken,
    drain: Duration,
) where
    H: Fn(Message) -> (Lane, F),
    F: Future<Output = ()> + Send + 'static,
{
    let mut reload = Reload::new(settings.tls.as_ref(), reload::POLL_EVERY);
    let Subscription { filter, window } = subscription;
    let options = match options(&settings, role, window) {
        Ok(options) => options,
        Err(e) => {
            tracing::error!(error = %e, "MQTT subscription cannot start");
            return;
        }
    };
    let (client, mut eventloop) = super::client(options, REQUEST_CAPACITY);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let mut acks = InOrderAcks::new();
    let mut backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF).with_jitter(0.2).with_stable_after(STABLE_CONNECTION);
    let mut resubscribe = Backoff::new(MIN_RESUBSCRIBE, MAX_RESUBSCRIBE);
    let mut resubscribe_at: Option<tokio::time::Instant> = None;
    let mut short_lived = ShortLived::default();
    // Connected, and whether a DISCONNECT is on its way to reconnect with renewed TLS files.
    let (mut connected, mut cycling) = (false, false);

    loop {
        acks.send(&client);
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            () = async { if let Some(at) = resubscribe_at { tokio::time::sleep_until(at).await } }, if resubscribe_at.is_some() => {
                resubscribe_at = subscribe(&client, &filter);
            }
            Some(done) = done_rx.recv() => acks.handled(done),
            transport = reload::next(&mut reload) => {
                eventloop.options.set_transport(transport);
                if connected && !cycling {
                    cycling = true;
                    reload::start_cycle(&mut eventloop);
                }
            }
            event = eventloop.poll() => match event {
                Ok(Event::Outgoing(Outgoing::Disconnect)) if cycling => {
                    // Reconnect with the renewed files; unacknowledged messages come again (persistent session).
                    (connected, cycling) = (false, false);
                    reload::end_cycle(&mut eventloop);
                    resubscribe_at = None;
                    acks.reconnected();
                }
                Ok(Event::Incoming(Incoming::ConnAck(connack))) => {
                    connected = true;
                    backoff.connected();
                    short_lived.connected(Instant::now());
                    tracing::info!(session_present = connack.session_present, %filter, "MQTT subscription connected");
                    // Also when the session is present: its SUBACK is what makes the subscription ready, and the
                    // session may hold no subscription (refused before) or another filter (changed configuration).
                    resubscribe_at = subscribe(&client, &filter);
                }
                Ok(Event::Incoming(Incoming::SubAck(suback))) => {
                    // Ready means subscribed: before the SUBACK, messages for the group may have no taker.
                    match suback.return_codes.iter().find_map(refused) {
                        None => {
                            resubscribe.reset();
                            probe.set(true);
                        }
                        Some((code, name)) => {
                            let delay = resubscribe.next_delay();
                            tracing::error!(%filter, code, reason = name, retry_in = ?delay, "the broker refused the subscription");
                            probe.down(format!("subscription to {filter} refused: SUBACK {code:#04x} {name}"));
                            resubscribe_at = Some(tokio::time::Instant::now() + delay);
                        }
                    }
                }
                Ok(Event::Incoming(Incoming::Publish(publish))) => {
                    // MQTT topics are UTF-8; a broker that breaks that gets U+FFFD, not a panic.
                    let topic = String::from_utf8_lossy(&publish.topic).into_owned();
                    let message = Message { topic, payload: publish.payload.clone(), qos: publish.qos as u8 };
                    let (lane, work) = handle(message);
                    // A QoS 0 message has nothing to acknowledge: kept in its lane, it would wait (payload and all)
                    // behind a QoS 1 message of its tenant that waits for Kafka, outside the broker's window.
                    if publish.qos == QoS::AtMostOnce {
                        tokio::spawn(work);
                    } else {
                        let done = acks.received(lane, publish);
                        let done_tx = done_tx.clone();
                        tokio::spawn(async move {
                            work.await;
                            let _ = done_tx.send(done);
                        });
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    (connected, cycling) = (false, false);
                    reload::forget_cycle(&mut eventloop);
                    probe.down(short_lived.lost(Instant::now(), &e));
                    resubscribe_at = None;
                    acks.reconnected();
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?delay, "MQTT subscription connection lost");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            },
        }
    }

    // Drain: acknowledge what finishes in time, keep the connection served meanwhile.
    let deadline = tokio::time::Instant::now() + drain;
    while !acks.is_empty() {
        acks.send(&client);
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => {
                tracing::warn!("MQTT subscription stopped with messages unacknowledged; the broker keeps them");
                break;
            }
            Some(done) = done_rx.recv() => acks.handled(done),
            event = eventloop.poll() => match event {
                // Lost, or closing for renewed TLS files: what is left cannot be acknowledged on it.
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => {
                    connected = false;
                    break;
                }
                Ok(_) => {}
            },
        }
    }
    // Only a live connection is closed: without one, rumqttc's poll connects first. For the plain subscription after
    // a lost lease, that fresh CONNECT with the cluster's one client id would take the session from the new holder.
    if connected {
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
    probe.set(false);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(pkid: u16) -> Publish {
        let mut p = Publish::new("t", QoS::AtLeastOnce, vec![], None);
        p.pkid = pkid;
        p
    }

    /// The packet ids released for acknowledgement since the last call.
    fn released(acks: &mut InOrderAcks) -> Vec<u16> {
        acks.unsent.drain(..).map(|p| p.pkid).collect()
    }

    #[test]
    fn acks_leave_in_arrival_order() {
        let mut acks = InOrderAcks::new();
        let a = acks.received(7, publish(1));
        let b = acks.received(7, publish(2));
        let d = acks.received(7, publish(3));
        acks.handled(b);
        assert!(released(&mut acks).is_empty(), "2 waits for 1");
        acks.handled(d);
        assert!(released(&mut acks).is_empty());
        acks.handled(a);
        assert_eq!(released(&mut acks), vec![1, 2, 3]);
        assert!(acks.is_empty());
    }

    #[test]
    fn a_waiting_lane_does_not_hold_the_others() {
        let mut acks = InOrderAcks::new();
        let slow = acks.received(1, publish(1));
        let fast = acks.received(2, publish(2));
        acks.handled(fast);
        assert_eq!(released(&mut acks), vec![2], "lane 2 does not wait for lane 1");
        assert!(!acks.is_empty());
        acks.handled(slow);
        assert_eq!(released(&mut acks), vec![1]);
        assert!(acks.is_empty());
    }

    #[test]
    fn acks_of_an_old_connection_are_dropped() {
        let mut acks = InOrderAcks::new();
        let old = acks.received(0, publish(1));
        let unsent = acks.received(1, publish(2));
        acks.handled(unsent);
        acks.reconnected();
        assert!(acks.is_empty(), "nothing of the old connection is left to send");
        acks.handled(old);
        assert!(released(&mut acks).is_empty());
        let new = acks.received(0, publish(1));
        acks.handled(new);
        assert_eq!(released(&mut acks), vec![1]);
    }

    /// A lane may release more acknowledgements at once than the client's request queue holds: the rest wait, in
    /// order, until the event loop took some (rumqttc's `clean` empties the queue here, as sending them would).
    #[test]
    fn acks_that_find_the_request_queue_full_wait_their_turn() {
        let settings = MqttSettings {
            host: "127.0.0.1".into(),
            port: 1,
            tls: None,
            username: "k2v-bridge".into(),
            password: None,
            client_id: "unit".into(),
            keep_alive: Duration::from_secs(30),
        };
        let (client, mut eventloop) = super::super::client(options(&settings, "v2k", 10).unwrap(), 2);
        let mut acks = InOrderAcks::new();
        let first = acks.received(0, publish(1));
        for pkid in 2..=5 {
            acks.received(0, publish(pkid));
        }
        for seq in 1..5 {
            acks.handled(Done { seq, ..first });
        }
        acks.handled(first);
        acks.send(&client);
        assert_eq!(acks.unsent.iter().map(|p| p.pkid).collect::<Vec<_>>(), vec![3, 4, 5], "two fit, none dropped");
        eventloop.clean();
        acks.send(&client);
        assert_eq!(acks.unsent.iter().map(|p| p.pkid).collect::<Vec<_>>(), vec![5]);
        eventloop.clean();
        acks.send(&client);
        assert!(acks.is_empty());
    }

    /// VerneMQ's MQTT 5 session takes its window from the CONNECT's Receive Maximum only (`max_inflight_messages` is
    /// a v3 modifier): without one it sends up to 65 535 unacknowledged messages, whatever V2K_MAX_IN_FLIGHT says.
    #[test]
    fn the_connect_announces_the_window_as_its_receive_maximum() {
        let settings = MqttSettings {
            host: "localhost".into(),
            port: 1883,
            tls: None,
            username: "k2v-bridge".into(),
            password: Some(crate::secret::Secret::new("pw")),
            client_id: "iotagent-mqtt-node1".into(),
            keep_alive: Duration::from_secs(30),
        };
        let options = options(&settings, "v2k", 1000).unwrap();
        assert_eq!(options.receive_maximum(), Some(1000));
        assert!(options.manual_acks());
        assert!(!options.clean_start(), "a persistent session");
    }

    /// Stopped while its connection is down (here: waiting to reconnect), the subscription opens none to say goodbye.
    #[tokio::test]
    async fn stopping_while_disconnected_opens_no_connection() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let settings = MqttSettings {
            host: "127.0.0.1".into(),
            port: listener.local_addr().unwrap().port(),
            tls: None,
            username: "k2v-bridge".into(),
            password: None,
            client_id: "unit".into(),
            keep_alive: Duration::from_secs(30),
        };
        let shutdown = CancellationToken::new();
        let subscription = Subscription { filter: "+/attrs".into(), window: 10 };
        let running = tokio::spawn(run(
            settings,
            "v2k",
            subscription,
            ReadyFlag::default(),
            |_: Message| (0, std::future::ready(())),
            shutdown.clone(),
            Duration::from_secs(1),
        ));
        // Connected, subscribed, then lost; the next attempt is closed at once: the client waits to reconnect.
        let (mut first, _) = listener.accept().await.unwrap();
        let mut packet = [0u8; 1024];
        let _ = first.read(&mut packet).await;
        // CONNACK: no session present, success, no properties.
        first.write_all(&[0x20, 0x03, 0x00, 0x00, 0x00]).await.unwrap();
        let _ = first.read(&mut packet).await;
        drop(first);
        drop(listener.accept().await.unwrap());
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), running).await.expect("stopped in time").unwrap();
        let after = tokio::time::timeout(Duration::from_millis(500), listener.accept()).await;
        assert!(after.is_err(), "a connection was opened after the stop");
    }

    #[test]
    fn suback_refusals_are_named() {
        assert_eq!(refused(&SubscribeReasonCode::Success(QoS::AtLeastOnce)), None);
        assert_eq!(refused(&SubscribeReasonCode::NotAuthorized), Some((0x87, "not_authorized")));
        assert_eq!(refused(&SubscribeReasonCode::Failure), Some((0x80, "unspecified_error")));
    }

    #[test]
    fn connections_dropped_at_once_are_a_loop() {
        let mut s = ShortLived::default();
        let mut now = Instant::now();
        assert_eq!(s.lost(now, &"refused"), "connection lost: refused", "never connected");
        for _ in 0..2 {
            s.connected(now);
            now += Duration::from_millis(50);
            assert!(s.lost(now, &"eof").starts_with("connection lost"));
        }
        s.connected(now);
        assert!(s.lost(now, &"eof").starts_with("disconnect loop: 3 connections"));
        s.connected(now);
        now += Duration::from_secs(6);
        assert_eq!(s.lost(now, &"eof"), "connection lost: eof", "a connection that lasted ends the loop");
    }
}
