//! Per-peer destination limits: which destinations a peer's OPENs may make this node connect to.
//!
//! A rule is a prefix (or one address) with an optional port or port range:
//!
//! ```text
//! 10.0.0.0/8              every port in 10.0.0.0/8
//! 10.0.0.0/8:443          port 443 only
//! 192.168.1.5:1000-2000   one host, ports 1000 to 2000
//! 2001:db8::/32           IPv6, every port
//! [2001:db8::/32]:443     IPv6 with a port: the prefix in brackets
//! 0.0.0.0/0  ::/0         everything (IPv4, IPv6)
//! ```
//!
//! A peer without an allow list may open everything; with one, an OPEN is allowed if the address it
//! connects to (after resolving a host name: every resolved address is checked, and only allowed
//! ones are tried) matches a rule. An empty list allows nothing. IPv4-mapped IPv6 addresses are
//! checked as the IPv4 address they carry.

use ipnet::IpNet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One rule: a prefix and a port range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllowRule {
    net: IpNet,
    ports: (u16, u16),
}

impl AllowRule {
    fn permits(&self, a: SocketAddr) -> bool {
        let ip = a.ip().to_canonical();
        self.net.contains(&ip) && (self.ports.0..=self.ports.1).contains(&a.port())
    }
}

impl FromStr for AllowRule {
    type Err = String;

    fn from_str(s: &str) -> Result<AllowRule, String> {
        let bad = |why: &str| {
            format!(
                "invalid allow rule {s:?}: {why}; expected a prefix with an optional port or port \
                 range, like \"10.0.0.0/8\", \"10.1.2.3:443\", \"192.168.1.0/24:1000-2000\" or \
                 \"[2001:db8::/32]:443\""
            )
        };
        let (net, ports) = if let Some(rest) = s.strip_prefix('[') {
            let (net, after) = rest.split_once(']').ok_or_else(|| bad("no closing ']'"))?;
            match after {
                "" => (net, None),
                _ => (
                    net,
                    Some(
                        after
                            .strip_prefix(':')
                            .ok_or_else(|| bad("':' expected after ']'"))?,
                    ),
                ),
            }
        } else if s.matches(':').count() > 1 {
            // IPv6 without a port.
            (s, None)
        } else {
            match s.split_once(':') {
                Some((n, p)) => (n, Some(p)),
                None => (s, None),
            }
        };
        let net = net
            .parse::<IpNet>()
            .or_else(|_| net.parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| bad("not an address or prefix"))?
            .trunc();
        let port = |p: &str| p.parse::<u16>().map_err(|_| bad("not a port"));
        let ports = match ports {
            None => (0, u16::MAX),
            Some(p) => match p.split_once('-') {
                Some((lo, hi)) => {
                    let (lo, hi) = (port(lo)?, port(hi)?);
                    if lo > hi {
                        return Err(bad("the port range is empty"));
                    }
                    (lo, hi)
                }
                None => {
                    let p = port(p)?;
                    (p, p)
                }
            },
        };
        Ok(AllowRule { net, ports })
    }
}

impl fmt::Display for AllowRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ports = match self.ports {
            (0, u16::MAX) => return write!(f, "{}", self.net),
            (a, b) if a == b => a.to_string(),
            (a, b) => format!("{a}-{b}"),
        };
        match self.net {
            IpNet::V4(n) => write!(f, "{n}:{ports}"),
            IpNet::V6(n) => write!(f, "[{n}]:{ports}"),
        }
    }
}

/// What a peer may open: everything (no list), or what its rules allow.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList {
    rules: Option<Vec<AllowRule>>,
}

impl AllowList {
    /// Every destination (no `allow` configured): the default.
    pub fn everything() -> AllowList {
        AllowList { rules: None }
    }

    /// Only what one of `rules` allows (nothing if empty).
    pub fn only(rules: Vec<AllowRule>) -> AllowList {
        AllowList { rules: Some(rules) }
    }

    /// Whether an OPEN may connect to `a`.
    pub fn permits(&self, a: SocketAddr) -> bool {
        match &self.rules {
            None => true,
            Some(r) => r.iter().any(|r| r.permits(a)),
        }
    }

    /// Whether every destination is allowed.
    pub fn is_everything(&self) -> bool {
        self.rules.is_none()
    }
}

impl fmt::Display for AllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.rules {
            None => f.write_str("any destination (no allow list)"),
            Some(r) if r.is_empty() => f.write_str("no destination (empty allow list)"),
            Some(r) => {
                f.write_str("only ")?;
                for (i, rule) in r.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{rule}")?;
                }
                Ok(())
            }
        }
    }
}

/// Shortest interval between two log lines about one peer's refused OPENs.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// A peer's allow list at run time, with its refusal counter and log limiter.
pub(crate) struct PeerAllow {
    pub(crate) list: AllowList,
    denied: prometheus::IntCounter,
    /// When the last line was logged, and refusals since then not yet logged.
    log: Mutex<(Option<Instant>, u64)>,
}

impl PeerAllow {
    pub(crate) fn new(list: AllowList, denied: prometheus::IntCounter) -> PeerAllow {
        denied.inc_by(0);
        PeerAllow {
            list,
            denied,
            log: Mutex::new((None, 0)),
        }
    }

    /// Counts a refused OPEN; logs at most one line per peer per [`LOG_EVERY`], with the count.
    pub(crate) fn refused(&self, peer: &str, dest: &str) {
        self.denied.inc();
        let mut g = self.log.lock().unwrap_or_else(|p| p.into_inner());
        g.1 += 1;
        let now = Instant::now();
        if g.0.is_some_and(|at| now.duration_since(at) < LOG_EVERY) {
            return;
        }
        tracing::warn!(
            peer,
            "refused {} OPEN(s) from peer {peer} to destinations outside its allow list (latest: {dest}); \
             allowed: {}; at most one such line per minute",
            g.1,
            self.list
        );
        *g = (Some(now), 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn rules_parse_and_match() {
        let r: AllowRule = "10.0.0.0/8:443".parse().expect("rule");
        assert!(r.permits(a("10.2.3.4:443")));
        assert!(!r.permits(a("10.2.3.4:444")));
        assert!(!r.permits(a("11.0.0.1:443")));
        assert!(r.permits(a("[::ffff:10.0.0.1]:443")), "mapped IPv4");
        let r: AllowRule = "192.168.1.5:1000-2000".parse().expect("rule");
        assert!(r.permits(a("192.168.1.5:1000")) && r.permits(a("192.168.1.5:2000")));
        assert!(!r.permits(a("192.168.1.5:999")) && !r.permits(a("192.168.1.6:1500")));
        let r: AllowRule = "2001:db8::/32".parse().expect("rule");
        assert!(r.permits(a("[2001:db8::1]:1")) && !r.permits(a("[2001:db9::1]:1")));
        let r: AllowRule = "[2001:db8::/32]:443".parse().expect("rule");
        assert!(r.permits(a("[2001:db8::1]:443")) && !r.permits(a("[2001:db8::1]:80")));
        let r: AllowRule = "0.0.0.0/0".parse().expect("rule");
        assert!(r.permits(a("1.2.3.4:5")) && !r.permits(a("[2001:db8::1]:5")));
        let r: AllowRule = "127.0.0.1".parse().expect("rule");
        assert!(r.permits(a("127.0.0.1:9")) && !r.permits(a("127.0.0.2:9")));
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0.1:",
            "10.0.0.1:70000",
            "10.0.0.1:20-10",
            "host:80",
            "[2001:db8::/32",
            "[2001:db8::/32]443",
            "10.0.0.1:1-2-3",
        ] {
            assert!(bad.parse::<AllowRule>().is_err(), "{bad:?}");
        }
        for s in [
            "10.0.0.0/8",
            "10.0.0.0/8:443",
            "10.0.0.5/32:1-2",
            "[2001:db8::/32]:443",
        ] {
            assert_eq!(s.parse::<AllowRule>().expect("rule").to_string(), s);
        }
    }

    #[test]
    fn lists() {
        assert!(AllowList::everything().permits(a("1.2.3.4:5")));
        assert!(!AllowList::only(vec![]).permits(a("1.2.3.4:5")));
        let l = AllowList::only(vec!["10.0.0.0/8:443".parse().expect("rule")]);
        assert!(l.permits(a("10.0.0.1:443")) && !l.permits(a("10.0.0.1:80")));
        assert_eq!(l.to_string(), "only 10.0.0.0/8:443");
    }
}
