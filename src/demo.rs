//! `ditto demo`: two appliances in this process, on loopback, joined by an emulated slow WAN link;
//! a real dataset (an archive of files under /usr/share/doc, then /usr/lib if that is small) is
//! sent twice, plain and through ditto, and each pass is checked byte for byte.

use anyhow::{bail, Context, Result};
use ditto_proxy::emu::{Link, LinkSpec};
use ditto_proxy::{Engine, ForwardSpec, Identity, Node, NodeSpec, PeerSpec, Settings};
use serde::Serialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
    /// Link rate in Mbit/s.
    #[arg(long, default_value_t = 50.0)]
    pub mbit: f64,
    /// Link round-trip time in milliseconds.
    #[arg(long, default_value_t = 40)]
    pub rtt_ms: u64,
    /// Dataset size cap in MiB.
    #[arg(long, default_value_t = 64)]
    pub max_mib: u64,
    /// Directory to archive instead of the system's documentation and libraries.
    #[arg(long)]
    pub path: Option<PathBuf>,
}

/// One pass: the dataset sent plain, then through ditto. WAN bytes are what crossed the emulated
/// link, both directions (TLS, acknowledgements and requests included for ditto).
#[derive(Serialize, Debug)]
struct Pass {
    lan_bytes: u64,
    plain_wan_bytes: u64,
    wan_bytes: u64,
    seconds: f64,
    plain_seconds: f64,
    verified: bool,
}

#[derive(Serialize, Debug)]
struct LinkReport {
    mbit: f64,
    rtt_ms: u64,
    /// One-way delay.
    delay_ms: f64,
    /// Longest queueing delay at the bottleneck.
    queue_ms: f64,
}

#[derive(Serialize, Debug)]
struct Report {
    dataset_bytes: u64,
    link: LinkReport,
    passes: Vec<Pass>,
}

/// Appends regular files under `dir` (sorted, so the archive is the same every run) as
/// "path NUL size LF contents" records, like a tar without its padding, until `cap` bytes.
fn archive(dir: &Path, cap: usize, out: &mut Vec<u8>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if out.len() >= cap {
            return;
        }
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.is_dir() {
            archive(&p, cap, out);
        } else if meta.is_file() {
            let Ok(data) = std::fs::read(&p) else {
                continue;
            };
            out.extend_from_slice(p.to_string_lossy().as_bytes());
            out.push(0);
            out.extend_from_slice(format!("{}\n", data.len()).as_bytes());
            let room = cap.saturating_sub(out.len());
            out.extend_from_slice(&data[..data.len().min(room)]);
        }
    }
}

fn dataset(args: &Args) -> Result<Vec<u8>> {
    let cap = usize::try_from(args.max_mib << 20).unwrap_or(usize::MAX);
    let mut out = Vec::with_capacity(cap.min(1 << 30));
    match &args.path {
        Some(p) => archive(p, cap, &mut out),
        None => {
            for d in [
                "/usr/share/doc",
                "/usr/lib/x86_64-linux-gnu",
                "/usr/lib",
                "/usr/share",
            ] {
                if out.len() >= cap {
                    break;
                }
                archive(Path::new(d), cap, &mut out);
            }
        }
    }
    if out.len() < 1 << 20 {
        bail!(
            "found only {} bytes of files to send; pass --path DIR",
            out.len()
        );
    }
    Ok(out)
}

/// A sink that compares what it receives with the dataset and answers one byte: 1 = identical.
async fn start_sink(data: Arc<Vec<u8>>) -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let data = data.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut pos = 0usize;
                let mut same = true;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => {
                            let end = pos + n;
                            same &= end <= data.len() && data[pos..end] == buf[..n];
                            pos = end;
                        }
                        Err(_) => return,
                    }
                }
                same &= pos == data.len();
                let _ = s.write_all(&[u8::from(same)]).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// Sends the dataset to `addr`, returns (seconds, verified).
async fn send(addr: SocketAddr, data: &[u8]) -> Result<(f64, bool)> {
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).await.context("connecting")?;
    s.set_nodelay(true)?;
    for chunk in data.chunks(256 * 1024) {
        s.write_all(chunk).await.context("sending")?;
    }
    s.shutdown().await?;
    let mut verdict = Vec::new();
    s.read_to_end(&mut verdict)
        .await
        .context("reading the verdict")?;
    Ok((t.elapsed().as_secs_f64(), verdict == [1]))
}

fn node(
    name: &str,
    id: &Identity,
    peer: &str,
    peer_id: &Identity,
    peer_addr: Option<SocketAddr>,
    listen: bool,
    fwd: Option<SocketAddr>,
) -> Result<NodeSpec> {
    let store = ditto_dedup::ChunkStore::open(ditto_dedup::StoreConfig::in_memory(512 << 20))?;
    let local: SocketAddr = ([127, 0, 0, 1], 0).into();
    Ok(NodeSpec {
        name: name.into(),
        identity: id.clone(),
        engine: Engine::Dedup {
            store: Arc::new(store),
            config: ditto_dedup::EngineConfig::default(),
        },
        tunnel_listen: listen.then_some(local),
        groups: Vec::new(),
        peers: vec![PeerSpec {
            name: peer.into(),
            fingerprint: peer_id.fingerprint,
            address: peer_addr.map(|a| a.to_string()),
            allow: Default::default(),
        }],
        forwards: fwd
            .map(|t| ForwardSpec {
                listen: local,
                peer: Some(peer.into()),
                target: t.to_string(),
                bypass: false,
            })
            .into_iter()
            .collect(),
        admin: None,
        intercept: None,
        routes: Vec::new(),
        settings: Settings {
            connections: 1,
            ..Settings::default()
        },
    })
}

pub fn run(args: Args) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(demo(args))
}

async fn demo(args: Args) -> Result<ExitCode> {
    let data = Arc::new(dataset(&args)?);
    let spec = LinkSpec::new(args.mbit, Duration::from_millis(args.rtt_ms));
    eprintln!(
        "dataset: {:.1} MiB of files; link: {} Mbit/s, {} ms RTT (emulated on loopback)",
        data.len() as f64 / (1 << 20) as f64,
        args.mbit,
        args.rtt_ms
    );
    let sink = start_sink(data.clone()).await?;
    let local: SocketAddr = ([127, 0, 0, 1], 0).into();
    // Plain: client → link → server.
    let plain_link = Link::start(local, sink, spec).await?;
    // ditto: client → A → link → B → server.
    let a_id = Identity::generate()?;
    let b_id = Identity::generate()?;
    let b = Node::start(node("site-b", &b_id, "site-a", &a_id, None, true, None)?).await?;
    let b_tunnel = b.tunnel_addr.context("tunnel address")?;
    let ditto_link = Link::start(local, b_tunnel, spec).await?;
    let a = Node::start(node(
        "site-a",
        &a_id,
        "site-b",
        &b_id,
        Some(ditto_link.addr),
        false,
        Some(sink),
    )?)
    .await?;
    if !a
        .wait_connections("site-b", 1, Duration::from_secs(10))
        .await
    {
        bail!("the demo tunnel did not come up");
    }
    let a_fwd = a.forward_addrs[0];
    let mut passes = Vec::new();
    println!(
        "{:<6} {:>10} {:>16} {:>16} {:>10} {:>10} {:>8}  verified",
        "pass", "LAN MiB", "plain WAN MiB", "ditto WAN MiB", "plain s", "ditto s", "speedup"
    );
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    for i in 1..=2 {
        let w0 = plain_link.bytes();
        let (plain_seconds, plain_ok) = send(plain_link.addr, &data).await?;
        let plain_wan_bytes = plain_link.bytes() - w0;
        let w0 = ditto_link.bytes();
        let (seconds, ok) = send(a_fwd, &data).await?;
        let wan_bytes = ditto_link.bytes() - w0;
        let p = Pass {
            lan_bytes: data.len() as u64,
            plain_wan_bytes,
            wan_bytes,
            seconds,
            plain_seconds,
            verified: ok && plain_ok,
        };
        println!(
            "{:<6} {:>10.1} {:>16.2} {:>16.2} {:>10.2} {:>10.2} {:>7.1}x  {}",
            i,
            mib(p.lan_bytes),
            mib(p.plain_wan_bytes),
            mib(p.wan_bytes),
            p.plain_seconds,
            p.seconds,
            p.plain_seconds / p.seconds.max(1e-9),
            if p.verified { "yes" } else { "NO" }
        );
        passes.push(p);
    }
    println!("WAN: bytes that crossed the emulated link, both directions");
    let all_ok = passes.iter().all(|p| p.verified);
    if args.json {
        let report = Report {
            dataset_bytes: data.len() as u64,
            link: LinkReport {
                mbit: args.mbit,
                rtt_ms: args.rtt_ms,
                delay_ms: spec.delay.as_secs_f64() * 1e3,
                queue_ms: spec.queue.as_secs_f64() * 1e3,
            },
            passes,
        };
        println!("{}", serde_json::to_string(&report)?);
    }
    a.shutdown().await;
    b.shutdown().await;
    plain_link.stop().await;
    ditto_link.stop().await;
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
