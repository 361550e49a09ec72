//! `ditto status`: asks a running node's admin endpoint for its peers, tunnels, flows and savings.

use anyhow::{bail, Context, Result};
use ditto_proxy::status::Status;
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
    let st: Status = serde_json::from_str(&body).with_context(|| {
        format!("{admin} answered a status this ditto does not understand (another version?)")
    })?;
    print!("{}", render(&st));
    Ok(ExitCode::SUCCESS)
}

/// The status as `ditto status` prints it.
fn render(v: &Status) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "node {}  (fingerprint {})  up {:.0}s",
        v.node, v.fingerprint, v.uptime_seconds
    );
    if let Some(i) = &v.intercept {
        let _ = writeln!(
            o,
            "interception: {} (nftables table {}: {}), {} route(s){}",
            i.mode,
            i.table,
            if i.rules_installed {
                "installed"
            } else {
                "NOT installed"
            },
            i.routes,
            if i.preserve_client {
                ", connecting from client addresses"
            } else {
                ""
            }
        );
        if !i.announce.is_empty() {
            let _ = if i.announced {
                writeln!(
                    o,
                    "  announcing {} to the site's routers",
                    i.announce.join(", ")
                )
            } else {
                writeln!(
                    o,
                    "  NOT announcing {} (waiting for a tunnel, or stopping)",
                    i.announce.join(", ")
                )
            };
        }
    }
    let _ = writeln!(o, "peers:");
    for p in &v.peers {
        let rtt = p.rtt_ms.map_or("-".to_owned(), |r| format!("{r:.1} ms"));
        let state = if p.version_mismatch {
            "no common protocol version"
        } else if !p.up {
            "down"
        } else if p.healthy_connections == 0 {
            "NOT ANSWERING"
        } else {
            "UP"
        };
        let held = match p.held_streams {
            0 => String::new(),
            n => format!(" ({n} held, waiting for the peer)"),
        };
        let _ = writeln!(
            o,
            "  {:<16} {:<4} conns {} streams {}{held} rtt {}  LAN {} / {}  WAN {} / {}  (sent / received)  reconnects {}  resumed {}",
            p.name,
            state,
            p.connections,
            p.streams,
            rtt,
            mib(p.lan_bytes_sent),
            mib(p.lan_bytes_received),
            mib(p.wan_bytes_sent),
            mib(p.wan_bytes_received),
            p.reconnects,
            p.resumed_streams,
        );
        if let Some(s) = &p.summary {
            let pct = match s.store_chunks {
                0 => "-".to_owned(),
                n => format!("{:.0}%", 100.0 * s.known_chunks.min(n) as f64 / n as f64),
            };
            let _ = writeln!(
                o,
                "  {:<16} its store: we know {} of its {} chunks ({pct}){}",
                "",
                s.known_chunks,
                s.store_chunks,
                if s.in_sync { "" } else { ", learning" },
            );
        }
    }
    for g in &v.groups {
        let total: u64 = g.members.iter().map(|m| m.flows).sum();
        let up = g.members.iter().filter(|m| m.up).count();
        let _ = writeln!(
            o,
            "group {}: {up} of {} members up, {} flows moved off an unreachable home",
            g.name,
            g.members.len(),
            g.moved
        );
        for m in &g.members {
            let share = match total {
                0 => "-".to_owned(),
                t => format!("{:.0}%", 100.0 * m.flows as f64 / t as f64),
            };
            let _ = writeln!(
                o,
                "  {:<16} {:<4} flows {} ({share})",
                m.peer,
                if m.up { "UP" } else { "down" },
                m.flows
            );
        }
    }
    let _ = writeln!(o, "flows: {} active", v.flows_active);
    for f in &v.flows {
        let _ = writeln!(o, "  {:<12} {:<14} {}", f.outcome, f.reason, f.count);
    }
    let (lan, wan) = (v.lan_bytes_sent, v.wan_bytes_sent);
    let ratio = if wan > 0 {
        format!("{:.1}x", lan as f64 / wan as f64)
    } else {
        "-".to_owned()
    };
    let _ = writeln!(
        o,
        "savings: LAN sent {} as WAN {} ({ratio}); dedup saved {}, compression saved {}",
        mib(lan),
        mib(wan),
        mib(v.dedup_saved_bytes),
        mib(v.compression_saved_bytes)
    );
    if let (Some(b), Some(c)) = (v.store_bytes, v.store_chunks) {
        let _ = writeln!(o, "store: {} in {c} chunks", mib(b));
    }
    if let Some(d) = &v.store_degraded {
        let _ = writeln!(
            o,
            "store DEGRADED (disk tier off, new chunks kept in RAM only): {d}"
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use ditto_proxy::status::{FlowCount, InterceptStatus, PeerStatus};

    #[test]
    fn status_round_trips_through_its_json_and_prints_every_part() {
        let st = Status {
            node: "site-a".into(),
            fingerprint: "ab".repeat(32),
            uptime_seconds: 12.0,
            peers: vec![PeerStatus {
                name: "site-b".into(),
                fingerprint: "cd".repeat(32),
                address: Some("198.51.100.7:7000".into()),
                up: true,
                connections: 2,
                streams: 3,
                rtt_ms: Some(41.5),
                lan_bytes_sent: 30 << 20,
                lan_bytes_received: 1 << 20,
                wan_bytes_sent: 10 << 20,
                wan_bytes_received: 1 << 20,
                reconnects: 4,
                held_streams: 3,
                resumed_streams: 7,
                healthy_connections: 0,
                version_mismatch: false,
                summary: Some(ditto_proxy::peer::SummaryStatus {
                    known_chunks: 990,
                    store_chunks: 1000,
                    in_sync: false,
                }),
            }],
            groups: vec![ditto_proxy::group::GroupStatus {
                name: "dc2".into(),
                members: vec![
                    ditto_proxy::group::MemberStatus {
                        peer: "site-b".into(),
                        up: true,
                        flows: 30,
                    },
                    ditto_proxy::group::MemberStatus {
                        peer: "site-b2".into(),
                        up: false,
                        flows: 10,
                    },
                ],
                moved: 4,
            }],
            flows_active: 5,
            flows: vec![FlowCount {
                outcome: "passthrough".into(),
                reason: "peer-down".into(),
                count: 6,
            }],
            lan_bytes_sent: 30 << 20,
            lan_bytes_received: 1 << 20,
            wan_bytes_sent: 10 << 20,
            wan_bytes_received: 1 << 20,
            dedup_saved_bytes: 15 << 20,
            compression_saved_bytes: 5 << 20,
            store_bytes: Some(64 << 20),
            store_chunks: Some(1234),
            store_degraded: Some("disk full".into()),
            intercept: Some(InterceptStatus {
                mode: "tproxy".into(),
                table: "ditto".into(),
                rules_installed: true,
                preserve_client: true,
                routes: 2,
                announce: vec!["10.2.0.0/24".into()],
                announced: true,
            }),
        };
        let json = serde_json::to_string(&st).expect("serialize");
        let back: Status = serde_json::from_str(&json).expect("the JSON the node serves");
        let text = render(&back);
        for part in [
            "node site-a",
            "up 12s",
            "interception: tproxy (nftables table ditto: installed), 2 route(s), connecting from client addresses",
            "announcing 10.2.0.0/24 to the site's routers",
            "site-b",
            "NOT ANSWERING",
            "conns 2 streams 3 (3 held, waiting for the peer) rtt 41.5 ms",
            "resumed 7",
            "its store: we know 990 of its 1000 chunks (99%), learning",
            "LAN 30.0 MiB / 1.0 MiB  WAN 10.0 MiB / 1.0 MiB",
            "reconnects 4",
            "group dc2: 1 of 2 members up, 4 flows moved off an unreachable home",
            "site-b2          down flows 10 (25%)",
            "flows: 5 active",
            "passthrough",
            "peer-down",
            "(3.0x)",
            "dedup saved 15.0 MiB, compression saved 5.0 MiB",
            "store: 64.0 MiB in 1234 chunks",
            "DEGRADED",
        ] {
            assert!(text.contains(part), "{part:?} missing from:\n{text}");
        }
        // A field the node no longer sends is an error, not a silent 0.
        let mut v: serde_json::Value = serde_json::from_str(&json).expect("json");
        v.as_object_mut().expect("object").remove("wan_bytes_sent");
        assert!(serde_json::from_value::<Status>(v).is_err());
    }
}
