//! Prometheus metrics of one node. Each node has its own registry, so several nodes can live in one
//! process (tests, `ditto demo`) without mixing their figures.

use ditto_dedup::store::{FaultKind, StoreStats};
use prometheus::{
    CounterVec, Encoder as _, Gauge, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry,
};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Why a flow was passed through instead of accelerated (the `reason` label of
/// `ditto_flows_total{outcome="passthrough"}`).
pub mod reason {
    /// The peer has no tunnel connection up.
    pub const PEER_DOWN: &str = "peer-down";
    /// Its tunnel connections stopped answering (peer hung, path down): new flows do not wait.
    pub const PEER_UNRESPONSIVE: &str = "peer-unresponsive";
    /// The peer speaks no tunnel protocol version this build speaks.
    pub const VERSION: &str = "version";
    pub const NO_PEER: &str = "no-peer";
    pub const BYPASS_RULE: &str = "bypass-rule";
    /// The peer's stream limit is reached, or its session is going away.
    pub const TUNNEL_BUSY: &str = "tunnel-busy";
    /// An intercepted flow whose destination matches no `[[route]]`.
    pub const NO_ROUTE: &str = "no-route";
    /// The far side refused the stream at its flow or stream limit (before connecting anywhere):
    /// the client's bytes went straight to the destination instead.
    pub const PEER_BUSY: &str = "peer-busy";
    /// This node's flow limit (`tunnel.max_flows`) is reached.
    pub const MAX_FLOWS: &str = "max-flows";
    /// The bytes all flows keep until acknowledged (`tunnel.retain_budget`) are spent.
    pub const RETAIN_BUDGET: &str = "retain-budget";
    pub const ALL: [&str; 10] = [
        PEER_DOWN,
        PEER_UNRESPONSIVE,
        VERSION,
        NO_PEER,
        BYPASS_RULE,
        TUNNEL_BUSY,
        PEER_BUSY,
        NO_ROUTE,
        MAX_FLOWS,
        RETAIN_BUDGET,
    ];
}

/// Every metric the node exports.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// LAN payload bytes, `direction` = "sent" (read from a LAN client, sent toward the peer) or
    /// "received" (arrived from the peer, written to a LAN endpoint).
    pub lan_bytes: IntCounterVec,
    /// Bytes on tunnel TCP connections (TLS records included), same directions.
    pub wan_bytes: IntCounterVec,
    pub dedup_saved: IntCounter,
    pub compression_saved: IntCounter,
    /// Flows by `outcome` (accelerated, passthrough, failed) and `reason`.
    pub flows: IntCounterVec,
    pub flows_active: IntGauge,
    pub tunnel_up: IntGaugeVec,
    pub tunnel_connections: IntGaugeVec,
    pub tunnel_rtt: GaugeVec,
    pub tunnel_pacing: IntGaugeVec,
    pub tunnel_reconnects: IntCounterVec,
    /// Flows homed on each member of a peer group, by `group` and `peer`.
    pub group_flows: IntCounterVec,
    /// Flows of a group that went to another member because their home was unreachable.
    pub group_moved: IntCounterVec,
    pub auth_failures: IntCounter,
    pub protocol_errors: IntCounter,
    pub store_bytes: IntGauge,
    pub store_chunks: IntGauge,
    pub chunk_misses: IntCounter,
    pub verify_failures: IntCounter,
    /// Store errors by `kind` ([`STORE_ERROR_KINDS`]), fed from the store's own totals by
    /// [`Metrics::observe_store`].
    pub store_errors: IntCounterVec,
    /// The store's totals already counted into `store_errors`, in the order of [`STORE_ERROR_KINDS`].
    store_errors_seen: Arc<[AtomicU64; 3]>,
    /// 1 while the store's disk tier is off after write failures, with the `reason` label set to the
    /// kind of failure; all other reasons 0.
    pub store_degraded: IntGaugeVec,
    /// Chunks the store did not write to disk because its write queue was full (the disk did not keep
    /// up), fed from the store's own total by [`Metrics::observe_store`].
    pub store_writes_skipped: IntCounter,
    store_writes_skipped_seen: Arc<AtomicU64>,
    /// Payload bytes waiting in the store's write-behind queue.
    pub store_write_queue_bytes: IntGauge,
    pub stream_resets: IntCounterVec,
    /// OPENs refused because their destination is outside the peer's allow list, by peer.
    pub opens_denied: IntCounterVec,
    /// Streams waiting for an unreachable peer now, by peer.
    pub streams_held: IntGaugeVec,
    /// Streams that continued on another tunnel connection after theirs was lost, by peer.
    pub streams_resumed: IntCounterVec,
    /// Stream-seconds spent waiting for an unreachable peer, by peer.
    pub streams_held_seconds: CounterVec,
    /// Store summary bytes exchanged with the peer (`direction` sent/received).
    pub summary_bytes: IntCounterVec,
    /// Summary messages from the peer refused as malformed or over a limit.
    pub summary_rejected: IntCounterVec,
    /// Chunks of the peer's store we know of from its summaries.
    pub peer_known_chunks: IntGaugeVec,
    /// Chunks on the peer's disk, per its latest summary index.
    pub peer_store_chunks: IntGaugeVec,
    /// Chunks sent as references (single or in runs).
    pub dedup_references: IntCounter,
    /// References the peer could not resolve and asked for (NEED), answered with the bytes.
    pub dedup_needs: IntCounter,
    pub up_seconds: Gauge,
    /// Unauthenticated connections closed by the listener, by `listener` (tunnel, admin) and `why`
    /// (per-source: the address was at its cap; evicted: the oldest of the busiest address, to make
    /// room; timeout: the handshake or request took too long).
    pub preauth_closed: IntCounterVec,
    /// Limits reached, and their rate-limited warnings.
    pub limits: Arc<crate::limits::LimitLog>,
    /// Savings totals of the last hour, for the admin status page.
    pub history: Arc<History>,
}

/// Totals at one moment, as the status page charts them.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct SavingsSample {
    /// Unix time, seconds.
    pub t: f64,
    pub lan_sent: u64,
    pub wan_sent: u64,
    pub dedup_saved: u64,
    pub compression_saved: u64,
}

/// A bounded ring of [`SavingsSample`]s: the oldest is dropped once `capacity` are held.
pub struct History {
    samples: Mutex<VecDeque<SavingsSample>>,
    capacity: usize,
}

/// `kind` labels of `ditto_store_errors_total`: failed writes (fsyncs, file creations, removals),
/// failed reads, and damaged data found (chunks that do not match their fingerprint, garbled records).
pub const STORE_ERROR_KINDS: [&str; 3] = ["write", "read", "corrupt"];

/// How often the admin endpoint samples the totals, and how many samples it keeps (one hour).
pub const HISTORY_INTERVAL: Duration = Duration::from_secs(10);
pub const HISTORY_SAMPLES: usize = 361;

impl History {
    pub fn new(capacity: usize) -> History {
        History {
            samples: Mutex::new(VecDeque::with_capacity(capacity.min(4096))),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<SavingsSample>> {
        // A panic elsewhere while holding the lock leaves plain numbers behind: still usable.
        self.samples.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn push(&self, s: SavingsSample) {
        let mut q = self.lock();
        while q.len() >= self.capacity {
            q.pop_front();
        }
        q.push_back(s);
    }

    /// The samples held, oldest first.
    pub fn samples(&self) -> Vec<SavingsSample> {
        self.lock().iter().copied().collect()
    }
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
    // Registration only fails on duplicate names, which the fixed list below does not have.
    if let Err(e) = r.register(Box::new(m.clone())) {
        tracing::error!("registering metric: {e}");
    }
    m
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

impl Metrics {
    /// A fresh registry with all metrics at zero.
    pub fn new() -> Metrics {
        let r = Registry::new();
        // Construction fails only for an invalid name or label set. These are constants exercised by
        // the unit test below, so `expect` documents a programming error, never a runtime condition.
        const BAD: &str = "metric definitions are static and valid";
        let cv =
            |n: &str, h: &str, l: &[&str]| reg(&r, IntCounterVec::new(opts(n, h), l).expect(BAD));
        let gv =
            |n: &str, h: &str, l: &[&str]| reg(&r, IntGaugeVec::new(opts(n, h), l).expect(BAD));
        let c = |n: &str, h: &str| reg(&r, IntCounter::with_opts(opts(n, h)).expect(BAD));
        let g = |n: &str, h: &str| reg(&r, IntGauge::with_opts(opts(n, h)).expect(BAD));
        cv(
            "ditto_build_info",
            "Build information (always 1).",
            &["version"],
        )
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .inc();
        let m = Metrics {
            lan_bytes: cv(
                "ditto_lan_bytes_total",
                "Payload bytes on LAN connections of accelerated flows.",
                &["peer", "direction"],
            ),
            wan_bytes: cv(
                "ditto_wan_bytes_total",
                "Bytes on tunnel TCP connections, TLS included.",
                &["peer", "direction"],
            ),
            dedup_saved: c(
                "ditto_dedup_saved_bytes_total",
                "LAN bytes not sent because the peer already held them.",
            ),
            compression_saved: c(
                "ditto_compression_saved_bytes_total",
                "Bytes saved by compressing literals.",
            ),
            flows: cv(
                "ditto_flows_total",
                "LAN flows by outcome and reason.",
                &["outcome", "reason"],
            ),
            flows_active: g("ditto_flows_active", "LAN flows currently open."),
            tunnel_up: gv(
                "ditto_tunnel_up",
                "1 while at least one tunnel connection to the peer is up.",
                &["peer"],
            ),
            tunnel_connections: gv(
                "ditto_tunnel_connections",
                "Tunnel connections up to the peer.",
                &["peer"],
            ),
            tunnel_rtt: reg(
                &r,
                GaugeVec::new(
                    opts(
                        "ditto_tunnel_rtt_seconds",
                        "Smoothed PING round-trip time to the peer.",
                    ),
                    &["peer"],
                )
                .expect(BAD),
            ),
            tunnel_pacing: gv(
                "ditto_tunnel_pacing_cap_bytes_per_second",
                "Sum of the pacing caps of the tunnel connections to the peer whose bottleneck \
                 queue overflowed (0: every connection paces itself).",
                &["peer"],
            ),
            tunnel_reconnects: cv(
                "ditto_tunnel_reconnects_total",
                "Tunnel connections re-established after a loss.",
                &["peer"],
            ),
            group_flows: cv(
                "ditto_group_flows_total",
                "Flows homed on each member of a peer group.",
                &["group", "peer"],
            ),
            group_moved: cv(
                "ditto_group_moved_flows_total",
                "Flows of a peer group carried by another member because their home was unreachable.",
                &["group"],
            ),
            auth_failures: c(
                "ditto_peer_auth_failures_total",
                "Tunnel handshakes refused: unknown or wrong key, not TLS, bad hello.",
            ),
            protocol_errors: c(
                "ditto_tunnel_protocol_errors_total",
                "Tunnel connections closed for a protocol violation.",
            ),
            store_bytes: g(
                "ditto_store_bytes",
                "Bytes of chunk data held by the store.",
            ),
            store_chunks: g("ditto_store_chunks", "Chunks held by the store."),
            chunk_misses: c(
                "ditto_chunk_misses_total",
                "References the peer sent for chunks we did not hold.",
            ),
            verify_failures: c(
                "ditto_verify_failures_total",
                "Chunks whose bytes did not match their fingerprint.",
            ),
            store_errors: cv(
                "ditto_store_errors_total",
                "Chunk store errors by kind: write (failed writes, fsyncs, file creations and \
                 removals), read (failed reads), corrupt (stored data that failed verification).",
                &["kind"],
            ),
            store_errors_seen: Arc::new(Default::default()),
            store_degraded: gv(
                "ditto_store_degraded",
                "1 while the chunk store's disk tier is off after write failures, by reason \
                 (disk-full, read-only, io-error); new chunks are then kept in RAM only.",
                &["reason"],
            ),
            store_writes_skipped: c(
                "ditto_store_writes_skipped_total",
                "Chunks not written to the store's disk tier because the disk did not keep up (write \
                 queue full): kept in RAM only. Traffic is unaffected; dedup savings may be lower.",
            ),
            store_writes_skipped_seen: Arc::new(AtomicU64::new(0)),
            store_write_queue_bytes: g(
                "ditto_store_write_queue_bytes",
                "Bytes of chunks waiting in the store's write-behind queue.",
            ),
            stream_resets: cv(
                "ditto_stream_resets_total",
                "Accelerated streams reset, by reason.",
                &["reason"],
            ),
            opens_denied: cv(
                "ditto_opens_denied_total",
                "OPENs from the peer refused: destination outside its allow list.",
                &["peer"],
            ),
            streams_held: gv(
                "ditto_streams_held",
                "Accelerated streams waiting for their unreachable peer (up to tunnel.hold).",
                &["peer"],
            ),
            streams_resumed: cv(
                "ditto_streams_resumed_total",
                "Streams that continued on another tunnel connection after theirs was lost.",
                &["peer"],
            ),
            streams_held_seconds: reg(
                &r,
                CounterVec::new(
                    opts(
                        "ditto_streams_held_seconds_total",
                        "Stream-seconds spent waiting for an unreachable peer.",
                    ),
                    &["peer"],
                )
                .expect(BAD),
            ),
            summary_bytes: cv(
                "ditto_summary_bytes_total",
                "Store summary bytes exchanged with the peer, by direction.",
                &["peer", "direction"],
            ),
            summary_rejected: cv(
                "ditto_summary_rejected_total",
                "Store summary messages from the peer refused as malformed or over a limit.",
                &["peer"],
            ),
            peer_known_chunks: gv(
                "ditto_peer_known_chunks",
                "Chunks of the peer's store we know of from its summaries.",
                &["peer"],
            ),
            peer_store_chunks: gv(
                "ditto_peer_store_chunks",
                "Chunks on the peer's disk, per its latest summary index.",
                &["peer"],
            ),
            dedup_references: c(
                "ditto_dedup_references_total",
                "Chunks sent as references to chunks the peer was believed to hold.",
            ),
            dedup_needs: c(
                "ditto_dedup_needs_total",
                "References the peer could not resolve (it asked for the bytes, NEED).",
            ),
            up_seconds: reg(
                &r,
                Gauge::with_opts(opts(
                    "ditto_uptime_seconds",
                    "Seconds since the node started.",
                ))
                .expect(BAD),
            ),
            preauth_closed: cv(
                "ditto_preauth_closed_total",
                "Unauthenticated connections closed, by listener (tunnel, admin) and why: per-source \
                 (the address was at its cap), evicted (the oldest of the busiest address, to make \
                 room), timeout (no complete handshake or request in time).",
                &["listener", "why"],
            ),
            limits: Arc::new(crate::limits::LimitLog::default()),
            history: Arc::new(History::new(HISTORY_SAMPLES)),
            registry: r,
        };
        // Pass-through series exist from the start, at zero, so that dashboards show them and an
        // alert on their increase sees the very first pass-through flow.
        for why in reason::ALL {
            m.flows.with_label_values(&["passthrough", why]);
        }
        for l in ["tunnel", "admin"] {
            for why in ["per-source", "evicted", "timeout"] {
                m.preauth_closed.with_label_values(&[l, why]);
            }
        }
        for kind in STORE_ERROR_KINDS {
            m.store_errors.with_label_values(&[kind]);
        }
        for kind in FaultKind::ALL {
            m.store_degraded.with_label_values(&[kind.as_str()]);
        }
        m
    }

    /// The text exposition of all metrics.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let enc = prometheus::TextEncoder::new();
        if let Err(e) = enc.encode(&self.registry.gather(), &mut buf) {
            tracing::error!("encoding metrics: {e}");
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Brings `ditto_store_errors_total` up to the store's own running totals, and sets
    /// `ditto_store_degraded` from `degraded` (the kind of failure while the disk tier is off). Safe to
    /// call concurrently: each error is counted once, and a total lower than one already seen is
    /// ignored.
    pub fn observe_store(&self, stats: &StoreStats, degraded: Option<FaultKind>) {
        let totals = [
            stats.write_errors,
            stats.read_errors,
            stats.verify_failures + stats.corrupt_records,
        ];
        for ((kind, total), seen) in STORE_ERROR_KINDS
            .iter()
            .zip(totals)
            .zip(self.store_errors_seen.iter())
        {
            let before = seen.fetch_max(total, Ordering::Relaxed);
            self.store_errors
                .with_label_values(&[kind])
                .inc_by(total.saturating_sub(before));
        }
        for kind in FaultKind::ALL {
            self.store_degraded
                .with_label_values(&[kind.as_str()])
                .set(i64::from(degraded == Some(kind)));
        }
        let before = self
            .store_writes_skipped_seen
            .fetch_max(stats.writes_skipped, Ordering::Relaxed);
        self.store_writes_skipped
            .inc_by(stats.writes_skipped.saturating_sub(before));
        self.store_write_queue_bytes
            .set(i64::try_from(stats.write_queue_bytes).unwrap_or(i64::MAX));
    }

    /// The current savings totals (LAN and WAN bytes summed over peers).
    pub fn savings_now(&self) -> SavingsSample {
        SavingsSample {
            t: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            lan_sent: sum_counter(&self.lan_bytes, "direction", "sent"),
            wan_sent: sum_counter(&self.wan_bytes, "direction", "sent"),
            dedup_saved: self.dedup_saved.get(),
            compression_saved: self.compression_saved.get(),
        }
    }

    /// Counts a flow.
    pub fn flow(&self, outcome: &str, reason: &str) {
        self.flows.with_label_values(&[outcome, reason]).inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Sums a counter family over all label sets.
pub fn sum_counter(v: &IntCounterVec, label: &str, value: &str) -> u64 {
    let mut total = 0;
    for mf in prometheus::core::Collector::collect(v) {
        for m in mf.get_metric() {
            if m.get_label()
                .iter()
                .any(|l| l.get_name() == label && l.get_value() == value)
            {
                total += m.get_counter().get_value() as u64;
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_metrics_construct_and_render() {
        let m = Metrics::new();
        m.flow("accelerated", "ok");
        m.lan_bytes.with_label_values(&["b", "sent"]).inc_by(10);
        m.tunnel_up.with_label_values(&["b"]).set(1);
        let text = m.render();
        for name in [
            "ditto_lan_bytes_total",
            "ditto_flows_total",
            "ditto_tunnel_up",
            "ditto_dedup_saved_bytes_total",
            "ditto_peer_auth_failures_total",
            "ditto_store_chunks",
            "ditto_store_errors_total{kind=\"write\"} 0",
            "ditto_store_errors_total{kind=\"corrupt\"} 0",
            "ditto_store_degraded{reason=\"disk-full\"} 0",
            "ditto_store_writes_skipped_total 0",
            "ditto_store_write_queue_bytes 0",
            "ditto_flows_total{outcome=\"passthrough\",reason=\"peer-down\"} 0",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
        assert_eq!(sum_counter(&m.lan_bytes, "direction", "sent"), 10);
        assert_eq!(m.savings_now().lan_sent, 10);
    }

    #[test]
    fn store_skipped_writes_and_queue_depth() {
        let m = Metrics::new();
        let st = |skipped, queued| StoreStats {
            writes_skipped: skipped,
            write_queue_bytes: queued,
            ..StoreStats::default()
        };
        m.observe_store(&st(5, 1000), None);
        m.observe_store(&st(5, 1000), None);
        assert_eq!(m.store_writes_skipped.get(), 5);
        m.observe_store(&st(9, 0), None);
        // A lower total (seen by a racing caller) never takes the counter back.
        m.observe_store(&st(7, 0), None);
        assert_eq!(m.store_writes_skipped.get(), 9);
        assert_eq!(m.store_write_queue_bytes.get(), 0);
    }

    #[test]
    fn store_errors_by_kind_and_degraded_state() {
        let m = Metrics::new();
        let errors = |kind: &str| m.store_errors.with_label_values(&[kind]).get();
        let degraded = |r: &str| m.store_degraded.with_label_values(&[r]).get();
        let st = |write, read, verify, corrupt| StoreStats {
            write_errors: write,
            read_errors: read,
            verify_failures: verify,
            corrupt_records: corrupt,
            ..StoreStats::default()
        };
        m.observe_store(&st(3, 1, 2, 1), Some(FaultKind::DiskFull));
        m.observe_store(&st(3, 1, 2, 1), Some(FaultKind::DiskFull));
        assert_eq!(
            (errors("write"), errors("read"), errors("corrupt")),
            (3, 1, 3)
        );
        assert_eq!((degraded("disk-full"), degraded("io-error")), (1, 0));
        // A lower total (a scrape racing another) is not subtracted; the reason can change.
        m.observe_store(&st(2, 1, 2, 1), Some(FaultKind::Io));
        assert_eq!(errors("write"), 3);
        assert_eq!((degraded("disk-full"), degraded("io-error")), (0, 1));
        m.observe_store(&st(5, 1, 2, 1), None);
        assert_eq!(errors("write"), 5);
        assert_eq!(FaultKind::ALL.map(|k| degraded(k.as_str())), [0, 0, 0]);
    }

    #[test]
    fn history_is_bounded_and_ordered() {
        let h = History::new(3);
        for i in 0..5u64 {
            h.push(SavingsSample {
                t: i as f64,
                lan_sent: i,
                ..Default::default()
            });
        }
        let got: Vec<u64> = h.samples().iter().map(|s| s.lan_sent).collect();
        assert_eq!(got, [2, 3, 4]);
        assert_eq!(History::new(0).capacity, 1);
    }
}
