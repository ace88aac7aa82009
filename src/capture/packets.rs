//! Packets capture: one record per TCP segment sent to the listen address. Needs CAP_NET_RAW.
//!
//! Owns the libpcap handles (per device — a non-loopback address is captured on its interface
//! and on loopback — one per capture thread): the choice of devices, the kernel (BPF) filter and
//! the user-space check that each segment is to the listen address (which `--filter` can only
//! narrow), the memory-mapped TPACKET_V3 ring that libpcap sets up on Linux, and the loop that
//! reads them on dedicated OS threads — reopening a failed handle with backoff, and draining the
//! rings on stop. Reading the ring costs no system call per frame: libpcap walks a filled block
//! in user space; a thread polls only when its rings are empty, and the kernel hands over a
//! block when it is full or [`BLOCK_TIMEOUT_MS`] after its first frame. Decoding is
//! [`super::parse`]'s.
//!
//! With `--capture-threads N` > 1, each of N threads holds one handle (its own ring) per
//! device, and a device's N handles form one `PACKET_FANOUT` group: the kernel hashes each
//! packet by flow (after reassembling IP fragments) to one member, so a flow stays on one thread
//! and every packet reaches exactly one ring. A handle joins its group before its filter admits
//! anything (see `Opener::open`), so no packet is seen twice at start or on a reopening.
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
use std::sync::{Arc, Mutex};
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

/// Before a fanout member's filter is installed: how long to wait for the kernel to hand over
/// the partly filled ring block holding what the handle took in while it was not yet in its
/// group. The kernel retires such a block within two block timeouts.
const FANOUT_SETTLE: Duration = Duration::from_millis(5 * BLOCK_TIMEOUT_MS as u64);

/// A filter no packet passes (no frame is 0 bytes long). Compiled unoptimized: the optimizer
/// refuses an expression that rejects everything.
const REJECT_ALL: &str = "less 0";

/// The default `--capture-threads`: one below four cores (a second reader would take a core
/// from the dispatcher, the writers and Redis), else half the cores, at most 8.
pub fn default_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores < 4 {
        1
    } else {
        (cores / 2).min(8)
    }
}

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
    /// The kernel refused the fanout group that `--capture-threads` > 1 needs.
    #[error(
        "cannot share {device} between capture threads ({detail}): PACKET_FANOUT with \
         PACKET_FANOUT_FLAG_IGNORE_OUTGOING needs Linux 4.20 or later; use --capture-threads 1"
    )]
    NoFanout {
        /// The device.
        device: String,
        /// The kernel's error.
        detail: String,
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

/// A handle's place in its device's fanout group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fanout {
    /// One capture thread: no group.
    Off,
    /// The group's first member: the kernel picks an id no other group on this host has.
    Create,
    /// A later member, or a reopened one: joins the group with this id.
    Join(u16),
}

/// How to open (and reopen) one capture.
#[derive(Debug, Clone)]
struct Opener {
    device: String,
    ring_size: usize,
    filter: String,
    user_filter: Option<String>,
    fanout: Fanout,
}

impl Opener {
    /// Open and set non-blocking: a handle ready for [`Reader`], with its fanout group id.
    ///
    /// Without fanout the filter is installed here. A fanout member is opened with a filter
    /// that admits nothing and then joins its group: until it has joined it would receive
    /// every packet beside the group, so whatever its ring took in so far is discarded by
    /// [`Opener::arm`], which installs the real filter once [`FANOUT_SETTLE`] has passed.
    fn open(&self) -> Result<(Capture<Active>, Link, Option<u16>), OpenError> {
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
        let group = match self.fanout {
            Fanout::Off => {
                self.install_filter(&mut cap)?;
                None
            }
            Fanout::Create | Fanout::Join(_) => {
                cap.filter(REJECT_ALL, false).map_err(dev_err)?;
                let id = match self.fanout {
                    Fanout::Join(id) => Some(id),
                    _ => None,
                };
                let group = sys::join_fanout(cap.as_fd(), id).map_err(|e| OpenError::NoFanout {
                    device: device.clone(),
                    detail: e.to_string(),
                })?;
                Some(group)
            }
        };
        let dlt = cap.get_datalink().0;
        let link = Link::from_dlt(dlt).ok_or_else(|| OpenError::UnsupportedLink {
            device: device.clone(),
            dlt,
        })?;
        // Non-blocking reads, so the reader knows when the ring is empty (then it counts what
        // it read and sleeps in poll(2) on the capture and on an eventfd that stop wakes).
        let cap = cap.setnonblock().map_err(dev_err)?;
        Ok((cap, link, group))
    }

    fn install_filter(&self, cap: &mut Capture<Active>) -> Result<(), OpenError> {
        cap.filter(&self.filter, true)
            .map_err(|e| match &self.user_filter {
                Some(expr) => OpenError::BadFilter {
                    expr: expr.clone(),
                    detail: e.to_string(),
                },
                None => OpenError::Device {
                    device: self.device.clone(),
                    detail: e.to_string(),
                },
            })
    }

    /// A fanout member, [`FANOUT_SETTLE`] after [`Opener::open`]: read its ring empty (libpcap
    /// runs the admit-nothing filter over the blocks filled before it was installed, so nothing
    /// comes out), then install the real filter. From here on the member receives only its
    /// group's share.
    fn arm(&self, cap: &mut Capture<Active>) -> Result<(), OpenError> {
        let deadline = Instant::now() + DRAIN_MAX;
        let mut leaked = 0u64;
        loop {
            match cap.next_packet() {
                Ok(_) => leaked += 1,
                Err(pcap::Error::TimeoutExpired) => break,
                Err(e) => {
                    return Err(OpenError::Device {
                        device: self.device.clone(),
                        detail: e.to_string(),
                    })
                }
            }
            if Instant::now() > deadline {
                break;
            }
        }
        if leaked > 0 {
            debug!(device = %self.device, frames = leaked,
                   "frames from before the fanout group was joined discarded");
        }
        self.install_filter(cap)
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
        let opened = self.opener.open().and_then(|(mut cap, link, group)| {
            if group.is_some() {
                std::thread::sleep(FANOUT_SETTLE);
                self.opener.arm(&mut cap)?;
            }
            Ok((cap, link))
        });
        match opened {
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

/// An open, filtered capture (per capture thread, one handle per device), ready to run.
pub struct PacketCapture {
    /// `handles[thread][device]`.
    handles: Vec<Vec<Handle>>,
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
        let threads = config.capture_threads.max(1);
        let mut handles: Vec<Vec<Handle>> = (0..threads).map(|_| Vec::new()).collect();
        for device in &devices {
            let mut opener = Opener {
                device: device.clone(),
                ring_size: config.ring_size,
                filter: filter.clone(),
                user_filter: config.filter.clone(),
                fanout: if threads > 1 {
                    Fanout::Create
                } else {
                    Fanout::Off
                },
            };
            for thread in &mut handles {
                let (cap, link, group) = opener.open()?;
                if let Some(id) = group {
                    // Every later member, and any reopening, joins this group.
                    opener.fanout = Fanout::Join(id);
                }
                thread.push(Handle {
                    opener: opener.clone(),
                    cap: Some(cap),
                    link,
                    kernel: KernelTotals::default(),
                    backoff: REOPEN_FIRST,
                    retry_at: Instant::now(),
                });
            }
        }
        if threads > 1 {
            // Every member of every group has joined: let the kernel hand over what they took
            // in before, discard it, and only then let the filters admit packets.
            std::thread::sleep(FANOUT_SETTLE);
            for h in handles.iter_mut().flatten() {
                if let Some(cap) = &mut h.cap {
                    h.opener.arm(cap)?;
                }
            }
        }
        Ok(PacketCapture {
            handles,
            listen: config.listen,
            device: devices.join(","),
            filter,
        })
    }

    /// Read frames on dedicated threads until `stop` fires, sending one record per segment to
    /// `out`. A device whose capture fails (the interface disappeared…) is reopened with
    /// backoff while the others go on; meanwhile, and while a captured interface is down,
    /// [`Metrics`] says capture is down. On stop, the frames already in the rings are read (for
    /// at most [`DRAIN_MAX`]). The returned task ends when every thread has stopped and dropped
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
        let links: Vec<Link> = self.handles[0].iter().map(|h| h.link).collect();
        let threads = self.handles.len();
        info!(device = %self.device, filter = %self.filter, link = ?links, threads,
              "packets capture running");
        let up = Arc::new(UpBoard {
            up: Mutex::new(vec![true; threads]),
            metrics: metrics.clone(),
        });
        let mut joins = Vec::with_capacity(threads);
        for (index, handles) in self.handles.into_iter().enumerate() {
            let reader = Reader {
                handles,
                listen: self.listen,
                index,
                up: up.clone(),
            };
            let (out, metrics, stop, wake) =
                (out.clone(), metrics.clone(), stop.clone(), wake.clone());
            // Thread names stay within the 15 bytes Linux keeps (`redtap-cap-63`).
            let name = if threads == 1 {
                "redtap-capture".to_string()
            } else {
                format!("redtap-cap-{index}")
            };
            // On an error, the threads already started stop when `stop` fires.
            joins.push(
                std::thread::Builder::new()
                    .name(name)
                    .spawn(move || reader.run(&out, &metrics, &stop, &wake))?,
            );
        }
        drop(out);
        Ok(tokio::task::spawn_blocking(move || {
            let totals: Vec<Totals> = joins.into_iter().filter_map(|j| j.join().ok()).collect();
            waker.abort();
            log_stopped(&totals);
        }))
    }
}

/// Whether each capture thread's handles are all up; capture is up when every thread's are.
/// Judged once a second per thread, so a lock is cheap here.
struct UpBoard {
    up: Mutex<Vec<bool>>,
    metrics: Arc<Metrics>,
}

impl UpBoard {
    fn set(&self, thread: usize, up: bool) {
        let mut all = self.up.lock().unwrap_or_else(|e| e.into_inner());
        all[thread] = up;
        self.metrics.set_capture_up(all.iter().all(|&u| u));
    }
}

/// What one capture thread read and lost, for the summary at stop.
#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    counts: Counts,
    /// Kernel drops (ring, interface).
    kernel: (u64, u64),
}

/// One line for all threads when capture stops (with each thread's frames when there are
/// several: how evenly the flows spread).
fn log_stopped(totals: &[Totals]) {
    let mut sum = Totals::default();
    for t in totals {
        sum.counts.add(&t.counts);
        sum.kernel.0 += t.kernel.0;
        sum.kernel.1 += t.kernel.1;
    }
    let per_thread: Vec<u64> = totals.iter().map(|t| t.counts.frames).collect();
    let c = sum.counts;
    info!(
        frames = c.frames,
        records = c.records,
        dropped_queue_full = c.queue_full,
        malformed = c.malformed,
        ignored = c.ignored,
        not_to_listen = c.filtered,
        kernel_ring_drops = sum.kernel.0,
        kernel_interface_drops = sum.kernel.1,
        frames_per_thread = ?per_thread,
        "packets capture stopped"
    );
}

/// Longest time spent reading what is left in the rings once stop fires.
pub const DRAIN_MAX: Duration = Duration::from_secs(2);
/// First wait before reopening a failed capture; doubles up to [`REOPEN_MAX`].
const REOPEN_FIRST: Duration = Duration::from_millis(100);
const REOPEN_MAX: Duration = Duration::from_secs(5);

/// One capture thread's state: one handle per device.
struct Reader {
    handles: Vec<Handle>,
    listen: SocketAddr,
    /// This thread's number, from 0.
    index: usize,
    up: Arc<UpBoard>,
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

    fn report(&mut self, thread: usize) {
        let (ring, iface) = std::mem::take(&mut self.kernel_window);
        report_loss(
            thread,
            &self.window,
            ring,
            iface,
            self.first_malformed.take(),
        );
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
    ) -> Totals {
        let mut t = Tally::default();
        let mut last_flush = Instant::now();
        let mut last_stats = Instant::now();
        let listen = self.listen;
        // Re-judged once a second and on each failure or reopening, not per batch: it reads
        // sysfs.
        let mut judge_up = true;
        'run: loop {
            if std::mem::take(&mut judge_up) {
                self.up.set(self.index, self.handles.iter().all(Handle::up));
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
                t.report(self.index);
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
        t.report(self.index);
        Totals {
            counts: t.total,
            kernel: t.kernel_total,
        }
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
        debug!(
            thread = self.index,
            frames = t.total.frames - before,
            "rings drained"
        );
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
        total.add(self);
        window.add(self);
        *self = Counts::default();
    }

    fn add(&mut self, other: &Counts) {
        self.frames += other.frames;
        self.records += other.records;
        self.queue_full += other.queue_full;
        self.malformed += other.malformed;
        self.ignored += other.ignored;
        self.filtered += other.filtered;
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
fn report_loss(
    thread: usize,
    window: &Counts,
    ring: u64,
    iface: u64,
    malformed: Option<NotSegment>,
) {
    if ring + iface + window.queue_full + window.malformed == 0 {
        return;
    }
    warn!(
        thread,
        kernel_ring_drops = ring,
        kernel_interface_drops = iface,
        dropped_queue_full = window.queue_full,
        malformed = window.malformed,
        first_malformed = malformed.map(|m| m.to_string()),
        "packets capture lost frames in the last second"
    );
}

/// The calls redtap makes to the kernel itself: socket options the libraries lack.
#[allow(unsafe_code)]
mod sys {
    use std::os::fd::{AsRawFd, BorrowedFd};

    /// Join a packet socket to fanout group `id`, or with `None` to a new group whose id the
    /// kernel picks unused on this host (`PACKET_FANOUT_FLAG_UNIQUEID`, Linux 4.15+), so no
    /// other process's group is joined by accident. Packets are hashed by flow
    /// (`PACKET_FANOUT_HASH`) after IP fragments are reassembled (`..._FLAG_DEFRAG`, so the
    /// fragments of one packet cannot go to different members), and outgoing frames are kept
    /// out of the whole group (`..._FLAG_IGNORE_OUTGOING`, Linux 4.20+: a group member's own
    /// `PACKET_IGNORE_OUTGOING` is not consulted). Returns the group's id.
    pub fn join_fanout(fd: BorrowedFd<'_>, id: Option<u16>) -> std::io::Result<u16> {
        let mut flags = libc::PACKET_FANOUT_FLAG_DEFRAG | libc::PACKET_FANOUT_FLAG_IGNORE_OUTGOING;
        if id.is_none() {
            flags |= libc::PACKET_FANOUT_FLAG_UNIQUEID;
        }
        // The group id in the low 16 bits, the mode and flags above (packet(7)).
        let arg = (u32::from(id.unwrap_or(0)) | ((libc::PACKET_FANOUT_HASH | flags) << 16))
            as libc::c_int;
        // SAFETY: `fd` is an open socket borrowed for the duration of the call; the option
        // value points at a live c_int and the length passed is exactly its size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_FANOUT,
                (&arg as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut got: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: as above; the kernel writes at most `len` bytes into the live c_int `got`
        // and updates `len`, a live socklen_t.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_FANOUT,
                (&mut got as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // The kernel answers id | mode << 16 | flags << 24.
        Ok((got as u32 & 0xffff) as u16)
    }

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
