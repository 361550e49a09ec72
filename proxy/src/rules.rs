//! The kernel state ditto owns for interception: its nftables tables and the policy routing that
//! delivers diverted packets locally.
//!
//! ditto installs its tables in one atomic `nft -f` transaction when it starts and deletes exactly
//! those tables when it stops; it never reads, changes or flushes anything else. The rules are
//! written to fail open where the kernel allows it:
//!
//! * tproxy: nft's `tproxy` statement with no socket to divert to does not match, so the packet is
//!   routed on untouched (a dead ditto is a plain router).
//! * inline: a SYN is diverted only if a transparent ditto socket listens on its port (`socket
//!   transparent 1`), so a dead ditto leaves frames bridged. `socket wildcard 1 accept` keeps
//!   mid-stream packets of connections that existed before ditto started on the bridge.
//! * redirect: nat REDIRECT to a dead listener refuses connections; only removing the table
//!   restores traffic, which the daemon's guard process does when the daemon dies or hangs.
//!
//! Only SYNs (without ACK) are diverted: connections that were passing before ditto started are
//! never captured mid-stream.
//!
//! Marked packets (diverted ones, and replies to ditto's transparent sockets) are delivered
//! locally by `ip rule fwmark MARK lookup TABLE` with `local default dev lo` in that table.

use crate::intercept::{InterceptSpec, Mode, RuleNames};
use ipnet::IpNet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

/// Installing or removing rules failed.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("running {cmd}: {source} (is it installed? ditto needs nftables and iproute2)")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("{cmd} failed: {stderr}")]
    Failed { cmd: String, stderr: String },
    #[error("bridge {bridge}: {why}")]
    Bridge { bridge: String, why: String },
}

fn run(cmd: &mut Command, stdin: Option<&str>) -> Result<(), RulesError> {
    let name = format!("{cmd:?}").replace('"', "");
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| RulesError::Spawn {
        cmd: name.clone(),
        source,
    })?;
    if let (Some(text), Some(mut w)) = (stdin, child.stdin.take()) {
        w.write_all(text.as_bytes())
            .map_err(|source| RulesError::Spawn {
                cmd: name.clone(),
                source,
            })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|source| RulesError::Spawn {
            cmd: name.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(RulesError::Failed {
            cmd: name,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

fn nft(script: &str) -> Result<(), RulesError> {
    run(Command::new("nft").args(["-f", "-"]), Some(script))
}

fn ip(args: &[&str]) -> Result<(), RulesError> {
    run(Command::new("ip").args(args), None)
}

/// The bridge's MAC address: diverted frames are re-addressed to it so the host takes them.
fn bridge_mac(bridge: &str) -> Result<String, RulesError> {
    let bad = |why: String| RulesError::Bridge {
        bridge: bridge.to_owned(),
        why,
    };
    if !crate::intercept::valid_ifname(bridge) {
        return Err(bad("invalid interface name".into()));
    }
    let path = format!("/sys/class/net/{bridge}/address");
    let mac = std::fs::read_to_string(&path).map_err(|e| bad(format!("reading {path}: {e}")))?;
    let mac = mac.trim().to_owned();
    let valid = mac.len() == 17
        && mac
            .split(':')
            .all(|b| b.len() == 2 && b.chars().all(|c| c.is_ascii_hexdigit()));
    if !valid || !std::path::Path::new(&format!("/sys/class/net/{bridge}/bridge")).exists() {
        return Err(bad("not a bridge (or has no MAC address)".into()));
    }
    Ok(mac)
}

fn quote_list(items: &[String]) -> String {
    items
        .iter()
        .map(|i| format!("\"{}\"", i.replace(['"', '\\'], "")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The nft script that atomically replaces ditto's tables with the ones `spec` needs.
/// `mac` is the bridge's address (inline mode only).
pub fn render(spec: &InterceptSpec, mac: Option<&str>) -> String {
    render_with(spec, mac, true)
}

/// The ruleset, diverting new connections or not (`divert` false: a draining node keeps delivering
/// the packets of the connections it holds, and lets every new one through untouched).
fn render_with(spec: &InterceptSpec, mac: Option<&str>, divert: bool) -> String {
    let n = &spec.names;
    let t = &n.table;
    let mark = format!("{:#x}", n.fwmark);
    let mut s = String::new();
    // Declaring then deleting makes the delete succeed whether or not the table existed; the whole
    // file is one transaction, so traffic never sees a moment without rules or with both sets.
    let _ = writeln!(s, "table inet {t}\ndelete table inet {t}");
    let _ = writeln!(s, "table bridge {t}\ndelete table bridge {t}");
    let _ = writeln!(s, "table inet {t} {{");
    let _ = writeln!(
        s,
        "  comment \"ditto interception ({}); removed when ditto stops\"",
        spec.mode.as_str()
    );
    let ports = spec.ports.iter().map(|p| p.to_string()).collect::<Vec<_>>();
    if !ports.is_empty() {
        let _ = writeln!(
            s,
            "  set ports {{ type inet_service; flags interval; elements = {{ {} }} }}",
            ports.join(", ")
        );
    }
    let (b4, b6): (Vec<&ipnet::IpNet>, Vec<&ipnet::IpNet>) =
        spec.bypass.iter().partition(|n| n.addr().is_ipv4());
    for (name, ty, nets) in [("bypass4", "ipv4_addr", &b4), ("bypass6", "ipv6_addr", &b6)] {
        if !nets.is_empty() {
            let list = nets.iter().map(|n| n.to_string()).collect::<Vec<_>>();
            let _ = writeln!(
                s,
                "  set {name} {{ type {ty}; flags interval; elements = {{ {} }} }}",
                list.join(", ")
            );
        }
    }
    let syn = "tcp flags & (syn | ack) == syn";
    let dport = if ports.is_empty() {
        String::new()
    } else {
        " tcp dport @ports".to_owned()
    };
    let mut bypass = String::new();
    if !b4.is_empty() {
        let _ = writeln!(bypass, "    {syn} ip daddr @bypass4 accept");
    }
    if !b6.is_empty() {
        let _ = writeln!(bypass, "    {syn} ip6 daddr @bypass6 accept");
    }
    let iif = if spec.interfaces.is_empty() {
        String::new()
    } else {
        format!(
            "    iifname != {{ {} }} accept\n",
            quote_list(&spec.interfaces)
        )
    };
    let _ = writeln!(
        s,
        "  chain prerouting {{\n    type filter hook prerouting priority mangle; policy accept;"
    );
    match spec.mode {
        Mode::Tproxy => {
            let port = spec.listen.port();
            // Traffic to this host (the tunnel, above all) is delivered as it is: one route
            // lookup, and no socket lookup on the busiest path.
            let _ = writeln!(s, "    fib daddr type local accept");
            // Packets of connections ditto holds with foreign addresses (accepted diverted ones,
            // and its own connections from a client's address) go to those sockets.
            let _ = writeln!(
                s,
                "    meta l4proto tcp socket transparent 1 meta mark set {mark} accept"
            );
            if divert {
                s.push_str(&iif);
                s.push_str(&bypass);
                let _ = writeln!(
                    s,
                    "    {syn}{dport} tproxy to :{port} meta mark set {mark} accept"
                );
            }
        }
        Mode::Redirect => {
            let _ = writeln!(s, "    fib daddr type local accept");
            let _ = writeln!(
                s,
                "    meta l4proto tcp socket transparent 1 meta mark set {mark} accept"
            );
        }
        Mode::Inline => {
            let _ = writeln!(s, "    fib daddr type local accept");
            if divert {
                s.push_str(&bypass);
                let _ = writeln!(
                    s,
                    "    {syn}{dport} socket transparent 1 meta mark set {mark} accept"
                );
            }
            // Two lookups, not one `socket transparent 1 socket wildcard 0` rule: `wildcard`
            // cannot be evaluated on a connection still in its handshake (a request socket), so
            // that rule would miss the handshake's last ACK and break every diverted connection.
            let _ = writeln!(s, "    meta l4proto tcp socket wildcard 1 accept");
            let _ = writeln!(
                s,
                "    meta l4proto tcp socket transparent 1 meta mark set {mark} accept"
            );
        }
    }
    let _ = writeln!(s, "  }}");
    if spec.mode == Mode::Redirect {
        let port = spec.listen.port();
        let _ = writeln!(
            s,
            "  chain nat_prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;"
        );
        let _ = writeln!(s, "    fib daddr type local accept");
        if divert {
            s.push_str(&iif);
            s.push_str(&bypass);
            let _ = writeln!(s, "    {syn}{dport} redirect to :{port}");
        }
        let _ = writeln!(s, "  }}");
    }
    let _ = writeln!(s, "}}");
    if let (Mode::Inline, Some(mac)) = (spec.mode, mac) {
        // br_netfilter runs the inet prerouting chain above for bridged frames first (priority 0
        // in the bridge family); frames it marked are handed to the host instead of bridged.
        let _ = writeln!(s, "table bridge {t} {{");
        let _ = writeln!(
            s,
            "  comment \"ditto interception (inline); removed when ditto stops\""
        );
        let _ = writeln!(
            s,
            "  chain prerouting {{\n    type filter hook prerouting priority 100; policy accept;"
        );
        let _ = writeln!(
            s,
            "    meta mark {mark} ether daddr set {mac} meta pkttype set host"
        );
        let _ = writeln!(s, "  }}\n}}");
    }
    s
}

/// Turns on what inline mode needs from the bridge: br_netfilter must show bridged IP traffic to
/// the inet hooks (the per-namespace default is on; an operator may have turned it off).
fn bridge_sysctls() {
    for f in ["bridge-nf-call-iptables", "bridge-nf-call-ip6tables"] {
        let p = format!("/proc/sys/net/bridge/{f}");
        if std::fs::read_to_string(&p).is_ok_and(|v| v.trim() == "1") {
            continue;
        }
        if let Err(e) = std::fs::write(&p, "1") {
            tracing::warn!("setting {p} to 1: {e} (inline interception needs it)");
        }
    }
}

fn routing(n: &RuleNames, add: bool) -> Result<(), RulesError> {
    let mark = format!("{:#x}", n.fwmark);
    let table = n.route_table.to_string();
    for (fam, any) in [("-4", "0.0.0.0/0"), ("-6", "::/0")] {
        // Remove every copy first (a previous run may have died before cleaning up), bounded.
        for _ in 0..16 {
            if ip(&[fam, "rule", "del", "fwmark", &mark, "lookup", &table]).is_err() {
                break;
            }
        }
        let _ = ip(&[fam, "route", "flush", "table", &table]);
        if add {
            let r = ip(&[fam, "rule", "add", "fwmark", &mark, "lookup", &table]).and_then(|_| {
                ip(&[
                    fam, "route", "replace", "local", any, "dev", "lo", "table", &table,
                ])
            });
            match r {
                Ok(()) => {}
                // A kernel without IPv6 still intercepts IPv4.
                Err(e) if fam == "-6" => tracing::warn!("IPv6 policy routing: {e}"),
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// The route the kernel takes now toward `net`'s first address, as `ip route` arguments
/// (`via GATEWAY dev DEV`, or `dev DEV` on a link), from `ip -j route get`.
fn path_to(net: &IpNet) -> Result<Vec<String>, RulesError> {
    let addr = net.network().to_string();
    let cmd = format!("ip -j route get {addr}");
    let out = Command::new("ip")
        .args(["-j", "route", "get", &addr])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| RulesError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(RulesError::Failed {
            cmd,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    parse_route_get(&out.stdout).ok_or_else(|| RulesError::Failed {
        cmd,
        stderr: format!(
            "no usable route to {net}: {}",
            String::from_utf8_lossy(&out.stdout).trim()
        ),
    })
}

/// `via G dev D` (or `dev D`) from the JSON of `ip -j route get`; `None` for a local, blackhole or
/// unreachable answer, which no router should be told to send traffic along.
fn parse_route_get(json: &[u8]) -> Option<Vec<String>> {
    let v: serde_json::Value = serde_json::from_slice(json).ok()?;
    let r = v.as_array()?.first()?;
    if r.get("type")
        .and_then(|t| t.as_str())
        .is_some_and(|t| t != "unicast")
    {
        return None;
    }
    let dev = r.get("dev")?.as_str()?;
    if dev == "lo" {
        return None;
    }
    let mut args = Vec::new();
    if let Some(g) = r.get("gateway").and_then(|g| g.as_str()) {
        args.extend(["via".to_owned(), g.to_owned()]);
    }
    args.extend(["dev".to_owned(), dev.to_owned()]);
    Some(args)
}

/// Puts the announced prefixes into the announce table, routed the way the kernel routes them now
/// (a routing daemon that imports the table also installs what it imports: the same route changes
/// nothing). Replaces what an earlier run left there.
pub fn announce(spec: &InterceptSpec) -> Result<(), RulesError> {
    withdraw(&spec.names);
    let table = spec.names.announce_table.to_string();
    for net in &spec.announce {
        let via = path_to(net)?;
        let dest = net.to_string();
        let mut args = vec!["route", "replace", dest.as_str()];
        args.extend(via.iter().map(String::as_str));
        args.extend(["table", table.as_str()]);
        if let Err(e) = ip(&args) {
            withdraw(&spec.names);
            return Err(e);
        }
    }
    Ok(())
}

/// Empties the announce table: the site's routers stop sending this appliance new flows.
pub fn withdraw(n: &RuleNames) {
    let table = n.announce_table.to_string();
    for fam in ["-4", "-6"] {
        let _ = ip(&[fam, "route", "flush", "table", &table]);
    }
}

/// Installs the tables and policy routing `spec` needs, replacing any left by an earlier run. The
/// prefixes are announced separately ([`announce`]), once the node can serve them.
pub fn install(spec: &InterceptSpec) -> Result<(), RulesError> {
    let mac = match (spec.mode, &spec.bridge) {
        (Mode::Inline, Some(b)) => {
            bridge_sysctls();
            Some(bridge_mac(b)?)
        }
        (Mode::Inline, None) => {
            return Err(RulesError::Bridge {
                bridge: String::new(),
                why: "inline mode needs a bridge".into(),
            })
        }
        _ => None,
    };
    routing(&spec.names, true)?;
    if let Err(e) = nft(&render(spec, mac.as_deref())) {
        let _ = routing(&spec.names, false);
        return Err(e);
    }
    Ok(())
}

/// Stops diverting new connections (they go straight to their destinations), while the packets of
/// the connections the node holds are still delivered to it, so they can drain. One transaction.
pub fn stop_diverting(spec: &InterceptSpec) -> Result<(), RulesError> {
    let mac = match (spec.mode, &spec.bridge) {
        // Redirected connections keep their translation only while the nat chain and its rules
        // stay as they are (replacing the table, or even flushing the chain, cut them off, as
        // measured): an `accept` at the head lets new connections pass untranslated.
        (Mode::Redirect, _) => {
            return nft(&format!(
                "insert rule inet {} nat_prerouting accept\n",
                spec.names.table
            ))
        }
        (Mode::Inline, Some(b)) => Some(bridge_mac(b)?),
        _ => None,
    };
    nft(&render_with(spec, mac.as_deref(), false))
}

/// Whether ditto's tables are in the kernel (one `nft list tables`).
pub fn installed(n: &RuleNames) -> bool {
    let out = Command::new("nft").args(["list", "tables"]).output();
    let Ok(out) = out else { return false };
    let ours = [
        format!("table inet {}", n.table),
        format!("table bridge {}", n.table),
    ];
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| ours.iter().any(|o| l.trim() == o))
}

/// Withdraws the announced prefixes, then removes the interception ([`remove_interception`]);
/// idempotent. What the guard and `ditto cleanup` do.
pub fn remove(n: &RuleNames) -> Result<(), RulesError> {
    withdraw(n);
    remove_interception(n)
}

/// Removes ditto's tables, then its policy routing; idempotent. The tables go in one transaction:
/// that alone restores traffic (and ends the intercepted connections still open: their packets are
/// routed on, see [`stop_diverting`] for a drain).
pub fn remove_interception(n: &RuleNames) -> Result<(), RulesError> {
    let t = &n.table;
    nft(&format!(
        "table inet {t}\ndelete table inet {t}\ntable bridge {t}\ndelete table bridge {t}\n"
    ))?;
    routing(n, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intercept::PortRange;

    fn spec(mode: Mode) -> InterceptSpec {
        InterceptSpec {
            mode,
            listen: "[::]:7070".parse().expect("addr"),
            ports: vec![
                PortRange { lo: 5001, hi: 5001 },
                PortRange { lo: 6000, hi: 6010 },
            ],
            interfaces: vec!["lan0".into()],
            bridge: Some("br0".into()),
            preserve_client: false,
            names: RuleNames::default(),
            bypass: vec!["10.2.9.0/24".parse().expect("net")],
            announce: Vec::new(),
        }
    }

    #[test]
    fn announced_prefixes_follow_the_kernels_path() {
        let p = |j: &str| parse_route_get(j.as_bytes());
        assert_eq!(
            p(
                r#"[{"dst":"10.2.0.0","gateway":"10.11.0.1","dev":"a1","prefsrc":"10.11.0.2","flags":[],"uid":0,"cache":[]}]"#
            ),
            Some(vec![
                "via".into(),
                "10.11.0.1".into(),
                "dev".into(),
                "a1".into()
            ])
        );
        assert_eq!(
            p(
                r#"[{"dst":"10.2.0.0","dev":"eth1","prefsrc":"10.2.0.9","flags":[],"uid":0,"cache":[]}]"#
            ),
            Some(vec!["dev".into(), "eth1".into()])
        );
        // This host's own address, or a destination the kernel would drop: nothing to announce.
        assert_eq!(
            p(
                r#"[{"type":"local","dst":"10.2.0.1","dev":"lo","prefsrc":"10.2.0.1","flags":[],"uid":0,"cache":["local"]}]"#
            ),
            None
        );
        assert_eq!(
            p(r#"[{"type":"unreachable","dst":"10.9.0.0","dev":"lo"}]"#),
            None
        );
        assert_eq!(p("not json"), None);
        assert_eq!(p("[]"), None);
    }

    #[test]
    fn tproxy_diverts_only_syns_and_fails_open() {
        let s = render(&spec(Mode::Tproxy), None);
        assert!(
            s.starts_with("table inet ditto\ndelete table inet ditto\n"),
            "{s}"
        );
        assert!(s.contains("elements = { 5001, 6000-6010 }"), "{s}");
        assert!(s.contains(
            "tcp flags & (syn | ack) == syn tcp dport @ports tproxy to :7070 meta mark set 0x1d1 accept"
        ));
        assert!(s.contains("iifname != { \"lan0\" } accept"), "{s}");
        assert!(s.contains("ip daddr @bypass4 accept"), "{s}");
        assert!(!s.contains("bypass6"), "{s}");
        assert!(!s.contains("table bridge ditto {"), "{s}");
    }

    #[test]
    fn a_draining_ruleset_diverts_nothing_new_and_keeps_delivering_held_connections() {
        for mode in [Mode::Tproxy, Mode::Redirect, Mode::Inline] {
            let s = render_with(&spec(mode), Some("02:00:00:00:00:01"), false);
            assert!(!s.contains("tproxy to"), "{s}");
            assert!(!s.contains("redirect to"), "{s}");
            assert!(!s.contains("tcp flags & (syn | ack) == syn"), "{s}");
            if mode != Mode::Redirect {
                assert!(
                    s.contains("meta l4proto tcp socket transparent 1 meta mark set 0x1d1 accept"),
                    "{s}"
                );
            }
        }
    }

    #[test]
    fn redirect_uses_nat_and_inline_depends_on_the_socket() {
        let r = render(&spec(Mode::Redirect), None);
        assert!(
            r.contains("type nat hook prerouting priority dstnat"),
            "{r}"
        );
        assert!(r.contains("tcp dport @ports redirect to :7070"), "{r}");
        let i = render(&spec(Mode::Inline), Some("02:00:00:00:00:01"));
        assert!(
            i.contains("tcp dport @ports socket transparent 1 meta mark set 0x1d1 accept"),
            "{i}"
        );
        assert!(i.contains("socket wildcard 1 accept"), "{i}");
        assert!(
            i.contains("meta mark 0x1d1 ether daddr set 02:00:00:00:00:01 meta pkttype set host")
        );
        assert!(!i.contains("tproxy"), "{i}");
    }
}
