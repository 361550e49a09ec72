//! What `ditto status`, `/status` and the status page show, and the gauges refreshed before a
//! scrape.

use crate::codec::Engine;
use crate::intercept::InterceptSpec;
use crate::metrics::Metrics;
use crate::peer::PeerSet;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Everything the status is made from.
pub struct StatusSource {
    pub name: String,
    pub fingerprint: String,
    pub started: Instant,
    pub peers: Arc<PeerSet>,
    pub metrics: Metrics,
    pub engine: Engine,
    pub intercept: Option<InterceptSpec>,
    pub routes: usize,
    /// Whether our nftables rules are in the kernel now.
    pub rules_installed: Arc<AtomicBool>,
    pub(crate) announced: Arc<crate::node::Announced>,
    /// Store verify failures already added to the counter.
    pub store_verify_seen: AtomicU64,
}

/// `GET /status`: what `ditto status` prints.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Status {
    pub node: String,
    pub fingerprint: String,
    pub uptime_seconds: f64,
    pub peers: Vec<PeerStatus>,
    /// Peer groups: each member's health and its share of flows.
    #[serde(default)]
    pub groups: Vec<crate::group::GroupStatus>,
    pub flows_active: i64,
    pub flows: Vec<FlowCount>,
    pub lan_bytes_sent: u64,
    pub lan_bytes_received: u64,
    pub wan_bytes_sent: u64,
    pub wan_bytes_received: u64,
    pub dedup_saved_bytes: u64,
    pub compression_saved_bytes: u64,
    pub store_bytes: Option<u64>,
    pub store_chunks: Option<u64>,
    /// Why the store's disk tier is off (new chunks kept in RAM only), while it is.
    pub store_degraded: Option<String>,
    /// Transparent interception, when configured.
    pub intercept: Option<InterceptStatus>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct InterceptStatus {
    pub mode: String,
    /// The nftables table(s) ditto owns.
    pub table: String,
    /// Whether the rules are in the kernel now (false while stopping).
    pub rules_installed: bool,
    pub preserve_client: bool,
    pub routes: usize,
    /// Prefixes this node announces to the site's routers (configured).
    #[serde(default)]
    pub announce: Vec<String>,
    /// Whether they are announced now (from once a tunnel is up until the drain at a stop ends).
    #[serde(default)]
    pub announced: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct PeerStatus {
    pub name: String,
    pub fingerprint: String,
    pub address: Option<String>,
    pub up: bool,
    pub connections: usize,
    pub streams: usize,
    pub rtt_ms: Option<f64>,
    pub lan_bytes_sent: u64,
    pub lan_bytes_received: u64,
    pub wan_bytes_sent: u64,
    pub wan_bytes_received: u64,
    pub reconnects: u64,
    /// Streams waiting for this peer now (no tunnel connection answers).
    pub held_streams: usize,
    /// Streams that continued on another tunnel connection after theirs was lost.
    pub resumed_streams: u64,
    /// Tunnel connections that answer.
    pub healthy_connections: usize,
    /// The peer speaks no tunnel protocol version in common with us.
    pub version_mismatch: bool,
    /// What we know of the peer's store from its summaries (absent without a summary exchange:
    /// a peer of protocol version 3, or an engine without a store).
    #[serde(default)]
    pub summary: Option<crate::peer::SummaryStatus>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct FlowCount {
    pub outcome: String,
    pub reason: String,
    pub count: u64,
}

impl StatusSource {
    /// The status now.
    pub fn status(&self) -> Status {
        let inner = self;
        let m = &inner.metrics;
        let peers: Vec<PeerStatus> = inner
            .peers
            .list
            .iter()
            .map(|p| {
                let st = p.stats();
                PeerStatus {
                    name: p.name.to_string(),
                    fingerprint: p.fingerprint.to_string(),
                    address: p.address.clone(),
                    up: st.links > 0,
                    connections: st.links,
                    streams: st.streams,
                    rtt_ms: st.rtt.map(|d| d.as_secs_f64() * 1000.0),
                    lan_bytes_sent: p.m.lan_sent.get(),
                    lan_bytes_received: p.m.lan_received.get(),
                    wan_bytes_sent: p.m.wan_sent.get(),
                    wan_bytes_received: p.m.wan_received.get(),
                    reconnects: p.m.reconnects.get(),
                    held_streams: st.held,
                    resumed_streams: p.m.resumed.get(),
                    healthy_connections: st.healthy_links,
                    version_mismatch: p.version_mismatch.load(Ordering::Relaxed),
                    summary: p.summary_status(),
                }
            })
            .collect();
        let mut flows = Vec::new();
        for mf in prometheus::core::Collector::collect(&m.flows) {
            for x in mf.get_metric() {
                let label = |n: &str| {
                    x.get_label()
                        .iter()
                        .find(|l| l.get_name() == n)
                        .map(|l| l.get_value().to_owned())
                        .unwrap_or_default()
                };
                flows.push(FlowCount {
                    outcome: label("outcome"),
                    reason: label("reason"),
                    count: x.get_counter().get_value() as u64,
                });
            }
        }
        let usage = inner.engine.store_usage();
        Status {
            node: inner.name.clone(),
            fingerprint: inner.fingerprint.clone(),
            uptime_seconds: inner.started.elapsed().as_secs_f64(),
            lan_bytes_sent: peers.iter().map(|p| p.lan_bytes_sent).sum(),
            lan_bytes_received: peers.iter().map(|p| p.lan_bytes_received).sum(),
            wan_bytes_sent: peers.iter().map(|p| p.wan_bytes_sent).sum(),
            wan_bytes_received: peers.iter().map(|p| p.wan_bytes_received).sum(),
            peers,
            groups: inner.peers.groups.iter().map(|g| g.status()).collect(),
            flows_active: m.flows_active.get(),
            flows,
            dedup_saved_bytes: m.dedup_saved.get(),
            compression_saved_bytes: m.compression_saved.get(),
            store_bytes: usage.map(|u| u.0),
            store_chunks: usage.map(|u| u.1),
            intercept: inner.intercept.as_ref().map(|i| InterceptStatus {
                mode: i.mode.as_str().to_owned(),
                table: i.names.table.clone(),
                rules_installed: inner.rules_installed.load(Ordering::Relaxed),
                preserve_client: i.preserve_client,
                routes: inner.routes,
                announce: i.announce.iter().map(|n| n.to_string()).collect(),
                announced: inner.announced.is_announced(),
            }),
            store_degraded: match &inner.engine {
                Engine::Dedup { store, .. } => store.degraded().map(|d| {
                    format!(
                        "{}: {}; off for {}s, {} failed attempts, next retry in {}s",
                        d.kind,
                        d.reason,
                        d.since.as_secs(),
                        d.failures,
                        d.retry_in.as_secs()
                    )
                }),
                Engine::Raw { .. } => None,
            },
        }
    }

    /// Refreshes gauges that are sampled rather than counted, and the counters fed from the store's own
    /// totals (before a /metrics scrape).
    pub fn refresh_gauges(&self) {
        let inner = self;
        let m = &inner.metrics;
        if let Engine::Dedup { store, .. } = &inner.engine {
            let st = store.stats();
            m.store_bytes
                .set(i64::try_from(st.bytes).unwrap_or(i64::MAX));
            m.store_chunks
                .set(i64::try_from(st.chunks).unwrap_or(i64::MAX));
            m.observe_store(&st, store.degraded().map(|d| d.kind));
            let vf = st.verify_failures;
            let seen = inner.store_verify_seen.fetch_max(vf, Ordering::Relaxed);
            m.verify_failures.inc_by(vf.saturating_sub(seen));
        }
        m.up_seconds.set(inner.started.elapsed().as_secs_f64());
    }
}
