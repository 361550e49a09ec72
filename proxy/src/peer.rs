//! A peer we trust, and the thin shell around its [`Session`]: the lock, the wake-ups of the tasks
//! that wait on it (flows, link writers, the timer), and the session's replacement when the peer
//! process restarts.
//!
//! Every call into the session goes through [`Peer::with`], which runs it under the lock and then,
//! with the lock released, wakes whoever the session said has news. Streams opened by the peer are
//! handed to flows through a channel: nothing here spawns a flow.

use crate::codec::{Engine, View};
use crate::frame::{OpenTarget, ResetReason};
use crate::group::{GroupSpec, PeerGroup};
use crate::hello::Hello;
use crate::identity::Fingerprint;
use crate::metrics::Metrics;
use crate::session::{
    Buffered, DownEvents, Event, Half, LinkId, OpenError, PeerParams, Session, SessionConfig,
    SessionStats, UpEvents,
};
use bytes::Bytes;
use ditto_dedup::summary::ReconcileStats;
use ditto_dedup::{Reconciler, Summarizer};
use prometheus::{Counter, Gauge, IntCounter, IntCounterVec, IntGauge};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

/// A stream the peer opened, for a flow to take.
pub struct Incoming {
    pub peer: Arc<Peer>,
    pub handle: StreamHandle,
    pub target: OpenTarget,
    pub view: View,
}

/// What a peer is configured as.
#[derive(Clone, Debug)]
pub struct PeerSpec {
    pub name: String,
    pub fingerprint: Fingerprint,
    /// Where to dial it ("host:port"); `None` for a peer that only dials us.
    pub address: Option<String>,
    /// What its OPENs may connect to.
    pub allow: crate::allow::AllowList,
}

/// The configured peers, by name and by key, and the groups they form.
pub struct PeerSet {
    pub list: Vec<Arc<Peer>>,
    by_fingerprint: HashMap<Fingerprint, Arc<Peer>>,
    pub groups: Vec<PeerGroup>,
}

/// Where flows sent to a configured name go: one peer, or a group's member chosen per destination.
pub enum Carrier<'a> {
    Peer(&'a Arc<Peer>),
    Group(&'a PeerGroup),
}

impl Carrier<'_> {
    /// The peer that carries a flow to `dest` (see [`PeerGroup::home`]); its state decides whether
    /// the flow is accelerated or passes through, and why. `None` for a group without members.
    pub fn pick(&self, dest: &str) -> Option<Arc<Peer>> {
        match self {
            Carrier::Peer(p) => Some((*p).clone()),
            Carrier::Group(g) => g.home(dest),
        }
    }
}

impl PeerSet {
    /// Group members that name no peer are left out (the node refuses such a spec first).
    pub fn new(
        specs: &[PeerSpec],
        groups: &[GroupSpec],
        cfg: &SessionConfig,
        metrics: &Metrics,
        incoming: mpsc::Sender<Incoming>,
    ) -> PeerSet {
        let list: Vec<Arc<Peer>> = specs
            .iter()
            .map(|s| Arc::new(Peer::new(s, cfg.clone(), metrics, incoming.clone())))
            .collect();
        let by_fingerprint = list.iter().map(|p| (p.fingerprint, p.clone())).collect();
        let groups = groups
            .iter()
            .map(|g| {
                let members = g
                    .members
                    .iter()
                    .filter_map(|m| list.iter().find(|p| &*p.name == m).cloned())
                    .collect();
                PeerGroup::new(&g.name, members, metrics)
            })
            .collect();
        PeerSet {
            list,
            by_fingerprint,
            groups,
        }
    }
    pub fn by_name(&self, name: &str) -> Option<&Arc<Peer>> {
        self.list.iter().find(|p| &*p.name == name)
    }
    /// What a forward or route naming `name` sends its flows to: a peer or a group.
    pub fn carrier(&self, name: &str) -> Option<Carrier<'_>> {
        if let Some(p) = self.by_name(name) {
            return Some(Carrier::Peer(p));
        }
        self.groups
            .iter()
            .find(|g| &*g.name == name)
            .map(Carrier::Group)
    }
    pub fn by_fingerprint(&self, fp: &Fingerprint) -> Option<&Arc<Peer>> {
        self.by_fingerprint.get(fp)
    }
}

/// Per-peer metrics.
#[derive(Clone)]
pub(crate) struct PeerMetrics {
    pub lan_sent: IntCounter,
    pub lan_received: IntCounter,
    pub wan_sent: IntCounter,
    pub wan_received: IntCounter,
    pub up: IntGauge,
    pub connections: IntGauge,
    pub rtt: Gauge,
    pub pacing: IntGauge,
    pub reconnects: IntCounter,
    pub held: IntGauge,
    pub resumed: IntCounter,
    pub held_seconds: Counter,
    pub resets: IntCounterVec,
    pub summary_sent: IntCounter,
    pub summary_received: IntCounter,
    pub summary_rejected: IntCounter,
    pub known_chunks: IntGauge,
    pub store_chunks: IntGauge,
}

/// The store summary exchange with the peer (tunnel protocol version 4 on): our side of it for the
/// current peer session, and what its counters already reported.
#[derive(Default)]
struct SummaryState {
    recon: Option<Reconciler>,
    /// The peer session generation and peer store the reconciler is for: messages and links of
    /// another pair get a new one (links attach, and messages arrive, in no fixed order with the
    /// attach that started a new session).
    recon_for: Option<(u64, u128)>,
    /// Built once, from the engine, at the first attach.
    summarizer: Option<Option<Arc<Summarizer>>>,
    seen: ReconcileStats,
    /// When a refused summary message was last logged, and how many were refused since.
    logged: Option<Instant>,
    unlogged: u64,
}

impl SummaryState {
    /// Makes the reconciler the one for `key` (a new one if it is for another session or peer
    /// store, or there is none); true if it made a new one.
    fn fit_recon(
        &mut self,
        key: (u64, u128),
        view: &Arc<ditto_dedup::PeerView>,
        summ: Option<Arc<Summarizer>>,
    ) -> bool {
        if self.recon.is_some() && self.recon_for == Some(key) {
            return false;
        }
        self.recon = Some(Reconciler::new(view.clone(), summ));
        self.recon_for = Some(key);
        self.seen = ReconcileStats::default();
        true
    }
}

/// What we know of the peer's store from its summaries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SummaryStatus {
    /// Chunks of its store we know of.
    pub known_chunks: u64,
    /// Chunks on its disk, per its latest index.
    pub store_chunks: u64,
    /// Every segment of its latest index is known to its announced length.
    pub in_sync: bool,
}

/// Wake-ups of one stream's owner.
pub(crate) struct StreamWake {
    up: Notify,
    down: Notify,
    reset: CancellationToken,
}

/// Control of one link's tasks.
pub struct LinkCtl {
    pub id: LinkId,
    /// The session generation it belongs to.
    gen: u64,
    /// Frames wait to be written.
    pub wake: Notify,
    /// Close the link.
    pub close: CancellationToken,
    /// The link stopped answering (a dialer dials a replacement).
    pub suspect: CancellationToken,
    /// Why it was closed, from the session's side.
    why: Mutex<Option<String>>,
}

impl LinkCtl {
    pub fn why(&self) -> Option<String> {
        self.why.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    fn close_because(&self, why: String) {
        self.why
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(why);
        self.close.cancel();
    }
}

#[derive(Default)]
struct State {
    session: Option<Session>,
    /// Incremented each time the session is replaced: handles of an older one are dead.
    gen: u64,
    peer_session: u128,
    /// The tunnel protocol version used with the peer's current session (the highest both speak).
    peer_version: u16,
    view: Option<(u128, View)>,
    streams: HashMap<u32, Arc<StreamWake>>,
    links: HashMap<LinkId, Arc<LinkCtl>>,
    /// Session totals already added to the counters.
    resumed_seen: u64,
    held_seen: f64,
}

/// Why a link could not join the peer's session.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("the peer presents our own session id")]
    SameSession,
}

/// A peer node we trust: its session, links and metrics.
pub struct Peer {
    pub name: Arc<str>,
    pub fingerprint: Fingerprint,
    pub address: Option<String>,
    cfg: SessionConfig,
    state: Mutex<State>,
    timer: Notify,
    /// Healthy links, for waiters.
    up_tx: watch::Sender<usize>,
    incoming: mpsc::Sender<Incoming>,
    /// The peer speaks no tunnel protocol version we speak (flows pass through as `version`).
    pub(crate) version_mismatch: AtomicBool,
    pub(crate) m: PeerMetrics,
    summaries: Mutex<SummaryState>,
    pub(crate) allow: crate::allow::PeerAllow,
}

impl Peer {
    fn new(
        spec: &PeerSpec,
        cfg: SessionConfig,
        metrics: &Metrics,
        incoming: mpsc::Sender<Incoming>,
    ) -> Peer {
        let n = spec.name.as_str();
        let m = PeerMetrics {
            lan_sent: metrics.lan_bytes.with_label_values(&[n, "sent"]),
            lan_received: metrics.lan_bytes.with_label_values(&[n, "received"]),
            wan_sent: metrics.wan_bytes.with_label_values(&[n, "sent"]),
            wan_received: metrics.wan_bytes.with_label_values(&[n, "received"]),
            up: metrics.tunnel_up.with_label_values(&[n]),
            connections: metrics.tunnel_connections.with_label_values(&[n]),
            rtt: metrics.tunnel_rtt.with_label_values(&[n]),
            pacing: metrics.tunnel_pacing.with_label_values(&[n]),
            reconnects: metrics.tunnel_reconnects.with_label_values(&[n]),
            held: metrics.streams_held.with_label_values(&[n]),
            resumed: metrics.streams_resumed.with_label_values(&[n]),
            held_seconds: metrics.streams_held_seconds.with_label_values(&[n]),
            resets: metrics.stream_resets.clone(),
            summary_sent: metrics.summary_bytes.with_label_values(&[n, "sent"]),
            summary_received: metrics.summary_bytes.with_label_values(&[n, "received"]),
            summary_rejected: metrics.summary_rejected.with_label_values(&[n]),
            known_chunks: metrics.peer_known_chunks.with_label_values(&[n]),
            store_chunks: metrics.peer_store_chunks.with_label_values(&[n]),
        };
        m.up.set(0);
        m.reconnects.inc_by(0);
        Peer {
            name: Arc::from(n),
            fingerprint: spec.fingerprint,
            address: spec.address.clone(),
            cfg,
            state: Mutex::new(State::default()),
            timer: Notify::new(),
            up_tx: watch::channel(0).0,
            incoming,
            version_mismatch: AtomicBool::new(false),
            m,
            summaries: Mutex::default(),
            allow: crate::allow::PeerAllow::new(
                spec.allow.clone(),
                metrics.opens_denied.with_label_values(&[n]),
            ),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Critical sections leave the state consistent at every step; a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the session (if there is one), then wakes whoever has news.
    pub(crate) fn with<R>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Session, Instant) -> R,
    ) -> Option<R> {
        self.with_gen(None, f).map(|(r, _)| r)
    }

    /// [`Peer::with`], only if the session is still generation `expect` (when given); also returns
    /// the generation `f` ran in.
    fn with_gen<R>(
        self: &Arc<Self>,
        expect: Option<u64>,
        f: impl FnOnce(&mut Session, Instant) -> R,
    ) -> Option<(R, u64)> {
        let now = Instant::now();
        let mut st = self.lock();
        let gen = st.gen;
        if expect.is_some_and(|g| g != gen) {
            return None;
        }
        let session = st.session.as_mut()?;
        let deadline = session.poll_timeout();
        let r = f(session, now);
        // The timer sleeps until the session's next deadline: wake it only if that moved earlier.
        let earlier = match (deadline, session.poll_timeout()) {
            (Some(before), Some(after)) => after < before,
            (None, Some(_)) => true,
            _ => false,
        };
        let mut wakes = Vec::new();
        session.take_wakes(&mut wakes);
        let dirty = session.take_dirty();
        let mut events = Vec::new();
        while let Some(e) = session.poll_event() {
            events.push(e);
        }
        let mut notify: Vec<(Arc<StreamWake>, Half, bool)> = Vec::with_capacity(wakes.len());
        for (id, half) in wakes {
            if let Some(w) = st.streams.get(&id) {
                let reset = st
                    .session
                    .as_ref()
                    .is_some_and(|s| s.reset_reason(id).is_some());
                notify.push((w.clone(), half, reset));
            }
        }
        let links: Vec<Arc<LinkCtl>> = dirty
            .iter()
            .filter_map(|l| st.links.get(l).cloned())
            .collect();
        let mut incoming = Vec::new();
        let mut closing = Vec::new();
        let mut summaries = Vec::new();
        let summary_key = st.view.as_ref().map(|(id, v)| ((gen, *id), v.clone()));
        for e in events {
            match e {
                Event::Incoming { stream, target } => {
                    let wake = Arc::new(StreamWake::new());
                    st.streams.insert(stream, wake.clone());
                    let view = st.view.as_ref().map(|(_, v)| v.clone());
                    incoming.push((stream, wake, target, view));
                }
                Event::CloseLink { link, why } => {
                    if let Some(ctl) = st.links.get(&link) {
                        closing.push((ctl.clone(), why));
                    }
                }
                Event::Summary(b) => summaries.push(b),
                Event::LinkSuspect(link) => {
                    if let Some(ctl) = st.links.get(&link) {
                        tracing::info!(peer = %self.name, link = link.0, "tunnel connection stopped answering: new flows avoid it");
                        ctl.suspect.cancel();
                    }
                }
            }
        }
        drop(st);
        for (w, half, reset) in notify {
            if reset {
                w.reset.cancel();
            }
            match half {
                Half::Up => w.up.notify_one(),
                Half::Down => w.down.notify_one(),
            }
        }
        for l in links {
            l.wake.notify_one();
        }
        for (ctl, why) in closing {
            ctl.close_because(why);
        }
        let mut refused = Vec::new();
        for (stream, wake, target, view) in incoming {
            let handle = StreamHandle {
                peer: self.clone(),
                gen,
                id: stream,
                wake,
            };
            let Some(view) = view else {
                refused.push(handle);
                continue;
            };
            let inc = Incoming {
                peer: self.clone(),
                handle,
                target,
                view,
            };
            if let Err(e) = self.incoming.try_send(inc) {
                let inc = match e {
                    mpsc::error::TrySendError::Full(i) | mpsc::error::TrySendError::Closed(i) => i,
                };
                refused.push(inc.handle);
            }
        }
        for h in refused {
            h.reset(ResetReason::Busy);
        }
        if earlier {
            self.timer.notify_one();
        }
        if let (false, Some((key, View::Dedup(v)))) = (summaries.is_empty(), summary_key) {
            self.on_summaries(key, &v, summaries);
        }
        Some((r, gen))
    }

    /// A link finished its hello: it joins the session with the peer process that sent `hello`,
    /// replacing the session with an earlier process of the peer (whose streams are then gone).
    pub(crate) fn attach(
        self: &Arc<Self>,
        hello: &Hello,
        our_session: u128,
        engine: &Engine,
    ) -> Result<Arc<LinkCtl>, AttachError> {
        if hello.session_id == our_session {
            return Err(AttachError::SameSession);
        }
        let now = Instant::now();
        let mut st = self.lock();
        let new_session = st.session.is_none() || st.peer_session != hello.session_id;
        if new_session {
            let had = st.session.is_some();
            let old_streams = st.session.as_ref().map_or(0, |s| s.stats(now).streams);
            let old = std::mem::take(&mut st.streams);
            let old_links = std::mem::take(&mut st.links);
            st.gen += 1;
            st.peer_session = hello.session_id;
            st.peer_version = crate::hello::version_with(hello).unwrap_or(0);
            st.resumed_seen = 0;
            st.held_seen = 0.0;
            st.session = Some(Session::new(
                self.cfg.clone(),
                PeerParams {
                    window: hello.window,
                    max_streams: hello.max_streams,
                    odd: our_session < hello.session_id,
                },
                now,
            ));
            if had {
                tracing::warn!(
                    peer = %self.name,
                    streams = old_streams,
                    "peer process restarted: resetting the streams of its previous session"
                );
                self.m
                    .resets
                    .with_label_values(&[ResetReason::PeerRestarted.as_str()])
                    .inc_by(old_streams as u64);
            }
            for w in old.values() {
                w.reset.cancel();
                w.up.notify_one();
                w.down.notify_one();
            }
            for l in old_links.values() {
                l.close_because("the peer process restarted".into());
            }
            // What the peer had not yet written to disk is gone with its process: forget what we
            // marked; its summaries tell what survived.
            if let (true, Some((id, View::Dedup(v)))) = (had, &st.view) {
                if *id == hello.store_id {
                    v.clear_marks();
                }
            }
        }
        match &st.view {
            Some((id, _)) if *id == hello.store_id => {}
            old => {
                if let Some((_, old)) = old {
                    tracing::info!(peer = %self.name, "peer has a new store identity; starting a fresh view of it");
                    if let View::Dedup(v) = old {
                        v.discard();
                    }
                }
                st.view = Some((hello.store_id, engine.new_view(hello.store_id)));
            }
        }
        let view = st.view.as_ref().map(|(_, v)| v.clone());
        let gen = st.gen;
        let id = st
            .session
            .as_mut()
            .map(|s| s.add_link(now))
            .unwrap_or(LinkId(0));
        let ctl = Arc::new(LinkCtl {
            id,
            gen,
            wake: Notify::new(),
            close: CancellationToken::new(),
            suspect: CancellationToken::new(),
            why: Mutex::new(None),
        });
        st.links.insert(id, ctl.clone());
        self.publish_links(&st);
        drop(st);
        self.version_mismatch.store(false, Ordering::Relaxed);
        // Waiting streams may have been bound to the new link, which pings at once.
        self.with(|_, _| ());
        self.timer.notify_one();
        let summaries = hello.versions.iter().any(|&v| v >= 4);
        self.start_summaries(summaries, view, (gen, hello.store_id), engine);
        Ok(ctl)
    }

    // ----- store summaries ---------------------------------------------------------------------

    fn summary_state(&self) -> MutexGuard<'_, SummaryState> {
        self.summaries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A link joined: with a peer that speaks summaries, a new peer session (or a new view) gets a
    /// new reconciler, an existing one announces our store on the new link. `key`: the session
    /// generation and the peer's store id the link belongs to.
    fn start_summaries(
        self: &Arc<Self>,
        speaks: bool,
        view: Option<View>,
        key: (u64, u128),
        engine: &Engine,
    ) {
        {
            let mut ss = self.summary_state();
            let summ = ss
                .summarizer
                .get_or_insert_with(|| engine.summarizer())
                .clone();
            match view {
                Some(View::Dedup(v)) if speaks => {
                    if !ss.fit_recon(key, &v, summ) {
                        if let Some(r) = ss.recon.as_mut() {
                            r.link_up();
                        }
                    }
                }
                _ => {
                    ss.recon = None;
                    ss.recon_for = None;
                }
            }
        }
        self.poll_summaries();
    }

    /// Summary messages from the peer, on a link of session generation and peer store `key`.
    fn on_summaries(
        self: &Arc<Self>,
        key: (u64, u128),
        view: &Arc<ditto_dedup::PeerView>,
        bodies: Vec<Bytes>,
    ) {
        let now = Instant::now();
        let mut out = Vec::new();
        {
            let mut ss = self.summary_state();
            let ss = &mut *ss;
            // They may arrive before the attach that started this session reached here.
            if let Some(summ) = ss.summarizer.clone() {
                ss.fit_recon(key, view, summ);
            }
            let Some(r) = ss.recon.as_mut() else {
                return;
            };
            for b in &bodies {
                if let Err(e) = r.on_message(b, now, &mut out) {
                    // One line a minute at most, with the count since the last.
                    ss.unlogged += 1;
                    if ss
                        .logged
                        .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60))
                    {
                        tracing::warn!(
                            peer = %self.name,
                            refused = ss.unlogged,
                            "store summary from the peer refused: {e}; nothing of it is believed"
                        );
                        ss.logged = Some(now);
                        ss.unlogged = 0;
                    }
                }
            }
            self.note_summaries(ss);
        }
        self.send_summaries(out);
    }

    /// Periodic summary work (announce our store's changes, ask again what was lost).
    fn poll_summaries(self: &Arc<Self>) {
        let mut out = Vec::new();
        {
            let mut ss = self.summary_state();
            let Some(r) = ss.recon.as_mut() else {
                return;
            };
            r.poll(Instant::now(), &mut out);
            self.note_summaries(&mut ss);
        }
        self.send_summaries(out);
    }

    fn send_summaries(self: &Arc<Self>, out: Vec<Vec<u8>>) {
        if !out.is_empty() {
            self.with(move |s, _| {
                for b in out {
                    s.send_summary(b);
                }
            });
        }
    }

    fn note_summaries(&self, ss: &mut SummaryState) {
        let Some(r) = ss.recon.as_ref() else {
            return;
        };
        let now = r.stats();
        let was = ss.seen;
        self.m
            .summary_sent
            .inc_by(now.bytes_sent.saturating_sub(was.bytes_sent));
        self.m
            .summary_received
            .inc_by(now.bytes_received.saturating_sub(was.bytes_received));
        self.m
            .summary_rejected
            .inc_by(now.rejected.saturating_sub(was.rejected));
        self.m.known_chunks.set(r.view().summarized_chunks() as i64);
        self.m.store_chunks.set(now.peer_chunks as i64);
        ss.seen = now;
    }

    /// What we know of the peer's store from its summaries (`None` without a summary exchange).
    pub fn summary_status(&self) -> Option<SummaryStatus> {
        let ss = self.summary_state();
        let r = ss.recon.as_ref()?;
        Some(SummaryStatus {
            known_chunks: r.view().summarized_chunks(),
            store_chunks: r.stats().peer_chunks,
            in_sync: r.in_sync(),
        })
    }

    /// Our view of the peer's store, once a link told us which store it has.
    pub fn view(&self) -> Option<View> {
        self.lock().view.as_ref().map(|(_, v)| v.clone())
    }

    /// The tunnel protocol version used with the peer's current session: what its decoders
    /// understand. (A stream opened in an earlier session is reset with it, so reading this after
    /// the stream was opened always describes the decoder that stream reaches.)
    pub fn version(&self) -> u16 {
        self.lock().peer_version
    }

    /// The link's tasks ended: its streams continue on other links.
    pub(crate) fn detach_link(self: &Arc<Self>, ctl: &LinkCtl) {
        let current = {
            let mut st = self.lock();
            let current = st.gen == ctl.gen;
            if current {
                st.links.remove(&ctl.id);
            }
            current
        };
        if current {
            self.with(|s, now| s.link_closed(ctl.id, now));
        }
        self.publish_links(&self.lock());
    }

    /// Tells waiters and the gauges how many links are attached. Called with the state locked:
    /// two links attaching at once on two threads must not publish their counts out of order
    /// (a stale 1 after 2 would leave the count wrong until the next change).
    fn publish_links(&self, st: &State) {
        let n = st.links.len();
        self.m.connections.set(n as i64);
        self.m.up.set(i64::from(n > 0));
        self.up_tx.send_replace(n);
    }

    /// Opens a stream to `target`.
    pub fn open(self: &Arc<Self>, target: OpenTarget) -> Result<StreamHandle, OpenError> {
        let (id, gen) = match self.with_gen(None, move |s, _| s.open(target)) {
            None => return Err(OpenError::NoLink),
            Some((r, gen)) => (r?, gen),
        };
        // A wake-up dispatched before this registration is not lost: the flow looks at the
        // stream's state before it first waits.
        let wake = Arc::new(StreamWake::new());
        let mut st = self.lock();
        if st.gen == gen {
            st.streams.insert(id, wake.clone());
        }
        drop(st);
        Ok(StreamHandle {
            peer: self.clone(),
            gen,
            id,
            wake,
        })
    }

    /// Whether a new stream could be opened now.
    pub fn can_open(&self) -> Result<(), OpenError> {
        match &self.lock().session {
            None => Err(OpenError::NoLink),
            Some(s) => s.can_open(),
        }
    }

    /// Runs the session's timers until `stop` is cancelled; refreshes the peer's gauges.
    pub(crate) async fn run_timer(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let deadline = self.lock().session.as_ref().and_then(|s| s.poll_timeout());
            // Never longer than a second: the gauges stay fresh, and a deadline that moved earlier
            // without a wake-up (a link attached) is late by at most that.
            let cap = tokio::time::Instant::now() + Duration::from_secs(1);
            let sleep = match deadline {
                Some(d) => tokio::time::Instant::from_std(d).min(cap),
                None => cap,
            };
            tokio::select! {
                _ = tokio::time::sleep_until(sleep) => {}
                _ = self.timer.notified() => {}
                _ = stop.cancelled() => return,
            }
            if Instant::now() >= deadline.unwrap_or_else(Instant::now) {
                self.with(|s, now| s.handle_timeout(now));
            }
            self.poll_summaries();
            self.refresh_metrics();
        }
    }

    fn refresh_metrics(&self) {
        let mut st = self.lock();
        let Some(stats) = st.session.as_ref().map(|s| s.stats(Instant::now())) else {
            return;
        };
        self.m.held.set(stats.held as i64);
        self.m
            .resumed
            .inc_by(stats.resumed.saturating_sub(st.resumed_seen));
        st.resumed_seen = st.resumed_seen.max(stats.resumed);
        let add = stats.held_seconds - st.held_seen;
        if add > 0.0 {
            self.m.held_seconds.inc_by(add);
            st.held_seen = stats.held_seconds;
        }
        if let Some(rtt) = stats.rtt {
            self.m.rtt.set(rtt.as_secs_f64());
        }
    }

    /// The session's figures now.
    pub fn stats(&self) -> SessionStats {
        self.lock()
            .session
            .as_ref()
            .map(|s| s.stats(Instant::now()))
            .unwrap_or_default()
    }

    /// See [`Session::buffered`].
    pub fn buffered(&self) -> Buffered {
        self.lock()
            .session
            .as_ref()
            .map_or_else(Buffered::default, |s| s.buffered())
    }

    /// Links attached now.
    pub fn connection_count(&self) -> usize {
        self.lock().links.len()
    }

    /// Streams wait for the peer: dial again promptly.
    pub fn holding(&self) -> bool {
        self.stats().held > 0
    }

    /// Waits until `n` links are attached; false on timeout.
    pub async fn wait_links(&self, n: usize, timeout: Duration) -> bool {
        let mut rx = self.up_tx.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|c| *c >= n))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Waits until no link is attached; false on timeout.
    pub async fn wait_no_links(&self, timeout: Duration) -> bool {
        let mut rx = self.up_tx.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|c| *c == 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

impl StreamWake {
    fn new() -> StreamWake {
        StreamWake {
            up: Notify::new(),
            down: Notify::new(),
            reset: CancellationToken::new(),
        }
    }
}

/// A stream's endpoint, held by its flow. Dropping it detaches the stream: what is queued still
/// leaves and is acknowledged; a stream that did not finish both ways is reset.
pub struct StreamHandle {
    peer: Arc<Peer>,
    gen: u64,
    pub id: u32,
    wake: Arc<StreamWake>,
}

impl StreamHandle {
    /// Runs `f` on this stream's session; `None` if the session it belonged to is gone.
    fn op<R>(&self, f: impl FnOnce(&mut Session) -> R) -> Option<R> {
        // Checked inside the lock: in a newer session, this id may be another stream.
        self.peer
            .with_gen(Some(self.gen), |s, _| f(s))
            .map(|(r, _)| r)
    }

    pub fn peer(&self) -> &Arc<Peer> {
        &self.peer
    }

    /// Queues encoded bytes for the peer's decoder.
    pub fn send_data(&self, bytes: Vec<u8>) {
        if !bytes.is_empty() {
            self.op(|s| s.send(self.id, false, Bytes::from(bytes)));
        }
    }

    /// Sets how many DATA bytes the stream's first turn carries (see
    /// [`Session::set_first_turn`]).
    pub fn set_first_turn(&self, bytes: usize) {
        if bytes > 0 {
            self.op(|s| s.set_first_turn(self.id, bytes));
        }
    }

    /// Queues feedback for the peer's encoder.
    pub fn send_feedback(&self, bytes: Vec<u8>) {
        if !bytes.is_empty() {
            self.op(|s| s.send(self.id, true, Bytes::from(bytes)));
        }
    }

    /// FIN after the data queued so far.
    pub fn send_fin(&self) {
        self.op(|s| s.finish(self.id, false));
    }

    /// DONE after the feedback queued so far.
    pub fn send_done(&self) {
        self.op(|s| s.finish(self.id, true));
    }

    /// Aborts the stream.
    pub fn reset(&self, reason: ResetReason) {
        self.op(|s| s.reset(self.id, reason));
        self.wake.reset.cancel();
    }

    /// (DATA bytes queued and not yet sent, feedback bytes likewise).
    pub fn queued(&self) -> (usize, usize) {
        self.op(|s| s.unsent(self.id)).unwrap_or((0, 0))
    }

    /// Bytes kept for this stream until the peer acknowledges them.
    pub fn retained(&self) -> usize {
        self.op(|s| s.retained(self.id)).unwrap_or(0)
    }

    /// The flow consumed `n` DATA bytes.
    pub fn consumed(&self, n: usize) {
        self.op(|s| s.consumed(self.id, n));
    }

    /// Takes what arrived for the sending half.
    pub fn take_up(&self) -> UpEvents {
        self.op(|s| s.take_up(self.id)).unwrap_or(UpEvents {
            reset: Some(ResetReason::PeerRestarted),
            ..Default::default()
        })
    }

    /// Takes what arrived for the receiving half.
    pub fn take_down(&self) -> DownEvents {
        self.op(|s| s.take_down(self.id)).unwrap_or(DownEvents {
            reset: Some(ResetReason::PeerRestarted),
            ..Default::default()
        })
    }

    /// The reset reason, if the stream was reset.
    pub fn reset_reason(&self) -> Option<ResetReason> {
        self.op(|s| s.reset_reason(self.id))
            .unwrap_or(Some(ResetReason::PeerRestarted))
    }

    /// Waits for news for the sending half: feedback, DONE, reset, or room to send.
    pub async fn up_wait(&self) {
        self.wake.up.notified().await;
    }

    /// Wakes the sending half (the receiving half has news for it).
    pub fn wake_up(&self) {
        self.wake.up.notify_one();
    }

    /// Waits for news for the receiving half: data, FIN, or reset.
    pub async fn down_wait(&self) {
        self.wake.down.notified().await;
    }

    /// Completes when the stream is reset.
    pub async fn reset_wait(&self) {
        self.wake.reset.cancelled().await;
    }
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        let mut st = self.peer.lock();
        if st.gen != self.gen {
            return;
        }
        st.streams.remove(&self.id);
        drop(st);
        self.peer.with_gen(Some(self.gen), |s, _| s.detach(self.id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reconciler follows the (session, peer store) pair, whichever comes first of a new
    /// session's links and its first summary messages: the second never replaces what the first
    /// set up (a replacement lost the peer's INDEX, which it sends again only when its store
    /// changes).
    #[test]
    fn one_reconciler_per_session_and_peer_store() {
        let mut ss = SummaryState::default();
        let v = Arc::new(ditto_dedup::PeerView::new(ditto_dedup::StoreId(7)));
        assert!(ss.fit_recon((1, 7), &v, None), "the first link");
        assert!(
            !ss.fit_recon((1, 7), &v, None),
            "a second link of the session"
        );
        assert!(ss.fit_recon((2, 7), &v, None), "messages of a new session");
        assert!(!ss.fit_recon((2, 7), &v, None), "then its attach");
        assert!(ss.fit_recon((2, 8), &v, None), "a new peer store");
    }

    fn test_session_config() -> SessionConfig {
        SessionConfig {
            window: 1 << 20,
            max_streams: 64,
            ping_interval: Duration::from_secs(1),
            suspect_after: Duration::from_secs(2),
            dead_after: Duration::from_secs(30),
            hold: Duration::from_secs(60),
        }
    }

    fn test_spec() -> PeerSpec {
        PeerSpec {
            name: "p".into(),
            fingerprint: Fingerprint([1; 32]),
            address: None,
            allow: crate::allow::AllowList::default(),
        }
    }

    /// Peer "p"'s hello: session 2, this build's protocol version, the raw codec.
    fn test_hello() -> Hello {
        Hello {
            versions: vec![crate::hello::PROTOCOL_VERSION],
            store_id: 9,
            session_id: 2,
            window: 1 << 20,
            max_streams: 64,
            codec: "raw".into(),
            chunking: String::new(),
            name: "p".into(),
        }
    }

    /// A peer restarted as another build is spoken to in the version its new session speaks
    /// (its decoders' ops follow it): down to 4 for a build without TDELTA, back up to 5.
    #[test]
    fn the_peer_version_follows_its_session() {
        let engine = Engine::raw();
        let metrics = Metrics::new();
        let (cfg, spec) = (test_session_config(), test_spec());
        let hello = |session_id, versions: &[u16]| Hello {
            versions: versions.to_vec(),
            session_id,
            ..test_hello()
        };
        let (tx, _rx) = mpsc::channel(1);
        let peer = Arc::new(Peer::new(&spec, cfg, &metrics, tx));
        assert_eq!(peer.version(), 0, "no session yet");
        peer.attach(&hello(2, &[3, 4, 5]), 1, &engine)
            .expect("attach");
        assert_eq!(peer.version(), 5);
        peer.attach(&hello(3, &[3, 4]), 1, &engine).expect("attach");
        assert_eq!(peer.version(), 4, "restarted as an older build");
        peer.attach(&hello(4, &[3, 4, 5, 6, 7]), 1, &engine)
            .expect("attach");
        assert_eq!(
            peer.version(),
            6,
            "a later build: the highest we both speak"
        );
    }

    /// Two links of a session attaching at once on two threads: waiters and the gauge see both,
    /// whatever the order in which the threads finish (a stale count published last once left
    /// `wait_links(2)` waiting forever with two links attached).
    #[test]
    fn links_attaching_at_once_are_all_counted() {
        let engine = Engine::raw();
        let metrics = Metrics::new();
        let (cfg, spec) = (test_session_config(), test_spec());
        let hello = test_hello();
        for round in 0..10_000 {
            let (tx, _rx) = mpsc::channel(1);
            let peer = Arc::new(Peer::new(&spec, cfg.clone(), &metrics, tx));
            let start = std::sync::Barrier::new(2);
            std::thread::scope(|s| {
                for _ in 0..2 {
                    s.spawn(|| {
                        start.wait();
                        peer.attach(&hello, 1, &engine).expect("attach");
                    });
                }
            });
            assert_eq!(peer.connection_count(), 2);
            assert_eq!(*peer.up_tx.borrow(), 2, "round {round}: a stale link count");
            assert_eq!(peer.m.connections.get(), 2, "round {round}: the gauge");
        }
    }
}
