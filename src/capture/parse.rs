//! Frame bytes → one TCP segment, or the reason the frame is not one.
//!
//! Owns the decoding of captured frames: link layer (Ethernet with up to two VLAN tags, Linux
//! cooked SLL/SLL2 from the `any` device, BSD loopback/null, raw IP), IPv4 (with options) and
//! IPv6 (with extension headers), and the TCP header.
//!
//! [`parse`] is a pure function: no I/O, no clock, no allocation, and it must never panic,
//! whatever the bytes (a fuzz target and a property test hold it to that). Header bounds and
//! field checks come from `etherparse`; only what it lacks is decoded by hand here.

use std::net::{IpAddr, SocketAddr};

use etherparse::{
    ip_number, Ethernet2HeaderSlice, IpNumber, Ipv4HeaderSlice, Ipv6ExtensionSlice,
    Ipv6ExtensionsSlice, Ipv6HeaderSlice, SingleVlanHeaderSlice, TcpHeaderSlice,
};

use crate::record::{Kind, Record};

/// The link layer a capture delivers, from its pcap link type (DLT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// DLT_EN10MB: Ethernet II, also what Linux loopback delivers.
    Ethernet,
    /// DLT_LINUX_SLL: Linux cooked capture v1 (the `any` device).
    LinuxSll,
    /// DLT_LINUX_SLL2: Linux cooked capture v2.
    LinuxSll2,
    /// DLT_NULL / DLT_LOOP: a 4-byte address family, then IP.
    Null,
    /// DLT_RAW / DLT_IPV4 / DLT_IPV6: the frame starts with the IP header.
    RawIp,
}

impl Link {
    /// The link for a pcap DLT value; `None` for one redtap does not decode.
    pub fn from_dlt(dlt: i32) -> Option<Link> {
        match dlt {
            1 => Some(Link::Ethernet),
            113 => Some(Link::LinuxSll),
            276 => Some(Link::LinuxSll2),
            0 | 108 => Some(Link::Null),
            12 | 14 | 101 | 228 | 229 => Some(Link::RawIp),
            _ => None,
        }
    }

    /// Every link, for tests and the fuzz target.
    pub const ALL: [Link; 5] = [
        Link::Ethernet,
        Link::LinuxSll,
        Link::LinuxSll2,
        Link::Null,
        Link::RawIp,
    ];
}

/// One decoded TCP segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Source IP and port.
    pub src: SocketAddr,
    /// Destination IP and port.
    pub dst: SocketAddr,
    /// The TCP flags byte (FIN=0x01 … CWR=0x80).
    pub flags: u8,
    /// TCP payload length in bytes, from the IP header's length (not from what was captured).
    pub len: u16,
}

impl Segment {
    /// The record of this segment, captured at `ts_us`.
    pub fn record(self, ts_us: u64) -> Record {
        Record {
            ts_us,
            src: self.src,
            dst: self.dst,
            kind: Kind::Segment {
                flags: self.flags,
                len: self.len,
            },
        }
    }
}

/// The header a [`NotSegment`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    /// Ethernet, SLL, SLL2 or null header.
    Link,
    /// An 802.1Q / 802.1ad tag.
    Vlan,
    /// The IPv4 header.
    Ipv4,
    /// The IPv6 header or one of its extension headers.
    Ipv6,
    /// The TCP header.
    Tcp,
}

/// Why a frame yields no record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotSegment {
    /// The frame ends inside a header.
    #[error("frame ends inside its {0:?} header")]
    Truncated(Layer),
    /// A header field is impossible (bad version, header length, option length…).
    #[error("invalid {0:?} header")]
    Invalid(Layer),
    /// The IP length disagrees with the headers or with the frame's length on the wire.
    #[error("IP length disagrees with the headers or the frame")]
    BadLength,
    /// More VLAN tags than redtap unwraps (two).
    #[error("more than two VLAN tags")]
    TooManyTags,
    /// A well-formed frame that is not IPv4 or IPv6.
    #[error("not IP (ethertype {0:#06x})")]
    NotIp(u16),
    /// A well-formed IP packet that does not carry TCP.
    #[error("not TCP (IP protocol {0})")]
    NotTcp(u8),
    /// A non-first IP fragment: it carries no TCP header.
    #[error("non-first IP fragment")]
    Fragment,
}

impl NotSegment {
    /// Whether the frame is broken (counted as malformed) rather than merely not a TCP segment.
    pub fn is_malformed(self) -> bool {
        matches!(
            self,
            NotSegment::Truncated(_)
                | NotSegment::Invalid(_)
                | NotSegment::BadLength
                | NotSegment::TooManyTags
        )
    }
}

const ETH_IPV4: u16 = 0x0800;
const ETH_IPV6: u16 = 0x86dd;
const ETH_VLAN: [u16; 3] = [0x8100, 0x88a8, 0x9100];

/// Decode `frame` (the captured bytes) of link type `link`. `wire_len` is the frame's length on
/// the wire, which is more than `frame.len()` when the capture was cut at the snap length; the
/// payload length comes from the IP header and is checked against `wire_len`, so only the
/// headers need to have been captured.
pub fn parse(link: Link, frame: &[u8], wire_len: u32) -> Result<Segment, NotSegment> {
    // Bytes of the frame on the wire past the link header; a cut capture never shrinks it.
    let wire_len = (wire_len as usize).max(frame.len());
    let (ethertype, ip) = match link {
        Link::Ethernet => ethernet(frame)?,
        Link::LinuxSll => {
            // By hand: etherparse's SLL slice rejects hardware types it does not know (tun
            // devices, ARPHRD_NONE), which the `any` device delivers.
            if frame.len() < 16 {
                return Err(NotSegment::Truncated(Layer::Link));
            }
            let proto = u16::from_be_bytes([frame[14], frame[15]]);
            unwrap_vlans(proto, &frame[16..])?
        }
        Link::LinuxSll2 => {
            // By hand: etherparse has no SLL2. Protocol is the first field of its 20 bytes.
            if frame.len() < 20 {
                return Err(NotSegment::Truncated(Layer::Link));
            }
            let proto = u16::from_be_bytes([frame[0], frame[1]]);
            unwrap_vlans(proto, &frame[20..])?
        }
        Link::Null => {
            // By hand: etherparse has no BSD loopback. The family is 4 bytes in the capturing
            // host's byte order (DLT_NULL) or big-endian (DLT_LOOP), so read both ways.
            if frame.len() < 4 {
                return Err(NotSegment::Truncated(Layer::Link));
            }
            let le = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]);
            let be = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]);
            let ethertype = match (le, be) {
                (2, _) | (_, 2) => ETH_IPV4,
                // AF_INET6 differs between systems: 10 Linux, 24 NetBSD, 28 FreeBSD, 30 macOS.
                (10 | 24 | 28 | 30, _) | (_, 10 | 24 | 28 | 30) => ETH_IPV6,
                _ => return Err(NotSegment::NotIp(0)),
            };
            (ethertype, &frame[4..])
        }
        Link::RawIp => match frame.first().map(|b| b >> 4) {
            Some(4) => (ETH_IPV4, frame),
            Some(6) => (ETH_IPV6, frame),
            Some(_) => return Err(NotSegment::Invalid(Layer::Link)),
            None => return Err(NotSegment::Truncated(Layer::Link)),
        },
    };
    // What the wire carried from the IP header on (the link header is always fully captured).
    let ip_wire_len = wire_len - (frame.len() - ip.len());
    match ethertype {
        ETH_IPV4 => ipv4(ip, ip_wire_len),
        ETH_IPV6 => ipv6(ip, ip_wire_len),
        other => Err(NotSegment::NotIp(other)),
    }
}

/// Ethernet II header, then any VLAN tags.
fn ethernet(frame: &[u8]) -> Result<(u16, &[u8]), NotSegment> {
    let eth =
        Ethernet2HeaderSlice::from_slice(frame).map_err(|_| NotSegment::Truncated(Layer::Link))?;
    unwrap_vlans(eth.ether_type().0, &frame[eth.slice().len()..])
}

/// Step over up to two 802.1Q/802.1ad tags starting with `ethertype`.
fn unwrap_vlans(mut ethertype: u16, mut rest: &[u8]) -> Result<(u16, &[u8]), NotSegment> {
    for _ in 0..2 {
        if !ETH_VLAN.contains(&ethertype) {
            return Ok((ethertype, rest));
        }
        let tag = SingleVlanHeaderSlice::from_slice(rest)
            .map_err(|_| NotSegment::Truncated(Layer::Vlan))?;
        ethertype = tag.ether_type().0;
        rest = &rest[tag.slice().len()..];
    }
    if ETH_VLAN.contains(&ethertype) {
        return Err(NotSegment::TooManyTags);
    }
    Ok((ethertype, rest))
}

fn ipv4(ip: &[u8], wire_len: usize) -> Result<Segment, NotSegment> {
    use etherparse::err::ipv4::HeaderSliceError as E;
    let h = Ipv4HeaderSlice::from_slice(ip).map_err(|e| match e {
        E::Len(_) => NotSegment::Truncated(Layer::Ipv4),
        E::Content(_) => NotSegment::Invalid(Layer::Ipv4),
    })?;
    let header_len = h.slice().len();
    // TSO/GSO frames captured on the way out carry total length 0: fall back to the wire.
    let total = match usize::from(h.total_len()) {
        0 => wire_len,
        t if t < header_len || t > wire_len => return Err(NotSegment::BadLength),
        t => t,
    };
    if h.protocol() != ip_number::TCP {
        return Err(NotSegment::NotTcp(h.protocol().0));
    }
    if h.fragments_offset().value() != 0 {
        return Err(NotSegment::Fragment);
    }
    tcp(
        IpAddr::V4(h.source_addr()),
        IpAddr::V4(h.destination_addr()),
        &ip[header_len..],
        total - header_len,
    )
}

fn ipv6(ip: &[u8], wire_len: usize) -> Result<Segment, NotSegment> {
    use etherparse::err::ipv6::HeaderSliceError as E;
    let h = Ipv6HeaderSlice::from_slice(ip).map_err(|e| match e {
        E::Len(_) => NotSegment::Truncated(Layer::Ipv6),
        E::Content(_) => NotSegment::Invalid(Layer::Ipv6),
    })?;
    let after = &ip[h.slice().len()..];
    let wire_payload = wire_len.saturating_sub(h.slice().len());
    // Payload length 0: a jumbogram or a TSO frame; the wire says how long it is.
    let payload = match usize::from(h.payload_length()) {
        0 => wire_payload,
        p if p > wire_payload => return Err(NotSegment::BadLength),
        p => p,
    };
    use etherparse::err::ipv6_exts::HeaderSliceError as X;
    let (exts, next, rest): (Ipv6ExtensionsSlice, IpNumber, &[u8]) =
        Ipv6ExtensionsSlice::from_slice(h.next_header(), after).map_err(|e| match e {
            X::Len(_) => NotSegment::Truncated(Layer::Ipv6),
            X::Content(_) => NotSegment::Invalid(Layer::Ipv6),
        })?;
    if exts.is_fragmenting_payload() {
        for ext in exts.clone().into_iter() {
            if let Ipv6ExtensionSlice::Fragment(f) = ext {
                if f.fragment_offset().value() != 0 {
                    return Err(NotSegment::Fragment);
                }
            }
        }
    }
    if next != ip_number::TCP {
        return Err(NotSegment::NotTcp(next.0));
    }
    let exts_len = exts.slice().len();
    if exts_len > payload {
        return Err(NotSegment::BadLength);
    }
    tcp(
        IpAddr::V6(h.source_addr()),
        IpAddr::V6(h.destination_addr()),
        rest,
        payload - exts_len,
    )
}

/// The TCP header in `bytes`; `ip_payload` is the length the IP header gives to TCP.
fn tcp(src: IpAddr, dst: IpAddr, bytes: &[u8], ip_payload: usize) -> Result<Segment, NotSegment> {
    use etherparse::err::tcp::HeaderSliceError as E;
    let t = TcpHeaderSlice::from_slice(bytes).map_err(|e| match e {
        E::Len(_) => NotSegment::Truncated(Layer::Tcp),
        E::Content(_) => NotSegment::Invalid(Layer::Tcp),
    })?;
    let header_len = t.slice().len();
    if header_len > ip_payload {
        return Err(NotSegment::BadLength);
    }
    // IPv4 lengths fit in u16; an IPv6 jumbogram's payload length is clamped.
    let len = u16::try_from(ip_payload - header_len).unwrap_or(u16::MAX);
    Ok(Segment {
        src: SocketAddr::new(src, t.source_port()),
        dst: SocketAddr::new(dst, t.destination_port()),
        // Byte 13 of the TCP header holds the eight flags, FIN in the lowest bit.
        flags: t.slice()[13],
        len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    /// An Ethernet frame carrying IPv4/TCP with `payload`, flags from `f`.
    fn eth_v4(
        f: impl Fn(
            etherparse::PacketBuilderStep<etherparse::TcpHeader>,
        ) -> etherparse::PacketBuilderStep<etherparse::TcpHeader>,
        payload: &[u8],
    ) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([1; 6], [2; 6])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(40000, 9000, 1, 65535);
        let b = f(b);
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    fn eth_v6(payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([1; 6], [2; 6])
            .ipv6([0xfe; 16], [0xfd; 16], 64)
            .tcp(40000, 9000, 1, 65535)
            .syn();
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    fn parse_all(link: Link, f: &[u8]) -> Result<Segment, NotSegment> {
        parse(link, f, f.len() as u32)
    }

    #[test]
    fn syn_over_ethernet() {
        let f = eth_v4(|b| b.syn(), &[]);
        let s = parse_all(Link::Ethernet, &f).unwrap();
        assert_eq!(s.src, "10.0.0.1:40000".parse().unwrap());
        assert_eq!(s.dst, "10.0.0.2:9000".parse().unwrap());
        assert_eq!(crate::record::flags_str(s.flags), "S");
        assert_eq!(s.len, 0);
    }

    #[test]
    fn data_length_comes_from_ip_not_from_padding_or_snaplen() {
        let mut f = eth_v4(|b| b.psh().ack(7), b"hello");
        let s = parse_all(Link::Ethernet, &f).unwrap();
        assert_eq!(
            (crate::record::flags_str(s.flags).as_str(), s.len),
            ("PA", 5)
        );
        // Ethernet padding after the IP packet is not payload.
        f.extend_from_slice(&[0; 20]);
        assert_eq!(parse_all(Link::Ethernet, &f).unwrap().len, 5);
        // Cut at the snap length after the TCP header: the length still comes from IP.
        let wire = f.len() as u32;
        assert_eq!(
            parse(Link::Ethernet, &f[..14 + 20 + 20], wire).unwrap().len,
            5
        );
    }

    #[test]
    fn ipv6_and_extension_headers() {
        let f = eth_v6(b"abc");
        let s = parse_all(Link::Ethernet, &f).unwrap();
        assert_eq!(s.len, 3);
        assert!(s.src.is_ipv6());
        // Insert an 8-byte destination-options header between IPv6 and TCP.
        let mut g = f[..14 + 40].to_vec();
        g[14 + 6] = 60; // next header: destination options
        let plen = u16::from_be_bytes([g[14 + 4], g[14 + 5]]) + 8;
        g[14 + 4..14 + 6].copy_from_slice(&plen.to_be_bytes());
        g.extend_from_slice(&[6, 0, 1, 4, 0, 0, 0, 0]); // next=TCP, len 0 (8 bytes), PadN
        g.extend_from_slice(&f[14 + 40..]);
        let s = parse_all(Link::Ethernet, &g).unwrap();
        assert_eq!((s.len, s.dst.port()), (3, 9000));
    }

    #[test]
    fn ipv4_options_and_vlan_tags() {
        let f = eth_v4(|b| b.fin().ack(1), &[]);
        // Two VLAN tags in front of IPv4.
        let mut g = f[..12].to_vec();
        g.extend_from_slice(&[0x88, 0xa8, 0, 5, 0x81, 0x00, 0, 6, 0x08, 0x00]);
        // IPv4 with 4 bytes of options (NOP NOP NOP EOL): IHL 6, total +4.
        let mut ip = f[14..34].to_vec();
        ip[0] = 0x46;
        let total = u16::from_be_bytes([ip[2], ip[3]]) + 4;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&[1, 1, 1, 0]);
        g.extend_from_slice(&ip);
        g.extend_from_slice(&f[34..]);
        let s = parse_all(Link::Ethernet, &g).unwrap();
        assert_eq!(crate::record::flags_str(s.flags), "FA");
        // A third tag is refused.
        let mut h = f[..12].to_vec();
        h.extend_from_slice(&[0x81, 0, 0, 1, 0x81, 0, 0, 2, 0x81, 0, 0, 3, 0x08, 0]);
        h.extend_from_slice(&f[14..]);
        assert_eq!(parse_all(Link::Ethernet, &h), Err(NotSegment::TooManyTags));
    }

    #[test]
    fn cooked_null_and_raw_links() {
        let f = eth_v4(|b| b.rst(), &[]);
        let ip = &f[14..];
        let mut sll = vec![0, 0, 0, 1, 0, 6, 1, 2, 3, 4, 5, 6, 0, 0, 0x08, 0x00];
        sll.extend_from_slice(ip);
        let mut sll2 = vec![
            0x08, 0x00, 0, 0, 0, 0, 0, 1, 0, 1, 0, 6, 1, 2, 3, 4, 5, 6, 0, 0,
        ];
        sll2.extend_from_slice(ip);
        let mut null = 2u32.to_le_bytes().to_vec();
        null.extend_from_slice(ip);
        for (link, frame) in [
            (Link::LinuxSll, &sll[..]),
            (Link::LinuxSll2, &sll2[..]),
            (Link::Null, &null[..]),
            (Link::RawIp, ip),
        ] {
            let s = parse_all(link, frame).unwrap();
            assert_eq!(crate::record::flags_str(s.flags), "R", "{link:?}");
        }
    }

    #[test]
    fn broken_frames_name_their_reason() {
        let f = eth_v4(|b| b.syn(), &[]);
        // Truncated at every length.
        for n in 0..f.len() {
            let r = parse(Link::Ethernet, &f[..n], n as u32);
            assert!(r.unwrap_err().is_malformed(), "cut at {n}");
        }
        // IP total length shorter than IP + TCP headers.
        let mut g = f.clone();
        g[14 + 2..14 + 4].copy_from_slice(&30u16.to_be_bytes());
        assert_eq!(parse_all(Link::Ethernet, &g), Err(NotSegment::BadLength));
        // IP total length beyond the frame on the wire.
        g[14 + 2..14 + 4].copy_from_slice(&1500u16.to_be_bytes());
        assert_eq!(parse_all(Link::Ethernet, &g), Err(NotSegment::BadLength));
        // TCP data offset below 5.
        let mut g = f.clone();
        g[14 + 20 + 12] = 0x40;
        assert_eq!(
            parse_all(Link::Ethernet, &g),
            Err(NotSegment::Invalid(Layer::Tcp))
        );
        // Non-first fragment.
        let mut g = f.clone();
        g[14 + 6..14 + 8].copy_from_slice(&0x0001u16.to_be_bytes());
        assert_eq!(parse_all(Link::Ethernet, &g), Err(NotSegment::Fragment));
        assert!(!NotSegment::Fragment.is_malformed());
        // UDP, ARP.
        let mut g = f.clone();
        g[14 + 9] = 17;
        assert_eq!(parse_all(Link::Ethernet, &g), Err(NotSegment::NotTcp(17)));
        let mut g = f.clone();
        g[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(
            parse_all(Link::Ethernet, &g),
            Err(NotSegment::NotIp(0x0806))
        );
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200), extra in 0u32..70000) {
            for link in Link::ALL {
                let _ = parse(link, &bytes, bytes.len() as u32 + extra);
                let _ = parse(link, &bytes, 0);
            }
        }

        #[test]
        fn never_panics_on_mutated_segments(pos in 0usize..80, val in proptest::num::u8::ANY, cut in 0usize..80) {
            let mut f = eth_v4(|b| b.syn(), b"xyz");
            let p = pos % f.len();
            f[p] = val;
            f.truncate(f.len() - cut.min(f.len()));
            let _ = parse_all(Link::Ethernet, &f);
        }
    }
}
