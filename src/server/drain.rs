//! Bounded shutdown. When a shutdown starts the listener closes, so new clients are refused
//! at once, and open connections are asked to finish (HTTP/2 GOAWAY). Requests in flight get
//! a grace period; when it ends, handlers still running answer UNAVAILABLE, and shortly after
//! every connection still open is closed, so that no client can hold the server up.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::Connected;

/// The phases of a shutdown, shared by the listener, the connections and the handlers.
/// Each phase is a token cancelled once; clones observe the same phases.
#[derive(Clone, Debug, Default)]
pub struct Drain {
    closing: CancellationToken,
    expired: CancellationToken,
    severed: CancellationToken,
}

impl Drain {
    /// Starts the shutdown: the listener stops accepting and closes its socket.
    pub fn close_listener(&self) {
        self.closing.cancel();
    }

    /// Whether the shutdown has started.
    pub fn is_closing(&self) -> bool {
        self.closing.is_cancelled()
    }

    /// Ends the grace period: handlers still running answer UNAVAILABLE.
    pub fn expire(&self) {
        self.expired.cancel();
    }

    /// Closes every connection still open, whatever it is doing.
    pub fn sever(&self) {
        self.severed.cancel();
    }

    /// Completes when the grace period has ended.
    pub async fn expired(&self) {
        self.expired.cancelled().await;
    }

    /// `incoming` until the shutdown starts; each connection closes when [`Self::sever`] is
    /// called. The listener is dropped, closing its socket, as soon as the shutdown starts.
    pub fn listener<S>(&self, incoming: S) -> Listener<S> {
        Listener {
            incoming: Some(incoming),
            closing: Box::pin(self.closing.clone().cancelled_owned()),
            severed: self.severed.clone(),
        }
    }
}

/// Accepted connections until the shutdown starts; see [`Drain::listener`].
pub struct Listener<S> {
    incoming: Option<S>,
    closing: Pin<Box<WaitForCancellationFutureOwned>>,
    severed: CancellationToken,
}

impl<S, IO, E> Stream for Listener<S>
where
    S: Stream<Item = Result<IO, E>> + Unpin,
{
    type Item = Result<Severable<IO>, E>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let Some(incoming) = this.incoming.as_mut() else {
            return Poll::Ready(None);
        };
        if this.closing.as_mut().poll(cx).is_ready() {
            this.incoming = None;
            return Poll::Ready(None);
        }
        let next = match Pin::new(incoming).poll_next(cx) {
            Poll::Ready(next) => next,
            Poll::Pending => return Poll::Pending,
        };
        let severed = &this.severed;
        Poll::Ready(next.map(|accepted| accepted.map(|io| Severable::new(io, severed))))
    }
}

/// A connection that fails every read and write once the drain severs connections, so the
/// transport drops it.
pub struct Severable<IO> {
    io: IO,
    severed: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl<IO> Severable<IO> {
    fn new(io: IO, severed: &CancellationToken) -> Self {
        Self {
            io,
            severed: Box::pin(severed.clone().cancelled_owned()),
        }
    }

    /// An error once the connection is severed; registers the task to be woken then.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.severed.as_mut().poll(cx).is_ready() {
            let message = "the server is shutting down and closed the connection";
            return Err(io::Error::new(io::ErrorKind::ConnectionAborted, message));
        }
        Ok(())
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Severable<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Severable<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl<IO: Connected> Connected for Severable<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn the_listener_ends_at_shutdown_and_severed_connections_fail() {
        let drain = Drain::default();
        let (client, server) = tokio::io::duplex(64);
        let accepted =
            futures::stream::iter([Ok::<_, io::Error>(server)]).chain(futures::stream::pending());
        let mut listener = drain.listener(accepted);
        let mut server = listener
            .next()
            .await
            .expect("one connection")
            .expect("accepted");
        drain.close_listener();
        assert!(listener.next().await.is_none(), "the listener ends");

        let mut client = client;
        client.write_all(b"ping").await.expect("client writes");
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.expect("server reads");
        drain.sever();
        let error = server.read(&mut buf).await.expect_err("severed");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionAborted);
        assert!(server.write(b"pong").await.is_err(), "writes fail too");
    }
}
