//! A TCP proxy inside the test process, between the relay and a service, to
//! inject network faults without touching the shared servers: cut every
//! connection (RST), stall them (bytes are accepted and held, nothing is
//! forwarded, no FIN or RST: a black hole), or go down (refuse new
//! connections and cut the current ones). A delayed proxy also holds every
//! chunk for half a round trip each way, as a distant service would.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Pass,
    Stall,
    Down,
}

pub struct Proxy {
    pub port: u16,
    mode: watch::Sender<Mode>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    /// Connections the relay opened (or tried to) through the proxy.
    attempts: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Listens on an ephemeral port of 127.0.0.1 and forwards to `target_port`.
    pub async fn start(target_port: u16) -> Self {
        Self::start_delayed(target_port, Duration::ZERO).await
    }

    /// Like [`Proxy::start`], adding `round_trip` to every round trip: each
    /// chunk is forwarded half of it after it arrived, in order, with many
    /// chunks on their way at once.
    pub async fn start_delayed(target_port: u16, round_trip: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (mode, _) = watch::channel(Mode::Pass);
        let connections = Arc::new(Mutex::new(Vec::new()));
        let attempts = Arc::new(AtomicUsize::new(0));
        let accept = tokio::spawn({
            let mode = mode.clone();
            let connections = connections.clone();
            let attempts = attempts.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    attempts.fetch_add(1, Ordering::Relaxed);
                    if *mode.borrow() == Mode::Down {
                        let _ = client.set_zero_linger();
                        continue; // dropped: the client sees a reset
                    }
                    let task = tokio::spawn(forward(
                        client,
                        target_port,
                        mode.subscribe(),
                        round_trip / 2,
                    ));
                    connections.lock().unwrap().push(task);
                }
            }
        });
        Self {
            port,
            mode,
            connections,
            attempts,
            accept,
        }
    }

    /// How many connections have been opened to the proxy so far, refused
    /// ones included: how often the relay tried to reach the service.
    pub fn attempts(&self) -> usize {
        self.attempts.load(Ordering::Relaxed)
    }

    /// Resets every current connection; new ones pass.
    pub fn cut(&self) {
        for task in self.connections.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    /// Holds every byte in both directions, on current and new connections.
    pub fn stall(&self) {
        self.mode.send_replace(Mode::Stall);
    }

    /// Refuses new connections and resets the current ones.
    pub fn down(&self) {
        self.mode.send_replace(Mode::Down);
        self.cut();
    }

    /// Forwards normally again.
    pub fn pass(&self) {
        self.mode.send_replace(Mode::Pass);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn forward(
    client: TcpStream,
    target_port: u16,
    mode: watch::Receiver<Mode>,
    delay: Duration,
) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)).await else {
        return;
    };
    // Dropping either socket (a cut) then sends RST, not FIN.
    let _ = client.set_zero_linger();
    let _ = server.set_zero_linger();
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::select! {
        () = pump(client_read, server_write, mode.clone(), delay) => {}
        () = pump(server_read, client_write, mode, delay) => {}
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
    delay: Duration,
) {
    if !delay.is_zero() {
        return pump_delayed(from, to, delay).await;
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // While stalled, hold what was read; nothing reaches the other side.
        match mode.wait_for(|m| *m != Mode::Stall).await {
            Ok(m) if *m == Mode::Pass => {}
            _ => return,
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Forwards each chunk `delay` after it arrived: a reader stamps and queues
/// chunks while a writer sends them when due, so bytes keep their order and
/// the throughput is not one chunk per delay.
async fn pump_delayed(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (queue, mut due_chunks) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let read = async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            if queue
                .send((Instant::now() + delay, buf[..n].to_vec()))
                .is_err()
            {
                return;
            }
        }
    };
    let write = async move {
        while let Some((due, chunk)) = due_chunks.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    tokio::join!(read, write);
}
