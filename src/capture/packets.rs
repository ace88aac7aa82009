//! Packets capture: one record per TCP segment sent to the listen address. Needs CAP_NET_RAW.
//!
//! Owns the libpcap handles (one per device: a non-loopback address is captured on its
//! interface and on loopback): the choice of devices, the kernel (BPF) filter and the user-space
//! check that each segment is to the listen address (which `--filter` can only narrow), the
//! memory-mapped TPACKET_V3 ring that libpcap sets up on Linux, and the loop that reads them on
//! a dedicated OS thread — reopening a failed handle with backoff, and draining the rings on
//! stop. Reading the ring costs no system call per frame: libpcap walks a filled block in user
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
    let one_of = |byte: usize, values: &mut dyn Iterator<Item = u8>| {
        values
            .map(|n| format!("ip6[{byte}] == {n}"))
            .collect::<Vec<_>>()
            .join(" or ")
    };
    // An extension header, followed by TCP or by another extension header (whose next-header
    // byte is its first, at offset 40): not, for instance, hop-by-hop then ICMPv6 (MLD).
    let ext = format!(
        "({}) and ({})",
        one_of(6, &mut IPV6_EXTENSIONS.iter().copied()),
        one_of(40, &mut std::iter::once(6).chain(IPV6_EXTENSIONS))
    );
    match listen.ip() {
        IpAddr::V4(a) if a.is_unspecified() => format!("ip and tcp dst port {port}"),
        IpAddr::V6(a) if a.is_unspecified() => {
            format!("tcp dst port {port} or (ip6 and {ext})")
        }
        IpAddr::V4(ip) => format!("tcp dst port {port} and dst host {ip}"),
        IpAddr::V6(ip) => {
            format!("(tcp dst port {port} and dst host {ip}) or (ip6 dst host {ip} and {ext})")
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

/// The devices to capture on: `any` for an unspecified address; the loopback interface for a
/// loopback address; for any other address of this host, its interface *and* loopback, because
/// clients on this host reach the address over loopback and other hosts over its interface
/// (each segment crosses one of them, so it is seen once); `any` if several interfaces carry it.
pub fn devices_for(addr: IpAddr) -> Result<Vec<String>, OpenError> {
    if addr.is_unspecified() {
        return Ok(vec!["any".into()]);
    }
    let devices = pcap::Device::list().map_err(|e| OpenError::Device {
        device: "(listing interfaces)".into(),
        detail: e.to_string(),
    })?;
    let carrying: Vec<&pcap::Device> = devices
        .iter()
        .filter(|d| d.addresses.iter().any(|a| a.addr == addr))
        .collect();
    let loopback = devices.iter().find(|d| d.flags.is_loopback());
    match carrying.as_slice() {
        [one] if one.flags.is_loopback() => Ok(vec![one.name.clone()]),
        [] if addr.is_loopback() => loopback
            .map(|d| vec![d.name.clone()])
            .ok_or(OpenError::NoInterface(addr)),
        [] => Err(OpenError::NoInterface(addr)),
        [one] => Ok(std::iter::once(one.name.clone())
            .chain(loopback.map(|d| d.name.clone()))
            .collect()),
        _ => Ok(vec!["any".into()]),
    }
}

/// Whether `device` is up, from sysfs; `true` when that cannot be told (no sysfs, `any`).
/// libpcap reads nothing from a downed interface and says nothing either.
fn device_up(device: &str) -> bool {
    const IFF_UP: u32 = 0x1;
    std::fs::read_to_string(format!("/sys/class/net/{device}/flags"))
        .ok()
        .and_then(|f| u32::from_str_radix(f.trim().trim_start_matches("0x"), 16).ok())
        .is_none_or(|flags| flags & IFF_UP != 0)
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
}

/// One device's capture: open, or down and waiting to be reopened.
struct Handle {
    opener: Opener,
    /// `None` while down after a read error.
    cap: Option<Capture<Active>>,
    link: Link,
    kernel: KernelTotals,
    backoff: Duration,
    retry_at: Instant,
}

impl Handle {
    /// Whether frames reach this handle: open, and its interface up.
    fn up(&self) -> bool {
        self.cap.is_some() && device_up(&self.opener.device)
    }

    /// After a read error: count what the kernel dropped, close, and reopen later.
    fn fail(&mut self, error: &str, metrics: &Metrics) -> (u64, u64) {
        let lost = match &mut self.cap {
            Some(cap) => self.kernel.update(cap, metrics),
            None => (0, 0),
        };
        self.cap = None;
        self.backoff = REOPEN_FIRST;
        self.retry_at = Instant::now() + self.backoff;
        error!(error = %error, device = %self.opener.device,
               "capture failed; reopening it (healthz answers 503 meanwhile)");
        lost
    }

    /// Try to reopen if it is time; true if it was reopened.
    fn try_reopen(&mut self, metrics: &Metrics) -> bool {
        if self.cap.is_some() || Instant::now() < self.retry_at {
            return false;
        }
        match self.opener.open() {
            Ok((cap, link)) => {
                self.cap = Some(cap);
                self.link = link;
                // The new handle's statistics start from zero.
                self.kernel = KernelTotals::default();
                metrics.capture_reopened();
                info!(device = %self.opener.device, "packets capture reopened");
                true
            }
            Err(e) => {
                self.backoff = (self.backoff * 2).min(REOPEN_MAX);
                self.retry_at = Instant::now() + self.backoff;
                warn!(device = %self.opener.device, error = %e, retry_in = ?self.backoff,
                      "capture still down");
                false
            }
        }
    }
}

/// An open, filtered capture (one handle per device), ready to run.
pub struct PacketCapture {
    handles: Vec<Handle>,
    listen: SocketAddr,
    /// The devices captured on, comma-separated.
    pub device: String,
    /// The installed filter.
    pub filter: String,
}

impl PacketCapture {
    /// Open the capture `config` asks for. Call this before binding anything: it is where a
    /// missing privilege or a bad `--filter` shows up.
    pub fn open(config: &Config) -> Result<PacketCapture, OpenError> {
        let devices = devices_for(config.listen.ip())?;
        if let Some(expr) = &config.filter {
            for device in &devices {
                check_user_filter(expr, device)?;
            }
        }
        let filter = full_filter(config.listen, config.filter.as_deref());
        let mut handles = Vec::new();
        for device in &devices {
            let opener = Opener {
                device: device.clone(),
                ring_size: config.ring_size,
                filter: filter.clone(),
                user_filter: config.filter.clone(),
            };
            let (cap, link) = opener.open()?;
            handles.push(Handle {
                opener,
                cap: Some(cap),
                link,
                kernel: KernelTotals::default(),
                backoff: REOPEN_FIRST,
                retry_at: Instant::now(),
            });
        }
        Ok(PacketCapture {
            handles,
            listen: config.listen,
            device: devices.join(","),
            filter,
        })
    }

    /// Read frames on a dedicated thread until `stop` fires, sending one record per segment to
    /// `out`. A device whose capture fails (the interface disappeared…) is reopened with
    /// backoff while the others go on; meanwhile, and while a captured interface is down,
    /// [`Metrics`] says capture is down. On stop, the frames already in the rings are read (for
    /// at most [`DRAIN_MAX`]). The returned task ends when the thread has stopped and dropped
    /// `out`.
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
            handles: self.handles,
            listen: self.listen,
            device: self.device,
            filter: self.filter,
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

/// Longest time spent reading what is left in the rings once stop fires.
pub const DRAIN_MAX: Duration = Duration::from_secs(2);
/// First wait before reopening a failed capture; doubles up to [`REOPEN_MAX`].
const REOPEN_FIRST: Duration = Duration::from_millis(100);
const REOPEN_MAX: Duration = Duration::from_secs(5);

/// The capture thread's state.
struct Reader {
    handles: Vec<Handle>,
    listen: SocketAddr,
    device: String,
    filter: String,
}

/// How a [`read_batch`] ended.
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

/// Frame counts and loss reports, across handles.
#[derive(Default)]
struct Tally {
    batch: Counts,
    total: Counts,
    window: Counts,
    first_malformed: Option<NotSegment>,
    /// Kernel drops (ring, interface) since the last report.
    kernel_window: (u64, u64),
    /// Kernel drops (ring, interface) since start.
    kernel_total: (u64, u64),
}

impl Tally {
    fn flush(&mut self, metrics: &Metrics) {
        self.batch
            .flush_into(metrics, &mut self.total, &mut self.window);
    }

    fn kernel(&mut self, (ring, iface): (u64, u64)) {
        self.kernel_window.0 += ring;
        self.kernel_window.1 += iface;
        self.kernel_total.0 += ring;
        self.kernel_total.1 += iface;
    }

    fn report(&mut self) {
        let (ring, iface) = std::mem::take(&mut self.kernel_window);
        report_loss(&self.window, ring, iface, self.first_malformed.take());
        self.window = Counts::default();
    }
}

impl Reader {
    fn run(
        mut self,
        out: &mpsc::Sender<Record>,
        metrics: &Metrics,
        stop: &CancellationToken,
        wake: &OwnedFd,
    ) {
        let links: Vec<Link> = self.handles.iter().map(|h| h.link).collect();
        info!(device = %self.device, filter = %self.filter, link = ?links,
              "packets capture running");
        let mut t = Tally::default();
        let mut last_flush = Instant::now();
        let mut last_stats = Instant::now();
        let listen = self.listen;
        // Re-judged once a second and on each failure or reopening, not per batch: it reads
        // sysfs.
        let mut judge_up = true;
        'run: loop {
            if std::mem::take(&mut judge_up) {
                metrics.set_capture_up(self.handles.iter().all(Handle::up));
            }
            if stop.is_cancelled() {
                self.drain(out, metrics, &mut t);
                break;
            }
            let mut idle = true;
            for h in &mut self.handles {
                let Some(cap) = &mut h.cap else { continue };
                match read_batch(cap, h.link, listen, out, &mut t) {
                    BatchEnd::Idle => {}
                    BatchEnd::Full => idle = false,
                    BatchEnd::QueueClosed => break 'run,
                    BatchEnd::Failed(e) => {
                        let lost = h.fail(&e.to_string(), metrics);
                        t.kernel(lost);
                        judge_up = true;
                    }
                }
            }
            if idle || t.batch.frames >= FLUSH_FRAMES || last_flush.elapsed() >= FLUSH_EVERY {
                t.flush(metrics);
                last_flush = Instant::now();
            }
            if last_stats.elapsed() >= STATS_EVERY {
                for h in &mut self.handles {
                    if let Some(cap) = &mut h.cap {
                        let lost = h.kernel.update(cap, metrics);
                        t.kernel(lost);
                    }
                }
                t.report();
                last_stats = Instant::now();
                judge_up = true;
            }
            for h in &mut self.handles {
                judge_up |= h.try_reopen(metrics);
            }
            if idle {
                // Sleep until a frame, stop, the next statistics or the next reopening.
                let now = Instant::now();
                let wait = self
                    .handles
                    .iter()
                    .filter(|h| h.cap.is_none())
                    .map(|h| h.retry_at.saturating_duration_since(now))
                    .fold(STATS_EVERY, Duration::min);
                let mut fds: Vec<PollFd<'_>> = self
                    .handles
                    .iter()
                    .filter_map(|h| h.cap.as_ref())
                    .map(|c| PollFd::new(c, PollFlags::IN))
                    .collect();
                fds.push(PollFd::new(wake, PollFlags::IN));
                let timeout = Timespec {
                    tv_sec: wait.as_secs() as _,
                    tv_nsec: wait.subsec_nanos() as _,
                };
                match poll(&mut fds, Some(&timeout)) {
                    Ok(_) | Err(rustix::io::Errno::INTR) => {}
                    Err(e) => {
                        // Not seen in practice (EINVAL, ENOMEM); do not spin on it.
                        error!(error = %e, "poll on the capture failed");
                        std::thread::sleep(REOPEN_FIRST);
                    }
                }
            }
        }
        t.flush(metrics);
        for h in &mut self.handles {
            if let Some(cap) = &mut h.cap {
                let lost = h.kernel.update(cap, metrics);
                t.kernel(lost);
            }
        }
        t.report();
        info!(
            frames = t.total.frames,
            records = t.total.records,
            dropped_queue_full = t.total.queue_full,
            malformed = t.total.malformed,
            ignored = t.total.ignored,
            not_to_listen = t.total.filtered,
            kernel_ring_drops = t.kernel_total.0,
            kernel_interface_drops = t.kernel_total.1,
            "packets capture stopped"
        );
    }

    /// On stop: read the frames already in the rings, so a segment that arrived before the
    /// signal is recorded (or counted) rather than lost with the handle.
    fn drain(&mut self, out: &mpsc::Sender<Record>, metrics: &Metrics, t: &mut Tally) {
        let deadline = Instant::now() + DRAIN_MAX;
        let before = t.total.frames + t.batch.frames;
        let listen = self.listen;
        for h in &mut self.handles {
            let Some(cap) = &mut h.cap else { continue };
            loop {
                let end = read_batch(cap, h.link, listen, out, t);
                t.flush(metrics);
                match end {
                    BatchEnd::Full if Instant::now() < deadline => {}
                    BatchEnd::Full => {
                        warn!(max = ?DRAIN_MAX, device = %h.opener.device,
                              "frames still arriving when the ring drain ended");
                        break;
                    }
                    BatchEnd::Idle | BatchEnd::QueueClosed | BatchEnd::Failed(_) => break,
                }
            }
        }
        debug!(frames = t.total.frames - before, "rings drained");
    }
}

/// Read from `cap` until its ring is empty or a batch is full, making a record of each segment
/// to the listen address.
fn read_batch(
    cap: &mut Capture<Active>,
    link: Link,
    listen: SocketAddr,
    out: &mpsc::Sender<Record>,
    t: &mut Tally,
) -> BatchEnd {
    let batch = &mut t.batch;
    while batch.frames < FLUSH_FRAMES {
        match cap.next_packet() {
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
                        t.first_malformed.get_or_insert(why);
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
        let ext = "(ip6[6] == 0 or ip6[6] == 43 or ip6[6] == 44 or ip6[6] == 51 \
                   or ip6[6] == 60 or ip6[6] == 135 or ip6[6] == 139 or ip6[6] == 140) and \
                   (ip6[40] == 6 or ip6[40] == 0 or ip6[40] == 43 or ip6[40] == 44 \
                   or ip6[40] == 51 or ip6[40] == 60 or ip6[40] == 135 or ip6[40] == 139 \
                   or ip6[40] == 140)";
        assert_eq!(f("0.0.0.0:9000"), "ip and tcp dst port 9000");
        assert_eq!(
            f("[::]:9000"),
            format!("tcp dst port 9000 or (ip6 and {ext})")
        );
        assert_eq!(
            f("127.0.0.1:9000"),
            "tcp dst port 9000 and dst host 127.0.0.1"
        );
        assert_eq!(
            f("[::1]:80"),
            format!("(tcp dst port 80 and dst host ::1) or (ip6 dst host ::1 and {ext})")
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
