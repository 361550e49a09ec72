//! A running ditto node: the wiring of its parts (peers and their sessions, the link shell, LAN
//! listeners and flows, admin endpoint) and graceful shutdown. This is the one module that knows
//! all the others; they know only the small contexts they are given.

use crate::codec::Engine;
use crate::flows::{FlowEnv, ForwardSpec};
use crate::group::GroupSpec;
use crate::identity::{Fingerprint, Identity};
use crate::intercept::{InterceptSpec, RouteAction, RouteSpec};
use crate::lifecycle::Lifecycle;
use crate::link::LinkEnv;
use crate::metrics::Metrics;
use crate::peer::{Peer, PeerSet, PeerSpec};
use crate::settings::Settings;
use crate::status::{Status, StatusSource};
use crate::stream::RetainBudget;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

/// Everything a node needs to start.
#[derive(Clone)]
pub struct NodeSpec {
    pub name: String,
    pub identity: Identity,
    pub engine: Engine,
    pub tunnel_listen: Option<SocketAddr>,
    pub peers: Vec<PeerSpec>,
    /// Peer groups (scale-out): forwards and routes may name a group instead of a peer.
    pub groups: Vec<GroupSpec>,
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
    #[error("group {group:?}: {why}")]
    BadGroup { group: String, why: String },
    #[error("installing interception rules: {0}")]
    Rules(#[from] crate::rules::RulesError),
}

/// A started node. Dropping it without [`Node::shutdown`] aborts its tasks at runtime shutdown.
pub struct Node {
    name: String,
    fingerprint: Fingerprint,
    settings: Settings,
    intercept: Option<InterceptSpec>,
    rules_installed: Arc<AtomicBool>,
    announced: Arc<Announced>,
    peers: Arc<PeerSet>,
    metrics: Metrics,
    life: Lifecycle,
    status: Arc<StatusSource>,
    pub tunnel_addr: Option<SocketAddr>,
    pub forward_addrs: Vec<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, NodeError> {
    crate::sock::listen(addr).map_err(|source| NodeError::Bind { what, addr, source })
}

/// Groups name configured peers, each at most once, and no group shares a name with a peer.
fn check_groups(spec: &NodeSpec) -> Result<(), NodeError> {
    for (i, g) in spec.groups.iter().enumerate() {
        let bad = |why: String| NodeError::BadGroup {
            group: g.name.clone(),
            why,
        };
        if g.members.is_empty() {
            return Err(bad("no members".into()));
        }
        if spec.peers.iter().any(|p| p.name == g.name)
            || spec.groups[..i].iter().any(|o| o.name == g.name)
        {
            return Err(bad("the name is taken by a peer or another group".into()));
        }
        for (j, m) in g.members.iter().enumerate() {
            if !spec.peers.iter().any(|p| &p.name == m) {
                return Err(bad(format!("member {m:?} is not a configured peer")));
            }
            if g.members[..j].contains(m) {
                return Err(bad(format!("member {m:?} is listed twice")));
            }
        }
    }
    Ok(())
}

impl Node {
    /// Binds every listener (so address errors surface here) and starts all tasks.
    pub async fn start(spec: NodeSpec) -> Result<Node, NodeError> {
        let metrics = Metrics::new();
        // Streams peers open wait here for a flow; beyond this many, they are refused (busy).
        let (incoming_tx, incoming_rx) = mpsc::channel(spec.settings.max_flows.max(1));
        check_groups(&spec)?;
        let peers = Arc::new(PeerSet::new(
            &spec.peers,
            &spec.groups,
            &spec.settings.session(),
            &metrics,
            incoming_tx,
        ));
        for f in &spec.forwards {
            if let Some(p) = &f.peer {
                if peers.carrier(p).is_none() {
                    return Err(NodeError::UnknownPeer {
                        listen: f.listen,
                        peer: p.clone(),
                    });
                }
            }
        }
        for r in &spec.routes {
            if let RouteAction::Peer(p) = &r.action {
                if peers.carrier(p).is_none() {
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
                peers.list.iter().map(|p| p.fingerprint),
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
        let life = Lifecycle::default();
        let rules_installed = Arc::new(AtomicBool::new(spec.intercept.is_some()));
        let announced = Arc::new(Announced::default());
        let links = Arc::new(LinkEnv {
            name: spec.name.clone(),
            identity: spec.identity.clone(),
            engine: spec.engine.clone(),
            settings: spec.settings.clone(),
            metrics: metrics.clone(),
            peers: peers.clone(),
            life: life.clone(),
            server_tls,
            preauth: crate::preauth::PreAuth::new(
                spec.settings.handshakes_per_source,
                spec.settings.max_handshakes,
            ),
            session_id: crate::codec::random_u128(),
        });
        let flows = Arc::new(FlowEnv {
            name: spec.name.clone(),
            engine: spec.engine.clone(),
            settings: spec.settings.clone(),
            metrics: metrics.clone(),
            peers: peers.clone(),
            life: life.clone(),
            admission: Arc::new(Semaphore::new(spec.settings.max_flows.max(1))),
            retained: RetainBudget::new(spec.settings.retain_budget),
            intercept: spec.intercept.clone(),
            routes: spec.routes.clone(),
        });
        let status = Arc::new(StatusSource {
            name: spec.name.clone(),
            fingerprint: spec.identity.fingerprint.to_string(),
            started: Instant::now(),
            peers: peers.clone(),
            metrics: metrics.clone(),
            engine: spec.engine.clone(),
            intercept: spec.intercept.clone(),
            routes: spec.routes.len(),
            rules_installed: rules_installed.clone(),
            announced: announced.clone(),
            store_verify_seen: AtomicU64::new(0),
        });
        for p in &peers.list {
            life.tasks.spawn(p.clone().run_timer(life.kill.clone()));
        }
        if let Some(i) = spec.intercept.as_ref().filter(|i| !i.announce.is_empty()) {
            let (i, peers, stop) = (i.clone(), peers.clone(), life.stop.clone());
            life.tasks
                .spawn(announce_when_ready(i, peers, announced.clone(), stop));
        }
        // Limits reached at the end of a burst are reported too, within a minute.
        let (limits, kill) = (metrics.limits.clone(), life.kill.clone());
        life.tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = tick.tick() => limits.flush(),
                    _ = kill.cancelled() => return,
                }
            }
        });
        life.tasks
            .spawn(crate::flows::accept_streams(flows.clone(), incoming_rx));
        let tunnel_addr = tunnel_listener.as_ref().and_then(|l| l.local_addr().ok());
        if let Some(l) = tunnel_listener {
            life.tasks.spawn(crate::link::accept_loop(links.clone(), l));
        }
        for p in &peers.list {
            if p.address.is_some() {
                for slot in 0..spec.settings.connections.max(1) {
                    life.tasks
                        .spawn(crate::link::dial_loop(links.clone(), p.clone(), slot));
                }
            }
        }
        let mut forward_addrs = Vec::new();
        for (l, f) in forward_listeners {
            forward_addrs.push(l.local_addr().unwrap_or(f.listen));
            life.tasks
                .spawn(crate::flows::forward_loop(flows.clone(), l, f));
        }
        if let Some(mode) = spec.intercept.as_ref().map(|i| i.mode) {
            for l in intercept_listeners {
                life.tasks
                    .spawn(crate::flows::intercept_loop(flows.clone(), l, mode));
            }
        }
        let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());
        if let Some(l) = admin_listener {
            life.tasks
                .spawn(crate::admin::serve(status.clone(), life.clone(), l));
        }
        tracing::info!(
            node = %spec.name,
            fingerprint = %spec.identity.fingerprint,
            backlog = crate::sock::listen_backlog(),
            max_flows = spec.settings.max_flows,
            tunnel = ?tunnel_addr,
            admin = ?admin_addr,
            "node started"
        );
        Ok(Node {
            name: spec.name,
            fingerprint: spec.identity.fingerprint,
            settings: spec.settings,
            intercept: spec.intercept,
            rules_installed,
            announced,
            peers,
            metrics,
            life,
            status,
            tunnel_addr,
            forward_addrs,
            admin_addr,
        })
    }

    /// The node's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Our key fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// A peer by name.
    pub fn peer(&self, name: &str) -> Option<&Arc<Peer>> {
        self.peers.by_name(name)
    }

    /// Waits until at least `n` tunnel connections to `peer` are up; false on timeout or unknown
    /// peer. For tests and the demo: synchronisation without sleeping.
    pub async fn wait_connections(&self, peer: &str, n: usize, timeout: Duration) -> bool {
        match self.peers.by_name(peer) {
            Some(p) => p.wait_links(n, timeout).await,
            None => false,
        }
    }

    /// Waits until no tunnel connection to `peer` is up.
    pub async fn wait_disconnected(&self, peer: &str, timeout: Duration) -> bool {
        match self.peers.by_name(peer) {
            Some(p) => p.wait_no_links(timeout).await,
            None => false,
        }
    }

    /// Bytes held in all stream queues of this node, see [`crate::session::Buffered`].
    pub fn buffered_bytes(&self) -> crate::session::Buffered {
        let mut t = crate::session::Buffered::default();
        for p in &self.peers.list {
            t += p.buffered();
        }
        t
    }

    /// The JSON status (what `ditto status` shows).
    pub fn status(&self) -> Status {
        self.status.status()
    }

    /// A token cancelled when the node begins shutting down.
    pub fn stopping(&self) -> CancellationToken {
        self.life.stop.clone()
    }

    /// Graceful stop: no new flows or connections, GOAWAY to peers, open flows get the drain
    /// timeout to finish, then what remains is reset and everything is closed.
    pub async fn shutdown(self) {
        let life = &self.life;
        tracing::info!(node = %self.name, "shutting down: draining flows");
        // New connections go straight to their destinations from now on; the packets of open flows
        // still reach them until the drain ends. So do the site's routers keep sending this
        // appliance what they sent it: withdrawn now, the open flows' packets would be routed to
        // the other appliances, which never saw them.
        stop_diverting(&self);
        life.stop.cancel();
        for p in &self.peers.list {
            p.with(|s, _| s.go_away());
        }
        life.flows.close();
        if tokio::time::timeout(self.settings.drain_timeout, life.flows.wait())
            .await
            .is_err()
        {
            tracing::warn!(node = %self.name, "drain timeout: resetting remaining flows");
        }
        if let Some(i) = &self.intercept {
            let (names, announced) = (i.names.clone(), self.announced.clone());
            let _ = tokio::task::spawn_blocking(move || {
                announced.withdraw(&names);
                match crate::rules::remove_interception(&names) {
                    Ok(()) => tracing::info!(table = %names.table, "interception rules removed"),
                    Err(e) => {
                        tracing::error!(table = %names.table, "removing interception rules: {e}")
                    }
                }
            })
            .await;
        }
        // Streams still open are reset, and the RSTs get a moment to leave before the links close,
        // so the peer does not hold them for nothing.
        for p in &self.peers.list {
            p.with(|s, _| s.reset_all(crate::frame::ResetReason::Shutdown));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        life.kill.cancel();
        life.tasks.close();
        life.flows.wait().await;
        life.tasks.wait().await;
        tracing::info!(node = %self.name, "stopped");
    }
}

/// How long a starting node waits for a tunnel before it announces its prefixes anyway.
const ANNOUNCE_WAIT: Duration = Duration::from_secs(10);

/// Whether the node's prefixes are announced; set and cleared under its lock, with the routes.
#[derive(Default)]
pub(crate) struct Announced(std::sync::Mutex<AnnounceState>);

#[derive(Default)]
struct AnnounceState {
    announced: bool,
    /// Withdrawn for good (the node is stopping): never announced again.
    done: bool,
}

impl Announced {
    fn lock(&self) -> std::sync::MutexGuard<'_, AnnounceState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn is_announced(&self) -> bool {
        self.lock().announced
    }

    fn announce(&self, spec: &InterceptSpec) {
        let mut st = self.lock();
        if st.done {
            return;
        }
        match crate::rules::announce(spec) {
            Ok(()) => {
                st.announced = true;
                let prefixes: Vec<String> = spec.announce.iter().map(|n| n.to_string()).collect();
                tracing::info!(
                    table = spec.names.announce_table,
                    "announcing {} to the site's routers",
                    prefixes.join(", ")
                );
            }
            Err(e) => tracing::error!(
                table = spec.names.announce_table,
                "announcing the prefixes failed, this appliance attracts no traffic: {e}"
            ),
        }
    }

    fn withdraw(&self, names: &crate::intercept::RuleNames) {
        let mut st = self.lock();
        st.done = true;
        if std::mem::take(&mut st.announced) {
            crate::rules::withdraw(names);
            tracing::info!(table = names.announce_table, "announced prefixes withdrawn");
        }
    }
}

/// Announces the node's prefixes once a tunnel to some peer is up (or after [`ANNOUNCE_WAIT`]):
/// an appliance that just started attracts flows only when it can accelerate them.
async fn announce_when_ready(
    spec: InterceptSpec,
    peers: Arc<PeerSet>,
    announced: Arc<Announced>,
    stop: CancellationToken,
) {
    let deadline = tokio::time::Instant::now() + ANNOUNCE_WAIT;
    while tokio::time::Instant::now() < deadline
        && !peers.list.iter().any(|p| p.connection_count() > 0)
    {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = stop.cancelled() => return,
        }
    }
    let _ = tokio::task::spawn_blocking(move || announced.announce(&spec)).await;
}

fn stop_diverting(inner: &Node) {
    let Some(i) = &inner.intercept else { return };
    if !inner.rules_installed.swap(false, Ordering::SeqCst) {
        return;
    }
    match crate::rules::stop_diverting(i) {
        Ok(()) => tracing::info!(table = %i.names.table, "new connections no longer intercepted"),
        Err(e) => tracing::error!(table = %i.names.table, "stopping interception: {e}"),
    }
}
