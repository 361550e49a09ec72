//! Peer groups: several far appliances that serve one remote site together (scale-out, see
//! `docs/scale-out.md`).
//!
//! A flow routed to a group goes to its destination's *home*: the member with the highest
//! rendezvous score (highest random weight) for the destination's host, among the members that are
//! reachable now. The score depends only on the member's key (its fingerprint, which every near
//! appliance pins alike) and the destination, so every near appliance picks the same home for the
//! same server: that server's data always lands in one far store, and the near appliances' views of
//! that store (fed by its summaries) make a repeat warm whichever near appliance takes it. When a
//! member goes away, only the destinations it was home to move, each to its next member in rank;
//! when it returns, they move back.

use crate::identity::Fingerprint;
use crate::metrics::Metrics;
use crate::peer::Peer;
use crate::session::OpenError;
use std::sync::Arc;

/// What a group is configured as.
#[derive(Clone, Debug)]
pub struct GroupSpec {
    pub name: String,
    /// Peer names, each a configured peer.
    pub members: Vec<String>,
}

/// A configured group, its members resolved.
pub struct PeerGroup {
    pub name: Arc<str>,
    members: Vec<Member>,
    /// Flows that went to a member other than their destination's first choice.
    moved: prometheus::IntCounter,
}

struct Member {
    peer: Arc<Peer>,
    /// Flows this member was picked for.
    flows: prometheus::IntCounter,
}

/// One member's state, for `ditto status`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct MemberStatus {
    pub peer: String,
    /// Reachable now: new flows may be homed on it.
    pub up: bool,
    /// Flows picked for it since the start.
    pub flows: u64,
}

/// A group's state, for `ditto status`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct GroupStatus {
    pub name: String,
    pub members: Vec<MemberStatus>,
    /// Flows that went to another member because their home was unreachable.
    pub moved: u64,
}

impl PeerGroup {
    /// `members` are the group's peers, in configuration order.
    pub fn new(name: &str, members: Vec<Arc<Peer>>, metrics: &Metrics) -> PeerGroup {
        let members = members
            .into_iter()
            .map(|peer| {
                let flows = metrics.group_flows.with_label_values(&[name, &peer.name]);
                flows.inc_by(0);
                Member { peer, flows }
            })
            .collect();
        let moved = metrics.group_moved.with_label_values(&[name]);
        moved.inc_by(0);
        PeerGroup {
            name: Arc::from(name),
            members,
            moved,
        }
    }

    /// The member that carries a flow to `dest` ("host:port"): the highest-ranked reachable one.
    /// A member whose tunnel is merely busy stays the home: moving the destination would scatter
    /// its data. With no member reachable, the home itself, whose state then says why the flow
    /// passes through (`peer-down`, `peer-unresponsive`, `version`). `None` only for no members.
    pub fn home(&self, dest: &str) -> Option<Arc<Peer>> {
        let keys: Vec<Fingerprint> = self.members.iter().map(|m| m.peer.fingerprint).collect();
        let ranked = rank(&keys, dest);
        let first = &self.members[*ranked.first()?];
        let (i, m) = ranked
            .iter()
            .map(|&i| &self.members[i])
            .enumerate()
            .find(|(_, m)| reachable(&m.peer))
            .unwrap_or((0, first));
        if i > 0 {
            self.moved.inc();
        }
        m.flows.inc();
        Some(m.peer.clone())
    }

    pub fn status(&self) -> GroupStatus {
        GroupStatus {
            name: self.name.to_string(),
            members: self
                .members
                .iter()
                .map(|m| MemberStatus {
                    peer: m.peer.name.to_string(),
                    up: reachable(&m.peer),
                    flows: m.flows.get(),
                })
                .collect(),
            moved: self.moved.get(),
        }
    }
}

/// The members (by their keys' fingerprints) in the order a flow to `dest` ("host:port") tries
/// them: indexes into `members`, the home first.
pub fn rank(members: &[Fingerprint], dest: &str) -> Vec<usize> {
    let host = host_of(dest);
    let mut r: Vec<(u64, usize)> = members
        .iter()
        .enumerate()
        .map(|(i, m)| (score(&m.0, host), i))
        .collect();
    r.sort_unstable_by(|a, b| b.cmp(a));
    r.into_iter().map(|(_, i)| i).collect()
}

/// Whether new flows may be homed on `p`: it has a live, responsive session.
fn reachable(p: &Peer) -> bool {
    match p.can_open() {
        Ok(()) | Err(OpenError::Full) | Err(OpenError::TooLarge) => p.view().is_some(),
        Err(OpenError::NoLink) | Err(OpenError::Unresponsive) | Err(OpenError::GoingAway) => false,
    }
}

/// The host part of "host:port" ("[v6]:port" keeps its brackets): the port does not pick the home,
/// so every service of one server shares a store.
fn host_of(dest: &str) -> &str {
    match dest.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => dest,
    }
}

/// The rendezvous score of a member (by its key's fingerprint) for a destination host.
fn score(member: &[u8; 32], host: &str) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(b"ditto group home v1\0");
    h.update(member);
    h.update(host.as_bytes());
    let out = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&out.as_bytes()[..8]);
    u64::from_be_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The home among the members that are up.
    fn home(members: &[Fingerprint], dest: &str, up: &[bool]) -> Option<usize> {
        rank(members, dest).into_iter().find(|&i| up[i])
    }

    fn members(n: u8) -> Vec<Fingerprint> {
        (0..n)
            .map(|i| Fingerprint([i.wrapping_mul(37).wrapping_add(1); 32]))
            .collect()
    }

    #[test]
    fn host_ignores_the_port() {
        assert_eq!(host_of("10.2.0.1:5001"), "10.2.0.1");
        assert_eq!(host_of("[fd00::1]:443"), "[fd00::1]");
        assert_eq!(host_of("db.example:5432"), "db.example");
        assert_eq!(host_of("noport"), "noport");
        assert_eq!(host_of("odd:"), "odd:");
    }

    #[test]
    fn homes_spread_evenly() {
        let m = members(4);
        let up = [true; 4];
        let mut count = [0usize; 4];
        for i in 0..20_000u32 {
            let host = format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255);
            count[home(&m, &host, &up).expect("a member is up")] += 1;
        }
        for c in count {
            assert!((4_500..5_500).contains(&c), "uneven spread {count:?}");
        }
    }

    #[test]
    fn a_member_leaving_moves_only_its_own_destinations() {
        let m = members(5);
        let all = [true; 5];
        let mut without = all;
        without[2] = false;
        let mut moved = 0;
        for i in 0..10_000u32 {
            let host = format!("host-{i}:80");
            let before = home(&m, &host, &all).expect("up");
            let after = home(&m, &host, &without).expect("up");
            if before == 2 {
                assert_ne!(after, 2);
                moved += 1;
            } else {
                assert_eq!(before, after, "{host} moved though its home stayed");
            }
        }
        assert!((1_500..2_500).contains(&moved), "moved {moved}");
        // None up: no home.
        assert_eq!(home(&m, "x:1", &[false; 5]), None);
        // The port does not move a destination.
        assert_eq!(rank(&m, "10.0.0.1:80"), rank(&m, "10.0.0.1:5432"));
    }
}
