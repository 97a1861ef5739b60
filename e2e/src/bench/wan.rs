//! An emulated WAN link: a user-space TCP relay on loopback that adds a fixed one-way delay
//! in each direction and shares one bandwidth limit among all connections.
//!
//! The kernel here has no `netem`, and shaping `lo` would slow every other loopback user, so
//! the link lives in user space. It works on bytes, not HTTP: whatever the client sends reaches
//! the registry `rtt / 2` later, and whatever the registry answers passes a token bucket shared
//! by every connection (the link's capacity) and then reaches the client `rtt / 2` later. A new
//! connection costs one extra round trip before its first bytes cross, as a TCP handshake
//! would. Data streams through bounded queues, so a large blob is never held whole, and a slow
//! client pushes back on the registry as it would over a real link.
//!
//! It does not model loss, reordering, jitter or a limit on the client-to-registry direction:
//! pulls send a few hundred bytes per request. It runs on its own runtime thread and stops
//! when dropped.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::server_thread::ServerThread;

/// Bytes read from one side in one go. Small enough that the token bucket meters the link
/// smoothly (16 KiB is 1.3 ms at 100 Mbit/s), large enough to keep the relay cheap.
const CHUNK: usize = 16 * 1024;

/// Chunks in flight per direction and connection (1 MiB): more than the bandwidth-delay
/// product of the links emulated here, so the queue never limits throughput by itself.
const QUEUE: usize = 64;

/// What the link looks like.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Link {
    /// Round-trip time added on top of loopback's.
    pub rtt: Duration,
    /// Capacity of the registry-to-client direction, shared by all connections.
    pub bits_per_sec: u64,
}

impl Link {
    /// The bucket may run this far ahead of the rate: a few milliseconds of traffic, so timer
    /// granularity costs no throughput and no burst exceeds what a router queue would pass.
    fn burst_bytes(&self) -> f64 {
        (self.bits_per_sec as f64 / 8.0 * 0.005).max(4.0 * CHUNK as f64)
    }
}

/// Traffic through the link since it started or since `reset`.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Traffic {
    /// Registry to client: response heads and bodies.
    pub bytes_down: u64,
    /// Client to registry.
    pub bytes_up: u64,
    pub connections: u64,
    /// HTTP request heads seen going up (an empty line ends each). Exact for pulls, whose
    /// requests have no body.
    pub requests: u64,
}

#[derive(Default)]
struct Counters {
    bytes_down: AtomicU64,
    bytes_up: AtomicU64,
    connections: AtomicU64,
    requests: AtomicU64,
}

pub struct Wan {
    addr: SocketAddr,
    link: Link,
    counters: Arc<Counters>,
    /// Stops the link when the `Wan` is dropped.
    _server: ServerThread,
}

impl Wan {
    /// Starts the link on a free loopback port, relaying to `upstream` (`127.0.0.1:PORT`).
    pub fn start(upstream: &str, link: Link) -> Result<Self> {
        let upstream: SocketAddr = upstream
            .parse()
            .with_context(|| format!("Upstream {upstream} is not an address"))?;
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        // Two workers: one relay direction can write while another sleeps or reads.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("wan-link")
            .enable_all()
            .build()
            .context("Building the WAN link runtime")?;
        let counters = Arc::new(Counters::default());
        let shared = Arc::new(Shared {
            link,
            bucket: Bucket::new(link),
            counters: counters.clone(),
            upstream,
        });
        let server =
            ServerThread::spawn("wan-link", runtime, listener, move |listener, stopped| {
                accept_until(listener, shared, stopped)
            })?;
        Ok(Self {
            addr,
            link,
            counters,
            _server: server,
        })
    }

    /// `127.0.0.1:PORT`: the registry as clients on the far side of the link see it.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// A reference to `name` (`repo:tag`) across the link.
    pub fn image(&self, name: &str) -> String {
        format!("{}/{name}", self.addr())
    }

    pub fn link(&self) -> Link {
        self.link
    }

    pub fn traffic(&self) -> Traffic {
        let c = &self.counters;
        Traffic {
            bytes_down: c.bytes_down.load(Ordering::Relaxed),
            bytes_up: c.bytes_up.load(Ordering::Relaxed),
            connections: c.connections.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
        }
    }

    pub fn reset(&self) {
        let c = &self.counters;
        for counter in [&c.bytes_down, &c.bytes_up, &c.connections, &c.requests] {
            counter.store(0, Ordering::Relaxed);
        }
    }
}

struct Shared {
    link: Link,
    bucket: Bucket,
    counters: Arc<Counters>,
    upstream: SocketAddr,
}

async fn accept_until(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stopped: oneshot::Receiver<()>,
) {
    loop {
        let client = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let accepted = Instant::now();
            shared.counters.connections.fetch_add(1, Ordering::Relaxed);
            // The registry refusing is the client's problem to see: it gets a closed socket.
            let Ok(server) = TcpStream::connect(shared.upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            // Over a real link the client's connect returns one round trip after its SYN,
            // so its first bytes leave no earlier than that.
            let established = accepted + shared.link.rtt;
            tokio::join!(
                pump(
                    client_read,
                    server_write,
                    Direction::Up,
                    established,
                    &shared
                ),
                pump(
                    server_read,
                    client_write,
                    Direction::Down,
                    established,
                    &shared
                ),
            );
        });
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Client to registry.
    Up,
    /// Registry to client: metered by the shared bucket.
    Down,
}

/// Moves bytes from `from` to `to`, each chunk delivered one one-way delay after it was read
/// (and, going down, after the link had capacity for it). EOF is passed on as a half-close.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    direction: Direction,
    not_before: Instant,
    shared: &Shared,
) {
    let one_way = shared.link.rtt / 2;
    // An empty chunk stands for EOF.
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUE);
    let read = async move {
        let mut heads = HeadCounter::default();
        loop {
            let mut buf = vec![0; CHUNK];
            let n = from.read(&mut buf).await.unwrap_or(0);
            buf.truncate(n);
            let counters = &shared.counters;
            match direction {
                Direction::Down => {
                    shared.bucket.take(n).await;
                    counters.bytes_down.fetch_add(n as u64, Ordering::Relaxed);
                }
                Direction::Up => {
                    counters.bytes_up.fetch_add(n as u64, Ordering::Relaxed);
                    counters
                        .requests
                        .fetch_add(heads.feed(&buf), Ordering::Relaxed);
                }
            }
            let due = Instant::now().max(not_before) + one_way;
            if tx.send((due, buf)).await.is_err() || n == 0 {
                return;
            }
        }
    };
    let write = async move {
        while let Some((due, buf)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if buf.is_empty() {
                let _ = to.shutdown().await;
                return;
            }
            if to.write_all(&buf).await.is_err() {
                // Dropping the receiver stops the reader at its next chunk.
                return;
            }
        }
    };
    tokio::join!(read, write);
}

/// Counts `\r\n\r\n` (the end of an HTTP head) across chunk boundaries.
#[derive(Default)]
struct HeadCounter {
    /// How many bytes of the terminator the stream currently ends with.
    matched: usize,
}

impl HeadCounter {
    fn feed(&mut self, bytes: &[u8]) -> u64 {
        const END: &[u8] = b"\r\n\r\n";
        let mut found = 0;
        for &b in bytes {
            self.matched = if b == END[self.matched] {
                self.matched + 1
            } else if b == b'\r' {
                1
            } else {
                0
            };
            if self.matched == END.len() {
                found += 1;
                self.matched = 0;
            }
        }
        found
    }
}

/// A token bucket that lends: a caller takes its bytes at once, going into debt if needed, and
/// sleeps until the debt would have been paid off. Callers are served in the order they ask,
/// and the long-run rate is exact however coarse the timer is.
struct Bucket {
    bytes_per_sec: f64,
    burst: f64,
    /// A std mutex: held only for a little arithmetic, never across an await.
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    fn new(link: Link) -> Self {
        let burst = link.burst_bytes();
        Self {
            bytes_per_sec: link.bits_per_sec as f64 / 8.0,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    async fn take(&self, n: usize) {
        let wait = {
            let mut state = self.state.lock().expect("not poisoned");
            let (tokens, last) = &mut *state;
            let now = Instant::now();
            *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.bytes_per_sec)
                .min(self.burst);
            *last = now;
            *tokens -= n as f64;
            (*tokens < 0.0).then(|| Duration::from_secs_f64(-*tokens / self.bytes_per_sec))
        };
        if let Some(wait) = wait {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads_are_counted_across_chunks() {
        let mut c = HeadCounter::default();
        assert_eq!(
            c.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /a HTTP/1.1\r\n\r"),
            1
        );
        assert_eq!(c.feed(b"\n"), 1);
        assert_eq!(c.feed(b"\r\r\n\r\n"), 1);
        assert_eq!(c.feed(b"\r\n\n\r\n"), 0);
    }

    #[test]
    fn a_response_crosses_after_two_round_trips_at_the_link_rate() {
        use std::io::{Read, Write};
        const SIZE: usize = 2_000_000;
        let server = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let upstream = server.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let (mut s, _) = server.accept().unwrap();
            let mut head = [0u8; 18];
            s.read_exact(&mut head).unwrap();
            s.write_all(&vec![7u8; SIZE]).unwrap();
        });
        let link = Link {
            rtt: Duration::from_millis(20),
            bits_per_sec: 80_000_000,
        };
        let wan = Wan::start(&upstream, link).unwrap();
        let started = std::time::Instant::now();
        let mut client = std::net::TcpStream::connect(wan.addr()).unwrap();
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let mut first = [0u8; 1];
        client.read_exact(&mut first).unwrap();
        let first_byte = started.elapsed().as_secs_f64();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        let total = started.elapsed().as_secs_f64();
        // Handshake, request and response: two round trips before the first byte.
        // Lower bounds are what the link guarantees; upper bounds only catch a hang, since a
        // loaded machine can always be slower.
        assert!(
            (0.040..2.0).contains(&first_byte),
            "first byte after {first_byte} s"
        );
        // 2 MB at 10 MB/s, less the initial burst, after the first byte.
        assert!((0.22..5.0).contains(&total), "done after {total} s");
        assert_eq!(rest.len() + 1, SIZE);
        let t = wan.traffic();
        assert_eq!(
            (t.bytes_down, t.requests, t.connections),
            (SIZE as u64, 1, 1)
        );
    }

    #[tokio::test]
    async fn the_bucket_holds_the_rate_over_many_takes() {
        let link = Link {
            rtt: Duration::ZERO,
            bits_per_sec: 80_000_000,
        };
        let bucket = Bucket::new(link);
        let started = Instant::now();
        // 2 MB at 10 MB/s: about 0.2 s once the initial burst is spent.
        for _ in 0..(2_000_000 / CHUNK) {
            bucket.take(CHUNK).await;
        }
        let took = started.elapsed().as_secs_f64();
        assert!((0.18..5.0).contains(&took), "took {took} s");
    }
}
