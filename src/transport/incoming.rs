//! The accept path. One task accepts TCP connections; each takes a connection slot (beyond
//! `max_connections` it is closed at once) and gets a task of its own for the handshake: TLS when it
//! is on, then the client's HTTP/2 preface, together within `handshake_timeout`. Only then is it
//! handed to tonic. So a peer that connects and sends nothing, or trickles its handshake, holds its
//! slot for the handshake timeout at most, and never delays anyone else's accept.
//!
//! tonic's own TLS would wrap the stream it is given, but its handshake ends with TLS: a peer silent
//! after it would hold the connection until hyper's keep-alive, which starts only after the preface.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
    task::JoinSet,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::transport::server::{Connected, TcpIncoming};

use super::TransportLimits;

/// What every HTTP/2 client sends first (RFC 9113, section 3.4).
pub const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Connections through their handshake, waiting for the server to take them.
const READY_QUEUE: usize = 64;
/// How long accepting pauses after an error of the listener itself (such as no file descriptor
/// left): retrying at once would only spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Connections ready to serve, for `serve_with_incoming_shutdown`. Dropping it stops the accept task,
/// which closes the listening socket.
pub type Incoming<IO> = ReceiverStream<io::Result<Connection<IO>>>;

/// Plaintext HTTP/2 connections accepted on `listener`.
pub fn plaintext(listener: TcpListener, limits: &TransportLimits) -> Incoming<TcpStream> {
    spawn_accept_loop(listener, limits, |tcp| async move { Ok(tcp) })
}

/// TLS connections accepted on `listener`, the handshake made by `acceptor`.
pub fn secure(
    listener: TcpListener,
    limits: &TransportLimits,
    acceptor: TlsAcceptor,
) -> Incoming<TlsStream<TcpStream>> {
    spawn_accept_loop(listener, limits, move |tcp| acceptor.accept(tcp))
}

fn spawn_accept_loop<IO, Secure, Secured>(
    listener: TcpListener,
    limits: &TransportLimits,
    secure: Secure,
) -> Incoming<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Secure: FnMut(TcpStream) -> Secured + Send + 'static,
    Secured: Future<Output = io::Result<IO>> + Send + 'static,
{
    let (ready, incoming) = mpsc::channel(READY_QUEUE);
    let tcp = TcpIncoming::from(listener).with_nodelay(Some(true)).with_keepalive(Some(limits.tcp_keepalive));
    let gate = Gate {
        slots: Arc::new(Semaphore::new(limits.max_connections)),
        limit: limits.max_connections,
        refusing: false,
    };
    tokio::spawn(accept_loop(tcp, gate, limits.handshake_timeout, secure, ready));
    ReceiverStream::new(incoming)
}

/// Accepts until the server drops its end of `ready`; dropping the handshakes then aborts them.
async fn accept_loop<IO, Secure, Secured>(
    mut tcp: TcpIncoming,
    mut gate: Gate,
    handshake_timeout: Duration,
    mut secure: Secure,
    ready: mpsc::Sender<io::Result<Connection<IO>>>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Secure: FnMut(TcpStream) -> Secured,
    Secured: Future<Output = io::Result<IO>> + Send + 'static,
{
    let mut handshakes = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = ready.closed() => return,
            Some(_) = handshakes.join_next(), if !handshakes.is_empty() => continue,
            accepted = tcp.next() => accepted,
        };
        match accepted {
            None => return,
            Some(Ok(stream)) => {
                // Without a slot the stream is dropped here, which closes it.
                if let Some(slot) = gate.admit() {
                    let peer = stream.peer_addr().ok();
                    let handshake = handshake(secure(stream), handshake_timeout);
                    handshakes.spawn(hand_over(handshake, slot, peer, ready.clone()));
                }
            }
            Some(Err(error)) => pause_after(error).await,
        }
    }
}

/// The TLS handshake (if any) and the HTTP/2 preface, within `timeout`.
async fn handshake<IO: AsyncRead + Unpin>(
    secured: impl Future<Output = io::Result<IO>>,
    timeout: Duration,
) -> io::Result<IO> {
    let within = tokio::time::timeout(timeout, async {
        let mut io = secured.await?;
        let mut preface = [0; HTTP2_PREFACE.len()];
        io.read_exact(&mut preface).await?;
        if &preface != HTTP2_PREFACE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not an HTTP/2 client; quotad serves gRPC over HTTP/2",
            ));
        }
        Ok(io)
    });
    let waited = humantime::format_duration(timeout);
    within
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, format!("no handshake within {waited}"))))
}

async fn hand_over<IO>(
    handshake: impl Future<Output = io::Result<IO>>,
    slot: OwnedSemaphorePermit,
    peer: Option<SocketAddr>,
    ready: mpsc::Sender<io::Result<Connection<IO>>>,
) {
    match handshake.await {
        // The server is gone only when it stops; the connection closes with it.
        Ok(io) => drop(ready.send(Ok(Connection { io, preface_replayed: 0, _slot: slot })).await),
        // Refused clients (no certificate, an unknown CA, not HTTP/2, too slow) are the peer's problem,
        // and a flood of them must not flood the log.
        Err(error) => tracing::debug!(peer = ?peer, %error, "connection closed in its handshake"),
    }
}

/// Errors of one connection (reset before it was accepted) leave the listener as it was; any other
/// pauses accepting for a moment.
async fn pause_after(error: io::Error) {
    use io::ErrorKind::*;
    if matches!(error.kind(), ConnectionAborted | ConnectionReset | Interrupted | WouldBlock | TimedOut) {
        return;
    }
    tracing::warn!(%error, "accepting a connection failed");
    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
}

/// Connection slots: one per connection, from accept until hyper drops the connection.
struct Gate {
    slots: Arc<Semaphore>,
    limit: usize,
    /// Whether the last connection was refused, so that only the changes are logged.
    refusing: bool,
}

impl Gate {
    fn admit(&mut self) -> Option<OwnedSemaphorePermit> {
        let slot = self.slots.clone().try_acquire_owned().ok();
        if slot.is_none() != self.refusing {
            self.refusing = slot.is_none();
            if self.refusing {
                tracing::warn!(
                    max_connections = self.limit,
                    "every connection slot is taken; new connections are closed"
                );
            } else {
                tracing::info!("a connection slot is free again; accepting connections");
            }
        }
        slot
    }
}

/// An accepted connection through its handshake. It gives hyper back the preface the handshake read,
/// and holds its connection slot until hyper drops it.
pub struct Connection<IO> {
    io: IO,
    /// Bytes of [`HTTP2_PREFACE`] already given back.
    preface_replayed: usize,
    _slot: OwnedSemaphorePermit,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Connection<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let rest = &HTTP2_PREFACE[this.preface_replayed..];
        if rest.is_empty() {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let n = rest.len().min(buf.remaining());
        buf.put_slice(&rest[..n]);
        this.preface_replayed += n;
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Connection<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The connection's own info (addresses, and under TLS the peer's certificates), so that requests
/// carry the same extensions as with tonic's accept.
impl<IO: Connected> Connected for Connection<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}
