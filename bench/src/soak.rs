//! The soak mode of `ditto-bench load` (`--soak-s N`): waves of mixed flows through the pair for N
//! seconds, with store churn, watching that memory and open files stay flat.
//!
//! Each wave opens `--flows` flows at once, in thirds: echo (1 KiB there and back), churn (a
//! download of `--bulk-bytes` of fresh pseudo-random bytes, verified: new chunks for both stores
//! every wave, so their RAM tiers evict and their disk tiers grow and recycle) and idle (one byte
//! there and back, then held). When every flow has its answer they are held `--hold-s`, closed, and
//! the next wave starts after a second. RSS and open files of both daemons are sampled every 250 ms
//! throughout (the samples of the run report).
//!
//! One server answers all three: the client's first byte says what it wants (`E`: echo the rest;
//! `C` + seed (u64) + length (u64): send that many bytes of the seed's stream).

use serde::Serialize;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The byte stream of `seed`, `len` bytes (BLAKE3's extendable output: fast, and never the same
/// twice for different seeds).
fn stream_of(seed: u64) -> blake3::OutputReader {
    let mut h = blake3::Hasher::new();
    h.update(b"ditto soak");
    h.update(&seed.to_le_bytes());
    h.finalize_xof()
}

/// Starts the soak server on loopback; returns its address.
pub async fn server() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            tokio::spawn(async move {
                let _ = serve_one(s).await;
            });
        }
    });
    Ok(addr)
}

async fn serve_one(mut s: TcpStream) -> std::io::Result<()> {
    let mut what = [0u8; 1];
    s.read_exact(&mut what).await?;
    if what[0] == b'C' {
        let mut hdr = [0u8; 16];
        s.read_exact(&mut hdr).await?;
        let (seed, mut left) = (
            u64::from_le_bytes(hdr[..8].try_into().unwrap_or_default()),
            u64::from_le_bytes(hdr[8..].try_into().unwrap_or_default()),
        );
        let mut xof = stream_of(seed);
        let mut buf = vec![0u8; 64 << 10];
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            xof.fill(&mut buf[..n]);
            s.write_all(&buf[..n]).await?;
            left -= n as u64;
        }
    } else {
        let (mut r, mut w) = s.split();
        tokio::io::copy(&mut r, &mut w).await?;
    }
    s.shutdown().await
}

/// One wave's outcome.
#[derive(Serialize, Default, Debug, Clone)]
pub struct Wave {
    pub t_s: f64,
    pub ok: usize,
    /// Failures by kind ("corrupt" would be a wrong byte).
    pub failures: std::collections::BTreeMap<String, usize>,
    pub seconds: f64,
    pub rss_kib: (u64, u64),
    pub fds: (usize, usize),
    /// Tunnel streams each daemon's session still holds (all flows are closed: should be 0).
    pub streams: (u64, u64),
}

/// What is measured of both daemons after each wave.
pub struct Measure {
    pub rss_kib: (u64, u64),
    pub fds: (usize, usize),
    pub streams: (u64, u64),
}

/// What the soak found.
#[derive(Serialize, Default, Debug)]
pub struct SoakReport {
    pub seconds: u64,
    pub flows_per_wave: usize,
    pub churn_bytes: u64,
    pub waves: Vec<Wave>,
}

async fn one(i: usize, wave: u64, to: SocketAddr, churn: u64) -> Result<TcpStream, String> {
    let kind = |e: std::io::Error| crate::load::kind_of(&e);
    let mut s = TcpStream::connect(to).await.map_err(kind)?;
    match i % 3 {
        1 => {
            let seed = wave << 32 | i as u64;
            let mut req = vec![b'C'];
            req.extend_from_slice(&seed.to_le_bytes());
            req.extend_from_slice(&churn.to_le_bytes());
            s.write_all(&req).await.map_err(kind)?;
            let mut xof = stream_of(seed);
            let (mut buf, mut want) = (vec![0u8; 64 << 10], vec![0u8; 64 << 10]);
            let mut got = 0u64;
            loop {
                let n = s.read(&mut buf).await.map_err(kind)?;
                if n == 0 {
                    break;
                }
                xof.fill(&mut want[..n]);
                if buf[..n] != want[..n] {
                    return Err("corrupt".into());
                }
                got += n as u64;
            }
            if got != churn {
                return Err("short".into());
            }
        }
        k => {
            let len = if k == 0 { 1024 } else { 1 };
            let mut msg = vec![b'E'];
            msg.extend(std::iter::repeat_n((i % 251) as u8, len));
            s.write_all(&msg).await.map_err(kind)?;
            let mut back = vec![0u8; msg.len() - 1];
            s.read_exact(&mut back).await.map_err(kind)?;
            if back[..] != msg[1..] {
                return Err("corrupt".into());
            }
        }
    }
    Ok(s)
}

/// Runs waves through `fwd` until `seconds` passed; `measure` is taken of both daemons at the
/// end of each wave.
pub fn run(
    rt: &tokio::runtime::Runtime,
    fwd: SocketAddr,
    flows: usize,
    churn: u64,
    hold: Duration,
    seconds: u64,
    measure: impl Fn() -> Measure,
) -> SoakReport {
    let t0 = Instant::now();
    let mut report = SoakReport {
        seconds,
        flows_per_wave: flows,
        churn_bytes: churn,
        waves: Vec::new(),
    };
    let mut wave = 0u64;
    while t0.elapsed() < Duration::from_secs(seconds) {
        wave += 1;
        let started = Instant::now();
        let results: Vec<Result<TcpStream, String>> = rt.block_on(async {
            let tasks: Vec<_> = (0..flows)
                .map(|i| {
                    tokio::spawn(async move {
                        tokio::time::timeout(Duration::from_secs(120), one(i, wave, fwd, churn))
                            .await
                            .unwrap_or_else(|_| Err("hung".into()))
                    })
                })
                .collect();
            let mut out = Vec::with_capacity(flows);
            for t in tasks {
                out.push(t.await.unwrap_or_else(|_| Err("panicked".into())));
            }
            out
        });
        let secs = started.elapsed().as_secs_f64();
        std::thread::sleep(hold);
        let mut w = Wave {
            t_s: t0.elapsed().as_secs_f64(),
            seconds: secs,
            ..Default::default()
        };
        for r in results {
            match r {
                Ok(s) => {
                    w.ok += 1;
                    drop(s);
                }
                Err(k) => *w.failures.entry(k).or_insert(0) += 1,
            }
        }
        std::thread::sleep(Duration::from_secs(1));
        let m = measure();
        (w.rss_kib, w.fds, w.streams) = (m.rss_kib, m.fds, m.streams);
        eprintln!(
            "wave {wave}: {} ok, failures {:?}, {:.1} s; RSS {:?} KiB, open files {:?}, streams {:?}",
            w.ok, w.failures, w.seconds, w.rss_kib, w.fds, w.streams
        );
        report.waves.push(w);
    }
    report
}

/// The soak's section of the Markdown report.
pub fn markdown(r: &SoakReport) -> String {
    let (Some(first), Some(last)) = (r.waves.first(), r.waves.last()) else {
        return String::new();
    };
    // The stores' RAM tiers fill during the first waves: flat means flat after that.
    let quarter = &r.waves[r.waves.len() / 4];
    let failed: usize = r
        .waves
        .iter()
        .map(|w| w.failures.values().sum::<usize>())
        .sum();
    let ok: usize = r.waves.iter().map(|w| w.ok).sum();
    let peak = |f: fn(&Wave) -> u64| r.waves.iter().map(f).max().unwrap_or(0);
    let ratio = |a: u64, b: u64| a as f64 / b.max(1) as f64;
    format!(
        "## Soak: {} s of waves of {} mixed flows (echo, {} KiB of fresh data, idle)\n\n\
         | | |\n|---|---|\n| waves | {} |\n| flows succeeded / failed | {ok} / {failed} |\n\
         | RSS A, B after wave 1 | {} / {} KiB |\n| RSS A, B after wave {} (a quarter of the run) | {} / {} KiB |\n\
         | RSS A, B after the last wave | {} / {} KiB ({:.2}x / {:.2}x of a quarter) |\n\
         | peak RSS A, B after a wave | {} / {} KiB |\n\
         | open files A, B after wave 1 / the last | {} / {} -> {} / {} |\n\
         | tunnel streams A, B still held after the last wave (all flows closed) | {} / {} |\n\n",
        r.seconds,
        r.flows_per_wave,
        r.churn_bytes / 1024,
        r.waves.len(),
        first.rss_kib.0,
        first.rss_kib.1,
        r.waves.len() / 4 + 1,
        quarter.rss_kib.0,
        quarter.rss_kib.1,
        last.rss_kib.0,
        last.rss_kib.1,
        ratio(last.rss_kib.0, quarter.rss_kib.0),
        ratio(last.rss_kib.1, quarter.rss_kib.1),
        peak(|w| w.rss_kib.0),
        peak(|w| w.rss_kib.1),
        first.fds.0,
        first.fds.1,
        last.fds.0,
        last.fds.1,
        last.streams.0,
        last.streams.1,
    )
}
