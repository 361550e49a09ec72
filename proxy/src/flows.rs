//! LAN flows: forward and interception listeners, the near side (LAN client → OPEN), the far side
//! (OPEN → connect to the destination), and pass-through when a flow cannot or must not be
//! accelerated.

use crate::allow::AllowList;
use crate::codec::Engine;
use crate::frame::{OpenTarget, ResetReason};
use crate::intercept::{self, InterceptSpec, Mode, RouteAction, RouteSpec};
use crate::lifecycle::Lifecycle;
use crate::metrics::{reason, Metrics};
use crate::peer::{Incoming, Peer, PeerSet};
use crate::session::OpenError;
use crate::settings::Settings;
use crate::sock;
use crate::stream::{self, FlowCtx, FlowEnd, RetainBudget};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};

/// Client bytes read at accept time to leave with the OPEN.
const OPEN_INITIAL: usize = 32 * 1024;

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

/// What flows need from the node.
pub struct FlowEnv {
    pub name: String,
    pub engine: Engine,
    pub settings: Settings,
    pub metrics: Metrics,
    pub peers: Arc<PeerSet>,
    pub life: Lifecycle,
    /// Accelerated flows at once (both kinds); LAN clients beyond it pass through.
    pub admission: Arc<Semaphore>,
    pub retained: Arc<RetainBudget>,
    pub intercept: Option<InterceptSpec>,
    pub routes: Vec<RouteSpec>,
}

fn flow_ctx(inner: &FlowEnv, peer: &Peer) -> FlowCtx {
    let m = &inner.metrics;
    FlowCtx {
        lan_sent: peer.m.lan_sent.clone(),
        lan_received: peer.m.lan_received.clone(),
        dedup_saved: m.dedup_saved.clone(),
        compression_saved: m.compression_saved.clone(),
        references: m.dedup_references.clone(),
        needs: m.dedup_needs.clone(),
        chunk_misses: m.chunk_misses.clone(),
        verify_failures: m.verify_failures.clone(),
        resets: m.stream_resets.clone(),
        send_queue_limit: inner.settings.send_queue_limit,
        retained: inner.retained.clone(),
    }
}

/// Decrements `ditto_flows_active` when the flow ends, however it ends.
struct ActiveFlow(prometheus::IntGauge);

impl ActiveFlow {
    fn new(g: &prometheus::IntGauge) -> ActiveFlow {
        g.inc();
        ActiveFlow(g.clone())
    }
}

impl Drop for ActiveFlow {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What to do with one LAN connection.
struct Plan {
    /// Where the flow goes: "host:port" (forward) or the original destination (intercepted).
    target: OpenTarget,
    /// Pass-through connects from the client's own address.
    spoof: bool,
    route: Route,
    /// The `reason` label of the flow once accelerated: how it reached us.
    via: &'static str,
}

enum Route {
    Peer(Arc<Peer>),
    /// Pass through, with this reason.
    Pass(&'static str),
}

impl PeerSet {
    /// The route of a flow to `dest` sent to the peer or group called `name`.
    fn route(&self, name: &str, dest: &str) -> Route {
        match self.carrier(name).and_then(|c| c.pick(dest)) {
            Some(p) => Route::Peer(p),
            None => Route::Pass(reason::NO_PEER),
        }
    }
}

impl Plan {
    /// A client of a `[[forward]]` listener.
    fn forward(inner: &FlowEnv, spec: &ForwardSpec) -> Plan {
        let route = match (&spec.peer, spec.bypass) {
            (_, true) => Route::Pass(reason::BYPASS_RULE),
            (None, _) => Route::Pass(reason::NO_PEER),
            (Some(name), false) => inner.peers.route(name, &spec.target),
        };
        Plan {
            target: OpenTarget {
                dest: spec.target.clone(),
                client: None,
            },
            spoof: false,
            route,
            via: "forward",
        }
    }

    /// A diverted client that was connecting to `dst`.
    fn intercepted(inner: &FlowEnv, mode: Mode, client: SocketAddr, dst: SocketAddr) -> Plan {
        let route = match intercept::classify(&inner.routes, dst) {
            Some(RouteAction::Peer(name)) => inner.peers.route(name, &dst.to_string()),
            Some(RouteAction::Bypass) => Route::Pass(reason::BYPASS_RULE),
            None => Route::Pass(reason::NO_ROUTE),
        };
        let preserve = inner.intercept.as_ref().is_some_and(|i| i.preserve_client);
        Plan {
            target: OpenTarget {
                dest: dst.to_string(),
                client: Some(SocketAddr::new(
                    intercept::canonical(client.ip()),
                    client.port(),
                )),
            },
            spoof: preserve,
            route,
            via: mode.as_str(),
        }
    }

    /// The address pass-through connects from, if not our own.
    fn source(&self) -> Option<IpAddr> {
        self.target.client.filter(|_| self.spoof).map(|c| c.ip())
    }
}

/// Accepts LAN clients on a forward listener until the node stops.
pub(crate) async fn forward_loop(inner: Arc<FlowEnv>, listener: TcpListener, spec: ForwardSpec) {
    let label = spec.listen.to_string();
    accept_loop(inner, listener, label, move |inner, _lan, _from| {
        Some(Plan::forward(inner, &spec))
    })
    .await;
}

/// Accepts diverted LAN clients on an interception listener until the node stops.
pub(crate) async fn intercept_loop(inner: Arc<FlowEnv>, listener: TcpListener, mode: Mode) {
    let label = format!(
        "{} {}",
        mode.as_str(),
        listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    );
    accept_loop(inner, listener, label, move |inner, lan, from| {
        let dst = match intercept::original_dst(mode, lan) {
            Ok(d) => d.0,
            Err(e) => {
                tracing::warn!(%from, "{} connection without an original destination: {e}", mode.as_str());
                return None;
            }
        };
        // A connection to this host itself (possible inline, where ditto listens on the real
        // ports): forwarding it would connect to ourselves, again and again.
        if intercept::is_local(dst.ip()) {
            tracing::debug!(%from, %dst, "intercepted connection to this host: refused");
            return None;
        }
        Some(Plan::intercepted(inner, mode, from, dst))
    })
    .await;
}

async fn accept_loop<F>(inner: Arc<FlowEnv>, listener: TcpListener, label: String, plan: F)
where
    F: Fn(&FlowEnv, &TcpStream, SocketAddr) -> Option<Plan>,
{
    loop {
        // Every client is accepted at once: past the flow limit, flows pass through (never wait
        // in the kernel's backlog, which would hang them or overflow into resets).
        let (lan, from) = tokio::select! {
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    if e.raw_os_error() == Some(libc_emfile()) || e.raw_os_error() == Some(libc_enfile()) {
                        inner.metrics.limits.hit(crate::limits::OPEN_FILES, 0);
                    } else {
                        tracing::warn!(listen = %label, "accept: {e}");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                        _ = inner.life.stop.cancelled() => return,
                    }
                }
            },
            _ = inner.life.stop.cancelled() => return,
        };
        sock::tune_lan(&lan);
        tracing::debug!(%from, listen = %label, "LAN connection");
        let Some(p) = plan(&inner, &lan, from) else {
            sock::reset(lan);
            continue;
        };
        let inner2 = inner.clone();
        inner.life.flows.spawn(async move {
            near_flow(inner2, lan, p).await;
        });
    }
}

/// EMFILE and ENFILE (Linux): the process's or the system's open file limit.
fn libc_emfile() -> i32 {
    24
}
fn libc_enfile() -> i32 {
    23
}

async fn near_flow(inner: Arc<FlowEnv>, lan: TcpStream, plan: Plan) {
    let _active = ActiveFlow::new(&inner.metrics.flows_active);
    let peer = match &plan.route {
        Route::Pass(why) => return passthrough(&inner, lan, &plan, why).await,
        Route::Peer(p) => p.clone(),
    };
    // Limits of this node: a flow that would wait for them passes through instead.
    let Ok(permit) = inner.admission.clone().try_acquire_owned() else {
        inner
            .metrics
            .limits
            .hit(crate::limits::MAX_FLOWS, inner.settings.max_flows as u64);
        return passthrough(&inner, lan, &plan, reason::MAX_FLOWS).await;
    };
    if inner.retained.spent() {
        inner.metrics.limits.hit(
            crate::limits::RETAIN_BUDGET,
            inner.settings.retain_budget as u64,
        );
        return passthrough(&inner, lan, &plan, reason::RETAIN_BUDGET).await;
    }
    // Whatever the client already sent leaves right behind the OPEN: no extra round trip, and a
    // server-first protocol (nothing sent yet) is not delayed either.
    let (initial, initial_eof) = match stream::read_waiting(&lan, OPEN_INITIAL) {
        Ok(v) => v,
        Err(e) => {
            tracing::debug!("LAN client gone before open: {e}");
            sock::reset(lan);
            return;
        }
    };
    let opened = match (peer.view(), peer.open(plan.target.clone())) {
        (Some(view), Ok(h)) => Ok((h, view)),
        (_, Err(OpenError::TooLarge)) => {
            tracing::error!(target = %plan.target.dest, "destination too long for an OPEN frame");
            sock::reset(lan);
            return;
        }
        (_, Err(OpenError::NoLink)) | (None, Ok(_)) => {
            if peer.version_mismatch.load(Ordering::Relaxed) {
                Err(reason::VERSION)
            } else {
                Err(reason::PEER_DOWN)
            }
        }
        (_, Err(OpenError::Unresponsive)) => Err(reason::PEER_UNRESPONSIVE),
        (_, Err(OpenError::Full)) => {
            let limit = peer.with(|s, _| s.peer_max_streams()).unwrap_or(0);
            inner
                .metrics
                .limits
                .hit(crate::limits::PEER_STREAMS, u64::from(limit));
            Err(reason::TUNNEL_BUSY)
        }
        (_, Err(OpenError::GoingAway)) => Err(reason::TUNNEL_BUSY),
    };
    let (handle, view) = match opened {
        Ok(v) => v,
        Err(why) => {
            drop(permit);
            return passthrough_with(&inner, lan, &plan, why, initial, initial_eof).await;
        }
    };
    let (mut enc, dec) = inner.engine.pair(&view, peer.version());
    let mut out = Vec::new();
    if !initial.is_empty() {
        enc.write(&initial, &mut out);
    }
    if initial_eof {
        enc.finish(&mut out);
    } else if !initial.is_empty() {
        enc.flush(&mut out);
    }
    stream::send_data(&handle, enc.as_ref(), &mut out, &mut false);
    peer.m.lan_sent.inc_by(initial.len() as u64);
    // Counted when it opens (a flow the peer then refuses as busy is also counted as `peer-busy`).
    inner.metrics.flow("accelerated", plan.via);
    // The bytes that went in the OPEN are the replay's first (kept only until the peer answers).
    let replay = stream::Replay::new(initial, initial_eof);
    let ctx = flow_ctx(&inner, &peer);
    let end = stream::bridge(lan, handle, enc, dec, initial_eof, &ctx, Some(replay)).await;
    drop(permit);
    if let FlowEnd::Refused { lan, sent, eof } = end {
        inner.metrics.limits.hit(crate::limits::PEER_BUSY, 0);
        passthrough_with(&inner, lan, &plan, reason::PEER_BUSY, sent, eof).await;
    }
}

/// Takes the streams peers open and starts a flow for each, until the node stops.
pub(crate) async fn accept_streams(inner: Arc<FlowEnv>, mut rx: mpsc::Receiver<Incoming>) {
    loop {
        let inc = tokio::select! {
            i = rx.recv() => match i { Some(i) => i, None => return },
            _ = inner.life.kill.cancelled() => return,
        };
        far_flow(&inner, inc);
    }
}

/// Starts the far side of a stream the peer opened: connect to its destination, then bridge.
fn far_flow(inner: &Arc<FlowEnv>, inc: Incoming) {
    let Incoming {
        peer,
        handle: h,
        target,
        view,
    } = inc;
    let Ok(permit) = inner.admission.clone().try_acquire_owned() else {
        inner.metrics.flow("rejected", "over-capacity");
        inner
            .metrics
            .limits
            .hit(crate::limits::FAR_FLOWS, inner.settings.max_flows as u64);
        h.reset(ResetReason::Busy);
        return;
    };
    if inner.life.stop.is_cancelled() {
        h.reset(ResetReason::Shutdown);
        return;
    }
    let inner2 = inner.clone();
    inner.life.flows.spawn(async move {
        let _active = ActiveFlow::new(&inner2.metrics.flows_active);
        // Servers see the real client when we are configured (and placed) to connect from its
        // address.
        let source = target
            .client
            .filter(|_| inner2.intercept.as_ref().is_some_and(|i| i.preserve_client))
            .map(|c| c.ip());
        let dest = target.dest;
        let allow = Some(&peer.allow.list);
        let connect = connect(&dest, source, allow, inner2.settings.connect_timeout);
        let r = tokio::select! {
            r = connect => r,
            _ = inner2.life.kill.cancelled() => Err(ConnectError::new(ResetReason::Shutdown)),
        };
        let lan = match r {
            Ok(s) => s,
            Err(e) if e.reason == ResetReason::Denied => {
                peer.allow.refused(&peer.name, &dest);
                inner2.metrics.flow("failed", ResetReason::Denied.as_str());
                h.reset(ResetReason::Denied);
                return;
            }
            Err(e) => {
                // Out of ports (a burst to one destination): one rate-limited line, not one
                // per flow.
                if !e.count_limit(&inner2.metrics.limits) {
                    tracing::info!(peer = %peer.name, %dest, "destination connect failed: {e}");
                }
                inner2.metrics.flow("failed", e.reason.as_str());
                h.reset(e.reason);
                return;
            }
        };
        inner2.metrics.flow("accelerated", "from-peer");
        let (enc, dec) = inner2.engine.pair(&view, peer.version());
        let ctx = flow_ctx(&inner2, &peer);
        stream::bridge(lan, h, enc, dec, false, &ctx, None).await;
        drop(permit);
    });
}

/// Why a connect to a destination failed: the reason reported to the peer, and the OS error.
#[derive(Debug)]
struct ConnectError {
    reason: ResetReason,
    error: Option<std::io::Error>,
}

impl ConnectError {
    fn new(reason: ResetReason) -> Self {
        ConnectError {
            reason,
            error: None,
        }
    }

    fn io(e: std::io::Error) -> Self {
        let reason = match e.kind() {
            std::io::ErrorKind::ConnectionRefused => ResetReason::Refused,
            _ => ResetReason::Unreachable,
        };
        ConnectError {
            reason,
            error: Some(e),
        }
    }

    /// If no local port was free for another connection to that address and port, counts the
    /// limit (which logs it, rate-limited) and returns true.
    fn count_limit(&self, limits: &crate::limits::LimitLog) -> bool {
        let out_of_ports = self
            .error
            .as_ref()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::AddrNotAvailable);
        if out_of_ports {
            limits.hit(crate::limits::LOCAL_PORTS, sock::local_port_range());
        }
        out_of_ports
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.reason.as_str())?;
        match &self.error {
            Some(e) => write!(f, " ({e})"),
            None => Ok(()),
        }
    }
}

/// Connects to "host:port" (from `source`'s address when given), mapping failures to the reason
/// reported to the peer. With `allow`, only to addresses it permits (each resolved address is
/// checked): `Denied` if there is none.
async fn connect(
    dest: &str,
    source: Option<IpAddr>,
    allow: Option<&AllowList>,
    timeout: Duration,
) -> Result<TcpStream, ConnectError> {
    let permits = |a: SocketAddr| allow.is_none_or(|l| l.permits(a));
    let s = match (source, dest.parse::<SocketAddr>()) {
        (Some(_), Ok(dst)) if !permits(dst) => return Err(ConnectError::new(ResetReason::Denied)),
        (Some(src), Ok(dst)) => intercept::connect_from(dst, src, timeout)
            .await
            .map_err(|e| {
                tracing::debug!(%dst, %src, "transparent connect: {e}");
                ConnectError::io(e)
            })?,
        _ => {
            let attempt = async {
                let mut last = ConnectError::new(ResetReason::Unreachable);
                let addrs = tokio::net::lookup_host(dest)
                    .await
                    .map_err(ConnectError::io)?;
                let (mut tried, mut denied) = (false, false);
                for a in addrs {
                    if !permits(a) {
                        denied = true;
                        continue;
                    }
                    tried = true;
                    match TcpStream::connect(a).await {
                        Ok(s) => return Ok(s),
                        Err(e) => last = ConnectError::io(e),
                    }
                }
                Err(if denied && !tried {
                    ConnectError::new(ResetReason::Denied)
                } else {
                    last
                })
            };
            tokio::time::timeout(timeout, attempt)
                .await
                .map_err(|_| ConnectError::new(ResetReason::Unreachable))??
        }
    };
    sock::tune_lan(&s);
    Ok(s)
}

async fn passthrough(inner: &FlowEnv, lan: TcpStream, plan: &Plan, why: &'static str) {
    passthrough_with(inner, lan, plan, why, Vec::new(), false).await;
}

/// Connects the client straight to its destination, unaccelerated. Half-closes and resets are
/// carried across like in the tunnel.
async fn passthrough_with(
    inner: &FlowEnv,
    lan: TcpStream,
    plan: &Plan,
    why: &'static str,
    initial: Vec<u8>,
    initial_eof: bool,
) {
    let target = &plan.target.dest;
    inner.metrics.flow("passthrough", why);
    tracing::debug!(%target, reason = why, "pass-through flow");
    let server = tokio::select! {
        r = connect(target, plan.source(), None, inner.settings.connect_timeout) => r,
        _ = inner.life.kill.cancelled() => Err(ConnectError::new(ResetReason::Shutdown)),
    };
    let mut server = match server {
        Ok(s) => s,
        Err(e) => {
            e.count_limit(&inner.metrics.limits);
            tracing::debug!(%target, "pass-through connect failed: {e}");
            sock::reset(lan);
            return;
        }
    };
    let mut lan = lan;
    let ok = tokio::select! {
        ok = splice(&mut lan, &mut server, &initial, initial_eof) => ok,
        _ = inner.life.kill.cancelled() => false,
    };
    if ok {
        sock::finished(&lan);
        sock::finished(&server);
    } else {
        sock::set_reset_on_close(&lan);
        sock::set_reset_on_close(&server);
    }
}

/// Copies both ways until both directions ended; false if either side reset or failed.
async fn splice(
    a: &mut TcpStream,
    b: &mut TcpStream,
    a_initial: &[u8],
    a_initial_eof: bool,
) -> bool {
    let (mut ar, mut aw) = a.split();
    let (mut br, mut bw) = b.split();
    let a_to_b = async {
        if !a_initial.is_empty() {
            bw.write_all(a_initial).await?;
        }
        if !a_initial_eof {
            copy_half(&mut ar, &mut bw).await?;
        }
        bw.shutdown().await
    };
    let b_to_a = async {
        copy_half(&mut br, &mut aw).await?;
        aw.shutdown().await
    };
    // Either direction failing ends the flow: the other is abandoned and both sockets reset.
    let r = tokio::try_join!(a_to_b, b_to_a);
    r.is_ok()
}

async fn copy_half(
    r: &mut tokio::net::tcp::ReadHalf<'_>,
    w: &mut tokio::net::tcp::WriteHalf<'_>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        w.write_all(&buf[..n]).await?;
    }
}
