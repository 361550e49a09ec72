//! `ditto run` and `ditto check-config`: building a node from a config file and running it until
//! SIGTERM/SIGINT, then stopping gracefully (stop accepting, drain, close).

use crate::config::{Config, Loaded};
use anyhow::{Context, Result};
use ditto_proxy::{Engine, Identity, Node, NodeSpec};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Configuration file (TOML).
    #[arg(long, short)]
    pub config: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Configuration file (TOML).
    #[arg(long, short, required_unless_present = "file")]
    pub config: Option<PathBuf>,
    /// The file as a positional argument: the older form of --config.
    #[arg(hide = true, conflicts_with = "config")]
    pub file: Option<PathBuf>,
}

/// Sets up logging to stderr: `RUST_LOG` if set, else info. Colour only when stderr is a terminal
/// (a file or a pipe gets plain text); no timestamps when stderr is the journal, which adds its own.
pub fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = if stderr_is_journal() {
        builder.without_time().try_init()
    } else {
        builder.try_init()
    };
}

/// True when stderr is systemd's journal stream: `JOURNAL_STREAM` ("DEVICE:INODE", set by systemd)
/// names the file stderr is (a child that inherits the variable but not the stream is not fooled).
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(want) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    std::fs::metadata("/proc/self/fd/2")
        .is_ok_and(|m| want.to_str() == Some(&format!("{}:{}", m.dev(), m.ino())))
}

/// The chunk store the config asks for.
fn open_engine(l: &Loaded) -> Result<Engine> {
    let n = &l.config.node;
    if !n.dedup {
        return Ok(Engine::raw());
    }
    let ram = n.store_ram.as_ref().map_or(256 << 20, |r| r.get_ref().0);
    let cfg = match &n.store_dir {
        Some(dir) => {
            let disk = n.store_disk.as_ref().map_or(10 << 30, |d| d.get_ref().0);
            let (path, at) = l.store_key_file();
            let (key, created) = ditto_dedup::StoreKey::load_or_create(&path)
                .with_context(|| format!("{at}: store key {}", path.display()))?;
            if created {
                tracing::info!(
                    "created the chunk store key {} (mode 0600): keep it like the node key; \
                     without it the store starts empty",
                    path.display()
                );
            }
            ditto_dedup::StoreConfig::on_disk(l.resolve(dir), ram, disk).with_key(key)
        }
        None => ditto_dedup::StoreConfig::in_memory(ram),
    };
    let store = ditto_dedup::ChunkStore::open(cfg).context("opening the chunk store")?;
    Ok(Engine::Dedup {
        store: Arc::new(store),
        config: ditto_dedup::EngineConfig::default(),
    })
}

/// Builds the node spec: loads the key, opens the store.
pub fn node_spec(l: &Loaded) -> Result<NodeSpec> {
    let (key, at) = l.key_file();
    let identity = Identity::load(&key).context(at)?;
    ditto_dedup::store::warn_if_readable_by_others(&key);
    for p in &l.config.peers {
        if p.fingerprint.get_ref().0 == identity.fingerprint {
            anyhow::bail!(
                "peer {:?} has this node's own fingerprint",
                p.name.get_ref()
            );
        }
    }
    let (peers, forwards) = l.peers_and_forwards();
    let (intercept, routes) = l.intercept();
    Ok(NodeSpec {
        name: l.config.node.name.get_ref().clone(),
        identity,
        engine: open_engine(l)?,
        tunnel_listen: l.config.tunnel.listen.as_ref().map(|a| *a.get_ref()),
        groups: l.groups(),
        peers,
        forwards,
        admin: l.config.node.admin.as_ref().map(|a| *a.get_ref()),
        intercept,
        routes,
        settings: l.settings(),
    })
}

pub fn check_config(args: CheckArgs) -> Result<ExitCode> {
    let Some(path) = args.config.or(args.file) else {
        anyhow::bail!("no config file: give --config FILE");
    };
    let l = Config::load(&path)?;
    // The key must be usable too: a config that cannot start is not valid.
    let (key, at) = l.key_file();
    let id = Identity::load(&key).context(at)?;
    println!(
        "{}: ok (node {:?}, fingerprint {}, {} peer(s), {} forward(s))",
        path.display(),
        l.config.node.name.get_ref(),
        id.fingerprint,
        l.config.peers.len(),
        l.config.forwards.len()
    );
    if l.config.node.dedup && l.config.node.store_dir.is_some() {
        let (k, _) = l.store_key_file();
        let state = if k.exists() {
            "exists"
        } else {
            "created at the first start"
        };
        println!("chunk store key {} ({state})", k.display());
    }
    for p in &l.config.peers {
        println!("peer {:?} may open {}", p.name.get_ref(), p.allow_list());
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run(args: RunArgs) -> Result<ExitCode> {
    init_logging();
    let l = Config::load(&args.config)?;
    let spec = node_spec(&l)?;
    let nofile = crate::sys::raise_nofile();
    // A flow is one socket at each end (two when it passes through).
    if nofile < spec.settings.max_flows as u64 + 1024 {
        tracing::warn!(
            open_files = nofile,
            max_flows = spec.settings.max_flows,
            "the open file limit is below tunnel.max_flows: raise LimitNOFILE (systemd) or ulimit -n"
        );
    }
    // The guard starts before any rule exists, so there is never a moment with rules and no guard.
    let guard = match (&spec.intercept, l.watchdog()) {
        (Some(i), Some(timeout)) => Some(crate::guard::Guard::spawn(&i.names, timeout)?),
        _ => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ditto")
        .on_thread_park(crate::alloc::worker_idle)
        .build()
        .context("starting the runtime")?;
    let guard = rt.block_on(async move {
        let node = Node::start(spec).await?;
        match crate::alloc::AllocatorStats::new() {
            Ok(c) => {
                if let Err(e) = node.metrics().registry.register(Box::new(c)) {
                    tracing::warn!("allocator metrics not exported: {e}");
                }
            }
            Err(e) => tracing::warn!("allocator metrics not exported: {e}"),
        }
        if let Some(a) = node.admin_addr {
            tracing::info!("admin endpoint on http://{a}/ (metrics, healthz, status)");
        }
        crate::notify::notify("READY=1");
        // Liveness, from the event loop itself: if it stops running tasks, these stop. The
        // heartbeat task owns the guard and hands it back when the node has stopped.
        let stop_beats = tokio_util::sync::CancellationToken::new();
        let beats = guard.map(|mut g| {
            let stop = stop_beats.clone();
            tokio::spawn(async move {
                let mut t = tokio::time::interval(g.interval);
                loop {
                    tokio::select! {
                        _ = t.tick() => g.beat(),
                        _ = stop.cancelled() => return g,
                    }
                }
            })
        });
        if let Some(every) = crate::notify::watchdog_interval() {
            tokio::spawn(async move {
                let mut t = tokio::time::interval(every);
                loop {
                    t.tick().await;
                    crate::notify::notify("WATCHDOG=1");
                }
            });
        }
        wait_for_signal().await?;
        tracing::info!("signal received: stopping (a second signal exits at once)");
        crate::notify::notify("STOPPING=1");
        tokio::spawn(async {
            if wait_for_signal().await.is_ok() {
                tracing::warn!("second signal: exiting without draining");
                std::process::exit(130);
            }
        });
        node.shutdown().await;
        stop_beats.cancel();
        let guard = match beats {
            Some(h) => h.await.ok(),
            None => None,
        };
        anyhow::Ok(guard)
    })?;
    // Rules are gone (shutdown removed them): let the guard go without acting.
    if let Some(g) = guard {
        g.goodbye();
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Args, Debug)]
pub struct CleanupArgs {
    /// Configuration file whose [intercept] names the rules (table, fwmark, route_table).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Without a config: the nftables table name (intercept.table).
    #[arg(long, default_value = "ditto", conflicts_with = "config")]
    pub table: String,
    /// Without a config: the firewall mark of ditto's policy routing (intercept.fwmark).
    #[arg(long, default_value_t = 0x1d1, conflicts_with = "config")]
    pub fwmark: u32,
    /// Without a config: the routing table of ditto's policy routing (intercept.route_table).
    #[arg(long, default_value_t = 1881, conflicts_with = "config")]
    pub route_table: u32,
    /// Without a config: the routing table of the announced prefixes (intercept.announce_table).
    #[arg(long, default_value_t = 188, conflicts_with = "config")]
    pub announce_table: u32,
}

/// `ditto cleanup`: removes ditto's nftables tables and policy routing (for ExecStopPost, or by hand
/// after a crash). Idempotent.
pub fn cleanup(args: CleanupArgs) -> Result<ExitCode> {
    let names = match &args.config {
        Some(c) => {
            let l = Config::load(c)?;
            match l.intercept().0 {
                Some(i) => i.names,
                None => {
                    println!("{}: no [intercept] section: nothing to remove", c.display());
                    return Ok(ExitCode::SUCCESS);
                }
            }
        }
        None => ditto_proxy::intercept::RuleNames {
            table: args.table,
            fwmark: args.fwmark,
            route_table: args.route_table,
            announce_table: args.announce_table,
        },
    };
    let removed = ditto_proxy::rules::installed(&names);
    ditto_proxy::rules::remove(&names)
        .with_context(|| format!("removing table {}", names.table))?;
    if removed {
        println!("removed ditto's interception rules (table {})", names.table);
    } else {
        println!(
            "no interception rules of ditto's (table {}) were installed",
            names.table
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_signal() -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
