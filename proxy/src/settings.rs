//! Tunables of the tunnel and flows.

use crate::sock::WanTuning;
use std::time::Duration;

/// Tunables of the tunnel and flows. `Default` is what a config without these keys gets.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Tunnel connections kept to each peer we dial.
    pub connections: usize,
    /// DATA bytes we accept per stream before granting more (≥ the bandwidth-delay product for one
    /// stream to fill the link).
    pub window: u32,
    /// Streams we accept from a peer at once (over all its connections).
    pub max_streams: u32,
    /// Flows (LAN connections, both kinds) the node handles at once; the admission semaphore.
    pub max_flows: usize,
    /// Bytes all flows together keep until their peer acknowledges them (encoder retention and
    /// unacknowledged encoded bytes); past it, flows stop reading their LAN sockets.
    pub retain_budget: usize,
    /// Queued DATA above which a flow stops reading its LAN socket.
    pub send_queue_limit: usize,
    /// Keepalive: how often an idle tunnel connection is probed at most.
    pub ping_interval: Duration,
    /// A tunnel connection with no frame for this long is suspect: new flows avoid it.
    pub suspect_after: Duration,
    /// A tunnel connection with no frame for this long is closed.
    pub dead_after: Duration,
    /// Streams wait this long for an unreachable peer before their LAN sides are reset.
    pub hold: Duration,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// On shutdown, how long open flows get to finish.
    pub drain_timeout: Duration,
    /// Unauthenticated connections (TLS and hello not yet complete) on the tunnel listener at once;
    /// past it, a new one replaces the oldest of the address holding the most.
    pub max_handshakes: usize,
    /// Unauthenticated connections on the tunnel listener from one address at once.
    pub handshakes_per_source: usize,
    /// How long an accepted tunnel connection has to complete TLS and hello.
    pub accept_timeout: Duration,
    pub wan: WanTuning,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            connections: 2,
            window: 16 << 20,
            // 25,000 concurrent flows and more must not degrade silently: an idle accelerated
            // flow costs a few KiB at each end (BENCHMARKS.md, "Load").
            max_streams: 32_768,
            max_flows: 65_536,
            // A deduplicated stream runs at most at its retention / RTT: 256 MiB at 80 ms is
            // 26 Gbit/s for one stream, and the same budget holds the flows of an outage.
            retain_budget: 256 << 20,
            send_queue_limit: 256 << 10,
            ping_interval: Duration::from_secs(5),
            suspect_after: Duration::from_millis(1500),
            dead_after: Duration::from_secs(30),
            // Of the order of Linux's own give-up time for an unanswered connection
            // (tcp_retries2 = 15: about 15 minutes).
            hold: Duration::from_secs(15 * 60),
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(10),
            // Large enough that a peer always finds a slot (see `crate::preauth`); small enough
            // that a flood of TLS handshakes costs bounded CPU and memory.
            max_handshakes: 256,
            handshakes_per_source: 8,
            // TLS 1.3 with client authentication and the hello take about three round trips.
            accept_timeout: Duration::from_secs(10),
            wan: WanTuning::default(),
        }
    }
}

impl Settings {
    /// The session's fixed parameters. Links are probed often enough that one which stops
    /// answering is noticed within `suspect_after`.
    pub fn session(&self) -> crate::session::SessionConfig {
        crate::session::SessionConfig {
            window: self.window,
            // A stream the peer opens is a flow here: never promise more than we admit.
            max_streams: self
                .max_streams
                .min(u32::try_from(self.max_flows).unwrap_or(u32::MAX))
                .max(1),
            ping_interval: self.ping_interval.min(self.suspect_after / 3),
            suspect_after: self.suspect_after,
            dead_after: self.dead_after,
            hold: self.hold,
        }
    }
}
