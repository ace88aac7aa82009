//! Packets capture: one record per TCP segment sent to the listen address. Needs CAP_NET_RAW.
//!
//! Owns the libpcap handle: the choice of device, the kernel (BPF) filter, the memory-mapped
//! TPACKET_V3 ring that libpcap sets up on Linux, and the loop that reads it on a dedicated OS
//! thread. Reading the ring costs no system call per frame: libpcap walks a filled block in user
//! space; the thread polls only when the ring is empty, and the kernel hands over a block when
//! it is full or [`BLOCK_TIMEOUT_MS`] after its first frame. Decoding is [`super::parse`]'s.
//!
//! The loop never waits on the record queue: when it is full the record is dropped and counted
//! (`queue_full`), because waiting would only move the loss into the kernel ring. Every loss —
//! kernel ring drops, interface drops, a full queue, malformed frames — is counted in
//! [`Metrics`], logged at most once a second, and summed up when capture stops.
//!
//! It must never bind or serve the port (that is [`super::connections`]'s, when `--serve sink`),
//! and never block the async runtime.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pcap::{Active, Capture, Direction};
use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags, Timespec};
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::parse::{parse, Link, NotSegment};
use crate::config::Config;
use crate::metrics::{DropReason, KernelDrop, Metrics};
use crate::record::Record;

/// Bytes kept of each frame: enough for SLL2 + two VLAN tags + IPv6 with extension headers +
/// a full TCP header. The payload is never needed (its length comes from the IP header), and a
/// small snap length packs many more frames into each ring block.
pub const SNAPLEN: i32 = 256;

/// How long the kernel may hold a partly filled ring block before handing it over: the worst
/// added latency between a segment arriving and redtap reading it.
pub const BLOCK_TIMEOUT_MS: i32 = 10;

/// Count into [`Metrics`] after this many frames (or [`FLUSH_EVERY`]), not per frame.
const FLUSH_FRAMES: u64 = 1024;
const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Read kernel statistics and report loss at most this often.
const STATS_EVERY: Duration = Duration::from_secs(1);

/// Why packet capture could not start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// No CAP_NET_RAW (or CAP_NET_ADMIN for the ring).
    #[error(
        "packet capture is not permitted ({detail}): run redtap as root, or grant it the \
         capability with 'sudo setcap cap_net_raw,cap_net_admin+ep {exe}', or use \
         --capture connections (no privileges needed)"
    )]
    NoPermission {
        /// libpcap's message.
        detail: String,
        /// This executable, for the setcap command line.
        exe: String,
    },
    /// `--filter` does not compile.
    #[error("--filter {expr:?} is not a valid capture filter (tcpdump syntax): {detail}")]
    BadFilter {
        /// The user's expression.
        expr: String,
        /// libpcap's message.
        detail: String,
    },
    /// The listen address is not on any interface.
    #[error(
        "no network interface carries {0}: use an address of this host, or 0.0.0.0 / [::] to \
         capture on every interface"
    )]
    NoInterface(IpAddr),
    /// The device delivers a link type the parser does not decode.
    #[error("device {device} delivers link type {dlt}, which redtap does not decode")]
    UnsupportedLink {
        /// The device.
        device: String,
        /// Its DLT.
        dlt: i32,
    },
    /// Anything else libpcap refused.
    #[error("cannot capture on {device}: {detail}")]
    Device {
        /// The device.
        device: String,
        /// libpcap's message.
        detail: String,
    },
}

impl OpenError {
    /// Whether the operator must change the command or its privileges (exit 64) rather than
    /// the host being in a bad state.
    pub fn is_usage(&self) -> bool {
        !matches!(self, OpenError::Device { .. })
    }
}

/// IPv6 extension headers a TCP header can follow: hop-by-hop (0), routing (43), fragment
/// (44), authentication (51), destination options (60), mobility (135), HIP (139), shim6 (140).
const IPV6_EXTENSIONS: [u8; 8] = [0, 43, 44, 51, 60, 135, 139, 140];

/// The capture filter for `listen`: TCP to its port, and to its address unless it is
/// unspecified. `0.0.0.0` means IPv4 only (like a socket bound there); `[::]` both families.
///
/// libpcap's `tcp dst port` only looks at the IPv6 header's own next-header field, and the one
/// primitive that follows the chain (`protochain`) compiles to a backward jump that the kernel
/// refuses (libpcap would then filter every frame in user space). So IPv6 packets to the
/// address whose next header is an extension header are admitted whatever their port, and
/// [`is_to_listen`] checks the decoded segment in user space.
pub fn builtin_filter(listen: SocketAddr) -> String {
    let port = listen.port();
    let ext = IPV6_EXTENSIONS
        .iter()
        .map(|n| format!("ip6[6] == {n}"))
        .collect::<Vec<_>>()
        .join(" or ");
    match listen.ip() {
        IpAddr::V4(a) if a.is_unspecified() => format!("ip and tcp dst port {port}"),
        IpAddr::V6(a) if a.is_unspecified() => {
            format!("tcp dst port {port} or (ip6 and ({ext}))")
        }
        IpAddr::V4(ip) => format!("tcp dst port {port} and dst host {ip}"),
        IpAddr::V6(ip) => {
            format!("(tcp dst port {port} and dst host {ip}) or (ip6 dst host {ip} and ({ext}))")
        }
    }
}

/// The filter redtap installs: the built-in one, ANDed with the user's.
pub fn full_filter(listen: SocketAddr, extra: Option<&str>) -> String {
    match extra {
        Some(e) => format!("({}) and ({e})", builtin_filter(listen)),
        None => builtin_filter(listen),
    }
}

/// Whether a decoded segment is TCP to `listen` as the built-in filter means it. Checked on
/// every segment before a record is made: the kernel filter admits IPv6 with extension headers
/// to any port (see [`builtin_filter`]), and whatever `--filter` says, it can only narrow.
pub fn is_to_listen(listen: SocketAddr, dst: SocketAddr) -> bool {
    dst.port() == listen.port()
        && match listen.ip() {
            IpAddr::V4(a) if a.is_unspecified() => dst.is_ipv4(),
            IpAddr::V6(a) if a.is_unspecified() => true,
            ip => dst.ip() == ip,
        }
}

/// Refuse a `--filter` that does not compile on its own. Pasted into `(built-in) and (user)`,
/// an expression such as `tcp) or (tcp` would compile and widen the capture to all TCP; one
/// that is a whole expression by itself cannot. Needs no privileges (a dead handle).
pub fn check_user_filter(expr: &str, device: &str) -> Result<(), OpenError> {
    // The link type the device will deliver: the `any` device is Linux cooked capture.
    let linktype = if device == "any" {
        pcap::Linktype::LINUX_SLL
    } else {
        pcap::Linktype::ETHERNET
    };
    let dead = Capture::dead(linktype).map_err(|e| OpenError::Device {
        device: device.into(),
        detail: e.to_string(),
    })?;
    dead.compile(expr, true)
        .map(drop)
        .map_err(|e| OpenError::BadFilter {
            expr: expr.into(),
            detail: format!(
                "{e} (the expression must be valid on its own: it is ANDed with \"TCP to \
                 --listen\", which it can only narrow)"
            ),
        })
}

/// The device to capture on: `any` for an unspecified address; the loopback interface for a
/// loopback address; `any` for any other address of this host. Clients on this host reach a
/// non-loopback address over loopback, other hosts over the address's own interface: only
/// `any` sees both (each frame once: see [`PacketCapture::open`]).
pub fn device_for(addr: IpAddr) -> Result<String, OpenError> {
    if addr.is_unspecified() {
        return Ok("any".into());
    }
    let devices = pcap::Device::list().map_err(|e| OpenError::Device {
        device: "(listing interfaces)".into(),
        detail: e.to_string(),
    })?;
    let carrying: Vec<&pcap::Device> = devices
        .iter()
        .filter(|d| d.addresses.iter().any(|a| a.addr == addr))
        .collect();
    match carrying.as_slice() {
        [one] if one.flags.is_loopback() => Ok(one.name.clone()),
        [] if addr.is_loopback() => devices
            .iter()
            .find(|d| d.flags.is_loopback())
            .map(|d| d.name.clone())
            .ok_or(OpenError::NoInterface(addr)),
        [] => Err(OpenError::NoInterface(addr)),
        _ => Ok("any".into()),
    }
}

/// How to open (and reopen) the capture.
#[derive(Debug, Clone)]
struct Opener {
    device: String,
    ring_size: usize,
    filter: String,
    user_filter: Option<String>,
}

impl Opener {
    /// Open, filter and set non-blocking: a handle ready for [`Reader`].
    fn open(&self) -> Result<(Capture<Active>, Link), OpenError> {
        let device = &self.device;
        let dev_err = |e: pcap::Error| OpenError::Device {
            device: device.clone(),
            detail: e.to_string(),
        };
        let inactive = Capture::from_device(device.as_str())
            .map_err(dev_err)?
            .snaplen(SNAPLEN)
            .buffer_size(i32::try_from(self.ring_size).unwrap_or(i32::MAX))
            .timeout(BLOCK_TIMEOUT_MS)
            .promisc(false);
        let mut cap = inactive.open().map_err(|e| {
            let detail = e.to_string();
            let low = detail.to_ascii_lowercase();
            if low.contains("permission") || low.contains("not permitted") {
                OpenError::NoPermission {
                    detail,
                    exe: std::env::current_exe()
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|_| "/path/to/redtap".into()),
                }
            } else {
                dev_err(e)
            }
        })?;
        // Frames this host sends are not traffic *to* the address; on loopback (and on `any`,
        // which sees loopback frames leave and arrive) this also keeps only one of the two
        // copies of each packet (libpcap drops the outgoing one).
        cap.direction(Direction::In).map_err(dev_err)?;
        // libpcap applies that direction in user space, after the outgoing copy has taken a
        // ring slot (and been counted as a drop when the ring is full). Ask the kernel to keep
        // outgoing frames out of the ring altogether; older kernels keep libpcap's filter.
        if let Err(e) = sys::ignore_outgoing(cap.as_fd()) {
            debug!(error = %e, "PACKET_IGNORE_OUTGOING not available; libpcap filters direction");
        }
        cap.filter(&self.filter, true)
            .map_err(|e| match &self.user_filter {
                Some(expr) => OpenError::BadFilter {
                    expr: expr.clone(),
                    detail: e.to_string(),
                },
                None => dev_err(e),
            })?;
        let dlt = cap.get_datalink().0;
        let link = Link::from_dlt(dlt).ok_or_else(|| OpenError::UnsupportedLink {
            device: device.clone(),
            dlt,
        })?;
        // Non-blocking reads, so the reader knows when the ring is empty (then it counts what
        // it read and sleeps in poll(2) on the capture and on an eventfd that stop wakes).
        let cap = cap.setnonblock().map_err(dev_err)?;
        Ok((cap, link))
    }

    /// Whether the device is up (`any` always is). A capture reopened on an interface that is
    /// still down would read nothing and look healthy.
    fn device_up(&self) -> bool {
        self.device == "any"
            || pcap::Device::list().is_ok_and(|l| {
                l.iter()
                    .any(|d| d.name == self.device && d.flags.is_up() && d.flags.is_running())
            })
    }
}

/// An open, filtered capture, ready to run.
pub struct PacketCapture {
    cap: Capture<Active>,
    link: Link,
    listen: SocketAddr,
    opener: Opener,
    /// The device captured on.
    pub device: String,
    /// The installed filter.
    pub filter: String,
}

impl PacketCapture {
    /// Open the capture `config` asks for. Call this before binding anything: it is where a
    /// missing privilege or a bad `--filter` shows up.
    pub fn open(config: &Config) -> Result<PacketCapture, OpenError> {
        let device = device_for(config.listen.ip())?;
        if let Some(expr) = &config.filter {
            check_user_filter(expr, &device)?;
        }
        let opener = Opener {
            device: device.clone(),
            ring_size: config.ring_size,
            filter: full_filter(config.listen, config.filter.as_deref()),
            user_filter: config.filter.clone(),
        };
        let (cap, link) = opener.open()?;
        Ok(PacketCapture {
            cap,
            link,
            listen: config.listen,
            device,
            filter: opener.filter.clone(),
            opener,
        })
    }

    /// Read frames on a dedicated thread until `stop` fires, sending one record per segment to
    /// `out`. On a read error (the interface went down…) the capture is reopened with backoff;
    /// meanwhile [`Metrics`] says capture is down. On stop, the frames already in the ring are
    /// read (for at most [`DRAIN_MAX`]). The returned task ends when the thread has stopped and
    /// dropped `out`.
    pub fn spawn(
        self,
        out: mpsc::Sender<Record>,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> std::io::Result<tokio::task::JoinHandle<()>> {
        let wake = Arc::new(eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?);
        let waker = {
            let (wake, stop) = (wake.clone(), stop.clone());
            tokio::spawn(async move {
                stop.cancelled().await;
                let _ = rustix::io::write(&*wake, &1u64.to_ne_bytes());
            })
        };
        let reader = Reader {
            cap: self.cap,
            link: self.link,
            listen: self.listen,
            opener: self.opener,
        };
        let thread = std::thread::Builder::new()
            .name("redtap-capture".into())
            .spawn(move || reader.run(&out, &metrics, &stop, &wake))?;
        Ok(tokio::task::spawn_blocking(move || {
            let _ = thread.join();
            waker.abort();
        }))
    }
}

/// Longest time spent reading what is left in the ring once stop fires.
pub const DRAIN_MAX: Duration = Duration::from_secs(2);
/// First wait before reopening a failed capture; doubles up to [`REOPEN_MAX`].
const REOPEN_FIRST: Duration = Duration::from_millis(100);
const REOPEN_MAX: Duration = Duration::from_secs(5);

/// The capture thread's state.
struct Reader {
    cap: Capture<Active>,
    link: Link,
    listen: SocketAddr,
    opener: Opener,
}

/// How a [`Reader::read_batch`] ended.
enum BatchEnd {
    /// The ring is empty.
    Idle,
    /// A batch is full; more may be waiting.
    Full,
    /// The record queue is gone: the pipeline has stopped.
    QueueClosed,
    /// libpcap failed.
    Failed(pcap::Error),
}

impl Reader {
    fn run(
        mut self,
        out: &mpsc::Sender<Record>,
        metrics: &Metrics,
        stop: &CancellationToken,
        wake: &OwnedFd,
    ) {
        info!(device = %self.opener.device, filter = %self.opener.filter, link = ?self.link,
              "packets capture running");
        metrics.set_capture_up(true);
        let mut batch = Counts::default();
        let mut total = Counts::default();
        let mut window = Counts::default();
        let mut kernel = KernelTotals::default();
        let mut last_flush = Instant::now();
        let mut last_stats = Instant::now();
        let mut first_malformed: Option<NotSegment> = None;
        'run: loop {
            let failure = loop {
                if stop.is_cancelled() {
                    break None;
                }
                let end = self.read_batch(out, &mut batch, &mut first_malformed);
                let idle = matches!(end, BatchEnd::Idle);
                match end {
                    BatchEnd::QueueClosed => break 'run,
                    BatchEnd::Failed(e) => break Some(e.to_string()),
                    BatchEnd::Idle | BatchEnd::Full => {}
                }
                if idle || batch.frames >= FLUSH_FRAMES || last_flush.elapsed() >= FLUSH_EVERY {
                    batch.flush_into(metrics, &mut total, &mut window);
                    last_flush = Instant::now();
                }
                if last_stats.elapsed() >= STATS_EVERY {
                    let (ring, iface) = kernel.update(&mut self.cap, metrics);
                    report_loss(&window, ring, iface, first_malformed.take());
                    window = Counts::default();
                    last_stats = Instant::now();
                }
                if idle {
                    let mut fds = [
                        PollFd::new(&self.cap, PollFlags::IN),
                        PollFd::new(wake, PollFlags::IN),
                    ];
                    let timeout = Timespec {
                        tv_sec: STATS_EVERY.as_secs() as _,
                        tv_nsec: 0,
                    };
                    match poll(&mut fds, Some(&timeout)) {
                        Ok(_) | Err(rustix::io::Errno::INTR) => {}
                        Err(e) => break Some(format!("poll on the capture failed: {e}")),
                    }
                }
            };
            match failure {
                None => {
                    self.drain(
                        out,
                        &mut batch,
                        &mut first_malformed,
                        metrics,
                        &mut total,
                        &mut window,
                    );
                    break 'run;
                }
                Some(e) => {
                    batch.flush_into(metrics, &mut total, &mut window);
                    let (ring, iface) = kernel.update(&mut self.cap, metrics);
                    report_loss(&window, ring, iface, first_malformed.take());
                    window = Counts::default();
                    metrics.set_capture_up(false);
                    error!(error = %e, device = %self.opener.device,
                           "capture failed; reopening it (healthz answers 503 meanwhile)");
                    if !self.reopen(metrics, stop, wake) {
                        break 'run;
                    }
                    // The new handle's statistics start from zero.
                    kernel = KernelTotals::default();
                }
            }
        }
        batch.flush_into(metrics, &mut total, &mut window);
        let (ring, iface) = kernel.update(&mut self.cap, metrics);
        report_loss(&window, ring, iface, first_malformed.take());
        info!(
            frames = total.frames,
            records = total.records,
            dropped_queue_full = total.queue_full,
            malformed = total.malformed,
            ignored = total.ignored,
            not_to_listen = total.filtered,
            kernel_ring_drops = kernel.ring,
            kernel_interface_drops = kernel.iface,
            "packets capture stopped"
        );
    }

    /// Read until the ring is empty or a batch is full, making a record of each segment to the
    /// listen address.
    fn read_batch(
        &mut self,
        out: &mpsc::Sender<Record>,
        batch: &mut Counts,
        first_malformed: &mut Option<NotSegment>,
    ) -> BatchEnd {
        let (link, listen) = (self.link, self.listen);
        while batch.frames < FLUSH_FRAMES {
            match self.cap.next_packet() {
                Ok(p) => {
                    batch.frames += 1;
                    let ts_us = (p.header.ts.tv_sec as u64)
                        .saturating_mul(1_000_000)
                        .saturating_add(p.header.ts.tv_usec as u64);
                    match parse(link, p.data, p.header.len) {
                        Ok(seg) if !is_to_listen(listen, seg.dst) => batch.filtered += 1,
                        Ok(seg) => {
                            batch.records += 1;
                            match out.try_send(seg.record(ts_us)) {
                                Ok(()) => {}
                                Err(TrySendError::Full(_)) => batch.queue_full += 1,
                                Err(TrySendError::Closed(_)) => return BatchEnd::QueueClosed,
                            }
                        }
                        Err(why) if why.is_malformed() => {
                            batch.malformed += 1;
                            first_malformed.get_or_insert(why);
                        }
                        Err(why) => {
                            batch.ignored += 1;
                            debug!(reason = %why, "frame ignored");
                        }
                    }
                }
                // Non-blocking: nothing left in the ring.
                Err(pcap::Error::TimeoutExpired) => return BatchEnd::Idle,
                Err(e) => return BatchEnd::Failed(e),
            }
        }
        BatchEnd::Full
    }

    /// On stop: read the frames already in the ring, so a segment that arrived before the
    /// signal is recorded (or counted) rather than lost with the handle.
    fn drain(
        &mut self,
        out: &mpsc::Sender<Record>,
        batch: &mut Counts,
        first_malformed: &mut Option<NotSegment>,
        metrics: &Metrics,
        total: &mut Counts,
        window: &mut Counts,
    ) {
        let deadline = Instant::now() + DRAIN_MAX;
        let before = total.frames + batch.frames;
        loop {
            let end = self.read_batch(out, batch, first_malformed);
            batch.flush_into(metrics, total, window);
            match end {
                BatchEnd::Full if Instant::now() < deadline => {}
                BatchEnd::Full => {
                    warn!(max = ?DRAIN_MAX, "frames still arriving when the ring drain ended");
                    break;
                }
                BatchEnd::Idle | BatchEnd::QueueClosed | BatchEnd::Failed(_) => break,
            }
        }
        debug!(frames = total.frames - before, "ring drained");
    }

    /// Reopen the capture with backoff until it works (true) or stop fires (false).
    fn reopen(&mut self, metrics: &Metrics, stop: &CancellationToken, wake: &OwnedFd) -> bool {
        let mut backoff = REOPEN_FIRST;
        loop {
            let mut fds = [PollFd::new(wake, PollFlags::IN)];
            let timeout = Timespec {
                tv_sec: backoff.as_secs() as _,
                tv_nsec: backoff.subsec_nanos() as _,
            };
            let _ = poll(&mut fds, Some(&timeout));
            if stop.is_cancelled() {
                return false;
            }
            let opened = if self.opener.device_up() {
                self.opener.open().map_err(|e| e.to_string())
            } else {
                Err(format!("interface {} is down", self.opener.device))
            };
            match opened {
                Ok((cap, link)) => {
                    self.cap = cap;
                    self.link = link;
                    metrics.capture_reopened();
                    metrics.set_capture_up(true);
                    info!(device = %self.opener.device, "packets capture reopened");
                    return true;
                }
                Err(e) => {
                    warn!(error = %e, retry_in = ?backoff * 2, "capture still down");
                    backoff = (backoff * 2).min(REOPEN_MAX);
                }
            }
        }
    }
}

/// Frame counts not yet added to [`Metrics`].
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    frames: u64,
    records: u64,
    queue_full: u64,
    malformed: u64,
    ignored: u64,
    /// Segments the kernel filter passed that are not to the listen address.
    filtered: u64,
}

impl Counts {
    fn flush_into(&mut self, metrics: &Metrics, total: &mut Counts, window: &mut Counts) {
        metrics.captured.inc_by(self.records);
        metrics.dropped(DropReason::QueueFull, self.queue_full);
        metrics.frames_unparsed(self.malformed, self.ignored);
        metrics.frames_not_to_listen(self.filtered);
        for acc in [total, window] {
            acc.frames += self.frames;
            acc.records += self.records;
            acc.queue_full += self.queue_full;
            acc.malformed += self.malformed;
            acc.ignored += self.ignored;
            acc.filtered += self.filtered;
        }
        *self = Counts::default();
    }
}

/// libpcap's cumulative drop counters as last read.
#[derive(Debug, Default)]
struct KernelTotals {
    ring: u64,
    iface: u64,
}

impl KernelTotals {
    /// Read libpcap's statistics, count what is new in [`Metrics`], and return the new drops
    /// (ring, interface).
    fn update(&mut self, cap: &mut Capture<Active>, metrics: &Metrics) -> (u64, u64) {
        let Ok(s) = cap.stats() else {
            return (0, 0);
        };
        // The counters are u32 in libpcap and may wrap on a long run.
        let ring = u64::from(s.dropped.wrapping_sub(self.ring as u32));
        let iface = u64::from(s.if_dropped.wrapping_sub(self.iface as u32));
        self.ring = self.ring.wrapping_add(ring);
        self.iface = self.iface.wrapping_add(iface);
        metrics.kernel_dropped(KernelDrop::Ring, ring);
        metrics.kernel_dropped(KernelDrop::Interface, iface);
        (ring, iface)
    }
}

/// Log the loss of the last window, if any: one line at most per [`STATS_EVERY`].
fn report_loss(window: &Counts, ring: u64, iface: u64, malformed: Option<NotSegment>) {
    if ring + iface + window.queue_full + window.malformed == 0 {
        return;
    }
    warn!(
        kernel_ring_drops = ring,
        kernel_interface_drops = iface,
        dropped_queue_full = window.queue_full,
        malformed = window.malformed,
        first_malformed = malformed.map(|m| m.to_string()),
        "packets capture lost frames in the last second"
    );
}

/// The one call redtap makes to the kernel itself: a socket option the libraries lack.
#[allow(unsafe_code)]
mod sys {
    use std::os::fd::{AsRawFd, BorrowedFd};

    /// Set PACKET_IGNORE_OUTGOING (Linux 4.20+) on a packet socket.
    pub fn ignore_outgoing(fd: BorrowedFd<'_>) -> std::io::Result<()> {
        let one: libc::c_int = 1;
        // SAFETY: `fd` is an open socket borrowed for the duration of the call; the option
        // value points at a live c_int and the length passed is exactly its size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_IGNORE_OUTGOING,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_follow_the_listen_address() {
        let f = |s: &str| builtin_filter(s.parse().unwrap());
        let ext = "ip6[6] == 0 or ip6[6] == 43 or ip6[6] == 44 or ip6[6] == 51 or ip6[6] == 60 \
                   or ip6[6] == 135 or ip6[6] == 139 or ip6[6] == 140";
        assert_eq!(f("0.0.0.0:9000"), "ip and tcp dst port 9000");
        assert_eq!(
            f("[::]:9000"),
            format!("tcp dst port 9000 or (ip6 and ({ext}))")
        );
        assert_eq!(
            f("127.0.0.1:9000"),
            "tcp dst port 9000 and dst host 127.0.0.1"
        );
        assert_eq!(
            f("[::1]:80"),
            format!("(tcp dst port 80 and dst host ::1) or (ip6 dst host ::1 and ({ext}))")
        );
        assert_eq!(
            full_filter("127.0.0.1:80".parse().unwrap(), Some("src net 10.0.0.0/8")),
            "(tcp dst port 80 and dst host 127.0.0.1) and (src net 10.0.0.0/8)"
        );
        // Every form compiles, on both link types redtap captures with.
        for listen in ["0.0.0.0:9000", "[::]:9000", "127.0.0.1:9000", "[::1]:80"] {
            for device in ["lo", "any"] {
                check_user_filter(&f(listen), device).unwrap();
            }
        }
    }

    #[test]
    fn a_user_filter_must_stand_alone() {
        for ok in ["src net 10.0.0.0/8", "tcp or udp", "not src host 127.0.0.2"] {
            check_user_filter(ok, "lo").unwrap();
        }
        for bad in ["tcp) or (tcp", "port ((", "src net", ")"] {
            let e = check_user_filter(bad, "lo").unwrap_err();
            assert!(matches!(e, OpenError::BadFilter { .. }), "{bad}: {e}");
            assert!(e.to_string().contains("on its own"), "{e}");
        }
    }

    #[test]
    fn only_segments_to_the_listen_address_make_records() {
        let to = |l: &str, d: &str| is_to_listen(l.parse().unwrap(), d.parse().unwrap());
        assert!(to("127.0.0.1:80", "127.0.0.1:80"));
        assert!(!to("127.0.0.1:80", "127.0.0.1:81"));
        assert!(!to("127.0.0.1:80", "127.0.0.2:80"));
        assert!(to("0.0.0.0:80", "10.1.2.3:80"));
        assert!(!to("0.0.0.0:80", "[::1]:80"));
        assert!(to("[::]:80", "[::1]:80") && to("[::]:80", "127.0.0.1:80"));
        assert!(to("[::1]:80", "[::1]:80") && !to("[::1]:80", "[::1]:8080"));
    }
}
