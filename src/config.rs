//! The daemon's TOML configuration: parsing (unknown keys are errors, every error names its line),
//! semantic validation, and conversion to a [`ditto_proxy::NodeSpec`].
//!
//! Values that have a syntax (sizes, durations, addresses, fingerprints) are checked while parsing,
//! so toml's error already points at the offending key and line. Checks that relate several keys
//! run in [`Config::validate`], which reports the line of the key at fault through its span.

use ditto_proxy::intercept::{
    InterceptSpec, Mode, PortRange, RouteAction, RouteSpec, RuleNames, MAX_INLINE_PORTS,
};
use ditto_proxy::Fingerprint;
use ipnet::IpNet;
use serde::{Deserialize, Deserializer};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

/// A configuration error, with the line it is about when known.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}:{line}: {message}")]
    Invalid {
        path: String,
        line: usize,
        message: String,
    },
}

/// A byte size: an integer, or a string with a unit ("256MiB", "10GiB", "64KiB", "1.5GB"; the rules
/// of `ditto-units`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Result<ByteSize, ditto_units::UnitError> {
        ditto_units::bytes(s).map(ByteSize)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Str(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// A duration: "5s", "200ms", "2m", "1h" (the rules of `ditto-units`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl Dur {
    pub fn parse(s: &str) -> Result<Dur, ditto_units::UnitError> {
        ditto_units::duration(s).map(Dur)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Dur::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A pinned key fingerprint in hex.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fp(pub Fingerprint);

impl<'de> Deserialize<'de> for Fp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Fingerprint::parse(&s).map(Fp).ok_or_else(|| {
            serde::de::Error::custom(
                "invalid fingerprint: expected 64 hex digits, the SHA-256 of the peer's public key as printed by `ditto keygen`",
            )
        })
    }
}

/// "host:port" with a numeric port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPort(pub String);

impl<'de> Deserialize<'de> for HostPort {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let ok = match s.rsplit_once(':') {
            Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0),
            None => false,
        };
        if ok && s.len() <= 255 {
            Ok(HostPort(s))
        } else {
            Err(serde::de::Error::custom(format!(
                "invalid address {s:?}: expected \"host:port\""
            )))
        }
    }
}

/// A rule of a peer's `allow` list: a prefix with an optional port or port range (see
/// `ditto_proxy::allow`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allow(pub ditto_proxy::AllowRule);

impl<'de> Deserialize<'de> for Allow {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(Allow).map_err(serde::de::Error::custom)
    }
}

/// A TCP port or an inclusive range: `5001` or `"6000-6010"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ports(pub PortRange);

impl<'de> Deserialize<'de> for Ports {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Str(String),
        }
        let bad = |s: String| {
            serde::de::Error::custom(format!(
                "invalid port {s}: expected a port (1-65535) or a range like \"6000-6010\""
            ))
        };
        let port = |s: &str| s.trim().parse::<u16>().ok().filter(|p| *p != 0);
        let r = match Raw::deserialize(d)? {
            Raw::Int(n) => {
                let p = u16::try_from(n)
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| bad(n.to_string()))?;
                PortRange { lo: p, hi: p }
            }
            Raw::Str(s) => {
                let (lo, hi) = match s.split_once('-') {
                    Some((a, b)) => (port(a), port(b)),
                    None => (port(&s), port(&s)),
                };
                match (lo, hi) {
                    (Some(lo), Some(hi)) if lo <= hi => PortRange { lo, hi },
                    _ => return Err(bad(format!("{s:?}"))),
                }
            }
        };
        Ok(Ports(r))
    }
}

/// An IP network: "10.2.0.0/16", "fd00:2::/48", or a single address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Net(pub IpNet);

impl<'de> Deserialize<'de> for Net {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let net = s
            .parse::<IpNet>()
            .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
            .map_err(|_| {
                serde::de::Error::custom(format!(
                    "invalid network {s:?}: expected an address or a prefix like \"10.2.0.0/16\""
                ))
            })?;
        Ok(Net(net.trunc()))
    }
}

/// An "IP:port" socket address; the error says what is wrong with it (toml's own says only
/// "invalid socket address syntax").
pub fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    let expected = "expected an IP address and a port, like \"127.0.0.1:9090\" or \"[::]:7070\"";
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("invalid address {s:?}: no port; {expected}"));
    };
    if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_err()
    {
        return Err(format!(
            "invalid address {s:?}: port {port} is out of range 0-65535"
        ));
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.parse::<std::net::IpAddr>().is_err() {
        return Err(format!(
            "invalid address {s:?}: {host:?} is not an IP address (host names are not resolved here); {expected}"
        ));
    }
    Err(format!("invalid address {s:?}: {expected}"))
}

fn addr<'de, D: Deserializer<'de>>(d: D) -> Result<Spanned<SocketAddr>, D::Error> {
    let s = Spanned::<String>::deserialize(d)?;
    let a = parse_socket_addr(s.get_ref()).map_err(serde::de::Error::custom)?;
    Ok(Spanned::new(s.span(), a))
}

fn opt_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Spanned<SocketAddr>>, D::Error> {
    addr(d).map(Some)
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ModeName {
    Redirect,
    Tproxy,
    Inline,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeSection,
    #[serde(default)]
    pub tunnel: TunnelSection,
    #[serde(default, rename = "peer")]
    pub peers: Vec<PeerSection>,
    #[serde(default, rename = "group")]
    pub groups: Vec<GroupSection>,
    #[serde(default, rename = "forward")]
    pub forwards: Vec<ForwardSection>,
    pub intercept: Option<InterceptSection>,
    #[serde(default, rename = "route")]
    pub routes: Vec<Spanned<RouteSection>>,
}

/// `[intercept]`: transparent interception (see docs/deploy.md).
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct InterceptSection {
    pub mode: Spanned<ModeName>,
    /// redirect/tproxy: where nftables diverts to (a wildcard address).
    #[serde(default, deserialize_with = "opt_addr")]
    pub listen: Option<Spanned<SocketAddr>>,
    /// Destination ports diverted (inline: required; else default all).
    #[serde(default)]
    pub ports: Vec<Spanned<Ports>>,
    /// redirect/tproxy: only connections arriving on these interfaces.
    #[serde(default)]
    pub interfaces: Vec<Spanned<String>>,
    /// inline: the bridge of the LAN and WAN ports.
    pub bridge: Option<Spanned<String>>,
    /// Connect to destinations from the client's own address (default: inline only).
    pub preserve_client: Option<bool>,
    pub table: Option<Spanned<String>>,
    pub fwmark: Option<Spanned<u32>>,
    pub route_table: Option<Spanned<u32>>,
    /// Prefixes to announce to the site's routers (scale-out, docs/scale-out.md): kept in
    /// `announce_table` while ditto runs, for the local routing daemon to import and announce.
    #[serde(default)]
    pub announce: Vec<Spanned<Net>>,
    pub announce_table: Option<Spanned<u32>>,
    /// The guard's timeout ("0s": no guard).
    pub watchdog: Option<Spanned<Dur>>,
}

/// `[[route]]`: which peer carries intercepted flows to these destinations.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    #[serde(default)]
    pub dest: Vec<Net>,
    #[serde(default)]
    pub ports: Vec<Ports>,
    pub peer: Option<Spanned<String>>,
    #[serde(default)]
    pub bypass: bool,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    pub name: Spanned<String>,
    /// Private key file (relative paths are relative to the config file).
    pub key: Spanned<PathBuf>,
    /// Admin endpoint (metrics, health, status); none when absent.
    #[serde(default, deserialize_with = "opt_addr")]
    pub admin: Option<Spanned<SocketAddr>>,
    /// Allow `admin` on a non-loopback address.
    #[serde(default)]
    pub admin_public: bool,
    /// Disk tier of the chunk store; RAM-only when absent.
    pub store_dir: Option<PathBuf>,
    /// Key the disk tier is encrypted with (32 random bytes, created on first start); by default next
    /// to `key`: `NAME.key` -> `NAME.store.key`.
    pub store_key: Option<Spanned<PathBuf>>,
    pub store_ram: Option<Spanned<ByteSize>>,
    pub store_disk: Option<Spanned<ByteSize>>,
    /// `false` carries streams verbatim (tunnel only, for comparison); both ends must agree.
    #[serde(default = "yes")]
    pub dedup: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct TunnelSection {
    /// Where peers dial us; a node that only dials has none.
    #[serde(default, deserialize_with = "opt_addr")]
    pub listen: Option<Spanned<SocketAddr>>,
    /// Connections kept to each peer we dial.
    pub connections: Option<Spanned<u32>>,
    /// Per-stream receive window.
    pub window: Option<Spanned<ByteSize>>,
    pub max_streams: Option<Spanned<u32>>,
    pub max_flows: Option<Spanned<u32>>,
    /// Fixed SO_SNDBUF/SO_RCVBUF for tunnel sockets. Unset keeps the kernel's autotuning.
    pub socket_buffer: Option<Spanned<ByteSize>>,
    /// TCP congestion control for tunnel sockets ("bbr" by default; "" keeps the system default).
    pub congestion: Option<String>,
    pub notsent_lowat: Option<Spanned<ByteSize>>,
    /// Cap a tunnel connection's pacing rate at the bottleneck's when its queue overflows, and size
    /// its send buffer from the measured bandwidth-delay product (on by default).
    pub pacing: Option<bool>,
    pub keepalive: Option<Spanned<Dur>>,
    /// A tunnel connection silent this long is suspect: new flows avoid it (or pass through).
    pub suspect_after: Option<Spanned<Dur>>,
    /// How long streams wait for an unreachable peer before their LAN sides are reset.
    pub hold: Option<Spanned<Dur>>,
    /// Bytes all flows together keep until their peers acknowledge them.
    pub retain_budget: Option<Spanned<ByteSize>>,
    pub connect_timeout: Option<Dur>,
    pub drain_timeout: Option<Dur>,
    /// How long an accepted tunnel connection has to complete TLS and hello.
    pub handshake_timeout: Option<Spanned<Dur>>,
    /// Unauthenticated tunnel connections at once (past it, the oldest of the busiest address
    /// is closed).
    pub max_handshakes: Option<Spanned<u32>>,
    /// Unauthenticated tunnel connections at once from one address.
    pub handshakes_per_source: Option<Spanned<u32>>,
    /// MTU of the WAN path: tunnel sockets clamp their segment size to fit it (for paths that
    /// drop big packets without telling, e.g. with ICMP filtered).
    pub mtu: Option<Spanned<u32>>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct PeerSection {
    pub name: Spanned<String>,
    pub address: Option<HostPort>,
    pub fingerprint: Spanned<Fp>,
    /// Destinations this peer's OPENs may reach; everything when absent.
    pub allow: Option<Vec<Allow>>,
}

impl PeerSection {
    /// The peer's allow list as the proxy takes it.
    pub fn allow_list(&self) -> ditto_proxy::AllowList {
        match &self.allow {
            None => ditto_proxy::AllowList::everything(),
            Some(rules) => ditto_proxy::AllowList::only(rules.iter().map(|r| r.0).collect()),
        }
    }
}

/// `[[group]]`: peers that serve one remote site together (scale-out, docs/scale-out.md). A
/// forward or route that names the group sends each flow to its destination's home member.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct GroupSection {
    pub name: Spanned<String>,
    pub members: Spanned<Vec<Spanned<String>>>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct ForwardSection {
    #[serde(deserialize_with = "addr")]
    pub listen: Spanned<SocketAddr>,
    pub peer: Option<Spanned<String>>,
    pub target: HostPort,
    #[serde(default)]
    pub bypass: bool,
}

/// A parsed and validated config, with the file it came from.
#[derive(Debug)]
pub struct Loaded {
    pub path: PathBuf,
    pub config: Config,
    /// The file's text, for the line numbers of later errors.
    src: String,
}

/// Node, peer and group names: 1-64 letters, digits, '-', '_' or '.'.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

fn line_of(src: &str, offset: usize) -> usize {
    src[..offset.min(src.len())]
        .bytes()
        .filter(|b| *b == b'\n')
        .count()
        + 1
}

impl Config {
    /// Parses `src` (from `path`, for messages) and validates it.
    pub fn parse(src: &str, path: &Path) -> Result<Config, ConfigError> {
        let p = path.display().to_string();
        let config: Config = toml::from_str(src).map_err(|e| ConfigError::Parse {
            path: p.clone(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        config
            .validate()
            .map_err(|(span, message)| ConfigError::Invalid {
                path: p,
                line: line_of(src, span.start),
                message,
            })?;
        Ok(config)
    }

    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
        let src = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Loaded::from_source(src, path)
    }

    /// Checks relations between keys. The error carries the span of the key at fault.
    pub fn validate(&self) -> Result<(), (std::ops::Range<usize>, String)> {
        let n = &self.node;
        if !valid_name(n.name.get_ref()) {
            return Err((
                n.name.span(),
                "node.name must be 1-64 characters of letters, digits, '-', '_' or '.'".into(),
            ));
        }
        if let Some(a) = &n.admin {
            if !a.get_ref().ip().is_loopback() && !n.admin_public {
                return Err((
                    a.span(),
                    format!(
                        "node.admin {} is not a loopback address: the admin endpoint has no authentication; set admin_public = true to expose it anyway",
                        a.get_ref()
                    ),
                ));
            }
        }
        if let Some(r) = &n.store_ram {
            if r.get_ref().0 < 1 << 20 {
                return Err((r.span(), "node.store_ram must be at least 1MiB".into()));
            }
        }
        if let Some(d) = &n.store_disk {
            if n.store_dir.is_none() {
                return Err((d.span(), "node.store_disk needs node.store_dir".into()));
            }
            if d.get_ref().0 < 16 << 20 {
                return Err((d.span(), "node.store_disk must be at least 16MiB".into()));
            }
        }
        let t = &self.tunnel;
        if let Some(c) = &t.connections {
            if !(1..=16).contains(c.get_ref()) {
                return Err((
                    c.span(),
                    "tunnel.connections must be between 1 and 16".into(),
                ));
            }
        }
        if let Some(w) = &t.window {
            let w0 = w.get_ref().0;
            if w0 < u64::from(ditto_proxy::hello::MIN_WINDOW)
                || w0 > u64::from(ditto_proxy::hello::MAX_WINDOW)
            {
                return Err((
                    w.span(),
                    "tunnel.window must be between 64KiB and 1GiB".into(),
                ));
            }
        }
        if let Some(m) = &t.max_streams {
            if !(1..=65_536).contains(m.get_ref()) {
                return Err((
                    m.span(),
                    "tunnel.max_streams must be between 1 and 65536".into(),
                ));
            }
        }
        if let Some(m) = &t.max_flows {
            if !(1..=1_000_000).contains(m.get_ref()) {
                return Err((
                    m.span(),
                    "tunnel.max_flows must be between 1 and 1000000".into(),
                ));
            }
        }
        if let Some(b) = &t.socket_buffer {
            if b.get_ref().0 < 64 << 10 || b.get_ref().0 > 1 << 30 {
                return Err((
                    b.span(),
                    "tunnel.socket_buffer must be between 64KiB and 1GiB".into(),
                ));
            }
        }
        if let Some(b) = &t.notsent_lowat {
            if b.get_ref().0 < 4 << 10 || b.get_ref().0 > 64 << 20 {
                return Err((
                    b.span(),
                    "tunnel.notsent_lowat must be between 4KiB and 64MiB".into(),
                ));
            }
        }
        if let Some(k) = &t.keepalive {
            if k.get_ref().0 < Duration::from_millis(100)
                || k.get_ref().0 > Duration::from_secs(300)
            {
                return Err((
                    k.span(),
                    "tunnel.keepalive must be between 100ms and 300s".into(),
                ));
            }
        }
        if let Some(k) = &t.suspect_after {
            if k.get_ref().0 < Duration::from_millis(300) || k.get_ref().0 > Duration::from_secs(60)
            {
                return Err((
                    k.span(),
                    "tunnel.suspect_after must be between 300ms and 60s".into(),
                ));
            }
        }
        if let Some(h) = &t.hold {
            if h.get_ref().0 < Duration::from_secs(1) || h.get_ref().0 > Duration::from_secs(86_400)
            {
                return Err((h.span(), "tunnel.hold must be between 1s and 24h".into()));
            }
        }
        if let Some(h) = &t.handshake_timeout {
            if h.get_ref().0 < Duration::from_millis(500) || h.get_ref().0 > Duration::from_secs(60)
            {
                return Err((
                    h.span(),
                    "tunnel.handshake_timeout must be between 500ms and 60s".into(),
                ));
            }
        }
        if let Some(m) = &t.max_handshakes {
            if !(1..=65_536).contains(m.get_ref()) {
                return Err((
                    m.span(),
                    "tunnel.max_handshakes must be between 1 and 65536".into(),
                ));
            }
        }
        if let Some(m) = &t.handshakes_per_source {
            if !(1..=4096).contains(m.get_ref()) {
                return Err((
                    m.span(),
                    "tunnel.handshakes_per_source must be between 1 and 4096".into(),
                ));
            }
        }
        if let Some(b) = &t.retain_budget {
            if b.get_ref().0 < 16 << 20 || b.get_ref().0 > 1 << 40 {
                return Err((
                    b.span(),
                    "tunnel.retain_budget must be between 16MiB and 1TiB".into(),
                ));
            }
        }
        for (i, p) in self.peers.iter().enumerate() {
            if !valid_name(p.name.get_ref()) {
                return Err((
                    p.name.span(),
                    "peer.name must be 1-64 characters of letters, digits, '-', '_' or '.'".into(),
                ));
            }
            if p.name.get_ref() == n.name.get_ref() {
                return Err((
                    p.name.span(),
                    format!("peer {:?} has this node's own name", p.name.get_ref()),
                ));
            }
            for q in &self.peers[..i] {
                if q.name.get_ref() == p.name.get_ref() {
                    return Err((
                        p.name.span(),
                        format!("peer {:?} is defined twice", p.name.get_ref()),
                    ));
                }
                if q.fingerprint.get_ref() == p.fingerprint.get_ref() {
                    return Err((
                        p.fingerprint.span(),
                        format!(
                            "peer {:?} has the same fingerprint as peer {:?}",
                            p.name.get_ref(),
                            q.name.get_ref()
                        ),
                    ));
                }
            }
            if p.address.is_none() && t.listen.is_none() {
                return Err((
                    p.name.span(),
                    format!("peer {:?} has no address and tunnel.listen is not set: the two nodes could never connect", p.name.get_ref()),
                ));
            }
        }
        self.validate_groups()?;
        let mut listens: Vec<(SocketAddr, &str)> = Vec::new();
        if let Some(l) = &t.listen {
            listens.push((*l.get_ref(), "tunnel.listen"));
        }
        if let Some(a) = &n.admin {
            if listens
                .iter()
                .any(|(x, _)| x == a.get_ref() && x.port() != 0)
            {
                return Err((
                    a.span(),
                    "node.admin uses the same address as tunnel.listen".into(),
                ));
            }
            listens.push((*a.get_ref(), "node.admin"));
        }
        for f in &self.forwards {
            if let Some(p) = &f.peer {
                if !self.names_carrier(p.get_ref()) {
                    return Err((
                        p.span(),
                        format!(
                            "forward.peer {:?} is not a configured [[peer]] or [[group]]",
                            p.get_ref()
                        ),
                    ));
                }
            }
            let l = *f.listen.get_ref();
            if l.port() != 0 {
                if let Some((_, what)) = listens.iter().find(|(x, _)| *x == l) {
                    return Err((
                        f.listen.span(),
                        format!("forward.listen {l} is already used by {what}"),
                    ));
                }
            }
            listens.push((l, "another [[forward]]"));
        }
        if let Some(m) = &t.mtu {
            if !(576..=65_535).contains(m.get_ref()) {
                return Err((m.span(), "tunnel.mtu must be between 576 and 65535".into()));
            }
        }
        self.validate_intercept(&listens)
    }

    /// Whether `name` is a peer or a group (what a forward or route may send flows to).
    fn names_carrier(&self, name: &str) -> bool {
        self.peers.iter().any(|x| x.name.get_ref() == name)
            || self.groups.iter().any(|g| g.name.get_ref() == name)
    }

    fn validate_groups(&self) -> Result<(), (std::ops::Range<usize>, String)> {
        for (i, g) in self.groups.iter().enumerate() {
            let name = g.name.get_ref();
            if !valid_name(name) {
                return Err((
                    g.name.span(),
                    "group.name must be 1-64 characters of letters, digits, '-', '_' or '.'".into(),
                ));
            }
            if self.peers.iter().any(|p| p.name.get_ref() == name)
                || self.groups[..i].iter().any(|o| o.name.get_ref() == name)
            {
                return Err((
                    g.name.span(),
                    format!("group {name:?}: the name is already used by a peer or another group"),
                ));
            }
            if g.members.get_ref().is_empty() {
                return Err((g.members.span(), format!("group {name:?} has no members")));
            }
            let members = g.members.get_ref();
            for (j, m) in members.iter().enumerate() {
                if !self.peers.iter().any(|p| p.name.get_ref() == m.get_ref()) {
                    return Err((
                        m.span(),
                        format!(
                            "group {name:?}: member {:?} is not a configured [[peer]]",
                            m.get_ref()
                        ),
                    ));
                }
                if members[..j].iter().any(|o| o.get_ref() == m.get_ref()) {
                    return Err((
                        m.span(),
                        format!("group {name:?}: member {:?} is listed twice", m.get_ref()),
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_intercept(
        &self,
        listens: &[(SocketAddr, &str)],
    ) -> Result<(), (std::ops::Range<usize>, String)> {
        let Some(i) = &self.intercept else {
            return match self.routes.first() {
                Some(r) => Err((
                    r.span(),
                    "[[route]] picks peers for intercepted flows: add an [intercept] section"
                        .into(),
                )),
                None => Ok(()),
            };
        };
        let mode = *i.mode.get_ref();
        let mode_span = i.mode.span();
        let inline = mode == ModeName::Inline;
        match (&i.listen, inline) {
            (Some(l), true) => {
                return Err((
                    l.span(),
                    "intercept.listen is not used inline: ditto listens on each intercepted port"
                        .into(),
                ))
            }
            (Some(l), false) => {
                let a = l.get_ref();
                if !a.ip().is_unspecified() || a.port() == 0 {
                    return Err((
                        l.span(),
                        format!("intercept.listen {a} must be a wildcard address with a port, like \"[::]:7070\" (nftables diverts to the port on the address the packet arrived at)"),
                    ));
                }
                if let Some((_, what)) = listens.iter().find(|(x, _)| x.port() == a.port()) {
                    return Err((
                        l.span(),
                        format!(
                            "intercept.listen port {} is already used by {what}",
                            a.port()
                        ),
                    ));
                }
            }
            (None, _) => {}
        }
        if inline {
            let n: usize = i.ports.iter().map(|p| p.get_ref().0.count()).sum();
            if n == 0 {
                return Err((
                    mode_span,
                    "inline mode needs intercept.ports: ditto listens on each of them".into(),
                ));
            }
            if n > MAX_INLINE_PORTS {
                return Err((
                    i.ports[0].span(),
                    format!("intercept.ports lists {n} ports; inline mode takes at most {MAX_INLINE_PORTS}"),
                ));
            }
            match &i.bridge {
                None => return Err((mode_span, "inline mode needs intercept.bridge".into())),
                Some(b) if !ditto_proxy::intercept::valid_ifname(b.get_ref()) => {
                    return Err((
                        b.span(),
                        format!(
                            "intercept.bridge {:?} is not an interface name",
                            b.get_ref()
                        ),
                    ))
                }
                Some(_) => {}
            }
            if let Some(f) = i.interfaces.first() {
                return Err((f.span(), "intercept.interfaces is for redirect/tproxy; inline diverts what crosses intercept.bridge".into()));
            }
        } else if let Some(b) = &i.bridge {
            return Err((b.span(), "intercept.bridge is only used inline".into()));
        }
        for f in &i.interfaces {
            if !ditto_proxy::intercept::valid_ifname(f.get_ref()) {
                return Err((
                    f.span(),
                    format!(
                        "intercept.interfaces: {:?} is not an interface name",
                        f.get_ref()
                    ),
                ));
            }
        }
        if let Some(t) = &i.table {
            let ok = (1..=32).contains(&t.get_ref().len())
                && t.get_ref()
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !ok {
                return Err((
                    t.span(),
                    "intercept.table must be 1-32 letters, digits, '_' or '-'".into(),
                ));
            }
        }
        if let Some(m) = &i.fwmark {
            if *m.get_ref() == 0 {
                return Err((m.span(), "intercept.fwmark must not be 0".into()));
            }
        }
        if let Some(r) = &i.route_table {
            if matches!(*r.get_ref(), 0 | 253..=255) {
                return Err((r.span(), "intercept.route_table must not be 0 or a reserved table (253 default, 254 main, 255 local)".into()));
            }
        }
        if let Some(r) = &i.announce_table {
            if !(1..=252).contains(r.get_ref()) {
                return Err((r.span(), "intercept.announce_table must be between 1 and 252 (the tables a routing daemon can import: FRR's ip import-table)".into()));
            }
            let route_table = i
                .route_table
                .as_ref()
                .map_or(RuleNames::default().route_table, |t| *t.get_ref());
            if *r.get_ref() == route_table {
                return Err((
                    r.span(),
                    "intercept.announce_table must differ from intercept.route_table".into(),
                ));
            }
        }
        if let Some(a) = i.announce.first() {
            if *i.mode.get_ref() == ModeName::Inline {
                return Err((a.span(), "intercept.announce attracts routed traffic: use mode tproxy or redirect (inline sits in a bridge, not on a route)".into()));
            }
            if i.watchdog.as_ref().is_some_and(|w| w.get_ref().0.is_zero()) {
                return Err((a.span(), "intercept.announce needs the guard (intercept.watchdog not 0s): it withdraws the prefixes if ditto dies".into()));
            }
        }
        if let Some(w) = &i.watchdog {
            let d = w.get_ref().0;
            if !d.is_zero() && !(Duration::from_millis(200)..=Duration::from_secs(300)).contains(&d)
            {
                return Err((
                    w.span(),
                    "intercept.watchdog must be 0s (off) or between 200ms and 300s".into(),
                ));
            }
        }
        for r in &self.routes {
            let route = r.get_ref();
            match (&route.peer, route.bypass) {
                (Some(p), true) => {
                    return Err((
                        p.span(),
                        "a [[route]] has either peer or bypass = true, not both".into(),
                    ))
                }
                (None, false) => {
                    return Err((
                        r.span(),
                        "a [[route]] needs peer = \"...\" or bypass = true".into(),
                    ))
                }
                (Some(p), false) => {
                    if !self.names_carrier(p.get_ref()) {
                        return Err((
                            p.span(),
                            format!(
                                "route.peer {:?} is not a configured [[peer]] or [[group]]",
                                p.get_ref()
                            ),
                        ));
                    }
                }
                (None, true) => {}
            }
        }
        Ok(())
    }
}

impl Loaded {
    /// Parses and validates `src`, the text of the config file at `path`.
    pub fn from_source(src: String, path: &Path) -> Result<Loaded, ConfigError> {
        Ok(Loaded {
            path: path.to_owned(),
            config: Config::parse(&src, path)?,
            src,
        })
    }

    /// "FILE:LINE: KEY", for an error about a key found valid while parsing (e.g. a key file that
    /// cannot be read).
    pub fn at(&self, span: std::ops::Range<usize>, key: &str) -> String {
        format!(
            "{}:{}: {key}",
            self.path.display(),
            line_of(&self.src, span.start)
        )
    }

    /// The node's key file, resolved, and where the config names it.
    pub fn key_file(&self) -> (PathBuf, String) {
        let k = &self.config.node.key;
        (self.resolve(k.get_ref()), self.at(k.span(), "node.key"))
    }

    /// The store key file, resolved, and where the config names it (or the node key, beside which
    /// it lies by default).
    pub fn store_key_file(&self) -> (PathBuf, String) {
        if let Some(k) = &self.config.node.store_key {
            return (
                self.resolve(k.get_ref()),
                self.at(k.span(), "node.store_key"),
            );
        }
        let (key, at) = self.key_file();
        let stem = key
            .file_stem()
            .map_or_else(|| "ditto".into(), |s| s.to_string_lossy().into_owned());
        (key.with_file_name(format!("{stem}.store.key")), at)
    }

    /// A path from the config, relative to the config file's directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.path.parent().unwrap_or(Path::new(".")).join(p)
        }
    }

    /// The proxy settings this config asks for.
    pub fn settings(&self) -> ditto_proxy::Settings {
        let t = &self.config.tunnel;
        let mut s = ditto_proxy::Settings::default();
        if let Some(c) = &t.connections {
            s.connections = *c.get_ref() as usize;
        }
        if let Some(w) = &t.window {
            s.window = u32::try_from(w.get_ref().0).unwrap_or(u32::MAX);
        }
        if let Some(m) = &t.max_streams {
            s.max_streams = *m.get_ref();
        }
        if let Some(m) = &t.max_flows {
            s.max_flows = *m.get_ref() as usize;
        }
        if let Some(b) = &t.socket_buffer {
            s.wan.buffer = Some(b.get_ref().0 as usize);
        }
        if let Some(c) = &t.congestion {
            s.wan.congestion = if c.is_empty() { None } else { Some(c.clone()) };
        }
        if let Some(l) = &t.notsent_lowat {
            s.wan.notsent_lowat = Some(u32::try_from(l.get_ref().0).unwrap_or(u32::MAX));
        }
        if let Some(p) = t.pacing {
            s.wan.pacing = p;
        }
        if let Some(k) = &t.keepalive {
            s.ping_interval = k.get_ref().0;
            s.dead_after = (k.get_ref().0 * 6).max(Duration::from_secs(2));
        }
        if let Some(a) = &t.suspect_after {
            s.suspect_after = a.get_ref().0;
        }
        if let Some(h) = &t.hold {
            s.hold = h.get_ref().0;
        }
        if let Some(b) = &t.retain_budget {
            s.retain_budget = usize::try_from(b.get_ref().0).unwrap_or(usize::MAX);
        }
        if let Some(c) = &t.connect_timeout {
            s.connect_timeout = c.0;
            s.handshake_timeout = c.0;
        }
        if let Some(d) = &t.drain_timeout {
            s.drain_timeout = d.0;
        }
        if let Some(h) = &t.handshake_timeout {
            s.accept_timeout = h.get_ref().0;
        }
        if let Some(m) = &t.max_handshakes {
            s.max_handshakes = *m.get_ref() as usize;
        }
        if let Some(m) = &t.handshakes_per_source {
            s.handshakes_per_source = *m.get_ref() as usize;
        }
        if let Some(m) = &t.mtu {
            s.wan.mtu = Some(*m.get_ref());
        }
        s
    }

    /// The interception spec and routes, if `[intercept]` is configured.
    pub fn intercept(&self) -> (Option<InterceptSpec>, Vec<RouteSpec>) {
        let c = &self.config;
        let routes: Vec<RouteSpec> = c
            .routes
            .iter()
            .map(|r| {
                let r = r.get_ref();
                RouteSpec {
                    dest: r.dest.iter().map(|n| n.0).collect(),
                    ports: r.ports.iter().map(|p| p.0).collect(),
                    action: match &r.peer {
                        Some(p) => RouteAction::Peer(p.get_ref().clone()),
                        None => RouteAction::Bypass,
                    },
                }
            })
            .collect();
        let Some(i) = &c.intercept else {
            return (None, routes);
        };
        let mode = match i.mode.get_ref() {
            ModeName::Redirect => Mode::Redirect,
            ModeName::Tproxy => Mode::Tproxy,
            ModeName::Inline => Mode::Inline,
        };
        let defaults = RuleNames::default();
        // Bypass routes that come before every peer route, on destinations alone, are decided
        // in nftables: those flows are never diverted at all.
        let bypass = routes
            .iter()
            .take_while(|r| r.action == RouteAction::Bypass)
            .filter(|r| r.ports.is_empty())
            .flat_map(|r| r.dest.iter().copied())
            .collect();
        let spec = InterceptSpec {
            mode,
            listen: i
                .listen
                .as_ref()
                .map_or(SocketAddr::from(([0u16; 8], 7070)), |l| *l.get_ref()),
            ports: i.ports.iter().map(|p| p.get_ref().0).collect(),
            interfaces: i.interfaces.iter().map(|f| f.get_ref().clone()).collect(),
            bridge: i.bridge.as_ref().map(|b| b.get_ref().clone()),
            preserve_client: i.preserve_client.unwrap_or(mode == Mode::Inline),
            names: RuleNames {
                table: i
                    .table
                    .as_ref()
                    .map_or(defaults.table, |t| t.get_ref().clone()),
                fwmark: i.fwmark.as_ref().map_or(defaults.fwmark, |m| *m.get_ref()),
                route_table: i
                    .route_table
                    .as_ref()
                    .map_or(defaults.route_table, |r| *r.get_ref()),
                announce_table: i
                    .announce_table
                    .as_ref()
                    .map_or(defaults.announce_table, |r| *r.get_ref()),
            },
            announce: i.announce.iter().map(|n| n.get_ref().0).collect(),
            bypass,
        };
        (Some(spec), routes)
    }

    /// The guard's timeout: `None` when no guard should run (no interception, or turned off).
    pub fn watchdog(&self) -> Option<Duration> {
        let i = self.config.intercept.as_ref()?;
        let d = i
            .watchdog
            .as_ref()
            .map_or(Duration::from_secs(3), |w| w.get_ref().0);
        (!d.is_zero()).then_some(d)
    }

    /// Peer groups as the proxy wants them.
    pub fn groups(&self) -> Vec<ditto_proxy::GroupSpec> {
        self.config
            .groups
            .iter()
            .map(|g| ditto_proxy::GroupSpec {
                name: g.name.get_ref().clone(),
                members: g
                    .members
                    .get_ref()
                    .iter()
                    .map(|m| m.get_ref().clone())
                    .collect(),
            })
            .collect()
    }

    /// Peers and forwards as the proxy wants them.
    pub fn peers_and_forwards(
        &self,
    ) -> (Vec<ditto_proxy::PeerSpec>, Vec<ditto_proxy::ForwardSpec>) {
        let c = &self.config;
        let peers = c
            .peers
            .iter()
            .map(|p| ditto_proxy::PeerSpec {
                name: p.name.get_ref().clone(),
                fingerprint: p.fingerprint.get_ref().0,
                address: p.address.as_ref().map(|a| a.0.clone()),
                allow: p.allow_list(),
            })
            .collect();
        let forwards = c
            .forwards
            .iter()
            .map(|f| ditto_proxy::ForwardSpec {
                listen: *f.listen.get_ref(),
                peer: f.peer.as_ref().map(|p| p.get_ref().clone()),
                target: f.target.0.clone(),
                bypass: f.bypass,
            })
            .collect();
        (peers, forwards)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("test.toml"))
    }

    #[test]
    fn sizes_and_durations() {
        // The rules themselves are ditto-units' (and tested there); these are the config's use.
        assert_eq!(ByteSize::parse("256MiB"), Ok(ByteSize(256 << 20)));
        assert_eq!(ByteSize::parse("1.5 GB"), Ok(ByteSize(1_500_000_000)));
        assert!(ByteSize::parse("12 parsecs").is_err());
        assert_eq!(Dur::parse("200ms"), Ok(Dur(Duration::from_millis(200))));
        assert!(Dur::parse("5").is_err());
    }

    #[test]
    fn handshake_keys_reach_the_settings_and_are_checked() {
        let base = "[node]\nname = \"a\"\nkey = \"k\"\n[tunnel]\n";
        let src = format!(
            "{base}handshake_timeout = \"5s\"\nmax_handshakes = 100\nhandshakes_per_source = 4\n"
        );
        let l = Loaded::from_source(src, Path::new("test.toml")).expect("valid");
        let s = l.settings();
        assert_eq!(
            (s.accept_timeout, s.max_handshakes, s.handshakes_per_source),
            (Duration::from_secs(5), 100, 4)
        );
        for (bad, line) in [
            ("handshakes_per_source = 0", "handshakes_per_source"),
            ("max_handshakes = 0", "max_handshakes"),
            ("handshake_timeout = \"100ms\"", "handshake_timeout"),
        ] {
            let e = parse(&format!("{base}{bad}\n")).expect_err(bad).to_string();
            assert!(e.starts_with("test.toml:5:") && e.contains(line), "{e}");
        }
    }

    #[test]
    fn pacing_is_on_unless_turned_off() {
        let base = "[node]\nname = \"a\"\nkey = \"k\"\n[tunnel]\n";
        let on = Loaded::from_source(base.to_owned(), Path::new("test.toml")).expect("valid");
        assert!(on.settings().wan.pacing);
        let off = Loaded::from_source(format!("{base}pacing = false\n"), Path::new("test.toml"))
            .expect("valid");
        assert!(!off.settings().wan.pacing);
        let e = parse(&format!("{base}pacing = \"yes\"\n"))
            .expect_err("not a boolean")
            .to_string();
        assert!(e.contains("expected a boolean"), "{e}");
    }

    #[test]
    fn socket_address_errors_say_what_is_wrong() {
        assert_eq!(
            parse_socket_addr("[::]:7070"),
            Ok(SocketAddr::from(([0u16; 8], 7070)))
        );
        let e = parse_socket_addr("127.0.0.1:70000").expect_err("port");
        assert!(e.contains("port 70000 is out of range 0-65535"), "{e}");
        let e = parse_socket_addr("127.0.0.1").expect_err("no port");
        assert!(e.contains("no port"), "{e}");
        let e = parse_socket_addr("example.com:80").expect_err("name");
        assert!(e.contains("not an IP address"), "{e}");
        let src = "[node]\nname = \"a\"\nkey = \"k\"\n[tunnel]\nlisten = \"0.0.0.0:99999\"\n";
        let e = parse(src).expect_err("port range").to_string();
        assert!(
            e.contains("line 5") && e.contains("port 99999 is out of range"),
            "{e}"
        );
    }

    #[test]
    fn peer_allow_lists() {
        let peer = |allow: &str| {
            format!("[node]\nname = \"a\"\nkey = \"k\"\n[[peer]]\nname = \"b\"\naddress = \"h:1\"\nfingerprint = \"{FP}\"\n{allow}")
        };
        let c = parse(&peer("")).expect("no allow");
        assert!(c.peers[0].allow_list().is_everything());
        let c = parse(&peer(
            "allow = [\"10.0.0.0/8:443\", \"[2001:db8::/32]:1000-2000\"]\n",
        ))
        .expect("allow");
        let l = c.peers[0].allow_list();
        assert!(l.permits("10.1.1.1:443".parse().expect("addr")));
        assert!(!l.permits("10.1.1.1:80".parse().expect("addr")));
        assert!(l.permits("[2001:db8::5]:1500".parse().expect("addr")));
        let e = parse(&peer("allow = [\"10.0.0.0/8\", \"example.com:443\"]\n"))
            .expect_err("a host name is not a rule")
            .to_string();
        assert!(
            e.contains("line 8") && e.contains("invalid allow rule"),
            "{e}"
        );
    }

    #[test]
    fn groups_name_configured_peers_and_carry_forwards_and_routes() {
        const FP2: &str = "2222222222222222222222222222222222222222222222222222222222222222";
        let peers = format!("[node]\nname = \"a\"\nkey = \"k\"\n[[peer]]\nname = \"b1\"\naddress = \"h:1\"\nfingerprint = \"{FP}\"\n[[peer]]\nname = \"b2\"\naddress = \"h:2\"\nfingerprint = \"{FP2}\"\n");
        let fwd = "[[forward]]\nlisten = \"127.0.0.1:1\"\npeer = \"dc2\"\ntarget = \"t:1\"\n";
        let ok = format!("{peers}[[group]]\nname = \"dc2\"\nmembers = [\"b1\", \"b2\"]\n{fwd}");
        let c = Loaded::from_source(ok, Path::new("test.toml")).expect("a group");
        let g = c.groups();
        assert_eq!((g[0].name.as_str(), g[0].members.len()), ("dc2", 2));
        for (group, line, what) in [
            (
                "name = \"dc2\"\nmembers = [\"b1\", \"b3\"]\n",
                14,
                "member \"b3\"",
            ),
            (
                "name = \"dc2\"\nmembers = [\"b1\", \"b1\"]\n",
                14,
                "listed twice",
            ),
            ("name = \"dc2\"\nmembers = []\n", 14, "no members"),
            ("name = \"b1\"\nmembers = [\"b2\"]\n", 13, "already used"),
        ] {
            let e = parse(&format!("{peers}[[group]]\n{group}{fwd}"))
                .expect_err(what)
                .to_string();
            assert!(
                e.starts_with(&format!("test.toml:{line}:")) && e.contains(what),
                "{what}: {e}"
            );
        }
        // A forward naming neither a peer nor a group.
        let e = parse(&format!("{peers}{fwd}"))
            .expect_err("no group")
            .to_string();
        assert!(e.contains("[[peer]] or [[group]]"), "{e}");
    }

    #[test]
    fn announced_prefixes_need_a_routed_mode_the_guard_and_an_importable_table() {
        let cfg = |extra: &str| {
            format!("[node]\nname = \"a\"\nkey = \"k\"\n[intercept]\nmode = \"tproxy\"\nannounce = [\"10.2.0.0/24\"]\n{extra}")
        };
        let c = Loaded::from_source(cfg(""), Path::new("test.toml")).expect("announce");
        let (spec, _) = c.intercept();
        let spec = spec.expect("intercept");
        assert_eq!(
            spec.announce,
            vec!["10.2.0.0/24".parse::<IpNet>().expect("net")]
        );
        assert_eq!(spec.names.announce_table, 188);
        for (extra, what) in [
            ("announce_table = 1000\n", "between 1 and 252"),
            ("announce_table = 1881\n", "between 1 and 252"),
            ("watchdog = \"0s\"\n", "needs the guard"),
        ] {
            let e = parse(&cfg(extra)).expect_err(what).to_string();
            assert!(e.contains(what), "{extra}: {e}");
        }
        let e = parse(&cfg("route_table = 77\nannounce_table = 77\n"))
            .expect_err("same table")
            .to_string();
        assert!(e.contains("must differ"), "{e}");
        let inline = "[node]\nname = \"a\"\nkey = \"k\"\n[intercept]\nmode = \"inline\"\nbridge = \"br0\"\nports = [80]\nannounce = [\"10.2.0.0/24\"]\n";
        let e = parse(inline).expect_err("inline").to_string();
        assert!(e.contains("tproxy or redirect"), "{e}");
    }

    #[test]
    fn errors_name_key_and_line() {
        let src = format!("[node]\nname = \"a\"\nkey = \"a.key\"\nstore_ram = \"lots\"\n[[peer]]\nname = \"b\"\naddress = \"h:1\"\nfingerprint = \"{FP}\"\n");
        let e = parse(&src).expect_err("bad size").to_string();
        assert!(
            e.contains("line 4") && e.contains("store_ram") && e.contains("invalid size"),
            "{e}"
        );

        let src = "[node]\nname = \"a\"\nkey = \"a.key\"\ncolour = \"blue\"\n";
        let e = parse(src).expect_err("unknown key").to_string();
        assert!(e.contains("line 4") && e.contains("colour"), "{e}");

        let src = format!("[node]\nname = \"a\"\nkey = \"k\"\n[[peer]]\nname = \"b\"\naddress = \"h:1\"\nfingerprint = \"{FP}\"\n[[forward]]\nlisten = \"127.0.0.1:1\"\npeer = \"c\"\ntarget = \"t:1\"\n");
        let e = parse(&src).expect_err("unknown peer").to_string();
        assert!(e.starts_with("test.toml:10:") && e.contains("\"c\""), "{e}");

        let src = "[node]\nname = \"a\"\nkey = \"k\"\nadmin = \"0.0.0.0:9090\"\n";
        let e = parse(src).expect_err("public admin").to_string();
        assert!(
            e.starts_with("test.toml:4:") && e.contains("admin_public"),
            "{e}"
        );
        parse(&format!("{src}admin_public = true\n")).expect("explicitly public");
    }

    #[test]
    fn examples_parse_and_invalid_examples_fail_at_the_right_line() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).expect("examples dir") {
            let p = e.expect("entry").path();
            if p.extension().is_some_and(|x| x == "toml") {
                let l = Config::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                let _ = l.settings();
                let _ = l.peers_and_forwards();
                n += 1;
            }
        }
        assert!(n >= 3, "expected example configs in {}", dir.display());
        let expect = [
            ("unknown-key.toml", 4, "colour"),
            ("bad-fingerprint.toml", 8, "fingerprint"),
            ("unknown-peer.toml", 12, "site-c"),
            ("public-admin.toml", 4, "admin_public"),
            ("bad-size.toml", 4, "store_ram"),
            ("unreachable-peer.toml", 7, "never connect"),
            ("bad-target.toml", 7, "host:port"),
            ("inline-no-bridge.toml", 6, "intercept.bridge"),
            ("intercept-listen-not-wildcard.toml", 7, "wildcard"),
            ("bad-port-range.toml", 7, "7000-6000"),
            ("route-unknown-peer.toml", 10, "nobody"),
        ];
        for (file, line, word) in expect {
            let p = dir.join("invalid").join(file);
            let e = Config::load(&p).expect_err(file).to_string();
            let at_line = e.contains(&format!(":{line}: ")) || e.contains(&format!("line {line}"));
            assert!(
                at_line && e.contains(word),
                "{file}: expected line {line} and {word:?} in: {e}"
            );
        }
    }
}
