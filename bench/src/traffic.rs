//! Traffic tools that run inside the namespaces: a server (`serve`), a bulk download client with
//! byte-exact verification (`fetch`), a request/response latency probe (`rr`) and a port waiter.
//!
//! Protocol: the client sends one line, then the server answers:
//! - `RAND <bytes> <seed>`: that many pseudo-random (incompressible) bytes, then FIN;
//! - `FILE <name>`: the file `<dir>/<name>` of the server's `--dir`, then FIN;
//! - `ECHO <req> <resp>`: for every `<req>` bytes received, `<resp>` bytes back, until EOF.

use crate::link::Rng;
use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const BLOCK: usize = 64 * 1024;
const MAX_LINE: usize = 4096;

/// A deterministic stream of incompressible bytes: block `i` is SplitMix64 seeded by (seed, i).
pub struct RandStream {
    seed: u64,
    len: u64,
    pos: u64,
    block: Vec<u8>,
    block_idx: u64,
}

impl RandStream {
    pub fn new(seed: u64, len: u64) -> Self {
        RandStream {
            seed,
            len,
            pos: 0,
            block: vec![0; BLOCK],
            block_idx: u64::MAX,
        }
    }
}

impl Read for RandStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.len || buf.is_empty() {
            return Ok(0);
        }
        let idx = self.pos / BLOCK as u64;
        if idx != self.block_idx {
            Rng::new(self.seed.wrapping_mul(0x1000_0000_01B3) ^ idx).fill(&mut self.block);
            self.block_idx = idx;
        }
        let off = (self.pos % BLOCK as u64) as usize;
        let n = buf
            .len()
            .min(BLOCK - off)
            .min((self.len - self.pos) as usize);
        buf[..n].copy_from_slice(&self.block[off..off + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

fn resolve(addr: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("bad address {addr:?}"))?
        .next()
        .with_context(|| format!("{addr:?} resolves to nothing"))
}

/// Options of `serve`.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long)]
    pub listen: String,
    /// Directory that FILE requests are served from.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// Runs the server until killed (one thread per connection).
pub fn serve(args: ServeArgs) -> Result<()> {
    let addr = resolve(&args.listen)?;
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())
        .with_context(|| format!("binding {addr}"))?;
    sock.listen(4096)?;
    let listener: TcpListener = sock.into();
    eprintln!("serving on {addr}");
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let dir = args.dir.clone();
        let _ = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || {
                if let Err(e) = handle(conn, dir.as_deref()) {
                    eprintln!("serve: {e:#}");
                }
            });
    }
    Ok(())
}

fn read_line(r: &mut impl BufRead) -> Result<String> {
    let mut line = Vec::new();
    r.take(MAX_LINE as u64).read_until(b'\n', &mut line)?;
    if line.last() != Some(&b'\n') {
        bail!("request line missing or too long");
    }
    Ok(String::from_utf8_lossy(&line).trim().to_string())
}

fn num(s: Option<&str>, what: &str) -> Result<u64> {
    s.with_context(|| format!("missing {what}"))?
        .parse()
        .with_context(|| format!("bad {what}"))
}

fn handle(conn: TcpStream, dir: Option<&Path>) -> Result<()> {
    conn.set_nodelay(true)?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut w = conn;
    let line = read_line(&mut reader)?;
    let mut parts = line.split_whitespace();
    match parts.next() {
        Some("RAND") => {
            let len = num(parts.next(), "length")?;
            let seed = num(parts.next(), "seed")?;
            std::io::copy(&mut RandStream::new(seed, len), &mut w)?;
        }
        Some("FILE") => {
            let name = parts.next().context("missing file name")?;
            let dir = dir.context("server has no --dir")?;
            if name.split('/').any(|c| c == ".." || c.is_empty()) {
                bail!("bad file name {name:?}");
            }
            let mut f = File::open(dir.join(name)).with_context(|| format!("opening {name}"))?;
            std::io::copy(&mut f, &mut w)?;
        }
        Some("ECHO") => {
            let req = num(parts.next(), "request size")? as usize;
            let resp = num(parts.next(), "response size")? as usize;
            if req == 0 || req > 1 << 20 || resp > 1 << 20 {
                bail!("ECHO sizes out of range");
            }
            let mut rbuf = vec![0u8; req];
            // Incompressible responses, so that compression does not flatter any contender.
            let mut out = vec![0u8; resp];
            let mut rng = Rng::new(req as u64 ^ (resp as u64) << 20);
            loop {
                match reader.read_exact(&mut rbuf) {
                    Ok(()) => {
                        rng.fill(&mut out);
                        w.write_all(&out)?
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        _ => bail!("unknown request {line:?}"),
    }
    w.flush()?;
    let _ = w.shutdown(Shutdown::Write);
    // Wait for the client to close so the FIN is not turned into a reset.
    let mut sink = [0u8; 256];
    let _ = w.set_read_timeout(Some(Duration::from_secs(30)));
    while matches!(reader.read(&mut sink), Ok(n) if n > 0) {}
    Ok(())
}

/// Options of `fetch`.
#[derive(Args, Debug, Clone)]
pub struct FetchArgs {
    /// Server (or proxy) address.
    #[arg(long)]
    pub connect: String,
    /// Fetch this many pseudo-random bytes ("16MiB").
    #[arg(long, conflicts_with = "file")]
    pub rand: Option<String>,
    /// Seed of the random data (connection i uses seed + i).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Fetch this file (a name relative to the server's --dir); verified against --dir here.
    #[arg(long)]
    pub file: Option<String>,
    /// Local directory holding the expected contents of --file.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Receive buffer (SO_RCVBUF) of the client socket, e.g. "64KiB".
    #[arg(long)]
    pub rcvbuf: Option<String>,
    /// Concurrent connections, each fetching the same amount.
    #[arg(long, default_value_t = 1)]
    pub conns: usize,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout_s: u64,
}

/// Result of a `fetch` (printed as JSON).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FetchResult {
    pub conns: usize,
    pub ok_conns: usize,
    /// Total payload bytes received.
    pub bytes: u64,
    /// Whether every connection received exactly the expected bytes.
    pub exact: bool,
    /// Wall time from the first connect to the last byte.
    pub secs: f64,
    /// Time from connect to the first payload byte (median over connections that got one).
    pub ttfb_s: Option<f64>,
    /// 99th percentile of the connections' first-byte times.
    #[serde(default)]
    pub ttfb_p99_s: Option<f64>,
    pub goodput_mbps: f64,
    pub errors: Vec<String>,
}

struct OneFetch {
    bytes: u64,
    exact: bool,
    ttfb: f64,
}

fn expected_source(args: &FetchArgs, i: usize) -> Result<(String, Box<dyn Read + Send>)> {
    if let Some(r) = &args.rand {
        let len = crate::units::parse_bytes(r)?;
        let seed = args.seed.wrapping_add(i as u64);
        Ok((
            format!("RAND {len} {seed}\n"),
            Box::new(RandStream::new(seed, len)),
        ))
    } else if let Some(name) = &args.file {
        let dir = args.dir.as_ref().context("--file needs --dir")?;
        let f =
            File::open(dir.join(name)).with_context(|| format!("opening local copy of {name}"))?;
        Ok((
            format!("FILE {name}\n"),
            Box::new(BufReader::with_capacity(BLOCK, f)),
        ))
    } else {
        bail!("give --rand SIZE or --file NAME")
    }
}

fn connect(addr: SocketAddr, rcvbuf: Option<usize>, timeout: Duration) -> Result<TcpStream> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if let Some(b) = rcvbuf {
        // As an application would: setsockopt(SO_RCVBUF, b). (The kernel doubles it for its
        // bookkeeping and advertises a window of about b.)
        sock.set_recv_buffer_size(b)?;
    }
    sock.set_nodelay(true)?;
    sock.connect_timeout(&addr.into(), Duration::from_secs(15).min(timeout))
        .with_context(|| format!("connecting to {addr}"))?;
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(timeout.min(Duration::from_secs(5))))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(s)
}

fn fetch_one(
    addr: SocketAddr,
    args: &FetchArgs,
    i: usize,
    rcvbuf: Option<usize>,
) -> Result<OneFetch> {
    let (req, mut expect) = expected_source(args, i)?;
    let t0 = Instant::now();
    let mut s = connect(addr, rcvbuf, Duration::from_secs(args.timeout_s))?;
    s.write_all(req.as_bytes())?;
    let mut buf = vec![0u8; BLOCK];
    let mut want = vec![0u8; BLOCK];
    let mut bytes = 0u64;
    let mut exact = true;
    let mut ttfb = None;
    let deadline = t0 + Duration::from_secs(args.timeout_s);
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if Instant::now() > deadline {
                    bail!(
                        "timed out after {} s with {bytes} bytes received",
                        args.timeout_s
                    );
                }
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("receiving, after {bytes} bytes")),
        };
        ttfb.get_or_insert_with(|| t0.elapsed().as_secs_f64());
        bytes += n as u64;
        if exact {
            let mut got = 0;
            while got < n {
                let m = expect.read(&mut want[got..n])?;
                if m == 0 {
                    break;
                }
                got += m;
            }
            if got < n || want[..n] != buf[..n] {
                exact = false;
            }
        }
    }
    if exact {
        exact = expect.read(&mut want[..1])? == 0;
    }
    let _ = s.shutdown(Shutdown::Both);
    Ok(OneFetch {
        bytes,
        exact,
        ttfb: ttfb.unwrap_or(f64::NAN),
    })
}

/// Runs `fetch` and returns the summary.
pub fn fetch(args: &FetchArgs) -> Result<FetchResult> {
    let addr = resolve(&args.connect)?;
    let rcvbuf = args
        .rcvbuf
        .as_deref()
        .map(crate::units::parse_bytes)
        .transpose()?
        .map(|b| b as usize);
    if args.conns == 0 || args.conns > 20_000 {
        bail!("--conns must be 1..20000");
    }
    expected_source(args, 0)?;
    let t0 = Instant::now();
    let results: Vec<Result<OneFetch>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..args.conns)
            .map(|i| {
                std::thread::Builder::new()
                    .stack_size(256 * 1024)
                    .spawn_scoped(sc, move || fetch_one(addr, args, i, rcvbuf))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h {
                Ok(h) => h
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("fetch thread panicked"))),
                Err(e) => Err(anyhow::Error::from(e).context("spawning thread")),
            })
            .collect()
    });
    let secs = t0.elapsed().as_secs_f64();
    let mut r = FetchResult {
        conns: args.conns,
        secs,
        exact: true,
        ..Default::default()
    };
    let mut ttfbs = Vec::new();
    for res in results {
        match res {
            Ok(o) => {
                r.ok_conns += 1;
                r.bytes += o.bytes;
                r.exact &= o.exact;
                ttfbs.push(o.ttfb);
            }
            Err(e) => {
                r.exact = false;
                if r.errors.len() < 5 {
                    r.errors.push(format!("{e:#}"));
                }
            }
        }
    }
    ttfbs.sort_by(f64::total_cmp);
    ttfbs.retain(|t| t.is_finite());
    r.ttfb_s = ttfbs.get(ttfbs.len() / 2).copied();
    r.ttfb_p99_s = ttfbs
        .get((ttfbs.len() * 99 / 100).min(ttfbs.len().saturating_sub(1)))
        .copied();
    r.goodput_mbps = if secs > 0.0 {
        r.bytes as f64 * 8.0 / secs / 1e6
    } else {
        0.0
    };
    Ok(r)
}

/// Options of `rr`.
#[derive(Args, Debug, Clone)]
pub struct RrArgs {
    /// Server (or proxy) address.
    #[arg(long)]
    pub connect: String,
    /// Round trips on one connection.
    #[arg(long, default_value_t = 20)]
    pub count: usize,
    /// Request size in bytes.
    #[arg(long, default_value_t = 100)]
    pub req: usize,
    /// Response size in bytes.
    #[arg(long, default_value_t = 1000)]
    pub resp: usize,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout_s: u64,
}

/// Result of `rr` (printed as JSON).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RrResult {
    pub count: usize,
    /// TCP connect time (to whatever accepts first: the server or a local proxy).
    pub connect_ms: f64,
    /// From starting to connect to the first response byte of the first exchange.
    pub ttfb_ms: f64,
    pub rtt_min_ms: f64,
    pub rtt_p50_ms: f64,
    pub rtt_p90_ms: f64,
    pub rtt_max_ms: f64,
}

/// Runs `rr`: a few request/response exchanges on one connection.
pub fn rr(args: &RrArgs) -> Result<RrResult> {
    if args.count == 0
        || args.count > 100_000
        || args.req == 0
        || args.req > 1 << 20
        || args.resp == 0
        || args.resp > 1 << 20
    {
        bail!("count, req and resp must be positive (req/resp at most 1 MiB)");
    }
    let addr = resolve(&args.connect)?;
    let t0 = Instant::now();
    let mut s = connect(addr, None, Duration::from_secs(args.timeout_s))?;
    let connect_ms = t0.elapsed().as_secs_f64() * 1e3;
    s.write_all(format!("ECHO {} {}\n", args.req, args.resp).as_bytes())?;
    let req = vec![b'q'; args.req];
    let mut resp = vec![0u8; args.resp];
    let mut rtts = Vec::with_capacity(args.count);
    let mut ttfb_ms = 0.0;
    let deadline = t0 + Duration::from_secs(args.timeout_s);
    for i in 0..args.count {
        if Instant::now() > deadline {
            bail!("timed out after {i} exchanges");
        }
        let t = Instant::now();
        s.write_all(&req)?;
        let mut first = [0u8; 1];
        s.read_exact(&mut first).context("reading response")?;
        if i == 0 {
            ttfb_ms = t0.elapsed().as_secs_f64() * 1e3;
        }
        s.read_exact(&mut resp[1..]).context("reading response")?;
        rtts.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let _ = s.shutdown(Shutdown::Write);
    let mut sorted = rtts.clone();
    sorted.sort_by(f64::total_cmp);
    let pct = |p: usize| sorted[(sorted.len() * p / 100).min(sorted.len() - 1)];
    Ok(RrResult {
        count: args.count,
        connect_ms,
        ttfb_ms,
        rtt_min_ms: sorted[0],
        rtt_p50_ms: pct(50),
        rtt_p90_ms: pct(90),
        rtt_max_ms: sorted[sorted.len() - 1],
    })
}

/// Options of `udp-blast` (sender) and `udp-sink` (receiver).
#[derive(Args, Debug, Clone)]
pub struct UdpArgs {
    /// Sender: destination; receiver: address to bind.
    #[arg(long)]
    pub addr: String,
    /// Sender: offered rate at the IP level ("1.2gbit").
    #[arg(long, default_value = "100mbit")]
    pub rate: String,
    /// Sender: seconds to send. Receiver: give up after this + 5 s.
    #[arg(long, default_value_t = 5.0)]
    pub secs: f64,
    /// UDP payload size (1472 makes 1500-byte IP packets).
    #[arg(long, default_value_t = 1472)]
    pub size: usize,
}

/// Result of `udp-blast` / `udp-sink`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct UdpResult {
    pub packets: u64,
    /// IP-level bytes (payload + 28 bytes of headers per packet).
    pub ip_bytes: u64,
    /// Receiver: from the first to the last packet.
    pub secs: f64,
    pub ip_mbps: f64,
}

/// Sends UDP datagrams at a fixed rate (paced in 200 µs slices).
pub fn udp_blast(args: &UdpArgs) -> Result<UdpResult> {
    let rate = crate::units::parse_rate(&args.rate)?;
    if rate == 0 || args.size == 0 || args.size > 65000 || !(0.0..=600.0).contains(&args.secs) {
        bail!("need a rate, a size of 1..65000 and at most 600 s");
    }
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
    sock.connect(&args.addr)
        .with_context(|| format!("connecting {}", args.addr))?;
    let payload = vec![0x5au8; args.size];
    let ip_len = (args.size + 28) as f64;
    let t0 = Instant::now();
    let mut sent = 0u64;
    loop {
        let el = t0.elapsed().as_secs_f64();
        if el >= args.secs {
            break;
        }
        let due = (el * rate as f64 / 8.0 / ip_len) as u64;
        while sent < due {
            // Lost sends (ENOBUFS) count as sent: the point is the offered load.
            let _ = sock.send(&payload);
            sent += 1;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let secs = t0.elapsed().as_secs_f64();
    let ip_bytes = sent * (args.size as u64 + 28);
    Ok(UdpResult {
        packets: sent,
        ip_bytes,
        secs,
        ip_mbps: ip_bytes as f64 * 8.0 / secs / 1e6,
    })
}

/// Receives UDP datagrams until 1 s passes without one (or --secs + 5 s overall).
pub fn udp_sink(args: &UdpArgs) -> Result<UdpResult> {
    let sock =
        std::net::UdpSocket::bind(&args.addr).with_context(|| format!("binding {}", args.addr))?;
    let sock2 = Socket::from(sock.try_clone()?);
    let _ = sock2.set_recv_buffer_size(8 << 20);
    println!("listening");
    std::io::stdout().flush()?;
    sock.set_read_timeout(Some(Duration::from_millis(1000)))?;
    let mut buf = vec![0u8; 65536];
    let start = Instant::now();
    let limit = Duration::from_secs_f64(args.secs.clamp(0.0, 600.0) + 5.0);
    let (mut first, mut last) = (None, Instant::now());
    let (mut packets, mut ip_bytes) = (0u64, 0u64);
    while start.elapsed() < limit {
        match sock.recv(&mut buf) {
            Ok(n) => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
                packets += 1;
                ip_bytes += n as u64 + 28;
            }
            Err(_) if first.is_some() => break,
            Err(_) => {}
        }
    }
    let secs = first
        .map(|f| last.duration_since(f).as_secs_f64())
        .unwrap_or(0.0);
    let ip_mbps = if secs > 0.0 {
        ip_bytes as f64 * 8.0 / secs / 1e6
    } else {
        0.0
    };
    Ok(UdpResult {
        packets,
        ip_bytes,
        secs,
        ip_mbps,
    })
}

/// Waits until a TCP connect to `addr` succeeds.
pub fn wait_port(addr: &str, timeout: Duration) -> Result<()> {
    let a = resolve(addr)?;
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&a, Duration::from_millis(500)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{addr} not accepting connections after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rand_stream_is_deterministic_across_read_sizes() {
        let mut a = Vec::new();
        RandStream::new(5, 200_000).read_to_end(&mut a).ok();
        let mut b = Vec::new();
        let mut s = RandStream::new(5, 200_000);
        let mut buf = [0u8; 777];
        loop {
            let n = s.read(&mut buf).unwrap_or(0);
            if n == 0 {
                break;
            }
            b.extend_from_slice(&buf[..n]);
        }
        assert_eq!(a.len(), 200_000);
        assert_eq!(a, b);
        let mut c = Vec::new();
        RandStream::new(6, 1000).read_to_end(&mut c).ok();
        assert_ne!(a[..1000], c[..]);
    }
}
