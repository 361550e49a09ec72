//! `ditto status`: asks a running node's admin endpoint for its peers, tunnels, flows and savings.

use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Admin address of the node.
    #[arg(long, default_value = "127.0.0.1:9090", conflicts_with = "config")]
    pub admin: SocketAddr,
    /// Take the admin address (node.admin) from this config file instead.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Print the raw JSON.
    #[arg(long)]
    pub json: bool,
}

fn mib(b: u64) -> String {
    if b >= 10 << 30 {
        format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

pub fn run(args: Args) -> Result<ExitCode> {
    let admin = match &args.config {
        Some(c) => {
            let l = crate::config::Config::load(c)?;
            match &l.config.node.admin {
                Some(a) => *a.get_ref(),
                None => bail!("{} has no node.admin address", c.display()),
            }
        }
        None => args.admin,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (code, body) = rt
        .block_on(ditto_proxy::admin::get(admin, "/status"))
        .with_context(|| {
            format!(
                "asking the node at {admin} (is `ditto run` up, with node.admin = \"{admin}\"?)"
            )
        })?;
    if code != 200 {
        bail!("{admin} answered HTTP {code}");
    }
    if args.json {
        println!("{body}");
        return Ok(ExitCode::SUCCESS);
    }
    let v: serde_json::Value = serde_json::from_str(&body).context("parsing the status")?;
    let u = |k: &str| v[k].as_u64().unwrap_or(0);
    println!(
        "node {}  (fingerprint {})  up {:.0}s",
        v["node"].as_str().unwrap_or("?"),
        v["fingerprint"].as_str().unwrap_or("?"),
        v["uptime_seconds"].as_f64().unwrap_or(0.0)
    );
    if let Some(i) = v["intercept"].as_object() {
        println!(
            "interception: {} (nftables table {}: {}), {} route(s){}",
            i["mode"].as_str().unwrap_or("?"),
            i["table"].as_str().unwrap_or("?"),
            if i["rules_installed"].as_bool().unwrap_or(false) {
                "installed"
            } else {
                "NOT installed"
            },
            i["routes"].as_u64().unwrap_or(0),
            if i["preserve_client"].as_bool().unwrap_or(false) {
                ", connecting from client addresses"
            } else {
                ""
            }
        );
    }
    println!("peers:");
    for p in v["peers"].as_array().into_iter().flatten() {
        let pu = |k: &str| p[k].as_u64().unwrap_or(0);
        let rtt = p["rtt_ms"]
            .as_f64()
            .map_or("-".to_owned(), |r| format!("{r:.1} ms"));
        println!(
            "  {:<16} {:<4} conns {} streams {} rtt {}  LAN {} / {}  WAN {} / {}  (sent / received)  reconnects {}",
            p["name"].as_str().unwrap_or("?"),
            if p["up"].as_bool().unwrap_or(false) { "UP" } else { "down" },
            pu("connections"),
            pu("streams"),
            rtt,
            mib(pu("lan_bytes_sent")),
            mib(pu("lan_bytes_received")),
            mib(pu("wan_bytes_sent")),
            mib(pu("wan_bytes_received")),
            pu("reconnects"),
        );
    }
    println!("flows: {} active", v["flows_active"].as_i64().unwrap_or(0));
    for f in v["flows"].as_array().into_iter().flatten() {
        println!(
            "  {:<12} {:<14} {}",
            f["outcome"].as_str().unwrap_or("?"),
            f["reason"].as_str().unwrap_or("?"),
            f["count"].as_u64().unwrap_or(0)
        );
    }
    let lan = u("lan_bytes_sent");
    let wan = u("wan_bytes_sent");
    let ratio = if wan > 0 {
        lan as f64 / wan as f64
    } else {
        0.0
    };
    println!(
        "savings: LAN sent {} as WAN {} ({ratio:.1}x); dedup saved {}, compression saved {}",
        mib(lan),
        mib(wan),
        mib(u("dedup_saved_bytes")),
        mib(u("compression_saved_bytes"))
    );
    if let (Some(b), Some(c)) = (v["store_bytes"].as_u64(), v["store_chunks"].as_u64()) {
        println!("store: {} in {c} chunks", mib(b));
    }
    if let Some(d) = v["store_degraded"].as_str() {
        println!("store DEGRADED (disk tier off, new chunks kept in RAM only): {d}");
    }
    Ok(ExitCode::SUCCESS)
}
