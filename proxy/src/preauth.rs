//! Connections not yet authenticated (the tunnel listener before TLS and hello complete; the admin
//! endpoint before its request is read): at most `per_source` from one address, at most `global`
//! in all. A new connection from an address at its cap is closed at once; one that finds the global
//! cap reached takes the place of the oldest connection of the address holding the most. So no
//! address, and no set of addresses, can keep a peer from getting a slot: an attacker fills at most
//! its share, and the connection evicted is always one of the largest share.
//!
//! Each admitted connection holds a [`Ticket`]: its task runs the handshake until the ticket's
//! `evicted` token fires or the handshake times out, and dropping the ticket frees the slot.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

/// What [`PreAuth::admit`] decided.
pub enum Admit {
    /// Go ahead; `evicted` is true if an older connection was closed to make room.
    Ok { ticket: Ticket, evicted: bool },
    /// This address is at its cap: close the connection.
    PerSource,
}

/// The pre-authentication slots of one listener.
pub struct PreAuth {
    per_source: usize,
    global: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    by_source: HashMap<IpAddr, VecDeque<(u64, CancellationToken)>>,
    total: usize,
    next: u64,
}

/// One admitted connection's slot, freed on drop.
pub struct Ticket {
    set: Arc<PreAuth>,
    ip: IpAddr,
    id: u64,
    /// Fires when a newer connection took this slot.
    pub evicted: CancellationToken,
}

impl PreAuth {
    pub fn new(per_source: usize, global: usize) -> Arc<PreAuth> {
        Arc::new(PreAuth {
            per_source: per_source.max(1),
            global: global.max(1),
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a connection from `ip`, or not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Admit {
        let ip = crate::intercept::canonical(ip);
        let mut st = self.lock();
        if st.by_source.get(&ip).map_or(0, |q| q.len()) >= self.per_source {
            return Admit::PerSource;
        }
        let mut evicted = false;
        while st.total >= self.global {
            // The oldest connection of the address holding the most.
            let Some(victim) = st
                .by_source
                .iter()
                .max_by_key(|(_, q)| q.len())
                .map(|(a, _)| *a)
            else {
                break;
            };
            if let Some(q) = st.by_source.get_mut(&victim) {
                if let Some((_, token)) = q.pop_front() {
                    token.cancel();
                    evicted = true;
                }
                if q.is_empty() {
                    st.by_source.remove(&victim);
                }
            }
            st.total = st.total.saturating_sub(1);
        }
        let id = st.next;
        st.next += 1;
        let token = CancellationToken::new();
        st.by_source
            .entry(ip)
            .or_default()
            .push_back((id, token.clone()));
        st.total += 1;
        Admit::Ok {
            ticket: Ticket {
                set: self.clone(),
                ip,
                id,
                evicted: token,
            },
            evicted,
        }
    }

    /// Connections held now: (in all, from `ip`).
    pub fn held(&self, ip: IpAddr) -> (usize, usize) {
        let st = self.lock();
        let ip = crate::intercept::canonical(ip);
        (st.total, st.by_source.get(&ip).map_or(0, |q| q.len()))
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut st = self.set.lock();
        let Some(q) = st.by_source.get_mut(&self.ip) else {
            return;
        };
        let Some(i) = q.iter().position(|(id, _)| *id == self.id) else {
            // Evicted: its slot was already given away.
            return;
        };
        q.remove(i);
        if q.is_empty() {
            st.by_source.remove(&self.ip);
        }
        st.total = st.total.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    fn ok(a: Admit) -> (Ticket, bool) {
        match a {
            Admit::Ok { ticket, evicted } => (ticket, evicted),
            Admit::PerSource => panic!("refused"),
        }
    }

    #[test]
    fn per_source_cap_and_release() {
        let p = PreAuth::new(2, 100);
        let a = ok(p.admit(ip(1))).0;
        let _b = ok(p.admit(ip(1))).0;
        assert!(matches!(p.admit(ip(1)), Admit::PerSource));
        // Other addresses are not affected.
        let _c = ok(p.admit(ip(2))).0;
        drop(a);
        assert_eq!(p.held(ip(1)), (2, 1));
        let _d = ok(p.admit(ip(1))).0;
    }

    #[test]
    fn global_cap_evicts_the_oldest_of_the_busiest_address() {
        let p = PreAuth::new(8, 10);
        // An attacker holds 8 slots from one address, another 2 from a second.
        let flood: Vec<Ticket> = (0..8).map(|_| ok(p.admit(ip(1))).0).collect();
        let other: Vec<Ticket> = (0..2).map(|_| ok(p.admit(ip(2))).0).collect();
        // The peer still gets in, at the expense of the first address's oldest connection.
        let (peer, evicted) = ok(p.admit(ip(9)));
        assert!(evicted);
        assert!(flood[0].evicted.is_cancelled());
        assert!(flood[1..].iter().all(|t| !t.evicted.is_cancelled()));
        assert!(other.iter().all(|t| !t.evicted.is_cancelled()));
        assert!(!peer.evicted.is_cancelled());
        assert_eq!(p.held(ip(1)), (10, 7));
        // Dropping an evicted ticket frees nothing twice.
        drop(flood);
        assert_eq!(p.held(ip(9)), (3, 1));
        drop(other);
        drop(peer);
        assert_eq!(p.held(ip(9)), (0, 0));
    }

    #[test]
    fn many_addresses_cannot_starve_a_newcomer() {
        let p = PreAuth::new(8, 64);
        let mut held = Vec::new();
        for round in 0..10u8 {
            for a in 0..50u8 {
                if let Admit::Ok { ticket, .. } = p.admit(ip(a)) {
                    held.push((round, ticket));
                }
            }
        }
        let (peer, _) = ok(p.admit(ip(200)));
        assert!(!peer.evicted.is_cancelled());
        assert_eq!(p.held(ip(200)).0, 64);
    }
}
