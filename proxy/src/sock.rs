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
}

impl Default for WanTuning {
    fn default() -> Self {
        WanTuning {
            congestion: Some("bbr".to_owned()),
            buffer: None,
            notsent_lowat: Some(128 * 1024),
        }
    }
}

/// Applies the options that must precede `connect`/`listen` (buffer sizes influence the window
/// scale negotiated in the SYN).
pub fn tune_wan_pre_connect(sock: &tokio::net::TcpSocket, t: &WanTuning) {
    if let Some(b) = t.buffer {
        let _ = sock.set_send_buffer_size(b.min(u32::MAX as usize) as u32);
        let _ = sock.set_recv_buffer_size(b.min(u32::MAX as usize) as u32);
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

/// LAN sockets: NODELAY so we never add Nagle delay to what the client sent or expects.
pub fn tune_lan(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
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
