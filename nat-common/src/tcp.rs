//! TCP connection state, kept as bits of what each direction has shown.
//!
//! Bits rather than a linear state machine: a simultaneous open (SYNs from
//! both ends) or FINs in either order reach the same phase without special
//! cases. The phase decides the idle timeout ([`crate::timeouts`]).

/// Direction of a packet through the gateway.
pub const DIR_OUT: u8 = 0;
pub const DIR_IN: u8 = 1;

pub const SYN_OUT: u8 = 1 << 0;
pub const SYN_IN: u8 = 1 << 1;
pub const FIN_OUT: u8 = 1 << 2;
pub const FIN_IN: u8 = 1 << 3;
pub const RST: u8 = 1 << 4;

/// TCP header flag bits (byte 13 of the header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;

/// Whether a packet with these TCP flags can change the state (the reverse
/// path only looks up the forward entry for these).
#[inline(always)]
pub const fn is_control(tcp_flags: u8) -> bool {
    tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0
}

/// The state after a packet with `tcp_flags` went through in direction `dir`.
#[inline(always)]
pub const fn update(state: u8, dir: u8, tcp_flags: u8) -> u8 {
    let mut s = state;
    if tcp_flags & TCP_RST != 0 {
        s |= RST;
    }
    if tcp_flags & TCP_SYN != 0 {
        // A new SYN after a reset or a close reopens the connection (port
        // reuse by the same inside endpoint toward the same remote).
        if s & (RST | FIN_OUT | FIN_IN) != 0 && dir == DIR_OUT && tcp_flags & TCP_RST == 0 {
            s = 0;
        }
        s |= if dir == DIR_OUT { SYN_OUT } else { SYN_IN };
    }
    if tcp_flags & TCP_FIN != 0 {
        s |= if dir == DIR_OUT { FIN_OUT } else { FIN_IN };
    }
    s
}

/// Coarse phase of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Only one side has sent a SYN so far (or no SYN was seen at all: a
    /// flow picked up mid-stream is not trusted as established).
    Opening,
    Established,
    /// A FIN was seen in at least one direction, or a RST.
    Closing,
}

pub const fn phase(state: u8) -> Phase {
    if state & (RST | FIN_OUT | FIN_IN) != 0 {
        Phase::Closing
    } else if state & (SYN_OUT | SYN_IN) == (SYN_OUT | SYN_IN) {
        Phase::Established
    } else {
        Phase::Opening
    }
}

pub const fn phase_name(state: u8) -> &'static str {
    match phase(state) {
        Phase::Opening => "opening",
        Phase::Established => "established",
        Phase::Closing => "closing",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACK: u8 = 0x10;

    #[test]
    fn three_way_handshake_reaches_established() {
        let s = update(0, DIR_OUT, TCP_SYN);
        assert_eq!(phase(s), Phase::Opening);
        let s = update(s, DIR_IN, TCP_SYN | ACK);
        assert_eq!(phase(s), Phase::Established);
        let s = update(s, DIR_OUT, ACK);
        assert_eq!(phase(s), Phase::Established);
    }

    #[test]
    fn simultaneous_open_reaches_established() {
        let s = update(0, DIR_OUT, TCP_SYN);
        let s = update(s, DIR_IN, TCP_SYN);
        assert_eq!(phase(s), Phase::Established);
    }

    #[test]
    fn fin_from_either_side_starts_closing() {
        let est = update(update(0, DIR_OUT, TCP_SYN), DIR_IN, TCP_SYN | ACK);
        assert_eq!(phase(update(est, DIR_IN, TCP_FIN | ACK)), Phase::Closing);
        assert_eq!(phase(update(est, DIR_OUT, TCP_FIN | ACK)), Phase::Closing);
    }

    #[test]
    fn rst_moves_to_closing() {
        let est = update(update(0, DIR_OUT, TCP_SYN), DIR_IN, TCP_SYN | ACK);
        assert_eq!(phase(update(est, DIR_IN, TCP_RST)), Phase::Closing);
    }

    #[test]
    fn new_outbound_syn_after_close_reopens() {
        let est = update(update(0, DIR_OUT, TCP_SYN), DIR_IN, TCP_SYN | ACK);
        let closed = update(est, DIR_OUT, TCP_RST);
        let s = update(closed, DIR_OUT, TCP_SYN);
        assert_eq!(s, SYN_OUT);
        assert_eq!(phase(s), Phase::Opening);
    }

    #[test]
    fn data_without_syn_is_not_established() {
        assert_eq!(phase(update(0, DIR_OUT, ACK)), Phase::Opening);
    }

    #[test]
    fn only_syn_fin_rst_are_control() {
        assert!(is_control(TCP_SYN));
        assert!(is_control(TCP_FIN | ACK));
        assert!(is_control(TCP_RST));
        assert!(!is_control(ACK));
        assert!(!is_control(ACK | 0x08));
    }
}
