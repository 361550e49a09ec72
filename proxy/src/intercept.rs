//! Transparent interception: LAN clients connect to their real destinations and nftables diverts
//! the connections to ditto, which learns where each was going.
//!
//! * `redirect`: nat REDIRECT to one listener; the destination comes from `SO_ORIGINAL_DST`.
//! * `tproxy`: nft `tproxy` to one `IP_TRANSPARENT` listener; the accepted socket's local address
//!   *is* the original destination.
//! * `inline`: the appliance bridges a LAN and a WAN port. ditto listens with `IP_TRANSPARENT` on
//!   each intercepted port itself, and nftables diverts a bridged SYN only while such a socket
//!   exists (see [`crate::rules`]), so a dead ditto leaves the bridge forwarding untouched.
//!
//! Every accepted connection gets an [`OrigDst`]; the first matching [`RouteSpec`] picks the peer
//! that carries it, or marks it as bypass; flows that match no route pass through.

use ipnet::IpNet;
use socket2::{Domain, SockRef, Socket, Type};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// How connections are diverted to ditto.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Redirect,
    Tproxy,
    Inline,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Redirect => "redirect",
            Mode::Tproxy => "tproxy",
            Mode::Inline => "inline",
        }
    }
}

/// An inclusive range of TCP ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub fn contains(&self, p: u16) -> bool {
        (self.lo..=self.hi).contains(&p)
    }

    /// How many ports the range holds.
    pub fn count(&self) -> usize {
        usize::from(self.hi - self.lo) + 1
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// Names of what ditto installs in the kernel, so that exactly that can be removed again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleNames {
    /// nftables table name (family `inet`, and `bridge` in inline mode).
    pub table: String,
    /// Packet mark of diverted packets.
    pub fwmark: u32,
    /// Policy routing table that delivers marked packets locally.
    pub route_table: u32,
    /// Routing table holding the announced prefixes, for the site's routing daemon to import
    /// (`ip import-table`, tables 1-252) and announce; emptied when ditto stops or dies.
    pub announce_table: u32,
}

impl Default for RuleNames {
    fn default() -> Self {
        RuleNames {
            table: "ditto".into(),
            fwmark: 0x1d1,
            route_table: 1881,
            announce_table: 188,
        }
    }
}

/// The `[intercept]` section.
#[derive(Clone, Debug)]
pub struct InterceptSpec {
    pub mode: Mode,
    /// redirect/tproxy: the one listener nftables diverts to.
    pub listen: SocketAddr,
    /// Destination ports diverted; empty = every TCP port (not allowed inline).
    pub ports: Vec<PortRange>,
    /// redirect/tproxy: only connections arriving on these interfaces; empty = any.
    pub interfaces: Vec<String>,
    /// inline: the bridge of the LAN and WAN ports.
    pub bridge: Option<String>,
    /// Connections this node opens to destinations use the client's own address.
    pub preserve_client: bool,
    pub names: RuleNames,
    /// Destinations never diverted at all (bypass routes without ports, compiled into nftables).
    pub bypass: Vec<IpNet>,
    /// Prefixes this appliance asks the site's routers to send it (scale-out: docs/scale-out.md),
    /// present in `names.announce_table` while ditto runs.
    pub announce: Vec<IpNet>,
}

/// A Linux interface name: 1-15 bytes, no '/', no whitespace, no quotes, not "." or "..".
pub fn valid_ifname(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_graphic() && !matches!(c, '/' | '"' | '\\' | ':'))
}

/// Most ports an inline node listens on (one socket each).
pub const MAX_INLINE_PORTS: usize = 64;

/// The addresses ditto listens on for diverted connections: the one `listen` address (redirect,
/// tproxy), or every intercepted port on the dual-stack wildcard address (inline).
pub fn listen_addrs(spec: &InterceptSpec) -> Vec<SocketAddr> {
    match spec.mode {
        Mode::Redirect | Mode::Tproxy => vec![spec.listen],
        Mode::Inline => spec
            .ports
            .iter()
            .flat_map(|r| r.lo..=r.hi)
            .take(MAX_INLINE_PORTS)
            .map(|p| SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), p))
            .collect(),
    }
}

/// What a route does with the flows it matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteAction {
    Peer(String),
    Bypass,
}

/// One `[[route]]`: destinations (empty = any) and ports (empty = any) → action.
#[derive(Clone, Debug)]
pub struct RouteSpec {
    pub dest: Vec<IpNet>,
    pub ports: Vec<PortRange>,
    pub action: RouteAction,
}

impl RouteSpec {
    pub fn matches(&self, dst: SocketAddr) -> bool {
        let ip = canonical(dst.ip());
        (self.dest.is_empty() || self.dest.iter().any(|n| n.contains(&ip)))
            && (self.ports.is_empty() || self.ports.iter().any(|p| p.contains(dst.port())))
    }
}

/// The first route matching `dst`.
pub fn classify(routes: &[RouteSpec], dst: SocketAddr) -> Option<&RouteAction> {
    routes.iter().find(|r| r.matches(dst)).map(|r| &r.action)
}

/// The address a diverted client was connecting to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst(pub SocketAddr);

/// An IPv4-mapped IPv6 address (what a dual-stack socket reports for IPv4) as plain IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

fn canonical_sa(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(canonical(a.ip()), a.port())
}

/// Whether `ip` is an address of this host (a plain bind to it succeeds).
pub fn is_local(ip: IpAddr) -> bool {
    let ip = canonical(ip);
    if ip.is_loopback() {
        return true;
    }
    let Ok(s) = Socket::new(
        Domain::for_address(SocketAddr::new(ip, 0)),
        Type::STREAM,
        None,
    ) else {
        return false;
    };
    s.bind(&SocketAddr::new(ip, 0).into()).is_ok()
}

/// Binds a listener for diverted connections. `transparent` sets `IP_TRANSPARENT` (tproxy, inline:
/// the socket accepts connections addressed to other hosts). An IPv6 wildcard address gives one
/// dual-stack socket for both families.
pub fn bind_listener(addr: SocketAddr, transparent: bool) -> std::io::Result<TcpListener> {
    let domain = Domain::for_address(addr);
    let s = Socket::new(domain, Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(false)?;
    }
    if transparent {
        if addr.is_ipv6() {
            s.set_ip_transparent_v6(true)?;
        } else {
            s.set_ip_transparent_v4(true)?;
        }
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(i32::try_from(crate::sock::listen_backlog()).unwrap_or(i32::MAX))?;
    TcpListener::from_std(s.into())
}

/// The original destination of an accepted, diverted connection.
pub fn original_dst(mode: Mode, s: &TcpStream) -> std::io::Result<OrigDst> {
    match mode {
        // TPROXY and the inline transparent listeners accept the connection *as* the destination.
        Mode::Tproxy | Mode::Inline => Ok(OrigDst(canonical_sa(s.local_addr()?))),
        Mode::Redirect => {
            let r = SockRef::from(s);
            let v4 = match s.peer_addr()? {
                SocketAddr::V4(_) => true,
                SocketAddr::V6(p) => p.ip().to_ipv4_mapped().is_some(),
            };
            let sa = if v4 {
                r.original_dst_v4()?
            } else {
                r.original_dst_v6()?
            };
            sa.as_socket()
                .map(|a| OrigDst(canonical_sa(a)))
                .ok_or_else(|| std::io::Error::other("SO_ORIGINAL_DST returned no IP address"))
        }
    }
}

/// Connects to `dest` from `source`, an address this host does not own (IP_TRANSPARENT; the
/// `socket transparent` rule brings the replies back to this socket).
pub async fn connect_from(
    dest: SocketAddr,
    source: IpAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let (src, dest) = (canonical(source), canonical_sa(dest));
    if src.is_unspecified() || src.is_ipv4() != dest.is_ipv4() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("cannot connect to {dest} from client address {src}"),
        ));
    }
    let s = Socket::new(Domain::for_address(dest), Type::STREAM, None)?;
    if dest.is_ipv4() {
        s.set_ip_transparent_v4(true)?;
    } else {
        s.set_ip_transparent_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::new(src, 0).into())?;
    let sock = tokio::net::TcpSocket::from_std_stream(s.into());
    tokio::time::timeout(timeout, sock.connect(dest))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("net")
    }

    #[test]
    fn first_matching_route_wins() {
        let routes = vec![
            RouteSpec {
                dest: vec![net("10.2.9.0/24")],
                ports: vec![],
                action: RouteAction::Bypass,
            },
            RouteSpec {
                dest: vec![net("10.2.0.0/16"), net("fd00:2::/48")],
                ports: vec![PortRange { lo: 5000, hi: 5010 }],
                action: RouteAction::Peer("b".into()),
            },
        ];
        let c = |s: &str| classify(&routes, s.parse().expect("addr")).cloned();
        assert_eq!(c("10.2.9.1:5001"), Some(RouteAction::Bypass));
        assert_eq!(c("10.2.3.4:5001"), Some(RouteAction::Peer("b".into())));
        assert_eq!(c("[fd00:2::9]:5010"), Some(RouteAction::Peer("b".into())));
        // IPv4 seen through a dual-stack socket matches IPv4 routes.
        assert_eq!(
            c("[::ffff:10.2.3.4]:5001"),
            Some(RouteAction::Peer("b".into()))
        );
        assert_eq!(c("10.2.3.4:5011"), None);
        assert_eq!(c("10.3.0.1:5001"), None);
    }
}
