//! Limits that new flows and connections can reach, and the warning each one gets: the first time a
//! limit is reached, a line naming it, its value and the config key that changes it; then at most
//! one line per limit per [`LOG_EVERY`], with the count since the previous line. A burst of ten
//! thousand flows over a limit is two lines, not ten thousand, and never silence.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most one line per limit this often.
pub const LOG_EVERY: Duration = Duration::from_secs(60);

/// A limit: what it is and how to change it.
#[derive(Clone, Copy, Debug)]
pub struct Limit {
    /// What was reached, e.g. "flow limit".
    pub name: &'static str,
    /// The config key (or kernel setting) that changes it.
    pub key: &'static str,
    /// What happens to what hit it, e.g. "new flows passed through unaccelerated".
    pub effect: &'static str,
}

/// The flows this node handles at once (`tunnel.max_flows`).
pub const MAX_FLOWS: Limit = Limit {
    name: "flow limit",
    key: "tunnel.max_flows",
    effect: "new flows passed through unaccelerated",
};
/// Streams the peer accepts from us at once (its `tunnel.max_streams`).
pub const PEER_STREAMS: Limit = Limit {
    name: "peer's stream limit",
    key: "tunnel.max_streams (on the peer)",
    effect: "new flows passed through unaccelerated",
};
/// Bytes all flows keep until acknowledged (`tunnel.retain_budget`).
pub const RETAIN_BUDGET: Limit = Limit {
    name: "retain budget",
    key: "tunnel.retain_budget",
    effect: "new flows passed through unaccelerated",
};
/// Streams the peer opened that we refused: our flow limit.
pub const FAR_FLOWS: Limit = Limit {
    name: "flow limit (streams from peers)",
    key: "tunnel.max_flows",
    effect: "streams opened by peers refused (busy)",
};
/// The peer's own flow or stream limit, met when it refused a stream we opened (busy). Its value
/// is the peer's, unknown here: logged without one.
pub const PEER_BUSY: Limit = Limit {
    name: "peer's flow limit",
    key: "tunnel.max_flows and tunnel.max_streams (on the peer)",
    effect: "flows it refused passed through unaccelerated",
};
/// Open files of the process (accept failed).
pub const OPEN_FILES: Limit = Limit {
    name: "open file limit",
    key: "LimitNOFILE (systemd) or ulimit -n",
    effect: "accepts failed and were retried",
};
/// Pre-authentication connections from one address (tunnel listener).
pub const TUNNEL_PER_SOURCE: Limit = Limit {
    name: "unauthenticated tunnel connections per address",
    key: "tunnel.handshakes_per_source",
    effect: "connections closed at once",
};
/// Pre-authentication connections in all (tunnel listener).
pub const TUNNEL_PREAUTH: Limit = Limit {
    name: "unauthenticated tunnel connections",
    key: "tunnel.max_handshakes",
    effect: "oldest connections of the busiest address closed",
};
/// Admin connections from one address.
pub const ADMIN_PER_SOURCE: Limit = Limit {
    name: "admin connections per address",
    key: "(fixed)",
    effect: "connections closed at once",
};
/// Admin connections in all.
pub const ADMIN_CONNECTIONS: Limit = Limit {
    name: "admin connections",
    key: "(fixed)",
    effect: "oldest connections of the busiest address closed",
};

/// Local ports for connections to one destination (connecting from our own address, each
/// connection to the same address and port needs a port of its own, and closed ones keep theirs
/// in TIME_WAIT for a minute). Its value is the size of the ephemeral port range.
pub const LOCAL_PORTS: Limit = Limit {
    name: "local ports to one destination",
    key: "net.ipv4.ip_local_port_range (more ports), net.ipv4.tcp_tw_reuse (ports in TIME_WAIT)",
    effect: "connections to that destination failed (streams reset: unreachable)",
};

/// Not a limit: tunnel handshakes refused (not TLS, unknown key, bad hello). Each is logged with
/// its address at debug level only, so a flood of them cannot flood the log.
pub const REFUSED_HANDSHAKES: Limit = Limit {
    name: "tunnel handshakes refused",
    key: "",
    effect: "(not TLS, unknown key or bad hello; addresses at debug level)",
};

#[derive(Default)]
struct Seen {
    /// Hits since the last line.
    pending: u64,
    last: Option<Instant>,
    value: u64,
}

/// The warnings of one node.
#[derive(Default)]
pub struct LimitLog {
    seen: Mutex<HashMap<&'static str, (Limit, Seen)>>,
}

impl LimitLog {
    /// Records that `limit` (currently `value`) was reached once; logs if its line is due.
    pub fn hit(&self, limit: Limit, value: u64) {
        self.hit_at(limit, value, Instant::now());
    }

    fn hit_at(&self, limit: Limit, value: u64, now: Instant) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let (_, s) = seen.entry(limit.name).or_insert((limit, Seen::default()));
        s.pending += 1;
        s.value = value;
        if due(s.last, now) {
            log(&limit, s);
            s.last = Some(now);
        }
    }

    /// Logs the hits not yet logged of every limit whose line is due (called periodically, so
    /// the end of a burst is reported too).
    pub fn flush(&self) {
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        for (limit, s) in seen.values_mut() {
            if s.pending > 0 && due(s.last, now) {
                log(limit, s);
                s.last = Some(now);
            }
        }
    }

    /// Hits not yet logged, for tests.
    pub fn pending(&self, limit: Limit) -> u64 {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.get(limit.name).map_or(0, |(_, s)| s.pending)
    }
}

fn due(last: Option<Instant>, now: Instant) -> bool {
    match last {
        Some(t) => now.duration_since(t) >= LOG_EVERY,
        None => true,
    }
}

fn log(limit: &Limit, s: &mut Seen) {
    let n = std::mem::take(&mut s.pending);
    let since = match s.last {
        Some(_) => "in the last minute",
        None => "so far",
    };
    if limit.key.is_empty() {
        tracing::warn!(count = n, "{}: {n} {since} {}", limit.name, limit.effect);
        return;
    }
    let value = if s.value == 0 {
        String::new()
    } else {
        format!(" ({})", s.value)
    };
    tracing::warn!(
        limit = limit.name,
        value = s.value,
        key = limit.key,
        count = n,
        "{} reached{value}: {n} {} {since}; to change it: {}",
        limit.name,
        limit.effect,
        limit.key
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_minute_with_the_count_since() {
        let l = LimitLog::default();
        let t0 = Instant::now();
        l.hit_at(MAX_FLOWS, 10, t0);
        // Logged at once: nothing pending.
        assert_eq!(l.pending(MAX_FLOWS), 0);
        for i in 1..=500 {
            l.hit_at(MAX_FLOWS, 10, t0 + Duration::from_millis(i));
        }
        assert_eq!(l.pending(MAX_FLOWS), 500);
        // Another limit has its own line.
        l.hit_at(RETAIN_BUDGET, 1 << 20, t0 + Duration::from_secs(1));
        assert_eq!(l.pending(RETAIN_BUDGET), 0);
        l.hit_at(MAX_FLOWS, 10, t0 + LOG_EVERY);
        assert_eq!(l.pending(MAX_FLOWS), 0);
    }
}
