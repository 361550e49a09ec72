//! Test helpers: node pairs on loopback, a checking server, deterministic data.
#![allow(dead_code)]

use ditto_proxy::{Engine, ForwardSpec, Identity, Node, NodeSpec, PeerSpec, Settings};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const WAIT: Duration = Duration::from_secs(60);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

pub fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A port nothing listens on (bound, then released).
pub fn dead_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = l.local_addr().expect("addr");
    drop(l);
    a
}

/// Deterministic, incompressible bytes: xorshift64* keyed by `seed`, byte `i` of the stream.
pub struct Gen {
    state: u64,
    buf: [u8; 8],
    pos: usize,
}

impl Gen {
    pub fn new(seed: u64) -> Gen {
        Gen {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            buf: [0; 8],
            pos: 8,
        }
    }
    pub fn fill(&mut self, out: &mut [u8]) {
        for b in out {
            if self.pos == 8 {
                self.state ^= self.state >> 12;
                self.state ^= self.state << 25;
                self.state ^= self.state >> 27;
                self.buf = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
                self.pos = 0;
            }
            *b = self.buf[self.pos];
            self.pos += 1;
        }
    }
    pub fn bytes(seed: u64, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        Gen::new(seed).fill(&mut v);
        v
    }
}

/// What the checking server does after reading a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Read the request to EOF (half-close), verify, send the response, close.
    Normal = 0,
    /// Read the header then reset the connection.
    ResetAfterHeader = 1,
    /// Echo: send back every byte as it comes (interactive), close at EOF.
    Echo = 2,
    /// Send `resp_len` bytes without reading anything, counting them in [`FIREHOSE_WRITTEN`].
    Firehose = 3,
}

/// Bytes the firehose mode managed to write so far.
pub static FIREHOSE_WRITTEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Outcomes the server observed, for assertions.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ServerLog {
    pub accepted: u64,
    pub ok: u64,
    pub bad: u64,
    pub resets_seen: u64,
}

/// The checking server's log; `wait` blocks until a condition holds (no polling).
#[derive(Clone)]
pub struct Log(tokio::sync::watch::Sender<ServerLog>);

impl Log {
    pub fn get(&self) -> ServerLog {
        self.0.borrow().clone()
    }
    pub async fn wait(&self, what: &str, f: impl FnMut(&ServerLog) -> bool) {
        let mut rx = self.0.subscribe();
        let r = tokio::time::timeout(WAIT, rx.wait_for(f)).await;
        assert!(
            matches!(r, Ok(Ok(_))),
            "timed out waiting for {what}; server log {:?}",
            self.get()
        );
    }
}

/// Starts the checking server. Request: mode u8 | req_len u64 | resp_len u64 | seed u64 | body.
pub async fn start_server() -> (SocketAddr, Log) {
    start_server_at(any_port()).await
}

/// [`start_server`] on `bind` (a loopback address; port 0 picks one).
pub async fn start_server_at(bind: SocketAddr) -> (SocketAddr, Log) {
    let l = TcpListener::bind(bind).await.expect("bind server");
    let addr = l.local_addr().expect("addr");
    let log = Log(tokio::sync::watch::channel(ServerLog::default()).0);
    let log2 = log.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            log2.0.send_modify(|l| l.accepted += 1);
            let log = log2.clone();
            tokio::spawn(async move {
                let r = serve_one(s).await;
                log.0.send_modify(|l| match r {
                    Ok(true) => l.ok += 1,
                    Ok(false) => l.bad += 1,
                    Err(e) if is_reset(&e) => l.resets_seen += 1,
                    Err(_) => l.bad += 1,
                });
            });
        }
    });
    (addr, log)
}

pub fn is_reset(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe
    )
}

async fn serve_one(mut s: TcpStream) -> std::io::Result<bool> {
    let mut head = [0u8; 25];
    s.read_exact(&mut head).await?;
    let mode = head[0];
    let req_len = u64::from_be_bytes(head[1..9].try_into().expect("8")) as usize;
    let resp_len = u64::from_be_bytes(head[9..17].try_into().expect("8")) as usize;
    let seed = u64::from_be_bytes(head[17..25].try_into().expect("8"));
    if mode == Mode::ResetAfterHeader as u8 {
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
        drop(s);
        return Ok(true);
    }
    if mode == Mode::Firehose as u8 {
        let mut gen = Gen::new(seed);
        let mut buf = vec![0u8; 16 * 1024];
        let mut left = resp_len;
        while left > 0 {
            let n = left.min(buf.len());
            gen.fill(&mut buf[..n]);
            s.write_all(&buf[..n]).await?;
            FIREHOSE_WRITTEN.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            left -= n;
        }
        s.shutdown().await?;
        return Ok(true);
    }
    if mode == Mode::Echo as u8 {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                s.shutdown().await?;
                return Ok(true);
            }
            s.write_all(&buf[..n]).await?;
        }
    }
    let mut gen = Gen::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut expect = vec![0u8; 64 * 1024];
    let mut got = 0usize;
    let mut good = true;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        gen.fill(&mut expect[..n]);
        if buf[..n] != expect[..n] {
            good = false;
        }
        got += n;
    }
    if got != req_len {
        good = false;
    }
    let mut gen = Gen::new(seed ^ 0xFFFF);
    let mut left = resp_len;
    while left > 0 {
        let n = left.min(buf.len());
        gen.fill(&mut buf[..n]);
        s.write_all(&buf[..n]).await?;
        left -= n;
    }
    s.shutdown().await?;
    Ok(good)
}

/// Runs one request through `addr`: sends `req_len` bytes, half-closes, reads and checks the reply.
pub async fn request(
    addr: SocketAddr,
    req_len: usize,
    resp_len: usize,
    seed: u64,
) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    let mut head = vec![Mode::Normal as u8];
    head.extend_from_slice(&(req_len as u64).to_be_bytes());
    head.extend_from_slice(&(resp_len as u64).to_be_bytes());
    head.extend_from_slice(&seed.to_be_bytes());
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(&head).await?;
        let mut gen = Gen::new(seed);
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = req_len;
        while left > 0 {
            let n = left.min(buf.len());
            gen.fill(&mut buf[..n]);
            w.write_all(&buf[..n]).await?;
            left -= n;
        }
        w.shutdown().await
    };
    let recv = async {
        let mut gen = Gen::new(seed ^ 0xFFFF);
        let mut buf = vec![0u8; 64 * 1024];
        let mut expect = vec![0u8; 64 * 1024];
        let mut got = 0usize;
        loop {
            let n = r.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            gen.fill(&mut expect[..n]);
            if buf[..n] != expect[..n] {
                return Err(std::io::Error::other(format!(
                    "reply bytes differ near offset {got}"
                )));
            }
            got += n;
        }
        if got != resp_len {
            return Err(std::io::Error::other(format!(
                "reply length {got}, expected {resp_len}"
            )));
        }
        Ok(())
    };
    tokio::try_join!(send, recv)?;
    Ok(())
}

/// Sends a header asking the server to reset, returns what the client saw on read.
pub async fn request_reset(addr: SocketAddr) -> std::io::Result<usize> {
    let mut s = TcpStream::connect(addr).await?;
    let mut head = vec![Mode::ResetAfterHeader as u8];
    head.extend_from_slice(&[0u8; 24]);
    s.write_all(&head).await?;
    let mut buf = [0u8; 16];
    s.read(&mut buf).await
}

pub struct Pair {
    pub a: Node,
    pub b: Node,
    pub a_id: Identity,
    pub b_id: Identity,
    /// A's forward → B → target.
    pub a_fwd: SocketAddr,
    /// B's forward → A → target (over the connections A dialed).
    pub b_fwd: SocketAddr,
    pub target: SocketAddr,
}

pub fn test_settings() -> Settings {
    Settings {
        connections: 2,
        window: 256 * 1024,
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        drain_timeout: Duration::from_secs(2),
        ..Settings::default()
    }
}

pub fn spec_a(
    a_id: &Identity,
    b_fp: ditto_proxy::Fingerprint,
    b_tunnel: SocketAddr,
    target: SocketAddr,
    engine: Engine,
) -> NodeSpec {
    NodeSpec {
        name: "site-a".into(),
        identity: a_id.clone(),
        engine,
        tunnel_listen: None,
        groups: Vec::new(),
        peers: vec![PeerSpec {
            name: "site-b".into(),
            fingerprint: b_fp,
            address: Some(b_tunnel.to_string()),
            allow: Default::default(),
        }],
        forwards: vec![ForwardSpec {
            listen: any_port(),
            peer: Some("site-b".into()),
            target: target.to_string(),
            bypass: false,
        }],
        admin: Some(any_port()),
        intercept: None,
        routes: Vec::new(),
        settings: test_settings(),
    }
}

pub fn spec_b(
    b_id: &Identity,
    a_fp: ditto_proxy::Fingerprint,
    tunnel: SocketAddr,
    target: SocketAddr,
    engine: Engine,
) -> NodeSpec {
    NodeSpec {
        name: "site-b".into(),
        identity: b_id.clone(),
        engine,
        tunnel_listen: Some(tunnel),
        groups: Vec::new(),
        peers: vec![PeerSpec {
            name: "site-a".into(),
            fingerprint: a_fp,
            address: None,
            allow: Default::default(),
        }],
        forwards: vec![ForwardSpec {
            listen: any_port(),
            peer: Some("site-a".into()),
            target: target.to_string(),
            bypass: false,
        }],
        admin: Some(any_port()),
        intercept: None,
        routes: Vec::new(),
        settings: test_settings(),
    }
}

/// Starts B (listening) and A (dialing B) with raw engines; waits for both tunnel connections.
pub async fn pair_with(target: SocketAddr, engine_a: Engine, engine_b: Engine) -> Pair {
    let a_id = Identity::generate().expect("id");
    let b_id = Identity::generate().expect("id");
    let b = Node::start(spec_b(
        &b_id,
        a_id.fingerprint,
        any_port(),
        target,
        engine_b,
    ))
    .await
    .expect("start b");
    let b_tunnel = b.tunnel_addr.expect("tunnel addr");
    let a = Node::start(spec_a(&a_id, b_id.fingerprint, b_tunnel, target, engine_a))
        .await
        .expect("start a");
    assert!(
        a.wait_connections("site-b", 2, WAIT).await,
        "A's tunnel did not come up"
    );
    assert!(
        b.wait_connections("site-a", 2, WAIT).await,
        "B's tunnel did not come up"
    );
    let a_fwd = a.forward_addrs[0];
    let b_fwd = b.forward_addrs[0];
    Pair {
        a,
        b,
        a_id,
        b_id,
        a_fwd,
        b_fwd,
        target,
    }
}

/// A dedup engine over a RAM store, or a disk store in `dir`.
pub fn dedup(dir: Option<&std::path::Path>) -> Engine {
    let cfg = match dir {
        Some(d) => ditto_dedup::StoreConfig::on_disk(d, 64 << 20, 512 << 20),
        None => ditto_dedup::StoreConfig::in_memory(256 << 20),
    };
    let store = ditto_dedup::ChunkStore::open(cfg).expect("open store");
    Engine::Dedup {
        store: std::sync::Arc::new(store),
        config: ditto_dedup::EngineConfig::default(),
    }
}

/// A pair running the real dedup engine on RAM stores.
pub async fn pair(target: SocketAddr) -> Pair {
    pair_with(target, dedup(None), dedup(None)).await
}

/// Polls `cond` until it holds (for state only observable from outside, like a metric), failing
/// after [`WAIT`].
pub async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends a request header in `mode` and returns the open connection.
pub async fn open_mode(
    addr: SocketAddr,
    mode: Mode,
    req_len: u64,
    resp_len: u64,
    seed: u64,
) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut head = vec![mode as u8];
    head.extend_from_slice(&req_len.to_be_bytes());
    head.extend_from_slice(&resp_len.to_be_bytes());
    head.extend_from_slice(&seed.to_be_bytes());
    s.write_all(&head).await.expect("header");
    s
}

/// Scrapes a counter total (all label sets matching `labels`) from a node's /metrics.
pub async fn scrape(node: &Node, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (code, body) = ditto_proxy::admin::get(node.admin_addr.expect("admin"), "/metrics")
        .await
        .expect("scrape");
    assert_eq!(code, 200);
    let mut total = 0.0;
    for line in body.lines() {
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(v) => v,
            None => continue,
        };
        let (metric, lbls) = match series.split_once('{') {
            Some((m, l)) => (m, l.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        if labels
            .iter()
            .all(|(k, v)| lbls.contains(&format!("{k}=\"{v}\"")))
        {
            total += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    total
}

/// A burst of concurrent requests of mixed sizes through both forwards; all must be byte-exact.
pub async fn mixed(a_fwd: SocketAddr, b_fwd: SocketAddr, seed: u64) {
    let sizes = [1usize, 700, 20_000, 150_000, 1 << 20];
    let mut tasks = Vec::new();
    for (i, &req) in sizes.iter().enumerate() {
        let resp = sizes[sizes.len() - 1 - i];
        for (j, via) in [a_fwd, b_fwd].into_iter().enumerate() {
            let sd = seed * 1000 + (i * 2 + j) as u64;
            tasks.push(tokio::spawn(
                async move { request(via, req, resp, sd).await },
            ));
        }
    }
    for t in tasks {
        t.await.expect("join").expect("mixed transfer");
    }
}
