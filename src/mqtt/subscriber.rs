//! A subscription with manual acknowledgements: each QoS 1 message is acknowledged to the broker only after its
//! handler finished, in the order the messages arrived, so the broker keeps every message not yet handled.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{Event, Outgoing, Packet, Publish, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::MqttSettings;
use super::backoff::Backoff;
use crate::health::Probe;
use crate::ordered::InOrder;

/// A message handed to the handler.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
}

/// Room in the client's request queue; acknowledgements are small and the broker bounds what it sends unacked.
const REQUEST_CAPACITY: usize = 10_000;
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Messages received on the current connection, oldest first, until acknowledged.
struct InOrderAcks {
    connection: u64,
    next: u64,
    waiting: InOrder<u64, Publish>,
}

impl InOrderAcks {
    fn new() -> Self {
        Self { connection: 0, next: 0, waiting: InOrder::default() }
    }

    /// A new connection: acknowledgements for messages of the old one would hit unrelated packet ids, and the
    /// broker redelivers those messages anyway (persistent session).
    fn reconnected(&mut self) {
        self.connection += 1;
        self.waiting.clear();
    }

    fn received(&mut self, publish: Publish) -> (u64, u64) {
        let seq = self.next;
        self.next += 1;
        self.waiting.push(seq, publish);
        (self.connection, seq)
    }

    /// Marks a message handled and returns those that can now be acknowledged, in order.
    fn handled(&mut self, connection: u64, seq: u64) -> Vec<Publish> {
        if connection != self.connection || !self.waiting.complete(seq) {
            return Vec::new();
        }
        self.waiting.release().map(|(_, publish)| publish).collect()
    }

    fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

/// Runs until `shutdown`: connects (persistent session), subscribes `filter` at QoS 1, hands every message to
/// `handle` and acknowledges it once the returned future completes. `handle` runs when the message arrives (so
/// its synchronous part sees messages in order); the future may finish in any order. At shutdown, messages still
/// being handled get `drain` to finish; the rest stay unacknowledged in the broker.
pub async fn run<H, F>(
    settings: MqttSettings,
    role: &str,
    filter: String,
    probe: Probe,
    handle: H,
    shutdown: CancellationToken,
    drain: Duration,
) where
    H: Fn(Message) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let mut options = match settings.options(role, false) {
        Ok(options) => options,
        Err(e) => {
            tracing::error!(error = %e, "MQTT subscription cannot start");
            return;
        }
    };
    options.set_manual_acks(true);
    let (client, mut eventloop) = super::client(options, REQUEST_CAPACITY);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(u64, u64)>();
    let mut acks = InOrderAcks::new();
    let mut backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);

    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            Some((connection, seq)) = done_rx.recv() => {
                for publish in acks.handled(connection, seq) {
                    if let Err(e) = client.try_ack(&publish) {
                        tracing::warn!(error = %e, "cannot queue an MQTT ack; the broker will redeliver");
                    }
                }
            }
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(connack))) => {
                    backoff.reset();
                    tracing::info!(session_present = connack.session_present, %filter, "MQTT subscription connected");
                    if let Err(e) = client.try_subscribe(filter.as_str(), QoS::AtLeastOnce) {
                        tracing::error!(error = %e, "cannot subscribe");
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(suback))) => {
                    // Ready means subscribed: before the SUBACK, messages for the group may have no taker.
                    let refused = suback.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure));
                    if refused {
                        tracing::error!(%filter, "the broker refused the subscription");
                    }
                    probe.set(!refused);
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    let message = Message { topic: publish.topic.clone(), payload: publish.payload.clone() };
                    let (connection, seq) = acks.received(publish);
                    let work = handle(message);
                    let done = done_tx.clone();
                    tokio::spawn(async move {
                        work.await;
                        let _ = done.send((connection, seq));
                    });
                }
                Ok(_) => {}
                Err(e) => {
                    probe.set(false);
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
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => {
                tracing::warn!("MQTT subscription stopped with messages unacknowledged; the broker keeps them");
                break;
            }
            Some((connection, seq)) = done_rx.recv() => {
                for publish in acks.handled(connection, seq) {
                    let _ = client.try_ack(&publish);
                }
            }
            event = eventloop.poll() => if event.is_err() { break },
        }
    }
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
    probe.set(false);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(pkid: u16) -> Publish {
        let mut p = Publish::new("t", QoS::AtLeastOnce, vec![]);
        p.pkid = pkid;
        p
    }

    #[test]
    fn acks_leave_in_arrival_order() {
        let mut acks = InOrderAcks::new();
        let (c, a) = acks.received(publish(1));
        let (_, b) = acks.received(publish(2));
        let (_, d) = acks.received(publish(3));
        assert!(acks.handled(c, b).is_empty(), "2 waits for 1");
        assert!(acks.handled(c, d).is_empty());
        let ready: Vec<u16> = acks.handled(c, a).iter().map(|p| p.pkid).collect();
        assert_eq!(ready, vec![1, 2, 3]);
        assert!(acks.is_empty());
    }

    #[test]
    fn acks_of_an_old_connection_are_dropped() {
        let mut acks = InOrderAcks::new();
        let (old, seq) = acks.received(publish(1));
        acks.reconnected();
        assert!(acks.handled(old, seq).is_empty());
        let (new, seq) = acks.received(publish(1));
        assert_eq!(acks.handled(new, seq).len(), 1);
    }
}
