//! A TCP proxy whose behaviour a test switches at run time, to make a
//! dependency slow, stalled or unreachable without touching its process.
//!
//! Contracts:
//! - [`Proxy::start`] listens on a free loopback port (from
//!   [`free_port`](crate::process::free_port)) and forwards every accepted
//!   connection to the target, one outgoing connection per incoming one.
//! - The mode applies to bytes in both directions and takes effect at once,
//!   also on open connections:
//!   - [`ProxyMode::Pass`]: forward as they come;
//!   - [`ProxyMode::Delay`]: every chunk read is written `D` after it was
//!     read (latency, not bandwidth; order is kept);
//!   - [`ProxyMode::Stall`]: nothing is written; bytes read meanwhile are
//!     held (up to a bounded buffer, then the sender is back-pressured) and
//!     released in order when the mode changes;
//!   - [`ProxyMode::Blackhole`]: open connections are reset (held bytes are
//!     dropped) and new ones are accepted and reset at once.
//! - The proxy runs on its own runtime thread, so it works from sync and
//!   async code alike and does not depend on the test's runtime; dropping
//!   it closes the listener and every connection.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::process::free_port;

/// What a [`Proxy`] does with the bytes it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyMode {
    Pass,
    Delay(Duration),
    Stall,
    Blackhole,
}

/// A running proxy; see the module doc.
pub struct Proxy {
    port: u16,
    target: SocketAddr,
    mode: watch::Sender<ProxyMode>,
    runtime: Option<tokio::runtime::Runtime>,
}

/// Chunks read but not yet written, per direction.
const HELD_CHUNKS: usize = 1024;

impl Proxy {
    /// A proxy in [`ProxyMode::Pass`] forwarding to `target`.
    pub fn start(target: SocketAddr) -> Proxy {
        let port = free_port();
        let listener = std::net::TcpListener::bind(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("proxy bind 127.0.0.1:{port}: {e}"));
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("test-proxy")
            .enable_all()
            .build()
            .expect("proxy runtime");
        let (mode, mode_rx) = watch::channel(ProxyMode::Pass);
        runtime.spawn(async move {
            let listener = TcpListener::from_std(listener).expect("tokio listener");
            accept_loop(listener, target, mode_rx).await;
        });
        Proxy {
            port,
            target,
            mode,
            runtime: Some(runtime),
        }
    }

    /// A proxy to `127.0.0.1:port`.
    pub fn to_local_port(port: u16) -> Proxy {
        Self::start(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// `http://127.0.0.1:<port>`, for gRPC clients.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn mode(&self) -> ProxyMode {
        *self.mode.borrow()
    }

    pub fn set_mode(&self, mode: ProxyMode) {
        self.mode.send_replace(mode);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Not a plain drop: that blocks, which a runtime forbids when the
        // proxy is dropped inside an async test.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, mode: watch::Receiver<ProxyMode>) {
    loop {
        let inbound = match listener.accept().await {
            Ok((s, _)) => s,
            Err(_) => {
                // Out of descriptors or similar: try again shortly.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if *mode.borrow() == ProxyMode::Blackhole {
            reset(inbound);
            continue;
        }
        tokio::spawn(connection(inbound, target, mode.clone()));
    }
}

/// Closes with a RST instead of a FIN.
fn reset(s: TcpStream) {
    let _ = s.set_zero_linger();
    drop(s);
}

async fn connection(mut inbound: TcpStream, target: SocketAddr, mode: watch::Receiver<ProxyMode>) {
    let mut outbound = match TcpStream::connect(target).await {
        Ok(s) => s,
        Err(_) => return reset(inbound),
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let blackholed = {
        let (ri, wi) = inbound.split();
        let (ro, wo) = outbound.split();
        let pipes = async { tokio::join!(pipe(ri, wo, mode.clone()), pipe(ro, wi, mode.clone())) };
        tokio::select! {
            _ = pipes => false,
            _ = until_blackhole(mode.clone()) => true,
        }
    };
    if blackholed {
        reset(inbound);
        reset(outbound);
    }
}

/// Returns once the mode is [`ProxyMode::Blackhole`] (never if the proxy
/// is gone).
async fn until_blackhole(mut mode: watch::Receiver<ProxyMode>) {
    loop {
        if *mode.borrow_and_update() == ProxyMode::Blackhole {
            return;
        }
        if mode.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// One direction: a reader queues chunks with their read time, a writer
/// writes each when the mode lets it go.
async fn pipe<R, W>(mut from: R, mut to: W, mode: watch::Receiver<ProxyMode>)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(HELD_CHUNKS);
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.send((Instant::now(), buf[..n].to_vec())).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let writer = async move {
        let mut mode = mode;
        while let Some((read_at, chunk)) = rx.recv().await {
            if !release(read_at, &mut mode).await || to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        // The source closed: pass the FIN on.
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

/// Waits until a chunk read at `read_at` may be written; false if it never
/// may (blackhole).
async fn release(read_at: Instant, mode: &mut watch::Receiver<ProxyMode>) -> bool {
    loop {
        let current = *mode.borrow_and_update();
        match current {
            ProxyMode::Pass => return true,
            ProxyMode::Blackhole => return false,
            ProxyMode::Delay(d) => {
                let due = read_at + d;
                if due <= Instant::now() {
                    return true;
                }
                tokio::select! {
                    _ = tokio::time::sleep_until(due.into()) => return true,
                    r = mode.changed() => if r.is_err() { return false },
                }
            }
            ProxyMode::Stall => {
                if mode.changed().await.is_err() {
                    return false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on a free port; runs until the test's runtime ends.
    async fn echo_server() -> u16 {
        let port = free_port();
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        port
    }

    async fn connect(p: &Proxy) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", p.port())).await.unwrap();
        s.set_nodelay(true).unwrap();
        s
    }

    /// Sends `msg` and reads its echo, within `timeout`.
    async fn round_trip(s: &mut TcpStream, msg: &[u8], timeout: Duration) -> Option<Vec<u8>> {
        s.write_all(msg).await.ok()?;
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(timeout, s.read_exact(&mut got))
            .await
            .ok()?
            .ok()?;
        Some(got)
    }

    /// True once `s` is closed or reset by the other side.
    async fn closed_within(s: &mut TcpStream, timeout: Duration) -> bool {
        let mut buf = [0u8; 16];
        matches!(
            tokio::time::timeout(timeout, s.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    #[tokio::test]
    async fn passes_bytes_both_ways() {
        let p = Proxy::to_local_port(echo_server().await);
        let mut s = connect(&p).await;
        for i in 0..10 {
            let msg = format!("hello {i}");
            let got = round_trip(&mut s, msg.as_bytes(), Duration::from_secs(2)).await;
            assert_eq!(got.as_deref(), Some(msg.as_bytes()));
        }
    }

    #[tokio::test]
    async fn delays_each_direction() {
        let p = Proxy::to_local_port(echo_server().await);
        let mut s = connect(&p).await;
        assert!(round_trip(&mut s, b"warm", Duration::from_secs(2))
            .await
            .is_some());
        p.set_mode(ProxyMode::Delay(Duration::from_millis(200)));
        let start = Instant::now();
        let got = round_trip(&mut s, b"slow", Duration::from_secs(5)).await;
        let took = start.elapsed();
        assert_eq!(got.as_deref(), Some(&b"slow"[..]));
        // 200 ms there and 200 ms back.
        assert!(took >= Duration::from_millis(400), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
        p.set_mode(ProxyMode::Pass);
        let start = Instant::now();
        assert!(round_trip(&mut s, b"fast", Duration::from_secs(2))
            .await
            .is_some());
        assert!(start.elapsed() < Duration::from_millis(200));
    }

    #[tokio::test]
    async fn stall_holds_bytes_until_released() {
        let p = Proxy::to_local_port(echo_server().await);
        let mut s = connect(&p).await;
        assert!(round_trip(&mut s, b"warm", Duration::from_secs(2))
            .await
            .is_some());
        p.set_mode(ProxyMode::Stall);
        assert_eq!(
            round_trip(&mut s, b"held", Duration::from_millis(500)).await,
            None,
            "a stalled proxy delivered"
        );
        p.set_mode(ProxyMode::Pass);
        // The held bytes arrive now, in order, then new ones.
        let mut got = vec![0u8; 4];
        tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got, b"held");
        let got = round_trip(&mut s, b"next", Duration::from_secs(2)).await;
        assert_eq!(got.as_deref(), Some(&b"next"[..]));
    }

    #[tokio::test]
    async fn blackhole_drops_and_refuses_connections() {
        let p = Proxy::to_local_port(echo_server().await);
        let mut open = connect(&p).await;
        assert!(round_trip(&mut open, b"warm", Duration::from_secs(2))
            .await
            .is_some());
        p.set_mode(ProxyMode::Blackhole);
        assert!(
            closed_within(&mut open, Duration::from_secs(2)).await,
            "open connection survived the blackhole"
        );
        // A new connection is accepted by the kernel, then reset.
        // (or refused, should the kernel's backlog be full).
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", p.port())).await {
            let _ = s.write_all(b"x").await;
            assert!(closed_within(&mut s, Duration::from_secs(2)).await);
        }
        p.set_mode(ProxyMode::Pass);
        let mut s = connect(&p).await;
        let got = round_trip(&mut s, b"back", Duration::from_secs(2)).await;
        assert_eq!(got.as_deref(), Some(&b"back"[..]));
    }

    #[tokio::test]
    async fn dropping_the_proxy_closes_its_connections() {
        let p = Proxy::to_local_port(echo_server().await);
        let mut s = connect(&p).await;
        assert!(round_trip(&mut s, b"warm", Duration::from_secs(2))
            .await
            .is_some());
        let port = p.port();
        drop(p);
        assert!(closed_within(&mut s, Duration::from_secs(2)).await);
        let deadline = Instant::now() + Duration::from_secs(2);
        while TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            assert!(Instant::now() < deadline, "listener still open");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
