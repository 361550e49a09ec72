//! systemd's readiness and watchdog protocol (sd_notify): datagrams to `$NOTIFY_SOCKET`.
//!
//! `Type=notify` units get `READY=1` once every listener is bound and the rules are installed, and
//! `WatchdogSec=` units get `WATCHDOG=1` from a task on the daemon's event loop: if the loop hangs,
//! the pings stop and systemd kills and restarts the daemon (and `ExecStopPost` removes the rules).

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Sends `state` ("READY=1", "WATCHDOG=1", ...) to systemd; false when not run by systemd.
pub fn notify(state: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return false;
    };
    let bytes = path.as_encoded_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name)
                .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
        }
        None => sock.send_to(state.as_bytes(), &path),
    };
    match sent {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!("sd_notify {state}: {e}");
            false
        }
    }
}

/// How often to send `WATCHDOG=1`: half of `WatchdogSec`, if systemd asked this process for it.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}
