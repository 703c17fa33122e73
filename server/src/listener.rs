//! Connections that a handler can break on purpose.
//!
//! A streamed response that fails half way must reach the client as a broken
//! transfer, never as a complete but short file. Ending the body stream with
//! an error is not enough over HTTP/1.1: poem polls the connection again
//! after the error and hyper then writes the last chunk, so the client sees
//! a well-formed end. A handler therefore breaks the connection itself
//! ([`break_connection`]): from then on every write to it fails, so nothing
//! more (no last chunk) is sent and the client sees the transfer cut.

use poem::listener::Acceptor;
use poem::web::{LocalAddr, RemoteAddr};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{LazyLock, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Open connections by local and remote address: each with its number and
/// whether it was broken. Held inline in one table: a connection costs no
/// allocation of its own (a string and a switch per connection, allocated
/// before hyper's buffers and kept for the connection's life, cost an idle
/// WebSocket about 5 kB of resident memory through allocator fragmentation).
static OPEN: LazyLock<Mutex<HashMap<Key, (u64, bool)>>> = LazyLock::new(Default::default);
/// How many open connections are broken: while none is, a write checks
/// nothing but this.
static BROKEN: AtomicUsize = AtomicUsize::new(0);
static NEXT: AtomicU64 = AtomicU64::new(1);

type Key = (SocketAddr, SocketAddr);

fn key(local: &LocalAddr, remote: &RemoteAddr) -> Option<Key> {
    Some((*local.as_socket_addr()?, *remote.as_socket_addr()?))
}

fn open() -> std::sync::MutexGuard<'static, HashMap<Key, (u64, bool)>> {
    OPEN.lock().unwrap_or_else(|e| e.into_inner())
}

/// Makes every further write to the connection between `local` and
/// `remote` fail. Returns whether such a connection was open.
pub fn break_connection(local: &LocalAddr, remote: &RemoteAddr) -> bool {
    let Some(key) = key(local, remote) else {
        return false;
    };
    match open().get_mut(&key) {
        Some((_, broken)) => {
            if !*broken {
                *broken = true;
                BROKEN.fetch_add(1, Ordering::SeqCst);
            }
            true
        }
        None => false,
    }
}

pub struct Breakable<A>(pub A);

impl<A: Acceptor> Acceptor for Breakable<A> {
    type Io = BreakableIo<A::Io>;

    fn local_addr(&self) -> Vec<LocalAddr> {
        self.0.local_addr()
    }

    async fn accept(
        &mut self,
    ) -> io::Result<(Self::Io, LocalAddr, RemoteAddr, poem::http::uri::Scheme)> {
        let (io, local, remote, scheme) = self.0.accept().await?;
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let key = key(&local, &remote);
        if let Some(key) = key {
            open().insert(key, (id, false));
        }
        Ok((BreakableIo { io, key, id }, local, remote, scheme))
    }
}

pub struct BreakableIo<T> {
    io: T,
    key: Option<Key>,
    id: u64,
}

impl<T> BreakableIo<T> {
    fn check(&self) -> io::Result<()> {
        if BROKEN.load(Ordering::SeqCst) == 0 {
            return Ok(());
        }
        let broken = self.key.is_some_and(|key| {
            open()
                .get(&key)
                .is_some_and(|&(id, broken)| id == self.id && broken)
        });
        if broken {
            Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection broken by the server",
            ))
        } else {
            Ok(())
        }
    }
}

impl<T> Drop for BreakableIo<T> {
    fn drop(&mut self) {
        let Some(key) = self.key else {
            return;
        };
        let mut open = open();
        // The address may already belong to a newer connection.
        if let Some(&(id, broken)) = open.get(&key) {
            if id == self.id {
                open.remove(&key);
                if broken {
                    BROKEN.fetch_sub(1, Ordering::SeqCst);
                }
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for BreakableIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for BreakableIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check()?;
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check()?;
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Sets TCP_NODELAY on every accepted socket: small frames (events, acks)
/// leave at once instead of waiting for the client's delayed ACK (Nagle).
pub struct NoDelay<A>(pub A);

impl<A> poem::listener::Acceptor for NoDelay<A>
where
    A: poem::listener::Acceptor<Io = tokio::net::TcpStream>,
{
    type Io = tokio::net::TcpStream;

    fn local_addr(&self) -> Vec<poem::web::LocalAddr> {
        self.0.local_addr()
    }

    async fn accept(
        &mut self,
    ) -> std::io::Result<(
        Self::Io,
        poem::web::LocalAddr,
        poem::web::RemoteAddr,
        poem::http::uri::Scheme,
    )> {
        let (io, local, remote, scheme) = self.0.accept().await?;
        let _ = io.set_nodelay(true);
        Ok((io, local, remote, scheme))
    }
}
