//! Connections that a handler can break on purpose.
//!
//! A streamed response that fails half way must reach the client as a broken
//! transfer, never as a complete but short file. Ending the body stream with
//! an error is not enough over HTTP/1.1: poem polls the connection again
//! after the error and hyper then writes the last chunk, so the client sees
//! a well-formed end. A handler therefore breaks the connection itself
//! ([`break_connection`]): from then on every write to it fails, so nothing
//! more (no last chunk) is sent and the client sees the transfer cut.
//!
//! Over HTTP/1.1 hyper reads nothing from a connection while its handler
//! runs, so a client that hangs up before the response starts goes unseen
//! until the handler ends. A handler that waits long for its first byte
//! (an export counting its rows behind a lock) asks [`peer_gone`].

use poem::listener::Acceptor;
use poem::web::{LocalAddr, RemoteAddr};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{LazyLock, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Open connections by local and remote address: each with its number,
/// whether it was broken and its socket. Held inline in one table: a connection costs no
/// allocation of its own (a string and a switch per connection, allocated
/// before hyper's buffers and kept for the connection's life, cost an idle
/// WebSocket about 5 kB of resident memory through allocator fragmentation).
static OPEN: LazyLock<Mutex<HashMap<Key, Conn>>> = LazyLock::new(Default::default);
/// How many open connections are broken: while none is, a write checks
/// nothing but this.
static BROKEN: AtomicUsize = AtomicUsize::new(0);
static NEXT: AtomicU64 = AtomicU64::new(1);

type Key = (SocketAddr, SocketAddr);

#[derive(Clone, Copy)]
struct Conn {
    id: u64,
    broken: bool,
    fd: RawFd,
}

fn key(local: &LocalAddr, remote: &RemoteAddr) -> Option<Key> {
    Some((*local.as_socket_addr()?, *remote.as_socket_addr()?))
}

fn open() -> std::sync::MutexGuard<'static, HashMap<Key, Conn>> {
    OPEN.lock().unwrap_or_else(|e| e.into_inner())
}

/// Makes every further write to the connection between `local` and
/// `remote` fail. Returns whether such a connection was open.
pub fn break_connection(local: &LocalAddr, remote: &RemoteAddr) -> bool {
    let Some(key) = key(local, remote) else {
        return false;
    };
    match open().get_mut(&key) {
        Some(c) => {
            if !c.broken {
                c.broken = true;
                BROKEN.fetch_add(1, Ordering::SeqCst);
            }
            true
        }
        None => false,
    }
}

/// Whether the client of the connection between `local` and `remote` has
/// closed its side (or reset it): the socket's TCP state, from the kernel,
/// without reading what hyper owns. False when the connection is unknown
/// (not TCP) or the state cannot be read.
pub fn peer_gone(local: &LocalAddr, remote: &RemoteAddr) -> bool {
    let Some(key) = key(local, remote) else {
        return false;
    };
    // Under the lock: the socket is closed only after its entry is removed
    // (BreakableIo's drop), so the descriptor is still this connection's.
    let open = open();
    let Some(c) = open.get(&key) else {
        return false;
    };
    // Linux's TCP states (include/net/tcp_states.h): the server has not
    // closed its side, so the socket is ESTABLISHED until the client sends
    // FIN (CLOSE_WAIT) or a reset (CLOSE).
    const TCP_CLOSE: u8 = 7;
    const TCP_CLOSE_WAIT: u8 = 8;
    tcp_state(c.fd).is_some_and(|s| s == TCP_CLOSE || s == TCP_CLOSE_WAIT)
}

#[cfg(target_os = "linux")]
fn tcp_state(fd: RawFd) -> Option<u8> {
    // SAFETY: `info` is a plain C struct the kernel fills up to `len` bytes;
    // `fd` is an open socket (see `peer_gone`).
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let r = libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        );
        (r == 0 && len >= 1).then_some(info.tcpi_state)
    }
}

/// Elsewhere the kernel's view is not read: a hang-up is seen when the
/// handler ends, as without the check.
#[cfg(not(target_os = "linux"))]
fn tcp_state(_fd: RawFd) -> Option<u8> {
    None
}

pub struct Breakable<A>(pub A);

/// Accepts the next connection, waiting out failures. poem takes an
/// accept error as nothing and asks again at once; when the process is out
/// of file descriptors (EMFILE: WebSockets and pool connections reach the
/// open-file limit) the waiting connection keeps the socket readable, so
/// that spun a core with nothing logged. An error that concerns one
/// connection only (aborted, reset before it was taken) is passed over;
/// any other is logged (at most every 10 s) and waited out, from 10 ms
/// doubling to a second, so connections closing meanwhile make room.
async fn accept_or_wait<A: Acceptor>(
    a: &mut A,
) -> (A::Io, LocalAddr, RemoteAddr, poem::http::uri::Scheme) {
    static LAST_WARNING: Mutex<Option<std::time::Instant>> = Mutex::new(None);
    let mut wait = std::time::Duration::from_millis(10);
    loop {
        match a.accept().await {
            Ok(accepted) => return accepted,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                let due = {
                    let mut last = LAST_WARNING.lock().unwrap_or_else(|p| p.into_inner());
                    let due =
                        last.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(10));
                    if due {
                        *last = Some(std::time::Instant::now());
                    }
                    due
                };
                if due {
                    tracing::warn!(
                        error = %e,
                        "accepting a connection failed; waiting before the next (out of file descriptors? raise the open-file limit)"
                    );
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_secs(1));
            }
        }
    }
}

impl<A: Acceptor> Acceptor for Breakable<A>
where
    A::Io: AsRawFd,
{
    type Io = BreakableIo<A::Io>;

    fn local_addr(&self) -> Vec<LocalAddr> {
        self.0.local_addr()
    }

    async fn accept(
        &mut self,
    ) -> io::Result<(Self::Io, LocalAddr, RemoteAddr, poem::http::uri::Scheme)> {
        let (io, local, remote, scheme) = accept_or_wait(&mut self.0).await;
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let key = key(&local, &remote);
        if let Some(key) = key {
            let fd = io.as_raw_fd();
            open().insert(
                key,
                Conn {
                    id,
                    broken: false,
                    fd,
                },
            );
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
                .is_some_and(|c| c.id == self.id && c.broken)
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
        if let Some(&c) = open.get(&key) {
            if c.id == self.id {
                open.remove(&key);
                if c.broken {
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
