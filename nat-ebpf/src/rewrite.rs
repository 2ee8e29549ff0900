//! The rewrite stage: what a translation changes in a packet (one address,
//! one port or ICMP identifier, the TTL) and the checksums that cover them.
//! XDP rewrites the frame in place with its own arithmetic
//! (`nat_common::csum`); TC goes through the skb helpers, which keep a
//! partial (CHECKSUM_PARTIAL) checksum right as well as a complete one.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use nat_common::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, csum, tcp::DIR_OUT};

use crate::parse::{
    ETH_HLEN, Frame, ICMP_CHECK, ICMP_ID, IP_CHECK, IP_TTL, TCP_CHECK, TCP_HLEN, UDP_CHECK,
    UDP_HLEN, ptr_at, read, write,
};

/// A rewrite of one address and one port (or ICMP identifier).
#[derive(Clone, Copy)]
pub struct Rewrite {
    pub proto: u8,
    pub addr_off: usize,
    pub old_addr: u32,
    pub new_addr: u32,
    /// Direction: which port is the inside end's (source outbound,
    /// destination inbound; the identifier for ICMP either way).
    pub dir: u8,
    pub l4_off: usize,
    pub old_port: u16,
    pub new_port: u16,
    pub l4_check: u16,
    pub ttl: u8,
    pub df: bool,
}

impl Rewrite {
    /// Offsets, within the L4 header, of the rewritten port (or ICMP
    /// identifier) and of the checksum.
    #[inline(always)]
    pub fn l4_fields(&self) -> (usize, usize) {
        match (self.proto, self.dir) {
            (IPPROTO_TCP, DIR_OUT) => (0, TCP_CHECK),
            (IPPROTO_TCP, _) => (2, TCP_CHECK),
            (IPPROTO_UDP, DIR_OUT) => (0, UDP_CHECK),
            (IPPROTO_UDP, _) => (2, UDP_CHECK),
            _ => (ICMP_ID, ICMP_CHECK),
        }
    }
}

/// XDP: rewrites address, port, TTL and both checksums in place, for a
/// packet whose L4 checksum is complete (XDP hands the others to TC).
/// Every field was bounds-checked by the parser; the checks here only
/// satisfy the verifier.
#[inline(always)]
pub fn xdp(f: Frame, rw: &Rewrite) -> Option<()> {
    let l3 = ETH_HLEN;
    let ip_check: u16 = read(f, l3 + IP_CHECK)?;
    let ttl_word_old: u16 = read(f, l3 + IP_TTL)?;
    write::<u8>(f, l3 + IP_TTL, rw.ttl - 1)?;
    let ttl_word_new: u16 = read(f, l3 + IP_TTL)?;
    let ip_check = csum::ip_after(
        ip_check,
        rw.old_addr,
        rw.new_addr,
        ttl_word_old,
        ttl_word_new,
    );
    let l4_check = csum::l4_after(
        rw.proto,
        rw.l4_check,
        rw.old_addr,
        rw.new_addr,
        rw.old_port,
        rw.new_port,
    );
    write(f, rw.addr_off, rw.new_addr)?;
    write(f, l3 + IP_CHECK, ip_check)?;
    // One checked pointer to the L4 header, constant offsets from it (see
    // parse::TCP_HLEN).
    let (port_at, check_at) = rw.l4_fields();
    let h = if rw.proto == IPPROTO_TCP {
        ptr_at::<[u8; TCP_HLEN]>(f, rw.l4_off)? as *mut u8
    } else {
        ptr_at::<[u8; UDP_HLEN]>(f, rw.l4_off)? as *mut u8
    };
    // SAFETY: both offsets are constants inside the checked header.
    unsafe {
        core::ptr::write_unaligned(h.add(port_at) as *mut u16, rw.new_port);
        core::ptr::write_unaligned(h.add(check_at) as *mut u16, l4_check);
    }
    Some(())
}

/// TC: address, port and TTL through the skb helpers.
#[inline(always)]
pub fn skb(ctx: &TcContext, rw: &Rewrite) -> Result<(), i64> {
    addr_port(ctx, rw)?;
    decrement_ttl(ctx, rw.ttl)
}

/// TC: one address and its port (or ICMP identifier), with the IP and L4
/// checksums; not the TTL (for a packet the kernel forwards next).
#[inline(always)]
pub fn addr_port(ctx: &TcContext, rw: &Rewrite) -> Result<(), i64> {
    ip_addr(ctx, rw.addr_off, rw.old_addr, rw.new_addr)?;
    let (port_at, check_at) = rw.l4_fields();
    let l4 = rw.l4_off + check_at;
    let (old_p, new_p) = (rw.old_port as u64, rw.new_port as u64);
    match rw.proto {
        IPPROTO_TCP => {
            let pseudo = (BPF_F_PSEUDO_HDR | 4) as u64;
            ctx.l4_csum_replace(l4, rw.old_addr as u64, rw.new_addr as u64, pseudo)?;
            ctx.l4_csum_replace(l4, old_p, new_p, 2)?;
        }
        IPPROTO_UDP => {
            let pseudo = (BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0 | 4) as u64;
            ctx.l4_csum_replace(l4, rw.old_addr as u64, rw.new_addr as u64, pseudo)?;
            ctx.l4_csum_replace(l4, old_p, new_p, (BPF_F_MARK_MANGLED_0 | 2) as u64)?;
        }
        IPPROTO_ICMP => ctx.l4_csum_replace(l4, old_p, new_p, 2)?,
        _ => return Err(-1),
    }
    ctx.store(rw.l4_off + port_at, &rw.new_port, 0)
}

/// TC: the IPv4 address at `off` (source or destination of the outer
/// header) from `old` to `new`, with the IP checksum; the L4 checksum is
/// the caller's.
#[inline(always)]
pub fn ip_addr(ctx: &TcContext, off: usize, old: u32, new: u32) -> Result<(), i64> {
    ctx.store(off, &new, 0)?;
    ctx.l3_csum_replace(ETH_HLEN + IP_CHECK, old as u64, new as u64, 4)
}

/// TC: the TTL from `ttl` to `ttl - 1`, with the IP checksum: what every
/// packet the gateway forwards itself gets.
#[inline(always)]
pub fn decrement_ttl(ctx: &TcContext, ttl: u8) -> Result<(), i64> {
    let l3 = ETH_HLEN;
    let ttl_word_old: u16 = ctx.load(l3 + IP_TTL)?;
    ctx.store(l3 + IP_TTL, &(ttl - 1), 0)?;
    let ttl_word_new: u16 = ctx.load(l3 + IP_TTL)?;
    ctx.l3_csum_replace(l3 + IP_CHECK, ttl_word_old as u64, ttl_word_new as u64, 2)
}
