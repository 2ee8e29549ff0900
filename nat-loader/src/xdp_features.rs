//! What each NIC can take: its `xdp-features`, which the kernel's netdev
//! generic-netlink family reports (`NETDEV_CMD_DEV_GET`,
//! `NETDEV_A_DEV_XDP_FEATURES`; Linux >= 6.3), read with the rust-netlink
//! crates. Since Linux 6.3 the kernel refuses an XDP redirect into a device
//! whose features lack `ndo-xmit`, so this is what decides whether XDP may
//! redirect into a NIC at all ([`crate::egress`]).

use std::time::Duration;

use anyhow::{Context, Result, bail};
use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload, Nla,
    NlaBuffer, NlasIterator, Parseable, ParseableParametrized, emit_u32, parse_u32, parse_u64,
};
use netlink_packet_generic::{
    GenlFamily, GenlHeader, GenlMessage,
    ctrl::{GenlCtrl, GenlCtrlCmd, nlas::GenlCtrlAttrs},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_GENERIC};

/// `NETDEV_XDP_ACT_*` (include/uapi/linux/netdev.h): what a device's XDP
/// can do. [`NDO_XMIT`]: it takes frames other devices' XDP programs
/// redirect to it.
pub const BASIC: u64 = 1 << 0;
pub const REDIRECT: u64 = 1 << 1;
pub const NDO_XMIT: u64 = 1 << 2;
pub const XSK_ZEROCOPY: u64 = 1 << 3;
pub const HW_OFFLOAD: u64 = 1 << 4;
pub const RX_SG: u64 = 1 << 5;
pub const NDO_XMIT_SG: u64 = 1 << 6;

/// The names `ynl` and `ip` give the features.
const NAMES: [(u64, &str); 7] = [
    (BASIC, "basic"),
    (REDIRECT, "redirect"),
    (NDO_XMIT, "ndo-xmit"),
    (XSK_ZEROCOPY, "xsk-zerocopy"),
    (HW_OFFLOAD, "hw-offload"),
    (RX_SG, "rx-sg"),
    (NDO_XMIT_SG, "ndo-xmit-sg"),
];

/// `features` as a comma-separated list of names (`none` for 0).
pub fn names(features: u64) -> String {
    let known: Vec<&str> = NAMES
        .iter()
        .filter(|(bit, _)| features & bit != 0)
        .map(|(_, n)| *n)
        .collect();
    let unknown = features & !NAMES.iter().fold(0, |a, (b, _)| a | b);
    match (known.is_empty(), unknown) {
        (true, 0) => "none".to_string(),
        (_, 0) => known.join(","),
        (_, u) => format!(
            "{}{}{u:#x}",
            known.join(","),
            if known.is_empty() { "" } else { "," }
        ),
    }
}

const FAMILY: &str = "netdev";
const CMD_DEV_GET: u8 = 1;
const A_DEV_IFINDEX: u16 = 1;
const A_DEV_XDP_FEATURES: u16 = 3;

/// An attribute of the netdev family's device messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DevAttr {
    Ifindex(u32),
    XdpFeatures(u64),
    Other(DefaultNla),
}

impl Nla for DevAttr {
    fn value_len(&self) -> usize {
        match self {
            DevAttr::Ifindex(_) => 4,
            DevAttr::XdpFeatures(_) => 8,
            DevAttr::Other(nla) => nla.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            DevAttr::Ifindex(_) => A_DEV_IFINDEX,
            DevAttr::XdpFeatures(_) => A_DEV_XDP_FEATURES,
            DevAttr::Other(nla) => nla.kind(),
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            DevAttr::Ifindex(i) => {
                // The buffer is value_len() long: cannot fail.
                let _ = emit_u32(buffer, *i);
            }
            DevAttr::XdpFeatures(f) => buffer[..8].copy_from_slice(&f.to_ne_bytes()),
            DevAttr::Other(nla) => nla.emit_value(buffer),
        }
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for DevAttr {
    fn parse(buf: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        let value = buf.value();
        Ok(match buf.kind() {
            A_DEV_IFINDEX => DevAttr::Ifindex(parse_u32(value)?),
            A_DEV_XDP_FEATURES => DevAttr::XdpFeatures(parse_u64(value)?),
            _ => DevAttr::Other(DefaultNla::parse(buf)?),
        })
    }
}

/// A message of the netdev family: a command and its attributes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevMessage {
    pub cmd: u8,
    pub attrs: Vec<DevAttr>,
}

impl GenlFamily for DevMessage {
    fn family_name() -> &'static str {
        FAMILY
    }

    fn command(&self) -> u8 {
        self.cmd
    }

    fn version(&self) -> u8 {
        1
    }
}

impl Emitable for DevMessage {
    fn buffer_len(&self) -> usize {
        self.attrs.as_slice().buffer_len()
    }

    fn emit(&self, buffer: &mut [u8]) {
        self.attrs.as_slice().emit(buffer)
    }
}

impl ParseableParametrized<[u8], GenlHeader> for DevMessage {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        let attrs = NlasIterator::new(buf)
            .map(|nla| nla.and_then(|nla| DevAttr::parse(&nla)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(DevMessage {
            cmd: header.cmd,
            attrs,
        })
    }
}

/// The `xdp-features` of `ifindex` in one answer to `NETDEV_CMD_DEV_GET`
/// (a netlink message as the kernel sent it).
pub fn parse_answer(bytes: &[u8], ifindex: u32) -> Result<u64> {
    let msg = NetlinkMessage::<GenlMessage<DevMessage>>::deserialize(bytes)
        .context("decoding the netdev family's answer")?;
    match msg.payload {
        NetlinkPayload::InnerMessage(m) => {
            let attrs = &m.payload.attrs;
            let about = attrs.iter().find_map(|a| match a {
                DevAttr::Ifindex(i) => Some(*i),
                _ => None,
            });
            if about != Some(ifindex) {
                bail!("the netdev family answered about interface {about:?}, not {ifindex}");
            }
            attrs
                .iter()
                .find_map(|a| match a {
                    DevAttr::XdpFeatures(f) => Some(*f),
                    _ => None,
                })
                .context("the netdev family's answer has no xdp-features")
        }
        NetlinkPayload::Error(e) => Err(std::io::Error::from(e))
            .with_context(|| format!("the netdev family about interface {ifindex}")),
        other => bail!("unexpected netdev family answer: {other:?}"),
    }
}

/// A generic-netlink socket to the netdev family of this network
/// namespace (a netlink socket sees the namespace it was opened in).
pub struct Netdev {
    socket: Socket,
    family: u16,
    seq: u32,
}

/// How long an answer may take: the kernel answers these requests from
/// the sending call itself, so waiting at all means something is wrong.
const ANSWER_TIMEOUT: Duration = Duration::from_millis(500);

impl Netdev {
    /// Opens the socket and resolves the family's id.
    pub fn open() -> Result<Netdev> {
        let mut socket =
            Socket::new(NETLINK_GENERIC).context("opening a generic netlink socket")?;
        socket
            .bind_auto()
            .context("binding a generic netlink socket")?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .context("connecting a generic netlink socket")?;
        set_recv_timeout(&socket, ANSWER_TIMEOUT)?;
        let mut netdev = Netdev {
            socket,
            family: 0,
            seq: 0,
        };
        netdev.family = netdev
            .resolve_family()
            .context("the kernel's netdev generic netlink family (Linux >= 6.3)")?;
        Ok(netdev)
    }

    /// The `xdp-features` of interface `ifindex`.
    pub fn xdp_features(&mut self, ifindex: u32) -> Result<u64> {
        let answer = self.request(dev_get(self.family, ifindex))?;
        parse_answer(&answer, ifindex)
            .with_context(|| format!("xdp-features of interface {ifindex}"))
    }

    fn resolve_family(&mut self) -> Result<u16> {
        let msg = GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName(FAMILY.to_string())],
        });
        let answer = self.request(msg)?;
        let msg = NetlinkMessage::<GenlMessage<GenlCtrl>>::deserialize(&answer)
            .context("decoding the controller's answer")?;
        match msg.payload {
            NetlinkPayload::InnerMessage(m) => m
                .payload
                .nlas
                .iter()
                .find_map(|a| match a {
                    GenlCtrlAttrs::FamilyId(id) => Some(*id),
                    _ => None,
                })
                .context("the controller's answer has no family id"),
            NetlinkPayload::Error(e) => {
                Err(std::io::Error::from(e)).context("the controller about the netdev family")
            }
            other => bail!("unexpected controller answer: {other:?}"),
        }
    }

    /// Sends one request and returns the first answer to it, as bytes.
    fn request<F>(&mut self, msg: GenlMessage<F>) -> Result<Vec<u8>>
    where
        F: std::fmt::Debug,
        GenlMessage<F>: netlink_packet_core::NetlinkSerializable,
    {
        self.seq = self.seq.wrapping_add(1);
        let buf = request_bytes(msg, self.seq);
        self.socket
            .send(&buf, 0)
            .context("sending a generic netlink request")?;
        loop {
            let (bytes, _) = self
                .socket
                .recv_from_full()
                .context("receiving a generic netlink answer")?;
            // A late answer to an earlier request (after a timeout) is not
            // this one's.
            if sequence_of(&bytes) == Some(self.seq) {
                return Ok(bytes);
            }
        }
    }
}

/// `NETDEV_CMD_DEV_GET` about `ifindex`, to the netdev family (id
/// `family`).
fn dev_get(family: u16, ifindex: u32) -> GenlMessage<DevMessage> {
    GenlMessage::new(
        GenlHeader {
            cmd: CMD_DEV_GET,
            version: 1,
        },
        DevMessage {
            cmd: CMD_DEV_GET,
            attrs: vec![DevAttr::Ifindex(ifindex)],
        },
        family,
    )
}

/// `msg` as a request with sequence number `seq`, in bytes.
fn request_bytes<F>(msg: GenlMessage<F>, seq: u32) -> Vec<u8>
where
    F: std::fmt::Debug,
    GenlMessage<F>: netlink_packet_core::NetlinkSerializable,
{
    let mut nl = NetlinkMessage::from(msg);
    nl.header.flags = NLM_F_REQUEST;
    nl.header.sequence_number = seq;
    nl.finalize();
    let mut buf = vec![0u8; nl.buffer_len()];
    nl.serialize(&mut buf);
    buf
}

/// The sequence number of the netlink message at the start of `bytes`.
fn sequence_of(bytes: &[u8]) -> Option<u32> {
    let b = bytes.get(8..12)?;
    Some(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

fn set_recv_timeout(socket: &Socket, timeout: Duration) -> Result<()> {
    use std::os::fd::AsRawFd;
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: setsockopt on a socket we own with a valid timeval.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("SO_RCVTIMEO on a netlink socket");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linux 6.18's answer about a veth whose peer runs no NAPI: ifindex 3,
    /// xdp-features 0x23, xdp-rx-metadata-features 7, xsk-features 0.
    const VETH_NO_NDO_XMIT: &str = "400000001400000002000000572c00000101000008000100030000000c0003002300000000000000\
         0c00050007000000000000000c0006000000000000000000";
    /// Its answer about an interface that does not exist: ENODEV.
    const NO_SUCH_DEVICE: &str = "300000000200000003000000572c0000edffffff1c0000001400010003000000000000000101000008000100e7030000";

    fn bytes(hex: &str) -> Vec<u8> {
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect()
    }

    #[test]
    fn the_kernels_answer_gives_the_xdp_features_of_the_interface_asked_about() {
        let f = parse_answer(&bytes(VETH_NO_NDO_XMIT), 3).expect("parses");
        assert_eq!(f, BASIC | REDIRECT | RX_SG);
        assert_eq!(f & NDO_XMIT, 0);
        assert_eq!(names(f), "basic,redirect,rx-sg");
    }

    #[test]
    fn an_answer_about_another_interface_or_an_error_is_refused() {
        let e = parse_answer(&bytes(VETH_NO_NDO_XMIT), 4).expect_err("about ifindex 3");
        assert!(e.to_string().contains("not 4"), "{e:#}");
        let e = parse_answer(&bytes(NO_SUCH_DEVICE), 999).expect_err("ENODEV");
        assert!(format!("{e:#}").contains("999"), "{e:#}");
        assert!(parse_answer(&[1, 2, 3], 3).is_err());
    }

    #[test]
    fn the_request_is_a_dev_get_with_the_ifindex() {
        let buf = request_bytes(dev_get(20, 3), 2);
        // nlmsghdr (len 28, type = family 20, flags REQUEST, seq 2), genl
        // header (cmd 1, version 1), NETDEV_A_DEV_IFINDEX = 3.
        let want = bytes("1c000000140001000200000000000000010100000800010003000000");
        assert_eq!(buf, want);
    }

    #[test]
    fn feature_names_list_known_bits_and_show_unknown_ones() {
        assert_eq!(names(0), "none");
        assert_eq!(names(0x67), "basic,redirect,ndo-xmit,rx-sg,ndo-xmit-sg");
        assert_eq!(names(BASIC | 1 << 9), "basic,0x200");
        assert_eq!(names(1 << 9), "0x200");
    }
}
