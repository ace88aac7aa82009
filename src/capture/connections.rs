//! Connections capture: one record per accepted TCP connection. Needs no privileges.
//!
//! The same accept-and-discard machinery also serves the port for packets mode
//! (`--serve sink`), where it produces no records: [`ConnCapture::run`] then gets no queue.
//!
//! Owns the listening socket and the served connections. Each served connection is read and
//! discarded (never buffered beyond one fixed read buffer) until the client closes or goes idle.
//! At most `max_connections` are served at once; beyond that, accepting waits (the kernel's
//! backlog holds the rest), which is also how a full record queue slows accepting.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info};

use crate::metrics::Metrics;
use crate::record::{now_us, Kind, Record};

/// Listen backlog asked of the kernel (capped by `net.core.somaxconn`). The runtime's default
/// (128) overflows under bursts of short connections on a busy 2-core machine: each overflow
/// costs the client a 1 s SYN retransmission.
pub const BACKLOG: i32 = 4096;

/// Bind a listening socket on `addr` with [`BACKLOG`]. `[::]` listens on IPv6 only when the
/// system says so; IPv4 clients of a dual-stack socket are recorded as IPv4.
pub fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(BACKLOG)?;
    TcpListener::from_std(sock.into())
}

/// Accept loop settings.
#[derive(Debug, Clone)]
pub struct ConnCapture {
    /// Most connections served at once.
    pub max_connections: usize,
    /// Close a connection after this long without data.
    pub idle_timeout: Duration,
}

impl ConnCapture {
    /// Accept on `listener` until `stop` fires, sending one record per connection to `out`
    /// (none when `out` is `None`: serving only). On stop, connections the kernel already
    /// completed are still accepted and recorded.
    pub async fn run(
        self,
        listener: TcpListener,
        out: Option<mpsc::Sender<Record>>,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) {
        let limit = Arc::new(Semaphore::new(self.max_connections));
        let mut backoff = Duration::from_millis(5);
        loop {
            let permit = tokio::select! {
                p = limit.clone().acquire_owned() => p.expect("semaphore never closed"),
                _ = stop.cancelled() => break,
            };
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.cancelled() => break,
            };
            match accepted {
                Ok((stream, peer)) => {
                    backoff = Duration::from_millis(5);
                    if let Some(out) = &out {
                        if !self.record(&stream, peer, out, &metrics).await {
                            break;
                        }
                    }
                    let idle = self.idle_timeout;
                    let stop = stop.clone();
                    tokio::spawn(async move {
                        discard(stream, idle, stop).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    // EMFILE, ENFILE, ENOBUFS…: back off instead of spinning.
                    error!(error = %e, backoff_ms = backoff.as_millis() as u64, "accept failed");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.cancelled() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
        // Record the connections already completed by the kernel before closing the listener.
        // At most one backlog's worth: clients connecting as fast as they are drained must not
        // hold shutdown open.
        let mut late = 0u64;
        while late < BACKLOG as u64 {
            let Some(Ok((stream, peer))) =
                crate::util::poll_once(std::pin::pin!(listener.accept()))
            else {
                break;
            };
            if let Some(out) = &out {
                if !self.record(&stream, peer, out, &metrics).await {
                    break;
                }
            }
            late += 1;
        }
        info!(
            late_accepted = late,
            "connections capture stopped; listener closed"
        );
    }

    /// Send the record of one accepted connection. `false` if the pipeline is gone.
    async fn record(
        &self,
        stream: &TcpStream,
        peer: SocketAddr,
        out: &mpsc::Sender<Record>,
        metrics: &Metrics,
    ) -> bool {
        let ts_us = now_us();
        let dst = match stream.local_addr() {
            Ok(a) => a,
            Err(e) => {
                debug!(error = %e, "local_addr failed");
                return true;
            }
        };
        let rec = Record {
            ts_us,
            src: normalize(peer),
            dst: normalize(dst),
            kind: Kind::Conn,
        };
        metrics.captured.inc();
        // Waiting here when the queue is full is the backpressure on accepting.
        out.send(rec).await.is_ok()
    }
}

/// IPv4 clients of a dual-stack socket appear as `::ffff:a.b.c.d`; store them as IPv4.
fn normalize(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

/// Read and throw away what the client sends until it closes, goes idle, or we stop.
async fn discard(mut stream: TcpStream, idle: Duration, stop: CancellationToken) {
    // Small and on the stack: zeroing it is per connection; 4 KiB reads still drain a fast
    // sender at several GB/s.
    let mut buf = [0u8; 4096];
    loop {
        tokio::select! {
            r = tokio::time::timeout(idle, stream.read(&mut buf)) => match r {
                Ok(Ok(n)) if n > 0 => continue,
                _ => break,
            },
            _ = stop.cancelled() => break,
        }
    }
}
