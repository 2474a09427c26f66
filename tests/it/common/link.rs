//! A TCP relay in front of a broker that delays every byte in both directions: a broker further away than the
//! loopback, whose answers (PUBACKs) take a realistic time to come back.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Listens on a free loopback port; each connection gets one of its own to the upstream port. A connection refused
/// upstream (broker down) closes the client's at once, and one the broker closes is closed after the bytes still
/// on their way, so clients see a broker stop or restart as they would directly.
pub struct DelayedLink {
    pub port: u16,
    accepting: JoinHandle<()>,
}

impl DelayedLink {
    pub async fn start(upstream: u16, one_way: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the relay");
        let port = listener.local_addr().expect("relay address").port();
        let accepting = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, upstream, one_way));
            }
        });
        Self { port, accepting }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for DelayedLink {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

async fn relay(client: TcpStream, upstream: u16, one_way: Duration) {
    let Ok(broker) = TcpStream::connect(("127.0.0.1", upstream)).await else { return };
    // MQTT packets are small: Nagle would add its own delay on top of the one wanted.
    let _ = client.set_nodelay(true);
    let _ = broker.set_nodelay(true);
    let (client_in, client_out) = client.into_split();
    let (broker_in, broker_out) = broker.into_split();
    // Either side closing ends both: the other peer sees the connection go.
    tokio::select! {
        () = delayed_copy(client_in, broker_out, one_way) => {}
        () = delayed_copy(broker_in, client_out, one_way) => {}
    }
}

/// Copies `from` to `to`, each chunk `delay` after it was read, in order; ends once `from` is closed and everything
/// read has been written.
async fn delayed_copy(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay: Duration) {
    let (chunks, mut due) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let read = async move {
        let mut buffer = vec![0; 64 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buffer).await {
            if chunks.send((Instant::now() + delay, buffer[..n].to_vec())).is_err() {
                break;
            }
        }
    };
    let write = async move {
        while let Some((at, chunk)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
    };
    tokio::join!(read, write);
}
