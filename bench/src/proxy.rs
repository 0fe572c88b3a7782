//! The distance scenario's delay proxy: a TCP proxy in front of a service
//! that holds every byte for half a round trip in each direction, as a
//! network between the relay and the service would.
//!
//! Each chunk read is stamped with its arrival and queued; a writer sends
//! it once `arrival + rtt/2` has passed, so bytes keep their order and many
//! chunks are on their way at once: throughput is not one chunk per delay.
//! The proxy runs on threads of its own with blocking sockets, not on the
//! bench's runtime: tokio's timer fires on whole milliseconds, which would
//! turn half of a 1 ms round trip into about a millisecond, and the bare
//! publisher and consumer on that runtime would slow the proxy down.

use std::io::{Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// Chunks queued per direction before reading waits (TCP's back-pressure).
const QUEUED_CHUNKS: usize = 4096;

/// A listening delay proxy; dropping it stops accepting (connections
/// already made end when their peers close them).
pub(crate) struct DelayProxy {
    addr: SocketAddr,
    stopping: Arc<AtomicBool>,
}

impl DelayProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream`
    /// (`host:port`), adding `rtt` to every round trip.
    pub(crate) fn start(upstream: &str, rtt: Duration) -> anyhow::Result<Self> {
        let upstream = upstream
            .to_socket_addrs()?
            .next()
            .with_context(|| format!("{upstream} has no address"))?;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = stopping.clone();
        thread::Builder::new()
            .name("delay-proxy".into())
            .spawn(move || {
                for client in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Ok(client) = client {
                        let _ = thread::Builder::new()
                            .name("delay-proxy-conn".into())
                            .spawn(move || connect(client, upstream, rtt / 2));
                    }
                }
            })?;
        Ok(Self { addr, stopping })
    }

    pub(crate) fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        // Wakes the accept loop, which then sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Connects `client` to `upstream` and forwards both ways with `delay`.
fn connect(client: TcpStream, upstream: SocketAddr, delay: Duration) {
    let Ok(server) = TcpStream::connect(upstream) else {
        return;
    };
    // Chunks are sent when due, not gathered by Nagle's algorithm.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (Ok(client2), Ok(server2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let upward = thread::spawn(move || forward(client, server, delay));
    forward(server2, client2, delay);
    let _ = upward.join();
}

/// Forwards `from` to `to`, each chunk `delay` after it arrived, until
/// `from` ends (then `to` is shut for writing) or `to` fails (then `from`
/// is shut, so its peer sees the connection go).
fn forward(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (queue, due_chunks) = mpsc::sync_channel::<(Instant, Vec<u8>)>(QUEUED_CHUNKS);
    let Ok(source) = from.try_clone() else {
        return;
    };
    let writer = thread::spawn(move || {
        for (due, chunk) in due_chunks {
            thread::sleep(due.saturating_duration_since(Instant::now()));
            if to.write_all(&chunk).is_err() {
                let _ = source.shutdown(Shutdown::Both);
                return;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if queue
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    drop(queue);
    let _ = writer.join();
}

/// `url` with its host and port replaced by `127.0.0.1:port`, everything
/// else (user, password, vhost, query) kept as written.
pub(crate) fn amqp_url_via(url: &str, port: u16) -> anyhow::Result<String> {
    let (scheme, rest) = url.split_once("://").context("--amqp-url has no scheme")?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    let userinfo = authority
        .rsplit_once('@')
        .map(|(user, _)| format!("{user}@"))
        .unwrap_or_default();
    Ok(format!("{scheme}://{userinfo}127.0.0.1:{port}{path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxied_url_keeps_all_but_the_address() {
        assert_eq!(
            amqp_url_via("amqp://guest:guest@127.0.0.1:5672/%2f", 40000).unwrap(),
            "amqp://guest:guest@127.0.0.1:40000/%2f"
        );
        assert_eq!(
            amqp_url_via("amqp://broker?heartbeat=5", 1).unwrap(),
            "amqp://127.0.0.1:1?heartbeat=5"
        );
    }

    #[test]
    fn bytes_come_through_in_order_and_late() {
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let echo_addr = echo.local_addr().unwrap();
        thread::spawn(move || {
            let (mut s, _) = echo.accept().unwrap();
            let mut buf = [0; 1024];
            while let Ok(n @ 1..) = s.read(&mut buf) {
                s.write_all(&buf[..n]).unwrap();
            }
        });
        let rtt = Duration::from_millis(20);
        let proxy = DelayProxy::start(&echo_addr.to_string(), rtt).unwrap();
        let mut s = TcpStream::connect(("127.0.0.1", proxy.port())).unwrap();
        let sent: Vec<u8> = (0..=255).collect();
        let started = Instant::now();
        for chunk in sent.chunks(16) {
            s.write_all(chunk).unwrap();
        }
        let mut got = vec![0; sent.len()];
        s.read_exact(&mut got).unwrap();
        assert!(started.elapsed() >= rtt, "{:?}", started.elapsed());
        assert_eq!(got, sent);
    }
}
