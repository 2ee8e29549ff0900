//! `#[repr(C)]` layouts of the maps and the configuration. Every struct
//! derives `bytemuck::Pod`, so implicit padding is a compile error; padding
//! is explicit and always zeroed, because hash map keys are compared bytewise.

use bytemuck::{Pod, Zeroable};

/// One direction of a flow, as the packet carries it on the wire.
///
/// Forward entries ([`crate::MAP_CT_FWD`]) are keyed by the inside tuple as it
/// arrives on `--int`; reverse entries ([`crate::MAP_CT_REV`]) by the reply
/// tuple as it arrives on `--ext` (source = remote, destination = SNAT
/// address and port). For ICMP echo the identifier stands in the port of the
/// inside end and the remote "port" is 0. Addresses and ports are in network
/// byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct CtKey {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl CtKey {
    pub const fn new(
        proto: u8,
        src_addr: u32,
        src_port: u16,
        dst_addr: u32,
        dst_port: u16,
    ) -> Self {
        CtKey {
            src_addr,
            dst_addr,
            src_port,
            dst_port,
            proto,
            _pad: [0; 3],
        }
    }
}

/// `CtValue::flags`: set on entries of the reverse map.
pub const CT_F_REVERSE: u8 = 1;

/// A conntrack entry. Each entry names its twin (`peer`): a forward entry's
/// peer is the reply tuple expected on `--ext`, so it says which address and
/// port to write as the new source (`peer.dst_*`); a reverse entry's peer is
/// the inside tuple, so it says the original destination (`peer.src_*`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct CtValue {
    pub peer: CtKey,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the last packet this
    /// direction translated.
    pub last_seen_ns: u64,
    /// TCP state bits ([`crate::tcp`]); kept on the forward entry only.
    pub tcp_state: u8,
    pub flags: u8,
    pub _pad: [u8; 6],
}

impl CtValue {
    /// Source address and port an outbound packet is rewritten to.
    pub const fn snat_addr_port(&self) -> (u32, u16) {
        (self.peer.dst_addr, self.peer.dst_port)
    }

    /// Destination address and port a reply is rewritten back to.
    pub const fn inside_addr_port(&self) -> (u32, u16) {
        (self.peer.src_addr, self.peer.src_port)
    }
}

/// Load-time configuration, written by the loader into the read-only global
/// [`crate::GLOBAL_CONFIG`] of the eBPF object.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct NatConfig {
    pub int_ifindex: u32,
    pub ext_ifindex: u32,
    /// SNAT address, network byte order.
    pub snat_addr: u32,
    /// External port range, inclusive, host byte order.
    pub port_min: u16,
    pub port_max: u16,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: each type is Pod (checked by bytemuck's derive: no padding, no
    // invalid bit patterns).
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtValue {}
    unsafe impl aya::Pod for super::NatConfig {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, offset_of, size_of};

    #[test]
    fn ct_key_layout_is_16_bytes_with_explicit_padding() {
        assert_eq!(size_of::<CtKey>(), 16);
        assert_eq!(align_of::<CtKey>(), 4);
        assert_eq!(offset_of!(CtKey, src_addr), 0);
        assert_eq!(offset_of!(CtKey, dst_addr), 4);
        assert_eq!(offset_of!(CtKey, src_port), 8);
        assert_eq!(offset_of!(CtKey, dst_port), 10);
        assert_eq!(offset_of!(CtKey, proto), 12);
        assert_eq!(offset_of!(CtKey, _pad), 13);
    }

    #[test]
    fn ct_value_layout_is_32_bytes_with_explicit_padding() {
        assert_eq!(size_of::<CtValue>(), 32);
        assert_eq!(align_of::<CtValue>(), 8);
        assert_eq!(offset_of!(CtValue, peer), 0);
        assert_eq!(offset_of!(CtValue, last_seen_ns), 16);
        assert_eq!(offset_of!(CtValue, tcp_state), 24);
        assert_eq!(offset_of!(CtValue, flags), 25);
        assert_eq!(offset_of!(CtValue, _pad), 26);
    }

    #[test]
    fn nat_config_layout_is_16_bytes() {
        assert_eq!(size_of::<NatConfig>(), 16);
        assert_eq!(offset_of!(NatConfig, snat_addr), 8);
        assert_eq!(offset_of!(NatConfig, port_min), 12);
        assert_eq!(offset_of!(NatConfig, port_max), 14);
    }

    #[test]
    fn ct_key_new_zeroes_padding() {
        let k = CtKey::new(6, 1, 2, 3, 4);
        assert_eq!(bytemuck::bytes_of(&k)[13..16], [0, 0, 0]);
    }

    #[test]
    fn ct_value_peer_gives_translation_addresses() {
        let fwd = CtValue {
            peer: CtKey::new(17, 0x0a, 53, 0xc0, 40000),
            ..Default::default()
        };
        assert_eq!(fwd.snat_addr_port(), (0xc0, 40000));
        assert_eq!(fwd.inside_addr_port(), (0x0a, 53));
    }
}
