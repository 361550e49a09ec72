//! Tunnel connections: dialing with backoff, accepting, the TLS + hello handshake, and the reader
//! and writer tasks that drive a [`Conn`].

use crate::frame::FrameReader;
use crate::hello::{self, Hello, PROTOCOL_VERSION};
use crate::mux::{Conn, ConnObserver, ConnParams};
use crate::node::{Inner, Peer};
use crate::sock;
use crate::tls;
use prometheus::IntCounter;
use rustls::pki_types::ServerName;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

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

fn our_hello(inner: &Inner) -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        store_id: inner.engine.store_id(),
        window: inner.settings.window,
        max_streams: inner.settings.max_streams,
        codec: inner.engine.codec_name().to_owned(),
        chunking: inner.engine.chunking_id(),
        name: inner.name.clone(),
    }
}

/// Accepts tunnel connections until the node stops.
pub(crate) async fn accept_loop(inner: Arc<Inner>, listener: TcpListener) {
    loop {
        let permit = tokio::select! {
            p = inner.handshakes.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = inner.stop.cancelled() => return,
        };
        let (tcp, from) = tokio::select! {
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!("tunnel accept: {e}");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                        _ = inner.stop.cancelled() => return,
                    }
                }
            },
            _ = inner.stop.cancelled() => return,
        };
        let inner2 = inner.clone();
        inner.tasks.spawn(async move {
            let hs = tokio::time::timeout(
                inner2.settings.handshake_timeout,
                accept_handshake(&inner2, tcp),
            );
            // A handshake in progress must not hold up a shutdown for its whole timeout.
            let r = tokio::select! {
                r = hs => r,
                _ = inner2.kill.cancelled() => return,
            };
            drop(permit);
            match r {
                Ok(Ok((tls, peer, hello))) => serve(inner2, peer, tls, hello, false).await,
                Ok(Err(e)) => {
                    inner2.metrics.auth_failures.inc();
                    tracing::warn!(%from, "tunnel connection refused: {e}");
                }
                Err(_) => {
                    inner2.metrics.auth_failures.inc();
                    tracing::warn!(%from, "tunnel connection refused: handshake timed out");
                }
            }
        });
    }
}

async fn accept_handshake(
    inner: &Inner,
    tcp: TcpStream,
) -> Result<(Tls, Arc<Peer>, Hello), TunnelError> {
    sock::tune_wan(&tcp, &inner.settings.wan);
    let count = WanCount::new();
    let io = Counted {
        inner: tcp,
        count: count.clone(),
    };
    let acceptor = inner.server_tls.clone().ok_or(TunnelError::Timeout)?;
    let tls = acceptor.accept(io).await.map_err(TunnelError::Tls)?;
    let (_, state) = tls.get_ref();
    if state.alpn_protocol() != Some(tls::ALPN) {
        return Err(TunnelError::Alpn);
    }
    let fp = tls::peer_fingerprint(state).ok_or(TunnelError::UnknownKey("(none)".into()))?;
    let peer = inner
        .by_fingerprint
        .get(&fp)
        .cloned()
        .ok_or_else(|| TunnelError::UnknownKey(fp.to_string()))?;
    count.bind(&peer);
    let mut tls: Tls = tls.into();
    let theirs = hello::exchange(&mut tls, &our_hello(inner)).await?;
    Ok((tls, peer, theirs))
}

async fn dial_once(
    inner: &Inner,
    peer: &Arc<Peer>,
    addr: &str,
) -> Result<(Tls, Hello), TunnelError> {
    let s = &inner.settings;
    let target = tokio::time::timeout(s.connect_timeout, tokio::net::lookup_host(addr))
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
    let tcp = tokio::time::timeout(s.connect_timeout, sock.connect(target))
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
        tokio_rustls::TlsConnector::from(tls::client_config(&inner.identity, peer.fingerprint)?);
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
        let theirs = hello::exchange(&mut tls, &our_hello(inner)).await?;
        Ok((tls, theirs))
    };
    match tokio::time::timeout(s.handshake_timeout, hs).await {
        Ok(r) => {
            if matches!(
                r,
                Err(TunnelError::Tls(_) | TunnelError::Alpn | TunnelError::Hello(_))
            ) {
                inner.metrics.auth_failures.inc();
            }
            r
        }
        Err(_) => Err(TunnelError::Timeout),
    }
}

/// Keeps connection `slot` to `peer` up, redialing with exponential backoff, until the node stops.
pub(crate) async fn dial_loop(inner: Arc<Inner>, peer: Arc<Peer>, slot: usize) {
    let Some(addr) = peer.address.clone() else {
        return;
    };
    let s = inner.settings.clone();
    let mut backoff = s.backoff_min;
    let mut failures = 0u32;
    loop {
        if inner.stop.is_cancelled() {
            return;
        }
        let r = tokio::select! {
            r = dial_once(&inner, &peer, &addr) => r,
            _ = inner.stop.cancelled() => return,
        };
        match r {
            Ok((tls, hello)) => {
                failures = 0;
                let began = Instant::now();
                serve(inner.clone(), peer.clone(), tls, hello, true).await;
                // A connection that lived a while resets the backoff; one that dies right after the
                // handshake (peer restarting, rejecting us) keeps backing off.
                if began.elapsed() > s.backoff_max.min(Duration::from_secs(10)) {
                    backoff = s.backoff_min;
                }
            }
            Err(e) => {
                failures += 1;
                // The first failure is news; repeats while the peer stays down are noise.
                if failures == 1 {
                    tracing::warn!(peer = %peer.name, slot, "tunnel dial failed: {e}; retrying with backoff");
                } else {
                    tracing::debug!(peer = %peer.name, slot, failures, "tunnel dial failed: {e}");
                }
            }
        }
        let jitter = jitter(backoff);
        tokio::select! {
            _ = tokio::time::sleep(backoff + jitter) => {}
            _ = inner.stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(s.backoff_max);
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

/// Runs an established connection until it closes.
pub(crate) async fn serve(
    inner: Arc<Inner>,
    peer: Arc<Peer>,
    tls: Tls,
    hello: Hello,
    dialer: bool,
) {
    if hello.chunking != inner.engine.chunking_id() {
        tracing::warn!(
            peer = %peer.name,
            "peer chunks with {:?}, we chunk with {:?}: streams work but dedup less",
            hello.chunking,
            inner.engine.chunking_id()
        );
    }
    if hello.name != *peer.name {
        tracing::debug!(peer = %peer.name, "peer calls itself {:?}", hello.name);
    }
    let id = inner.conn_seq.fetch_add(1, Ordering::Relaxed);
    let params = ConnParams {
        dialer,
        our_window: inner.settings.window,
        peer_window: hello.window,
        peer_max_streams: hello.max_streams,
        our_max_streams: inner.settings.max_streams,
    };
    let conn = Conn::new(
        id,
        peer.name.clone(),
        params,
        ConnObserver {
            rtt: peer.m.rtt.clone(),
            protocol_errors: inner.metrics.protocol_errors.clone(),
        },
    );
    let view = peer.view_for(hello.store_id, &inner.engine);
    tracing::info!(peer = %peer.name, conn = id, dialer, "tunnel connection up");
    peer.add(conn.clone(), view.clone());
    // Shutting down before we registered: this connection must not linger.
    if inner.stop.is_cancelled() {
        conn.go_away();
    }
    let (rd, wr) = tokio::io::split(tls);
    let kill = inner.kill.clone();
    tokio::join!(
        reader(inner.clone(), peer.clone(), conn.clone(), view, rd),
        writer(inner.clone(), conn.clone(), wr),
        async {
            tokio::select! {
                _ = kill.cancelled() => conn.close("node stopped"),
                _ = conn.closed.cancelled() => {}
            }
        }
    );
    peer.remove(&conn);
}

async fn reader(
    inner: Arc<Inner>,
    peer: Arc<Peer>,
    conn: Arc<Conn>,
    view: crate::codec::View,
    rd: tokio::io::ReadHalf<Tls>,
) {
    let mut fr = FrameReader::new(rd);
    let dead_after = inner.settings.dead_after;
    loop {
        let r = tokio::select! {
            r = tokio::time::timeout(dead_after, fr.next()) => r,
            _ = conn.closed.cancelled() => return,
        };
        let f = match r {
            Err(_) => {
                conn.close(&format!("no frame for {dead_after:?}: peer unresponsive"));
                return;
            }
            Ok(Err(e)) => {
                if let crate::frame::ReadError::Frame(_) = e {
                    inner.metrics.protocol_errors.inc();
                    tracing::error!(peer = %peer.name, conn = conn.id, "tunnel protocol error: {e}");
                }
                conn.close(&format!("read: {e}"));
                return;
            }
            Ok(Ok(None)) => {
                conn.close("peer closed the connection");
                return;
            }
            Ok(Ok(Some(f))) => f,
        };
        match conn.on_frame(f) {
            Err(why) => {
                tracing::error!(peer = %peer.name, conn = conn.id, "tunnel protocol error: {why}");
                conn.close(&why);
                return;
            }
            Ok(Some((handle, dest))) => {
                crate::flows::spawn_far_flow(&inner, &peer, handle, dest, view.clone());
            }
            Ok(None) => {}
        }
    }
}

async fn writer(inner: Arc<Inner>, conn: Arc<Conn>, mut wr: tokio::io::WriteHalf<Tls>) {
    let interval = inner.settings.ping_interval;
    let mut next_ping = tokio::time::Instant::now();
    let mut buf = Vec::with_capacity(crate::mux::BATCH_BYTES + crate::frame::MAX_PAYLOAD + 64);
    loop {
        if tokio::time::Instant::now() >= next_ping {
            conn.ping();
            next_ping += interval;
        }
        buf.clear();
        conn.next_batch(&mut buf);
        if buf.is_empty() {
            tokio::select! {
                _ = conn.writer_wait() => continue,
                _ = tokio::time::sleep_until(next_ping) => continue,
                _ = conn.closed.cancelled() => break,
            }
        }
        let r = tokio::select! {
            r = async { wr.write_all(&buf).await?; wr.flush().await } => r,
            _ = conn.closed.cancelled() => break,
        };
        if let Err(e) = r {
            conn.close(&format!("write: {e}"));
            return;
        }
    }
    // Closing: a TLS close_notify, bounded so a dead peer cannot hold us.
    let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
}
