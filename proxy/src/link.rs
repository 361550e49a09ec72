//! The link shell: tunnel connections (dial with backoff, accept, TLS, hello) and the two tasks
//! per connection that move frames between its socket and the peer's [`Session`]: a reader that
//! parses frames and hands them to the session, and a writer that sends what the session
//! schedules. Nothing here decides anything about streams.
//!
//! [`Session`]: crate::session::Session

use crate::codec::Engine;
use crate::frame;
use crate::hello::{self, Hello, HelloError, VERSIONS};
use crate::identity::Identity;
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::pacing;
use crate::peer::{LinkCtl, Peer, PeerSet};
use crate::session::BATCH_BYTES;
use crate::settings::Settings;
use crate::sock;
use crate::tls;
use bytes::BytesMut;
use prometheus::IntCounter;
use rustls::pki_types::ServerName;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// While streams wait for the peer, a dial attempt gives up after this long (plus two round
/// trips) and the next one starts at once: each attempt sends a fresh SYN instead of waiting out
/// TCP's own SYN retransmission backoff, so a returning path is noticed within about this long.
const HELD_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Pause between dial attempts while streams wait for the peer.
const HELD_RETRY: Duration = Duration::from_millis(100);

/// Why setting up a tunnel connection failed.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("connect to {0}: timed out")]
    ConnectTimeout(String),
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
    #[error("handshake timed out")]
    Timeout,
    #[error("peer did not negotiate ALPN ditto/1")]
    Alpn,
    #[error("peer key {0} is not configured")]
    UnknownKey(String),
    #[error(transparent)]
    Hello(#[from] hello::HelloError),
    #[error("TLS config: {0}")]
    Config(#[from] rustls::Error),
    #[error(transparent)]
    Attach(#[from] crate::peer::AttachError),
}

/// What the link shell needs from the node.
pub struct LinkEnv {
    pub name: String,
    pub identity: Identity,
    pub engine: Engine,
    pub settings: Settings,
    pub metrics: Metrics,
    pub peers: Arc<PeerSet>,
    pub life: Lifecycle,
    pub server_tls: Option<tokio_rustls::TlsAcceptor>,
    /// Connections accepted and not yet authenticated.
    pub preauth: Arc<crate::preauth::PreAuth>,
    /// This process's session id, sent in every hello.
    pub session_id: u128,
}

/// Counts bytes crossing a WAN socket into the peer's counters. Before the peer is known (during
/// the handshake of an accepted connection) bytes are held in `pending` and added at [`bind`].
pub(crate) struct WanCount {
    pending_rx: AtomicU64,
    pending_tx: AtomicU64,
    target: OnceLock<(IntCounter, IntCounter)>,
}

impl WanCount {
    fn new() -> Arc<WanCount> {
        Arc::new(WanCount {
            pending_rx: AtomicU64::new(0),
            pending_tx: AtomicU64::new(0),
            target: OnceLock::new(),
        })
    }
    fn rx(&self, n: u64) {
        match self.target.get() {
            Some((rx, _)) => rx.inc_by(n),
            None => {
                self.pending_rx.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
    fn tx(&self, n: u64) {
        match self.target.get() {
            Some((_, tx)) => tx.inc_by(n),
            None => {
                self.pending_tx.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
    fn bind(&self, peer: &Peer) {
        let _ = self
            .target
            .set((peer.m.wan_received.clone(), peer.m.wan_sent.clone()));
        peer.m
            .wan_received
            .inc_by(self.pending_rx.swap(0, Ordering::Relaxed));
        peer.m
            .wan_sent
            .inc_by(self.pending_tx.swap(0, Ordering::Relaxed));
    }
}

/// A TCP stream that counts what crosses it.
pub(crate) struct Counted {
    inner: TcpStream,
    count: Arc<WanCount>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.count.rx(n as u64);
        }
        r
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &r {
            self.count.tx(*n as u64);
        }
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r {
            self.count.tx(*n as u64);
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

type Tls = tokio_rustls::TlsStream<Counted>;

fn our_hello(env: &LinkEnv) -> Hello {
    Hello {
        versions: VERSIONS.to_vec(),
        store_id: env.engine.store_id(),
        session_id: env.session_id,
        window: env.settings.window,
        max_streams: env.settings.session().max_streams,
        codec: env.engine.codec_name().to_owned(),
        chunking: env.engine.chunking_id(),
        name: env.name.clone(),
    }
}

/// A peer that speaks no version we speak: its flows pass through (reason `version`), and this is
/// logged once, not at every retry.
fn note_version(peer: &Peer, e: &TunnelError) -> bool {
    if let TunnelError::Hello(HelloError::Version { .. }) = e {
        if !peer.version_mismatch.swap(true, Ordering::Relaxed) {
            tracing::error!(peer = %peer.name, "{e}; its flows pass through unaccelerated");
        }
        return true;
    }
    false
}

/// Accepts tunnel connections until the node stops. Accepting never waits: connections not yet
/// authenticated are bounded per address and in all by [`crate::preauth`], and each has
/// `accept_timeout` to complete TLS and hello.
pub(crate) async fn accept_loop(env: Arc<LinkEnv>, listener: TcpListener) {
    let stop = env.life.stop.clone();
    let closed = |why: &str| {
        env.metrics
            .preauth_closed
            .with_label_values(&["tunnel", why])
    };
    loop {
        let (tcp, from) = tokio::select! {
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    if matches!(e.raw_os_error(), Some(23 | 24)) {
                        env.metrics.limits.hit(crate::limits::OPEN_FILES, 0);
                    } else {
                        tracing::warn!("tunnel accept: {e}");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                        _ = stop.cancelled() => return,
                    }
                }
            },
            _ = stop.cancelled() => return,
        };
        let ticket = match env.preauth.admit(from.ip()) {
            crate::preauth::Admit::Ok { ticket, evicted } => {
                if evicted {
                    closed("evicted").inc();
                    env.metrics.limits.hit(
                        crate::limits::TUNNEL_PREAUTH,
                        env.settings.max_handshakes as u64,
                    );
                }
                ticket
            }
            crate::preauth::Admit::PerSource => {
                closed("per-source").inc();
                env.metrics.limits.hit(
                    crate::limits::TUNNEL_PER_SOURCE,
                    env.settings.handshakes_per_source as u64,
                );
                // Closed with RST: nothing of ours lingers in TIME_WAIT or FIN_WAIT.
                sock::reset(tcp);
                continue;
            }
        };
        let env2 = env.clone();
        env.life.tasks.spawn(async move {
            let hs =
                tokio::time::timeout(env2.settings.accept_timeout, accept_handshake(&env2, tcp));
            // A handshake in progress must not hold up a shutdown for its whole timeout; one
            // evicted to make room for a newer connection ends at once.
            let r = tokio::select! {
                r = hs => r,
                _ = ticket.evicted.cancelled() => {
                    tracing::debug!(%from, "unauthenticated tunnel connection evicted");
                    return;
                }
                _ = env2.life.kill.cancelled() => return,
            };
            drop(ticket);
            match r {
                Ok(Ok((tls, peer, hello))) => run_link(&env2, &peer, tls, hello).await,
                Ok(Err((e, peer))) => {
                    if !peer.as_ref().is_some_and(|p| note_version(p, &e)) {
                        env2.metrics.auth_failures.inc();
                        if peer.is_some() {
                            // A configured peer's key: worth a line each.
                            tracing::warn!(%from, "tunnel connection refused: {e}");
                        } else {
                            tracing::debug!(%from, "tunnel connection refused: {e}");
                            env2.metrics
                                .limits
                                .hit(crate::limits::REFUSED_HANDSHAKES, 0);
                        }
                    }
                }
                Err(_) => {
                    env2.metrics.auth_failures.inc();
                    env2.metrics
                        .preauth_closed
                        .with_label_values(&["tunnel", "timeout"])
                        .inc();
                    tracing::debug!(%from, "tunnel connection refused: handshake timed out");
                }
            }
        });
    }
}

type AcceptError = (TunnelError, Option<Arc<Peer>>);

async fn accept_handshake(
    env: &LinkEnv,
    tcp: TcpStream,
) -> Result<(Tls, Arc<Peer>, Hello), AcceptError> {
    sock::tune_wan(&tcp, &env.settings.wan);
    let count = WanCount::new();
    let io = Counted {
        inner: tcp,
        count: count.clone(),
    };
    let acceptor = env.server_tls.clone().ok_or((TunnelError::Timeout, None))?;
    let tls = acceptor
        .accept(io)
        .await
        .map_err(|e| (TunnelError::Tls(e), None))?;
    let (_, state) = tls.get_ref();
    if state.alpn_protocol() != Some(tls::ALPN) {
        return Err((TunnelError::Alpn, None));
    }
    let fp =
        tls::peer_fingerprint(state).ok_or((TunnelError::UnknownKey("(none)".into()), None))?;
    let peer = env
        .peers
        .by_fingerprint(&fp)
        .cloned()
        .ok_or_else(|| (TunnelError::UnknownKey(fp.to_string()), None))?;
    count.bind(&peer);
    let mut tls: Tls = tls.into();
    let theirs = hello::exchange(&mut tls, &our_hello(env))
        .await
        .map_err(|e| (TunnelError::from(e), Some(peer.clone())))?;
    Ok((tls, peer, theirs))
}

async fn dial_once(
    env: &LinkEnv,
    peer: &Arc<Peer>,
    addr: &str,
    connect_timeout: Duration,
) -> Result<(Tls, Hello), TunnelError> {
    let s = &env.settings;
    let target = tokio::time::timeout(connect_timeout, tokio::net::lookup_host(addr))
        .await
        .map_err(|_| TunnelError::ConnectTimeout(addr.to_owned()))?
        .map_err(|source| TunnelError::Connect {
            addr: addr.to_owned(),
            source,
        })?
        .next()
        .ok_or_else(|| TunnelError::Connect {
            addr: addr.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
        })?;
    let sock = if target.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(|source| TunnelError::Connect {
        addr: addr.to_owned(),
        source,
    })?;
    sock::tune_wan_pre_connect(&sock, &s.wan, target.is_ipv6());
    let tcp = tokio::time::timeout(connect_timeout, sock.connect(target))
        .await
        .map_err(|_| TunnelError::ConnectTimeout(addr.to_owned()))?
        .map_err(|source| TunnelError::Connect {
            addr: addr.to_owned(),
            source,
        })?;
    sock::tune_wan(&tcp, &s.wan);
    let count = WanCount::new();
    count.bind(peer);
    let io = Counted { inner: tcp, count };
    let connector =
        tokio_rustls::TlsConnector::from(tls::client_config(&env.identity, peer.fingerprint)?);
    let name = ServerName::try_from(tls::SERVER_NAME).map_err(|_| TunnelError::Alpn)?;
    let hs = async {
        let tls = connector
            .connect(name, io)
            .await
            .map_err(TunnelError::Tls)?;
        if tls.get_ref().1.alpn_protocol() != Some(tls::ALPN) {
            return Err(TunnelError::Alpn);
        }
        let mut tls: Tls = tls.into();
        let theirs = hello::exchange(&mut tls, &our_hello(env)).await?;
        Ok((tls, theirs))
    };
    match tokio::time::timeout(s.handshake_timeout, hs).await {
        Ok(r) => {
            if let Err(e) = &r {
                let counted = matches!(e, TunnelError::Tls(_) | TunnelError::Alpn)
                    || matches!(e, TunnelError::Hello(h) if !matches!(h, HelloError::Version { .. }));
                if counted {
                    env.metrics.auth_failures.inc();
                }
            }
            r
        }
        Err(_) => Err(TunnelError::Timeout),
    }
}

/// Keeps connection `slot` to `peer` up until the node stops. A lost connection is redialed with
/// exponential backoff; while streams wait for the peer, promptly and with short attempts. A
/// connection that stops answering is replaced (it stays attached until it closes, so its streams
/// move only once the replacement is up).
pub(crate) async fn dial_loop(env: Arc<LinkEnv>, peer: Arc<Peer>, slot: usize) {
    let Some(addr) = peer.address.clone() else {
        return;
    };
    let s = env.settings.clone();
    let stop = env.life.stop.clone();
    let mut backoff = s.backoff_min;
    let mut failures = 0u32;
    // The link this slot replaced because it stopped answering: closed once the new one is up.
    let mut replaced: Option<Arc<LinkCtl>> = None;
    let mut had_link = false;
    loop {
        if stop.is_cancelled() {
            return;
        }
        let holding = peer.holding();
        let timeout = if holding {
            let rtt = peer.stats().rtt.unwrap_or_default();
            s.connect_timeout.min(HELD_CONNECT_TIMEOUT + rtt * 2)
        } else {
            s.connect_timeout
        };
        let r = tokio::select! {
            r = dial_once(&env, &peer, &addr, timeout) => r,
            _ = stop.cancelled() => return,
        };
        let mut delay = None;
        match r {
            Ok((tls, hello)) => {
                failures = 0;
                let began = Instant::now();
                match attach(&env, &peer, &hello) {
                    Err(e) => {
                        tracing::warn!(peer = %peer.name, slot, "tunnel connection refused: {e}");
                    }
                    Ok(ctl) => {
                        if let Some(old) = replaced.take() {
                            old.close.cancel();
                        }
                        if std::mem::replace(&mut had_link, true) {
                            peer.m.reconnects.inc();
                        }
                        tracing::info!(peer = %peer.name, slot, link = ctl.id.0, "tunnel connection up (dialed)");
                        let env2 = env.clone();
                        let peer2 = peer.clone();
                        let ctl2 = ctl.clone();
                        env.life.tasks.spawn(async move {
                            serve(&env2, &peer2, tls, ctl2).await;
                        });
                        // Wait until the link closes or stops answering.
                        tokio::select! {
                            _ = ctl.close.cancelled() => {}
                            _ = ctl.suspect.cancelled() => {
                                replaced = Some(ctl.clone());
                                delay = Some(Duration::ZERO);
                            }
                            _ = stop.cancelled() => return,
                        }
                    }
                }
                // A connection that lived a while resets the backoff; one that dies right after
                // the handshake (peer restarting, rejecting us) keeps backing off.
                if began.elapsed() > s.backoff_max.min(Duration::from_secs(10)) {
                    backoff = s.backoff_min;
                }
            }
            Err(e) => {
                failures += 1;
                if note_version(&peer, &e) {
                    // Retried slowly, to notice an upgrade of the peer; never a reconnect loop.
                    delay = Some(s.backoff_max);
                } else if failures == 1 {
                    // The first failure is news; repeats while the peer stays down are noise.
                    tracing::warn!(peer = %peer.name, slot, "tunnel dial failed: {e}; retrying");
                } else {
                    tracing::debug!(peer = %peer.name, slot, failures, "tunnel dial failed: {e}");
                }
            }
        }
        let wait = match delay {
            Some(d) => d,
            None if peer.holding() => HELD_RETRY + jitter(HELD_RETRY),
            None => {
                let d = backoff + jitter(backoff);
                backoff = (backoff * 2).min(s.backoff_max);
                d
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Up to a quarter of `d`, from the clock's low bits: enough to keep dialers of many nodes from
/// reconnecting in lockstep.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    let quarter = d.as_nanos() / 4;
    if quarter == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos((u128::from(nanos) % quarter) as u64)
}

/// Runs an accepted connection until it closes.
async fn run_link(env: &LinkEnv, peer: &Arc<Peer>, tls: Tls, hello: Hello) {
    match attach(env, peer, &hello) {
        Ok(ctl) => {
            tracing::info!(peer = %peer.name, link = ctl.id.0, "tunnel connection up (accepted)");
            serve(env, peer, tls, ctl).await;
        }
        Err(e) => {
            env.metrics.auth_failures.inc();
            tracing::warn!(peer = %peer.name, "tunnel connection refused: {e}");
        }
    }
}

/// Joins the link to the peer's session. A chunking mismatch is worth a warning: streams work,
/// but dedup less.
fn attach(env: &LinkEnv, peer: &Arc<Peer>, hello: &Hello) -> Result<Arc<LinkCtl>, TunnelError> {
    if hello.chunking != env.engine.chunking_id() {
        tracing::warn!(
            peer = %peer.name,
            "peer chunks with {:?}, we chunk with {:?}: streams work but dedup less",
            hello.chunking,
            env.engine.chunking_id()
        );
    }
    Ok(peer.attach(hello, env.session_id, &env.engine)?)
}

/// Moves frames between the socket and the session until the link closes, then detaches it.
async fn serve(env: &LinkEnv, peer: &Arc<Peer>, tls: Tls, ctl: Arc<LinkCtl>) {
    // The pacer's own handle on the socket (a duplicate descriptor): it outlives nothing.
    let wan = &env.settings.wan;
    let pace_fd = wan
        .pacing
        .then(|| tls.get_ref().0.inner.as_fd().try_clone_to_owned().ok())
        .flatten();
    let pace = async {
        match pace_fd {
            Some(fd) => {
                // A fixed `tunnel.socket_buffer` stays as the operator set it.
                let size_buffer = wan.buffer.is_none();
                pacing::run(fd, size_buffer, peer.m.pacing.clone(), &peer.name, ctl.id.0).await
            }
            None => std::future::pending().await,
        }
    };
    let (rd, wr) = tokio::io::split(tls);
    let kill = env.life.kill.clone();
    let why = tokio::select! {
        why = reader(env, peer, &ctl, rd) => why,
        why = writer(peer, &ctl, wr) => why,
        never = pace => match never {},
        _ = ctl.close.cancelled() => ctl.why().unwrap_or_else(|| "closed".into()),
        _ = kill.cancelled() => "node stopped".into(),
    };
    ctl.close.cancel();
    tracing::info!(peer = %peer.name, link = ctl.id.0, "tunnel connection closed: {why}");
    peer.detach_link(&ctl);
}

async fn reader(
    env: &LinkEnv,
    peer: &Arc<Peer>,
    ctl: &LinkCtl,
    mut rd: tokio::io::ReadHalf<Tls>,
) -> String {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut frames = Vec::new();
    loop {
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(64 * 1024);
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) => return "peer closed the connection".into(),
            Ok(_) => {}
            Err(e) => return format!("read: {e}"),
        }
        loop {
            match frame::decode(&mut buf) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => {
                    env.metrics.protocol_errors.inc();
                    tracing::error!(peer = %peer.name, link = ctl.id.0, "tunnel protocol error: {e}");
                    return format!("protocol error: {e}");
                }
            }
        }
        if frames.is_empty() {
            continue;
        }
        let id = ctl.id;
        let r = peer.with(|s, now| {
            for f in frames.drain(..) {
                s.on_frame(id, f, now)?;
            }
            Ok::<(), String>(())
        });
        frames.clear();
        if let Some(Err(why)) = r {
            env.metrics.protocol_errors.inc();
            tracing::error!(peer = %peer.name, link = id.0, "tunnel protocol error: {why}");
            return format!("protocol error: {why}");
        }
    }
}

async fn writer(peer: &Arc<Peer>, ctl: &LinkCtl, mut wr: tokio::io::WriteHalf<Tls>) -> String {
    let mut buf = Vec::with_capacity(BATCH_BYTES + frame::MAX_PAYLOAD + 64);
    loop {
        buf.clear();
        let id = ctl.id;
        if peer.with(|s, _| s.poll_transmit(id, &mut buf)).is_none() {
            return "session ended".into();
        }
        if buf.is_empty() {
            tokio::select! {
                _ = ctl.wake.notified() => {}
                _ = ctl.close.cancelled() => break,
            }
            // Let the tasks that are ready now (and the sockets that became ready) add their
            // frames first: under a burst one write then carries many flows' frames instead of
            // each flow's frames costing a TLS record, a TCP segment and a wake-up of their own.
            tokio::task::yield_now().await;
            continue;
        }
        let r = async {
            wr.write_all(&buf).await?;
            wr.flush().await
        };
        if let Err(e) = r.await {
            return format!("write: {e}");
        }
    }
    // Closing: a TLS close_notify, bounded so a dead peer cannot hold us.
    let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
    ctl.why().unwrap_or_else(|| "closed".into())
}
