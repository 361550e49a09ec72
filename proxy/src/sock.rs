//! Socket options for WAN (tunnel) and LAN sockets, and the abortive close used to propagate resets.

use socket2::SockRef;
use std::time::Duration;
use tokio::net::TcpStream;

/// How tunnel (WAN) sockets are tuned.
#[derive(Clone, Debug)]
pub struct WanTuning {
    /// Congestion control to ask for; failure (module absent, not permitted) is ignored.
    pub congestion: Option<String>,
    /// Fixed SO_SNDBUF/SO_RCVBUF. `None` leaves the kernel's autotuning on, which is what we want
    /// unless the operator knows the path: setting either option turns autotuning off for it.
    pub buffer: Option<usize>,
    /// TCP_NOTSENT_LOWAT: unsent bytes the kernel may hold. Keeping this small keeps the queue in our
    /// scheduler, where interactive streams can overtake bulk ones, instead of in the kernel.
    pub notsent_lowat: Option<u32>,
    /// MTU of the WAN path, when smaller than the interfaces' (and the path drops big packets
    /// without an ICMP "fragmentation needed"): tunnel sockets clamp their segment size to fit.
    /// The clamped MSS is also what we advertise, so the peer's segments fit too.
    pub mtu: Option<u32>,
    /// Cap a connection's pacing rate at the bottleneck's when its queue overflows
    /// ([`crate::pacing`]), and size its send buffer from the measured bandwidth-delay product.
    pub pacing: bool,
}

impl Default for WanTuning {
    fn default() -> Self {
        WanTuning {
            congestion: Some("bbr".to_owned()),
            buffer: None,
            notsent_lowat: Some(128 * 1024),
            mtu: None,
            pacing: true,
        }
    }
}

/// The TCP MSS that fits `mtu` (IP and TCP headers, no options: the kernel subtracts the
/// timestamp option itself).
pub fn mss_for(mtu: u32, ipv6: bool) -> u32 {
    mtu.saturating_sub(if ipv6 { 60 } else { 40 }).max(88)
}

/// Applies the options that must precede `connect`/`listen` (buffer sizes influence the window
/// scale negotiated in the SYN; the MSS is advertised in it).
pub fn tune_wan_pre_connect(sock: &tokio::net::TcpSocket, t: &WanTuning, ipv6: bool) {
    if let Some(b) = t.buffer {
        let _ = sock.set_send_buffer_size(b.min(u32::MAX as usize) as u32);
        let _ = sock.set_recv_buffer_size(b.min(u32::MAX as usize) as u32);
    }
    clamp_mss(SockRef::from(sock), t, ipv6);
}

/// Clamps the segment size of a tunnel socket, or of a tunnel listener (accepted connections
/// inherit it, and its SYN-ACKs advertise it).
pub fn clamp_mss(s: SockRef<'_>, t: &WanTuning, ipv6: bool) {
    if let Some(mtu) = t.mtu {
        let mss = mss_for(mtu, ipv6);
        if let Err(e) = s.set_tcp_mss(mss) {
            tracing::warn!("TCP_MAXSEG {mss} (tunnel.mtu {mtu}): {e}");
        }
    }
}

/// Applies WAN options to a connected socket. Every option is best effort: a kernel without BBR or
/// NOTSENT_LOWAT still gets a working tunnel.
pub fn tune_wan(stream: &TcpStream, t: &WanTuning) {
    let _ = stream.set_nodelay(true);
    let s = SockRef::from(stream);
    if let Some(cc) = &t.congestion {
        if let Err(e) = s.set_tcp_congestion(cc.as_bytes()) {
            tracing::debug!("TCP_CONGESTION {cc} not available: {e}");
        }
    }
    if let Some(b) = t.buffer {
        let _ = s.set_send_buffer_size(b);
        let _ = s.set_recv_buffer_size(b);
    }
    if let Some(l) = t.notsent_lowat {
        let _ = s.set_tcp_notsent_lowat(l);
    }
    // Keepalive catches a silently vanished peer even if our PINGs are stuck behind a full window.
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10));
    let _ = s.set_tcp_keepalive(&ka);
}

/// LAN sockets: NODELAY so we never add Nagle delay to what the client sent or expects; and
/// reset-on-close while the flow is in progress, so that if this process dies (SIGKILL, crash)
/// the kernel closes the socket with RST: the application at the other end sees a reset, never an
/// orderly end of a stream that was cut short. A flow that completes clears it ([`finished`]).
pub fn tune_lan(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    set_reset_on_close(stream);
}

/// Marks a LAN socket whose flow completed in order: closing it is an ordinary close.
pub fn finished(stream: &TcpStream) {
    let _ = SockRef::from(stream).set_linger(None);
}

/// Makes the eventual close of this socket send RST instead of FIN (SO_LINGER 0), so a reset at one
/// end of a flow reaches the application at the other end as a reset.
pub fn set_reset_on_close(stream: &TcpStream) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Closes `stream` abortively (RST).
pub fn reset(stream: TcpStream) {
    set_reset_on_close(&stream);
    drop(stream);
}

/// Whether an I/O error means the other end reset the connection.
pub fn is_reset(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionReset | ConnectionAborted | BrokenPipe)
}

/// Backlog when the kernel's limit cannot be read.
const DEFAULT_BACKLOG: u32 = 4096;

/// Ports of the kernel's ephemeral range (`net.ipv4.ip_local_port_range`; 0 if unreadable).
pub fn local_port_range() -> u64 {
    let Ok(s) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") else {
        return 0;
    };
    let mut it = s.split_whitespace().filter_map(|v| v.parse::<u64>().ok());
    match (it.next(), it.next()) {
        (Some(lo), Some(hi)) if hi >= lo => hi - lo + 1,
        _ => 0,
    }
}

/// The listen backlog: the kernel's own maximum (`net.core.somaxconn`), so a burst of connections
/// waits in the accept queue instead of being reset when it overflows.
pub fn listen_backlog() -> u32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(DEFAULT_BACKLOG)
}

/// A listening socket on `addr` (SO_REUSEADDR, like `TcpListener::bind`) with the
/// [`listen_backlog`].
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let s = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(listen_backlog())
}
