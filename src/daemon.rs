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
    pub config: PathBuf,
}

/// Sets up logging: `RUST_LOG` if set, else info.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
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
            ditto_dedup::StoreConfig::on_disk(l.resolve(dir), ram, disk)
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
    let key = l.resolve(&l.config.node.key);
    let identity =
        Identity::load(&key).with_context(|| format!("loading node.key {}", key.display()))?;
    for p in &l.config.peers {
        if p.fingerprint.get_ref().0 == identity.fingerprint {
            anyhow::bail!(
                "peer {:?} has this node's own fingerprint",
                p.name.get_ref()
            );
        }
    }
    let (peers, forwards) = l.peers_and_forwards();
    Ok(NodeSpec {
        name: l.config.node.name.get_ref().clone(),
        identity,
        engine: open_engine(l)?,
        tunnel_listen: l.config.tunnel.listen.as_ref().map(|a| *a.get_ref()),
        peers,
        forwards,
        admin: l.config.node.admin.as_ref().map(|a| *a.get_ref()),
        settings: l.settings(),
    })
}

pub fn check_config(args: CheckArgs) -> Result<ExitCode> {
    let l = Config::load(&args.config)?;
    // The key must be usable too: a config that cannot start is not valid.
    let key = l.resolve(&l.config.node.key);
    let id = Identity::load(&key).with_context(|| format!("node.key {}", key.display()))?;
    println!(
        "{}: ok (node {:?}, fingerprint {}, {} peer(s), {} forward(s))",
        args.config.display(),
        l.config.node.name.get_ref(),
        id.fingerprint,
        l.config.peers.len(),
        l.config.forwards.len()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn run(args: RunArgs) -> Result<ExitCode> {
    init_logging();
    let l = Config::load(&args.config)?;
    let spec = node_spec(&l)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ditto")
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let node = Node::start(spec).await?;
        if let Some(a) = node.admin_addr {
            tracing::info!("admin endpoint on http://{a}/ (metrics, healthz, status)");
        }
        wait_for_signal().await?;
        tracing::info!("signal received: stopping (a second signal exits at once)");
        tokio::spawn(async {
            if wait_for_signal().await.is_ok() {
                tracing::warn!("second signal: exiting without draining");
                std::process::exit(130);
            }
        });
        node.shutdown().await;
        anyhow::Ok(())
    })?;
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
