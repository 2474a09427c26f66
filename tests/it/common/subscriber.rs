//! An MQTT subscriber that records what it receives: a device on its config topic, or a spy on `#`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::task::JoinHandle;

/// Topic and payload of one message a subscriber received.
pub type Delivery = (String, Vec<u8>);

/// An MQTT subscriber (a device, or a spy on `#`) with a persistent session, recording every publish it receives.
pub struct Subscriber {
    received: Arc<Mutex<Vec<Delivery>>>,
    /// Payloads with `D` for the DUP flag, and reconnections: shown when an order check fails.
    pub log: Arc<Mutex<Vec<String>>>,
    client: AsyncClient,
    task: JoinHandle<()>,
}

impl Subscriber {
    pub async fn connect(port: u16, username: &str, client_id: &str, filter: &str) -> Self {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
        options.set_credentials(username, "");
        options.set_clean_session(false);
        options.set_keep_alive(Duration::from_secs(5));
        options.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        client.subscribe(filter, QoS::AtLeastOnce).await.expect("subscribe");
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::new(Mutex::new(Vec::<String>::new()));
        let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
        let task = tokio::spawn({
            let received = received.clone();
            let log = log.clone();
            let client = client.clone();
            let filter = filter.to_string();
            async move {
                let mut subscribed_tx = Some(subscribed_tx);
                let mut connections = 0;
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            received.lock().unwrap().push((p.topic.clone(), p.payload.to_vec()));
                            log.lock().unwrap().push(format!(
                                "{}{}",
                                if p.dup { "D" } else { "" },
                                String::from_utf8_lossy(&p.payload)
                            ));
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            if let Some(tx) = subscribed_tx.take() {
                                let _ = tx.send(());
                            }
                        }
                        Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                            log.lock().unwrap().push(format!("CONNACK sp={}", ack.session_present));
                            connections += 1;
                            if connections > 1 && !ack.session_present {
                                let _ = client.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                            }
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), subscribed).await.expect("SUBACK in time").expect("SUBACK");
        Self { received, log, client, task }
    }

    pub fn received(&self) -> Vec<Delivery> {
        self.received.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    pub async fn stop(self) {
        let _ = self.client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.task.abort();
    }
}
