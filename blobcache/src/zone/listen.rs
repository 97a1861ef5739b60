//! The peer port: what it takes from the network before anyone is authenticated.
//!
//! A caller's stamp is checked only once its request has arrived and been decoded, so
//! everything before that is bounded here, per source address and in total: connections
//! (counted on the accept loop, the excess closed at once), streams and calls in progress
//! per connection, header and message sizes, how long a connection may stay silent before
//! its first byte, how long a handler may take, and how soon a vanished caller's
//! connection is noticed. A source over its caps is refused without touching anyone else's
//! share. It does not authenticate (`zone::auth`) or bound what an authenticated caller
//! asks for (`zone::server`, `zone::limits`).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use brisk_proto::brisk::v1::peer_server::PeerServer;
use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::limits::{self, Bound};
use super::refusals::RefusalLog;
use super::server::PeerService;
use super::{ZoneError, ZoneTls};
use crate::Result;

#[derive(Clone, Debug)]
pub struct ListenLimits {
    /// Open connections from one source address; more are closed as they arrive. A caller
    /// keeps one HTTP/2 connection to each member, and a restarted caller's old one may
    /// linger until keepalive notices (below); 8 leaves room for that and for tools.
    /// Hosts sharing one address (behind NAT) share this.
    pub connections_per_source: usize,
    /// Open connections from all sources. Every other member holds one; 256 serves a zone
    /// of a couple of hundred hosts, and bounds the memory callers can hold before they
    /// authenticate (see `calls_per_connection`) by the number of addresses they have.
    pub connections: usize,
    /// HTTP/2 streams one connection may have open (SETTINGS_MAX_CONCURRENT_STREAMS; HTTP/2
    /// itself sets no limit). Twice the requests a caller may hold open at the service
    /// (`ServeLimits::streams_per_caller`, 16), so a caller over its share is told
    /// RESOURCE_EXHAUSTED by the service rather than having its streams queued unseen.
    pub streams_per_connection: u32,
    /// Calls one connection may have in its handlers at once; more wait for a turn (their
    /// bodies held back by HTTP/2 flow control, 1 MiB a connection). A handler receives and
    /// decodes its request (up to `limits::MAX_REQUEST_MESSAGE`) before the stamp can be
    /// checked, so this bounds a connection's pre-authentication memory at about 9 MiB,
    /// and a source's at 8 connections' worth. Honest callers have at most 8 fetches in
    /// flight to a member (`PeerConfig::streams_per_peer`), and a fetch leaves its handler
    /// as soon as its reply stream is set up.
    pub calls_per_connection: usize,
    /// A handler taking longer than this is cancelled: it covers receiving and decoding the
    /// request, so a caller trickling a body cannot hold a call forever. Handlers only check
    /// the stamp and look up caches; a fetch's reply stream is not covered.
    pub handler_timeout: Duration,
    /// A connection that sends nothing this long after it was accepted (no HTTP/2 preface,
    /// no TLS hello) is closed. Callers speak at once.
    pub first_byte_timeout: Duration,
    /// TLS handshakes longer than this are abandoned.
    pub tls_handshake_timeout: Duration,
    /// HTTP/2 pings this often on each connection, and a connection whose caller does not
    /// answer one within `keepalive_timeout` is closed, so a caller that vanished (power
    /// loss, a partition) frees its connection slot in seconds, not TCP's minutes.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// Bytes of request headers. gRPC's own and the stamp come to well under 1 KiB.
    pub header_list_bytes: u32,
}

impl Default for ListenLimits {
    fn default() -> Self {
        Self {
            connections_per_source: 8,
            connections: 256,
            streams_per_connection: 32,
            calls_per_connection: 8,
            handler_timeout: Duration::from_secs(10),
            first_byte_timeout: Duration::from_secs(5),
            tls_handshake_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            header_list_bytes: 8 << 10,
        }
    }
}

/// The peer port's server settings, checked (TLS included) before anything is served.
pub struct PeerPort {
    server: tonic::transport::Server,
    limits: ListenLimits,
}

impl PeerPort {
    pub fn new(tls: Option<&ZoneTls>, limits: ListenLimits) -> Result<Self> {
        let mut server = tonic::transport::Server::builder()
            .concurrency_limit_per_connection(limits.calls_per_connection)
            .max_concurrent_streams(limits.streams_per_connection)
            .timeout(limits.handler_timeout)
            .http2_keepalive_interval(Some(limits.keepalive_interval))
            .http2_keepalive_timeout(Some(limits.keepalive_timeout))
            .http2_max_header_list_size(limits.header_list_bytes)
            // Streams a caller opens and resets before they are served (the "rapid reset"
            // flood): h2's default, said out loud.
            .http2_max_pending_accept_reset_streams(Some(20))
            .tcp_nodelay(true);
        if let Some(tls) = tls {
            server = server
                .tls_config(tls.server().timeout(limits.tls_handshake_timeout))
                .map_err(ZoneError::Tls)?;
        }
        Ok(Self { server, limits })
    }

    /// Serves `service` on `listener` until `shutdown`.
    pub async fn serve(
        mut self,
        listener: TcpListener,
        service: PeerService,
        shutdown: impl Future<Output = ()>,
    ) -> Result<()> {
        let peer = PeerServer::new(service)
            .max_decoding_message_size(limits::MAX_REQUEST_MESSAGE)
            .max_encoding_message_size(limits::MAX_REPLY_MESSAGE);
        let incoming = admitted(listener, Arc::new(Admission::new(&self.limits)));
        self.server
            .add_service(peer)
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
            .map_err(|e| ZoneError::Serve(e).into())
    }
}

/// Open connections by source, against the caps.
struct Admission {
    per_source: usize,
    total: usize,
    first_byte_timeout: Duration,
    /// A std mutex: held to count one connection in or out.
    open: Mutex<HashMap<IpAddr, usize>>,
    refusals: RefusalLog,
}

impl Admission {
    fn new(limits: &ListenLimits) -> Self {
        Self {
            per_source: limits.connections_per_source,
            total: limits.connections,
            first_byte_timeout: limits.first_byte_timeout,
            open: Mutex::default(),
            refusals: RefusalLog::default(),
        }
    }

    /// A slot for one more connection from `source`, or `None` if it is over a cap.
    fn admit(self: &Arc<Self>, source: IpAddr) -> Option<Slot> {
        let mut open = self.open.lock().expect("not poisoned");
        let total: usize = open.values().sum();
        let mine = open.get(&source).copied().unwrap_or(0);
        let refused = limits::check(Bound::Connections, mine as u64 + 1, self.per_source as u64)
            .and_then(|()| {
                limits::check(Bound::AllConnections, total as u64 + 1, self.total as u64)
            })
            .err();
        if let Some(over) = refused {
            drop(open);
            self.refusals.refuse(Some(source), "over_limit", &over);
            return None;
        }
        *open.entry(source).or_insert(0) += 1;
        Some(Slot {
            admission: self.clone(),
            source,
        })
    }
}

/// One admitted connection's place in the count; given back when the connection closes.
struct Slot {
    admission: Arc<Admission>,
    source: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.admission.open.lock().expect("not poisoned");
        if let Some(n) = open.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.source);
            }
        }
    }
}

/// Accepted connections within the caps; the rest are closed as soon as they are accepted.
fn admitted(
    listener: TcpListener,
    admission: Arc<Admission>,
) -> impl Stream<Item = io::Result<Admitted>> {
    futures::stream::unfold((listener, admission), |(listener, admission)| async move {
        loop {
            match listener.accept().await {
                Ok((stream, from)) => {
                    if let Some(slot) = admission.admit(from.ip()) {
                        let io = Admitted {
                            stream,
                            first_byte: Some(Box::pin(tokio::time::sleep(
                                admission.first_byte_timeout,
                            ))),
                            _slot: slot,
                        };
                        return Some((Ok(io), (listener, admission)));
                    }
                    // Dropping the stream closes it: the source learns nothing more.
                }
                Err(err) => {
                    // Out of file descriptors or similar: wait instead of spinning.
                    tracing::warn!(%err, "zone peer accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
}

/// An admitted TCP connection: holds its slot, and fails its reads if the caller says
/// nothing within the first-byte timeout.
struct Admitted {
    stream: TcpStream,
    /// Until the first byte arrives.
    first_byte: Option<Pin<Box<Sleep>>>,
    _slot: Slot,
}

impl Connected for Admitted {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Admitted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                this.first_byte = None;
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let expired = match &mut this.first_byte {
                    Some(deadline) => deadline.as_mut().poll(cx).is_ready(),
                    None => false,
                };
                if expired {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "nothing received from the caller",
                    )));
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
