//! A running ditto node: its peers, tunnel listener and dialers, forward listeners, admin endpoint,
//! and graceful shutdown.

use crate::codec::{Engine, View};
use crate::identity::{Fingerprint, Identity};
use crate::intercept::{InterceptSpec, RouteAction, RouteSpec};
use crate::metrics::Metrics;
use crate::mux::Conn;
use crate::sock::WanTuning;
use prometheus::{Gauge, IntCounter, IntGauge};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Tunables of the tunnel and flows. `Default` is what a config without these keys gets.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Tunnel connections kept to each peer we dial.
    pub connections: usize,
    /// DATA bytes we accept per stream before granting more (≥ the bandwidth-delay product for one
    /// stream to fill the link).
    pub window: u32,
    /// Streams we accept from a peer per connection.
    pub max_streams: u32,
    /// Flows (LAN connections, both kinds) the node handles at once; the admission semaphore.
    pub max_flows: usize,
    /// Encoder retention above which a flow stops reading its LAN socket.
    pub retain_limit: usize,
    /// Queued DATA above which a flow stops reading its LAN socket.
    pub send_queue_limit: usize,
    pub ping_interval: Duration,
    /// A connection with no frame for this long is dead.
    pub dead_after: Duration,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// On shutdown, how long open flows get to finish.
    pub drain_timeout: Duration,
    /// TLS handshakes in progress at once on the tunnel listener.
    pub max_handshakes: usize,
    pub wan: WanTuning,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            connections: 2,
            window: 4 << 20,
            max_streams: 1024,
            max_flows: 4096,
            // Raw bytes a stream's encoder keeps until the peer acknowledges them (about one round
            // trip): it bounds a deduplicated stream to retain_limit / RTT (32 MiB at 80 ms: 3.3 Gbit/s).
            retain_limit: 32 << 20,
            send_queue_limit: 256 << 10,
            ping_interval: Duration::from_secs(5),
            dead_after: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(10),
            max_handshakes: 64,
            wan: WanTuning::default(),
        }
    }
}

/// A peer node we trust.
#[derive(Clone, Debug)]
pub struct PeerSpec {
    pub name: String,
    pub fingerprint: Fingerprint,
    /// Where to dial it ("host:port"); `None` for a peer that only dials us.
    pub address: Option<String>,
}

/// A LAN listener forwarding to a fixed destination.
#[derive(Clone, Debug)]
pub struct ForwardSpec {
    pub listen: SocketAddr,
    /// The peer to carry flows through; `None` = always pass through.
    pub peer: Option<String>,
    /// "host:port", connected to by the far node (or by us when passing through).
    pub target: String,
    /// Never accelerate: pass-through with reason `bypass-rule`.
    pub bypass: bool,
}

/// Everything a node needs to start.
#[derive(Clone)]
pub struct NodeSpec {
    pub name: String,
    pub identity: Identity,
    pub engine: Engine,
    pub tunnel_listen: Option<SocketAddr>,
    pub peers: Vec<PeerSpec>,
    pub forwards: Vec<ForwardSpec>,
    /// Admin HTTP endpoint (metrics, health, status).
    pub admin: Option<SocketAddr>,
    /// Transparent interception (`[intercept]`), and the routes that pick a peer for its flows.
    pub intercept: Option<InterceptSpec>,
    pub routes: Vec<RouteSpec>,
    pub settings: Settings,
}

/// Errors starting a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
    #[error("forward on {listen} names peer {peer:?}, which is not configured")]
    UnknownPeer { listen: SocketAddr, peer: String },
    #[error("route names peer {0:?}, which is not configured")]
    UnknownRoutePeer(String),
    #[error("installing interception rules: {0}")]
    Rules(#[from] crate::rules::RulesError),
}

/// Per-peer state: live connections, the view of its store, metrics.
pub struct Peer {
    pub name: Arc<str>,
    pub fingerprint: Fingerprint,
    pub address: Option<String>,
    conns: Mutex<Vec<(Arc<Conn>, View)>>,
    view: Mutex<Option<(u128, View)>>,
    up_tx: watch::Sender<usize>,
    ever_up: AtomicBool,
    /// Connections lost and not yet replaced: the next ones added count as reconnects.
    lost: AtomicU64,
    pub(crate) m: PeerMetrics,
}

#[derive(Clone)]
pub(crate) struct PeerMetrics {
    pub lan_sent: IntCounter,
    pub lan_received: IntCounter,
    pub wan_sent: IntCounter,
    pub wan_received: IntCounter,
    pub up: IntGauge,
    pub connections: IntGauge,
    pub rtt: Gauge,
    pub reconnects: IntCounter,
}

impl Peer {
    fn new(spec: &PeerSpec, metrics: &Metrics) -> Peer {
        let n = spec.name.as_str();
        let m = PeerMetrics {
            lan_sent: metrics.lan_bytes.with_label_values(&[n, "sent"]),
            lan_received: metrics.lan_bytes.with_label_values(&[n, "received"]),
            wan_sent: metrics.wan_bytes.with_label_values(&[n, "sent"]),
            wan_received: metrics.wan_bytes.with_label_values(&[n, "received"]),
            up: metrics.tunnel_up.with_label_values(&[n]),
            connections: metrics.tunnel_connections.with_label_values(&[n]),
            rtt: metrics.tunnel_rtt.with_label_values(&[n]),
            reconnects: metrics.tunnel_reconnects.with_label_values(&[n]),
        };
        m.up.set(0);
        m.reconnects.inc_by(0);
        Peer {
            name: Arc::from(n),
            fingerprint: spec.fingerprint,
            address: spec.address.clone(),
            conns: Mutex::new(Vec::new()),
            view: Mutex::new(None),
            up_tx: watch::channel(0).0,
            ever_up: AtomicBool::new(false),
            lost: AtomicU64::new(0),
            m,
        }
    }

    fn conns(&self) -> std::sync::MutexGuard<'_, Vec<(Arc<Conn>, View)>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The view of the peer's store `store_id`: kept while the peer keeps its store, fresh when the
    /// peer comes back with a new store (it lost what we believed it held).
    pub(crate) fn view_for(&self, store_id: u128, engine: &Engine) -> View {
        let mut v = self.view.lock().unwrap_or_else(|e| e.into_inner());
        match &*v {
            Some((id, view)) if *id == store_id => view.clone(),
            old => {
                if old.is_some() {
                    tracing::info!(peer = %self.name, "peer has a new store identity; starting a fresh view of it");
                }
                let view = engine.new_view(store_id);
                *v = Some((store_id, view.clone()));
                view
            }
        }
    }

    pub(crate) fn add(&self, conn: Arc<Conn>, view: View) {
        let n = {
            let mut c = self.conns();
            c.push((conn, view));
            c.len()
        };
        // A reconnect is a connection that replaces one that was lost, not the second of the
        // connections opened at start or one the peer dialed on its own.
        let replaced = self
            .lost
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| l.checked_sub(1))
            .is_ok();
        self.ever_up.store(true, Ordering::Relaxed);
        if replaced {
            self.m.reconnects.inc();
        }
        self.m.connections.set(n as i64);
        self.m.up.set(1);
        self.up_tx.send_replace(n);
    }

    pub(crate) fn remove(&self, conn: &Arc<Conn>) {
        let n = {
            let mut c = self.conns();
            let before = c.len();
            c.retain(|(x, _)| !Arc::ptr_eq(x, conn));
            if c.len() < before {
                self.lost.fetch_add(1, Ordering::Relaxed);
            }
            c.len()
        };
        self.m.connections.set(n as i64);
        self.m.up.set(i64::from(n > 0));
        self.up_tx.send_replace(n);
    }

    /// The least loaded connection accepting new streams.
    pub(crate) fn pick(&self) -> Option<(Arc<Conn>, View)> {
        self.conns()
            .iter()
            .filter(|(c, _)| c.accepting())
            .min_by_key(|(c, _)| c.stream_count())
            .map(|(c, v)| (c.clone(), v.clone()))
    }

    pub(crate) fn all_conns(&self) -> Vec<Arc<Conn>> {
        self.conns().iter().map(|(c, _)| c.clone()).collect()
    }

    /// Live tunnel connections.
    pub fn connection_count(&self) -> usize {
        self.conns().len()
    }
}

/// Shared state of a node, used by all its tasks.
pub(crate) struct Inner {
    pub name: String,
    pub identity: Identity,
    pub engine: Engine,
    pub settings: Settings,
    pub metrics: Metrics,
    pub peers: Vec<Arc<Peer>>,
    pub by_fingerprint: HashMap<Fingerprint, Arc<Peer>>,
    /// Stop accepting new work (listeners, dialers).
    pub stop: CancellationToken,
    /// Abort everything still running.
    pub kill: CancellationToken,
    /// Long-lived tasks: listeners, dialers, connections.
    pub tasks: TaskTracker,
    /// Flow tasks, waited for (up to the drain timeout) on shutdown.
    pub flows: TaskTracker,
    pub admission: Arc<Semaphore>,
    pub handshakes: Arc<Semaphore>,
    pub conn_seq: AtomicU64,
    pub started: Instant,
    pub server_tls: Option<tokio_rustls::TlsAcceptor>,
    /// Store verify failures already added to the counter.
    pub store_verify_seen: AtomicU64,
    pub intercept: Option<InterceptSpec>,
    pub routes: Vec<RouteSpec>,
    /// Whether our nftables rules are in the kernel now.
    pub rules_installed: AtomicBool,
}

impl Inner {
    pub fn peer(&self, name: &str) -> Option<&Arc<Peer>> {
        self.peers.iter().find(|p| &*p.name == name)
    }
}

/// A started node. Dropping it without [`Node::shutdown`] aborts its tasks at runtime shutdown.
pub struct Node {
    pub(crate) inner: Arc<Inner>,
    pub tunnel_addr: Option<SocketAddr>,
    pub forward_addrs: Vec<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, NodeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| NodeError::Bind { what, addr, source })
}

impl Node {
    /// Binds every listener (so address errors surface here) and starts all tasks.
    pub async fn start(spec: NodeSpec) -> Result<Node, NodeError> {
        let metrics = Metrics::new();
        let peers: Vec<Arc<Peer>> = spec
            .peers
            .iter()
            .map(|p| Arc::new(Peer::new(p, &metrics)))
            .collect();
        let by_fingerprint = peers.iter().map(|p| (p.fingerprint, p.clone())).collect();
        for f in &spec.forwards {
            if let Some(p) = &f.peer {
                if !peers.iter().any(|x| &*x.name == p) {
                    return Err(NodeError::UnknownPeer {
                        listen: f.listen,
                        peer: p.clone(),
                    });
                }
            }
        }
        for r in &spec.routes {
            if let RouteAction::Peer(p) = &r.action {
                if !peers.iter().any(|x| &*x.name == p) {
                    return Err(NodeError::UnknownRoutePeer(p.clone()));
                }
            }
        }
        let tunnel_listener = match spec.tunnel_listen {
            Some(a) => {
                let l = bind("tunnel listener", a).await?;
                crate::sock::clamp_mss(socket2::SockRef::from(&l), &spec.settings.wan, a.is_ipv6());
                Some(l)
            }
            None => None,
        };
        let server_tls = match &tunnel_listener {
            Some(_) => Some(tokio_rustls::TlsAcceptor::from(crate::tls::server_config(
                &spec.identity,
                peers.iter().map(|p| p.fingerprint),
            )?)),
            None => None,
        };
        let mut forward_listeners = Vec::new();
        for f in &spec.forwards {
            forward_listeners.push((bind("forward listener", f.listen).await?, f.clone()));
        }
        let admin_listener = match spec.admin {
            Some(a) => Some(bind("admin endpoint", a).await?),
            None => None,
        };
        // Interception listeners exist before the rules that divert to them, and rules are the
        // last thing that can fail: an error leaves nothing behind in the kernel.
        let mut intercept_listeners = Vec::new();
        if let Some(i) = &spec.intercept {
            for addr in crate::intercept::listen_addrs(i) {
                let transparent = i.mode != crate::intercept::Mode::Redirect;
                let l = crate::intercept::bind_listener(addr, transparent).map_err(|source| {
                    NodeError::Bind {
                        what: "interception listener",
                        addr,
                        source,
                    }
                })?;
                intercept_listeners.push(l);
            }
            crate::rules::install(i)?;
            tracing::info!(
                mode = i.mode.as_str(),
                table = %i.names.table,
                "interception rules installed"
            );
        }
        let inner = Arc::new(Inner {
            name: spec.name,
            identity: spec.identity,
            engine: spec.engine,
            admission: Arc::new(Semaphore::new(spec.settings.max_flows.max(1))),
            handshakes: Arc::new(Semaphore::new(spec.settings.max_handshakes.max(1))),
            settings: spec.settings,
            metrics,
            peers,
            by_fingerprint,
            stop: CancellationToken::new(),
            kill: CancellationToken::new(),
            tasks: TaskTracker::new(),
            flows: TaskTracker::new(),
            conn_seq: AtomicU64::new(1),
            started: Instant::now(),
            server_tls,
            store_verify_seen: AtomicU64::new(0),
            rules_installed: AtomicBool::new(spec.intercept.is_some()),
            intercept: spec.intercept,
            routes: spec.routes,
        });
        let tunnel_addr = tunnel_listener.as_ref().and_then(|l| l.local_addr().ok());
        if let Some(l) = tunnel_listener {
            inner
                .tasks
                .spawn(crate::tunnel::accept_loop(inner.clone(), l));
        }
        for p in &inner.peers {
            if p.address.is_some() {
                for slot in 0..inner.settings.connections.max(1) {
                    inner
                        .tasks
                        .spawn(crate::tunnel::dial_loop(inner.clone(), p.clone(), slot));
                }
            }
        }
        let mut forward_addrs = Vec::new();
        for (l, f) in forward_listeners {
            forward_addrs.push(l.local_addr().unwrap_or(f.listen));
            inner
                .tasks
                .spawn(crate::flows::forward_loop(inner.clone(), l, f));
        }
        if let Some(mode) = inner.intercept.as_ref().map(|i| i.mode) {
            for l in intercept_listeners {
                inner
                    .tasks
                    .spawn(crate::flows::intercept_loop(inner.clone(), l, mode));
            }
        }
        let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());
        if let Some(l) = admin_listener {
            inner.tasks.spawn(crate::admin::serve(inner.clone(), l));
        }
        tracing::info!(
            node = %inner.name,
            fingerprint = %inner.identity.fingerprint,
            tunnel = ?tunnel_addr,
            admin = ?admin_addr,
            "node started"
        );
        Ok(Node {
            inner,
            tunnel_addr,
            forward_addrs,
            admin_addr,
        })
    }

    /// The node's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Our key fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        self.inner.identity.fingerprint
    }

    /// A peer by name.
    pub fn peer(&self, name: &str) -> Option<&Arc<Peer>> {
        self.inner.peer(name)
    }

    /// Waits until at least `n` tunnel connections to `peer` are up; false on timeout or unknown
    /// peer. For tests and the demo: synchronisation without sleeping.
    pub async fn wait_connections(&self, peer: &str, n: usize, timeout: Duration) -> bool {
        let Some(p) = self.inner.peer(peer) else {
            return false;
        };
        let mut rx = p.up_tx.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|c| *c >= n))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Waits until no tunnel connection to `peer` is up.
    pub async fn wait_disconnected(&self, peer: &str, timeout: Duration) -> bool {
        let Some(p) = self.inner.peer(peer) else {
            return false;
        };
        let mut rx = p.up_tx.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|c| *c == 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Bytes held in all tunnel stream queues of this node: (to send, received), see [`Conn::buffered`].
    pub fn buffered_bytes(&self) -> (usize, usize) {
        let mut t = (0, 0);
        for p in &self.inner.peers {
            for c in p.all_conns() {
                let (s, r) = c.buffered();
                t.0 += s;
                t.1 += r;
            }
        }
        t
    }

    /// The JSON status (what `ditto status` shows).
    pub fn status(&self) -> Status {
        status(&self.inner)
    }

    /// A token cancelled when the node begins shutting down.
    pub fn stopping(&self) -> CancellationToken {
        self.inner.stop.clone()
    }

    /// Graceful stop: no new flows or connections, GOAWAY to peers, open flows get the drain
    /// timeout to finish, then everything is closed.
    pub async fn shutdown(self) {
        let inner = self.inner;
        tracing::info!(node = %inner.name, "shutting down: draining flows");
        // New connections go straight to their destinations from now on.
        remove_rules(&inner);
        inner.stop.cancel();
        for p in &inner.peers {
            for c in p.all_conns() {
                c.go_away();
            }
        }
        inner.flows.close();
        if tokio::time::timeout(inner.settings.drain_timeout, inner.flows.wait())
            .await
            .is_err()
        {
            tracing::warn!(node = %inner.name, "drain timeout: resetting remaining flows");
        }
        inner.kill.cancel();
        for p in &inner.peers {
            for c in p.all_conns() {
                c.close("node shutting down");
            }
        }
        inner.tasks.close();
        inner.flows.wait().await;
        inner.tasks.wait().await;
        tracing::info!(node = %inner.name, "stopped");
    }
}

fn remove_rules(inner: &Inner) {
    let Some(i) = &inner.intercept else { return };
    if !inner.rules_installed.swap(false, Ordering::SeqCst) {
        return;
    }
    match crate::rules::remove(&i.names) {
        Ok(()) => tracing::info!(table = %i.names.table, "interception rules removed"),
        Err(e) => tracing::error!(table = %i.names.table, "removing interception rules: {e}"),
    }
}

/// `GET /status`: what `ditto status` prints (it reads this same type back).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Status {
    pub node: String,
    pub fingerprint: String,
    pub uptime_seconds: f64,
    pub peers: Vec<PeerStatus>,
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
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct FlowCount {
    pub outcome: String,
    pub reason: String,
    pub count: u64,
}

pub(crate) fn status(inner: &Inner) -> Status {
    let m = &inner.metrics;
    let peers: Vec<PeerStatus> = inner
        .peers
        .iter()
        .map(|p| {
            let conns = p.all_conns();
            let rtt = conns.iter().filter_map(|c| c.rtt()).min();
            PeerStatus {
                name: p.name.to_string(),
                fingerprint: p.fingerprint.to_string(),
                address: p.address.clone(),
                up: !conns.is_empty(),
                connections: conns.len(),
                streams: conns.iter().map(|c| c.stream_count()).sum(),
                rtt_ms: rtt.map(|d| d.as_secs_f64() * 1000.0),
                lan_bytes_sent: p.m.lan_sent.get(),
                lan_bytes_received: p.m.lan_received.get(),
                wan_bytes_sent: p.m.wan_sent.get(),
                wan_bytes_received: p.m.wan_received.get(),
                reconnects: p.m.reconnects.get(),
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
        fingerprint: inner.identity.fingerprint.to_string(),
        uptime_seconds: inner.started.elapsed().as_secs_f64(),
        lan_bytes_sent: peers.iter().map(|p| p.lan_bytes_sent).sum(),
        lan_bytes_received: peers.iter().map(|p| p.lan_bytes_received).sum(),
        wan_bytes_sent: peers.iter().map(|p| p.wan_bytes_sent).sum(),
        wan_bytes_received: peers.iter().map(|p| p.wan_bytes_received).sum(),
        peers,
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
            routes: inner.routes.len(),
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
pub(crate) fn refresh_gauges(inner: &Inner) {
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
