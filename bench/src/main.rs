//! `ditto-bench`: topology management, traffic tools and the scenario runner.

use anyhow::Result;
use clap::{Parser, Subcommand};
use ditto_bench::topo::{LinkSpec, Topo};
use ditto_bench::{linktest, load, modes, procs, scenarios, traffic};
use std::os::unix::process::CommandExt;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "ditto-bench", version, about = "ditto's WAN benchmark kit")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Build or tear down the five-namespace topology (client, a, wan, b, server).
    Topo {
        #[command(subcommand)]
        action: TopoCmd,
    },
    /// Run a throw-away topology with one link setting and measure RTT and one bulk download.
    Linktest(linktest::LinktestArgs),
    /// A ditto pair on loopback under many concurrent flows and attacks on its tunnel port.
    Load(load::LoadArgs),
    /// Run benchmark scenarios (all, or the named ones).
    Scenarios(scenarios::ScenarioArgs),
    /// Compare ditto's forward mode with its intercepting modes (tproxy, redirect; inline on --topology bridged) (throughput, latency, fail-to-wire).
    Modes(modes::ModesArgs),
    /// Request/response exchanges on new connections, every sample as JSON (used by `modes`).
    #[command(hide = true)]
    RrSamples(modes::RrSamplesArgs),
    /// Open a new connection every interval and report each (used by `modes`).
    #[command(hide = true)]
    ConnectProbe(modes::ProbeArgs),
    /// Serve RAND/FILE/ECHO requests (runs inside a namespace).
    Serve(traffic::ServeArgs),
    /// Download and verify data from a `serve`; prints JSON.
    Fetch(traffic::FetchArgs),
    /// Measure request/response latency against a `serve`; prints JSON.
    Rr(traffic::RrArgs),
    /// Wait until a TCP port accepts connections.
    WaitPort {
        #[arg(long)]
        addr: String,
        #[arg(long, default_value_t = 10)]
        timeout_s: u64,
    },
    /// Send UDP datagrams at a fixed rate; prints JSON.
    UdpBlast(traffic::UdpArgs),
    /// Count received UDP datagrams; prints JSON.
    UdpSink(traffic::UdpArgs),
    /// Run a command and record its CPU time and peak memory.
    Rusage(procs::RusageArgs),
    /// TCP relay that pipes one direction through the zstd binary.
    Zrelay(procs::ZrelayArgs),
    /// Draw the charts of scenario runs again from their JSON files (RUN.json -> RUN-*.svg).
    Charts {
        /// Result files written by `scenarios` (bench/results/DATE.json).
        #[arg(required = true)]
        json: Vec<std::path::PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum TopoCmd {
    /// Create the namespaces, veth pairs, addresses and routes; with --rate/--rtt also start
    /// the emulator in the background (its counters go to <state dir>/wanem-*.json).
    Up {
        #[arg(long)]
        name: String,
        #[arg(long)]
        rate: Option<String>,
        #[arg(long)]
        rtt: Option<String>,
        #[arg(long)]
        loss: Option<String>,
        #[arg(long)]
        queue: Option<String>,
    },
    /// Remove everything of that prefix (idempotent; also after a crashed run).
    Down {
        #[arg(long)]
        name: String,
    },
}

fn topo_cmd(action: TopoCmd) -> Result<()> {
    match action {
        TopoCmd::Up {
            name,
            rate,
            rtt,
            loss,
            queue,
        } => {
            let topo = Topo::new(&name)?;
            topo.up()?;
            println!(
                "namespaces: {}",
                ditto_bench::topo::Role::ALL.map(|r| topo.ns(r)).join(" ")
            );
            if rate.is_some() || rtt.is_some() || loss.is_some() {
                let spec = LinkSpec {
                    rate,
                    rtt,
                    loss,
                    queue,
                    ..Default::default()
                };
                let wanem = linktest::sibling_binary("ditto-wanem")?;
                let out = topo.state_dir().join("wanem.log");
                let stats = topo.state_dir().join("wanem-stats.json");
                let log = std::fs::File::create(&out)?;
                let mut cmd = topo.cmd(ditto_bench::topo::Role::Wan, &wanem);
                ditto_bench::topo::link_args(&topo, &mut cmd);
                cmd.arg("--stats-file").arg(&stats).args(spec.to_args()?);
                let child = cmd
                    .stdin(std::process::Stdio::null())
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    .process_group(0)
                    .spawn()?;
                std::thread::sleep(Duration::from_millis(500));
                println!(
                    "emulator pid {} (stats: {}, log: {})",
                    child.id(),
                    stats.display(),
                    out.display()
                );
            }
            Ok(())
        }
        TopoCmd::Down { name } => Topo::new(&name)?.down(),
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.command {
        Cmd::Topo { action } => topo_cmd(action),
        Cmd::Linktest(a) => linktest::run(&a).and_then(|r| print_json(&r)),
        Cmd::Scenarios(a) => scenarios::run(&a),
        Cmd::Load(a) => load::run(&a),
        Cmd::Modes(a) => modes::run(&a),
        Cmd::RrSamples(a) => modes::rr_samples(&a).and_then(|r| print_json(&r)),
        Cmd::ConnectProbe(a) => modes::connect_probe(&a).and_then(|r| print_json(&r)),
        Cmd::Serve(a) => traffic::serve(a),
        Cmd::Fetch(a) => traffic::fetch(&a).and_then(|r| print_json(&r)),
        Cmd::Rr(a) => traffic::rr(&a).and_then(|r| print_json(&r)),
        Cmd::WaitPort { addr, timeout_s } => {
            traffic::wait_port(&addr, Duration::from_secs(timeout_s))
        }
        Cmd::UdpBlast(a) => traffic::udp_blast(&a).and_then(|r| print_json(&r)),
        Cmd::UdpSink(a) => traffic::udp_sink(&a).and_then(|r| print_json(&r)),
        Cmd::Rusage(a) => procs::rusage(&a),
        Cmd::Zrelay(a) => procs::zrelay(a),
        Cmd::Charts { json } => json.iter().try_for_each(|j| {
            for p in ditto_bench::report::rewrite_charts(j)? {
                eprintln!("wrote {}", p.display());
            }
            Ok(())
        }),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ditto-bench: {e:#}");
            ExitCode::from(1)
        }
    }
}
