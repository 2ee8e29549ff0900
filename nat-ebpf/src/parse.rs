//! Header parsing. All bounds checks go through [`ptr_at`]; all offsets are
//! relative to the start of the frame and come from the parsed IHL, never
//! from fixed header sizes.

use core::mem::size_of;

use aya_ebpf::programs::{TcContext, XdpContext};
use nat_common::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, stats};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
/// Ethernet + the longest IPv4 header + a TCP header without options: all
/// the parser reads.
const HEADERS_MAX: u32 = 14 + 60 + 20;

/// ICMP types the gateway tells apart.
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETER_PROBLEM: u8 = 12;

/// Whether an ICMP type is an error that quotes the packet it is about.
#[inline(always)]
pub fn icmp_is_error(icmp_type: u8) -> bool {
    matches!(
        icmp_type,
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
    )
}

/// Frame bounds: `data` and `data_end` as the program context gives them.
#[derive(Clone, Copy)]
pub struct Frame {
    pub data: usize,
    pub data_end: usize,
}

impl Frame {
    /// The frame XDP sees: all of the packet.
    #[inline(always)]
    pub fn xdp(ctx: &XdpContext) -> Frame {
        Frame {
            data: ctx.data(),
            data_end: ctx.data_end(),
        }
    }

    /// The headers of an skb, made directly readable first (they may sit in
    /// a fragment of a non-linear skb). The frame is the linear area only:
    /// the packet's length is `ctx.len()`.
    #[inline(always)]
    pub fn tc(ctx: &TcContext) -> Frame {
        let want = if ctx.len() < HEADERS_MAX {
            ctx.len()
        } else {
            HEADERS_MAX
        };
        // On failure the parser's bounds checks see the short linear area
        // and count the packet as malformed.
        let _ = ctx.pull_data(want);
        Frame {
            data: ctx.data(),
            data_end: ctx.data_end(),
        }
    }
}

/// The one bounds check: a pointer to a `T` at `off`, if all of it is inside
/// the frame.
#[inline(always)]
pub fn ptr_at<T>(f: Frame, off: usize) -> Option<*mut T> {
    let start = f.data + off;
    if start + size_of::<T>() > f.data_end {
        return None;
    }
    Some(start as *mut T)
}

#[inline(always)]
pub fn read<T: Copy>(f: Frame, off: usize) -> Option<T> {
    // Unaligned: the IP header starts 14 bytes into the frame.
    ptr_at::<T>(f, off).map(|p| unsafe { core::ptr::read_unaligned(p) })
}

#[inline(always)]
pub fn write<T>(f: Frame, off: usize, v: T) -> Option<()> {
    ptr_at::<T>(f, off).map(|p| unsafe { core::ptr::write_unaligned(p, v) })
}

/// Whether the frame is for this NIC: its MAC, or a group address (the
/// kernel's business anyway). A zero `mac` means unknown: no check. A frame
/// for another machine reaches the NIC only from a switch that floods; a
/// NIC outside promiscuous mode would never have delivered it, and the
/// kernel drops it.
#[inline(always)]
pub fn for_us(f: Frame, mac: &[u8; 6]) -> bool {
    let Some(dst) = read::<[u8; 6]>(f, 0) else {
        // Too short to be Ethernet: the parser counts it.
        return true;
    };
    dst[0] & 1 == 1 || *mac == [0; 6] || dst == *mac
}

/// What the translation needs from the IPv4 header.
#[derive(Clone, Copy)]
pub struct Ipv4 {
    pub l4_off: usize,
    pub tot_len: u16,
    pub ttl: u8,
    pub proto: u8,
    pub df: bool,
    /// MF and the fragment offset (raw value & 0x3fff, host order): non-zero
    /// for a fragment; see [`FRAG_OFFSET`].
    pub frag: u16,
    /// Raw (network order).
    pub saddr: u32,
    pub daddr: u32,
}

/// Fragment field bits: more fragments, and the offset (in 8-byte units).
pub const FRAG_MF: u16 = 0x2000;
pub const FRAG_OFFSET: u16 = 0x1fff;

/// Offsets of IPv4 header fields from the start of the IP header.
pub const IP_ID: usize = 4;
pub const IP_TTL: usize = 8;
pub const IP_CHECK: usize = 10;
pub const IP_SADDR: usize = 12;
pub const IP_DADDR: usize = 16;

/// Why parsing stopped.
pub enum Stop {
    /// Not IPv4: the kernel handles it.
    NotIpv4,
    /// A count-worthy malformation.
    Malformed,
}

#[inline(always)]
/// `pkt_len` is the whole packet's length: the frame for XDP, `skb->len` for
/// TC (whose linear area can be shorter than the packet).
pub fn ipv4(f: Frame, pkt_len: usize) -> Result<Ipv4, Stop> {
    let ethertype: u16 = read(f, 12).ok_or(Stop::Malformed)?;
    if u16::from_be(ethertype) != ETH_P_IP {
        return Err(Stop::NotIpv4);
    }
    let l3 = ETH_HLEN;
    let vihl: u8 = read(f, l3).ok_or(Stop::Malformed)?;
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < 20 {
        return Err(Stop::Malformed);
    }
    // The whole header, options included, must be in the frame.
    ptr_at::<[u8; 20]>(f, l3).ok_or(Stop::Malformed)?;
    if f.data + l3 + ihl > f.data_end {
        return Err(Stop::Malformed);
    }
    let tot_len = u16::from_be(read::<u16>(f, l3 + 2).ok_or(Stop::Malformed)?);
    // A datagram claiming more bytes than arrived is truncated.
    if (tot_len as usize) < ihl || l3 + tot_len as usize > pkt_len {
        return Err(Stop::Malformed);
    }
    let frag = u16::from_be(read::<u16>(f, l3 + 6).ok_or(Stop::Malformed)?);
    Ok(Ipv4 {
        l4_off: l3 + ihl,
        tot_len,
        ttl: read(f, l3 + IP_TTL).ok_or(Stop::Malformed)?,
        proto: read(f, l3 + 9).ok_or(Stop::Malformed)?,
        df: frag & 0x4000 != 0,
        frag: frag & (FRAG_MF | FRAG_OFFSET),
        saddr: read(f, l3 + IP_SADDR).ok_or(Stop::Malformed)?,
        daddr: read(f, l3 + IP_DADDR).ok_or(Stop::Malformed)?,
    })
}

/// The translatable part of the L4 header.
#[derive(Clone, Copy)]
pub struct L4 {
    /// Raw source/destination port; 0 for ICMP, whose echo identifier is
    /// in `id`.
    pub sport: u16,
    pub dport: u16,
    pub id: u16,
    pub check: u16,
    pub tcp_flags: u8,
    pub icmp_type: u8,
}

/// Offsets within the L4 header. Every access to an L4 field is a constant
/// offset from one bounds-checked header pointer: the verifier loses the
/// bounds of a pointer computed as `data + (variable + constant)`.
pub const TCP_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
pub const ICMP_HLEN: usize = 8;
pub const TCP_FLAGS: usize = 13;
pub const TCP_CHECK: usize = 16;
pub const UDP_CHECK: usize = 6;
pub const ICMP_CHECK: usize = 2;
pub const ICMP_ID: usize = 4;

#[inline(always)]
unsafe fn get16(h: *const u8, off: usize) -> u16 {
    unsafe { core::ptr::read_unaligned(h.add(off) as *const u16) }
}

#[inline(always)]
unsafe fn get8(h: *const u8, off: usize) -> u8 {
    unsafe { *h.add(off) }
}

/// Parses the L4 header of a translatable protocol. `Ok(None)` means "not
/// TCP/UDP/ICMP": the caller decides; `Err` is a truncated header.
#[inline(always)]
pub fn l4(f: Frame, ip: &Ipv4) -> Result<Option<L4>, u32> {
    // SAFETY (each closure): `h` points at the protocol's header length,
    // checked by `header`, and every offset is a constant inside it.
    let l4 = match ip.proto {
        IPPROTO_TCP => header::<TCP_HLEN>(f, ip, |h| unsafe {
            L4 {
                sport: get16(h, 0),
                dport: get16(h, 2),
                id: 0,
                check: get16(h, TCP_CHECK),
                tcp_flags: get8(h, TCP_FLAGS),
                icmp_type: 0,
            }
        }),
        IPPROTO_UDP => header::<UDP_HLEN>(f, ip, |h| unsafe {
            L4 {
                sport: get16(h, 0),
                dport: get16(h, 2),
                id: 0,
                check: get16(h, UDP_CHECK),
                tcp_flags: 0,
                icmp_type: 0,
            }
        }),
        IPPROTO_ICMP => header::<ICMP_HLEN>(f, ip, |h| unsafe {
            L4 {
                sport: 0,
                dport: 0,
                id: get16(h, ICMP_ID),
                check: get16(h, ICMP_CHECK),
                tcp_flags: 0,
                icmp_type: get8(h, 0),
            }
        }),
        _ => return Ok(None),
    };
    l4.map(Some)
}

/// The one path every L4 header takes: `HLEN` bytes at the L4 offset, in
/// the frame and inside the datagram's total length, then `fields` reads
/// them through one checked pointer.
#[inline(always)]
fn header<const HLEN: usize>(
    f: Frame,
    ip: &Ipv4,
    fields: impl FnOnce(*const u8) -> L4,
) -> Result<L4, u32> {
    let h = ptr_at::<[u8; HLEN]>(f, ip.l4_off).ok_or(stats::DROP_MALFORMED)? as *const u8;
    let l4_len = ip.tot_len as usize - (ip.l4_off - ETH_HLEN);
    if l4_len < HLEN {
        return Err(stats::DROP_MALFORMED);
    }
    Ok(fields(h))
}
