//! Two sessions in memory, joined by links that the test kills, stalls and replaces at random
//! points, with a virtual clock. Every stream must arrive byte-exact, both ways, DATA and FEEDBACK,
//! however the links behave, and every stream must end cleanly once a link works again.

use bytes::{Bytes, BytesMut};
use ditto_proxy::frame::{self, OpenTarget};
use ditto_proxy::session::{
    DownEvents, Event, Half, LinkId, PeerParams, Session, SessionConfig, UpEvents,
};
use proptest::prelude::*;
use std::collections::HashMap;
use std::time::{Duration, Instant};

fn config() -> SessionConfig {
    SessionConfig {
        window: 64 * 1024,
        max_streams: 64,
        ping_interval: Duration::from_millis(500),
        suspect_after: Duration::from_millis(1500),
        dead_after: Duration::from_secs(30),
        hold: Duration::from_secs(3600),
    }
}

/// One side's view of one stream: what it sends and what it got.
#[derive(Default)]
struct Owner {
    /// Sent before FIN, then `tail` after it (as an encoder answers a decoder's requests after
    /// its client half-closed).
    data: Vec<u8>,
    tail: Vec<u8>,
    data_pos: usize,
    data_finished: bool,
    tail_sent: bool,
    /// DATA bytes the peer sends in all (before and after FIN): DONE waits for them.
    expect: usize,
    feedback: Vec<u8>,
    fb_pos: usize,
    fb_finished: bool,
    got_data: Vec<u8>,
    got_fb: Vec<u8>,
    fin: bool,
    done: bool,
    detached: bool,
}

struct Side {
    s: Session,
    owners: HashMap<u32, Owner>,
}

/// A link: each side's id for it, and the bytes in flight each way.
struct Conn {
    a: LinkId,
    b: LinkId,
    ab: Vec<u8>,
    ba: Vec<u8>,
    a_rx: BytesMut,
    b_rx: BytesMut,
    stalled: bool,
}

struct World {
    now: Instant,
    a: Side,
    b: Side,
    conns: Vec<Conn>,
    /// (opener is A, stream id, payload seed) of every stream opened.
    opened: Vec<(bool, u32)>,
    resets: Vec<String>,
}

/// What the far side of a stream opened with `seed` sends: (data, tail, feedback).
fn far_payload(seed: u64) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    (
        payload(seed ^ 0xbac, (seed % 50_000) as usize),
        payload(seed ^ 0x7a1, (seed % 300) as usize),
        payload(seed ^ 0xfb2, (seed % 3_000) as usize),
    )
}

fn tail_len(len: usize) -> usize {
    len % 97
}

fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

impl World {
    fn new() -> World {
        let now = Instant::now();
        let a = Session::new(
            config(),
            PeerParams {
                window: 64 * 1024,
                max_streams: 64,
                odd: true,
            },
            now,
        );
        let b = Session::new(
            config(),
            PeerParams {
                window: 64 * 1024,
                max_streams: 64,
                odd: false,
            },
            now,
        );
        let mut w = World {
            now,
            a: Side {
                s: a,
                owners: HashMap::new(),
            },
            b: Side {
                s: b,
                owners: HashMap::new(),
            },
            conns: Vec::new(),
            opened: Vec::new(),
            resets: Vec::new(),
        };
        w.add_link();
        w
    }

    fn add_link(&mut self) {
        let a = self.a.s.add_link(self.now);
        let b = self.b.s.add_link(self.now);
        self.conns.push(Conn {
            a,
            b,
            ab: Vec::new(),
            ba: Vec::new(),
            a_rx: BytesMut::new(),
            b_rx: BytesMut::new(),
            stalled: false,
        });
    }

    fn kill(&mut self, i: usize) {
        if self.conns.is_empty() {
            return;
        }
        let c = self.conns.remove(i % self.conns.len());
        self.a.s.link_closed(c.a, self.now);
        self.b.s.link_closed(c.b, self.now);
    }

    fn open(&mut self, from_a: bool, seed: u64, len: usize, fb_len: usize) {
        let side = if from_a { &mut self.a } else { &mut self.b };
        let target = OpenTarget {
            dest: format!("server:{seed}:{len}:{fb_len}"),
            client: None,
        };
        let Ok(id) = side.s.open(target) else {
            return;
        };
        let (far, far_tail, _) = far_payload(seed);
        side.owners.insert(
            id,
            Owner {
                data: payload(seed, len),
                tail: payload(seed ^ 0x7a11, tail_len(len)),
                feedback: payload(seed ^ 0xfeed, fb_len),
                expect: far.len() + far_tail.len(),
                ..Default::default()
            },
        );
        self.opened.push((from_a, id));
    }

    /// Each owner queues some of its bytes and takes what arrived; a finished stream is detached.
    fn owners_act(&mut self, step: usize) {
        for side in [&mut self.a, &mut self.b] {
            let ids: Vec<u32> = side.owners.keys().copied().collect();
            for id in ids {
                let Some(o) = side.owners.get_mut(&id) else {
                    continue;
                };
                if o.detached {
                    continue;
                }
                let up: UpEvents = side.s.take_up(id);
                let down: DownEvents = side.s.take_down(id);
                if let Some(r) = up.reset.or(down.reset) {
                    side.s.detach(id);
                    o.detached = true;
                    // Judged by the test: no reset is expected while the hold lasts.
                    self.resets.push(format!("stream {id}: {r:?}"));
                    continue;
                }
                for f in up.feedback {
                    o.got_fb.extend_from_slice(&f);
                }
                o.done |= up.done;
                let mut n = 0;
                for d in down.data {
                    n += d.len();
                    o.got_data.extend_from_slice(&d);
                }
                if n > 0 {
                    side.s.consumed(id, n);
                }
                o.fin |= down.fin;
                // Queue data a piece at a time, but not too far ahead of the link.
                let (unsent, _) = side.s.unsent(id);
                if o.data_pos < o.data.len() && unsent < 32 * 1024 {
                    let k = (1 + step * 7919 % 5000).min(o.data.len() - o.data_pos);
                    side.s.send(
                        id,
                        false,
                        Bytes::copy_from_slice(&o.data[o.data_pos..o.data_pos + k]),
                    );
                    o.data_pos += k;
                }
                if o.data_pos == o.data.len() && !o.data_finished {
                    side.s.finish(id, false);
                    o.data_finished = true;
                } else if o.data_finished && !o.tail_sent {
                    side.s.send(id, false, Bytes::from(o.tail.clone()));
                    o.tail_sent = true;
                }
                if o.fb_pos < o.feedback.len() {
                    let k = (1 + step * 104_729 % 700).min(o.feedback.len() - o.fb_pos);
                    side.s.send(
                        id,
                        true,
                        Bytes::copy_from_slice(&o.feedback[o.fb_pos..o.fb_pos + k]),
                    );
                    o.fb_pos += k;
                }
                // DONE once the peer's data is complete, as a decoder would.
                if o.fin
                    && o.got_data.len() == o.expect
                    && o.fb_pos == o.feedback.len()
                    && !o.fb_finished
                {
                    side.s.finish(id, true);
                    o.fb_finished = true;
                }
                if o.fin && o.done && o.tail_sent && o.fb_finished {
                    side.s.detach(id);
                    o.detached = true;
                }
            }
        }
    }

    /// Writers write, links deliver (a prefix, at a random cut), readers read.
    fn pump(&mut self, cut: usize) {
        let now = self.now;
        let mut kill = Vec::new();
        for (i, c) in self.conns.iter_mut().enumerate() {
            let mut out = Vec::new();
            self.a.s.poll_transmit(c.a, &mut out);
            c.ab.extend_from_slice(&out);
            out.clear();
            self.b.s.poll_transmit(c.b, &mut out);
            c.ba.extend_from_slice(&out);
            if c.stalled {
                continue;
            }
            for (pipe, rx, to, link) in [
                (&mut c.ab, &mut c.b_rx, &mut self.b, c.b),
                (&mut c.ba, &mut c.a_rx, &mut self.a, c.a),
            ] {
                let n = if pipe.len() > 1 && cut != usize::MAX {
                    1 + cut % pipe.len()
                } else {
                    pipe.len()
                };
                rx.extend_from_slice(&pipe[..n]);
                pipe.drain(..n);
                loop {
                    match frame::decode(rx) {
                        Ok(Some(f)) => {
                            if let Err(e) = to.s.on_frame(link, f, now) {
                                panic!("protocol violation between correct sessions: {e}");
                            }
                        }
                        Ok(None) => break,
                        Err(e) => panic!("bad frame between correct sessions: {e}"),
                    }
                }
            }
            let _ = i;
        }
        for (is_a, side) in [(true, &mut self.a), (false, &mut self.b)] {
            while let Some(e) = side.s.poll_event() {
                match e {
                    Event::Incoming { stream, target } => {
                        let f: Vec<usize> = target.dest["server:".len()..]
                            .split(':')
                            .map(|x| x.parse().expect("number"))
                            .collect();
                        let (seed, len) = (f[0] as u64, f[1]);
                        let (data, tail, feedback) = far_payload(seed);
                        side.owners.insert(
                            stream,
                            Owner {
                                data,
                                tail,
                                feedback,
                                expect: len + tail_len(len),
                                ..Default::default()
                            },
                        );
                    }
                    Event::CloseLink { link, .. } => kill.push((is_a, link)),
                    // Summaries are the dedup engine's business (tests of their own).
                    Event::Summary(_) => {}
                    Event::LinkSuspect(_) => {}
                }
            }
            let mut wakes: Vec<(u32, Half)> = Vec::new();
            side.s.take_wakes(&mut wakes);
            side.s.take_dirty();
        }
        for (is_a, l) in kill {
            let mine = |c: &Conn| if is_a { c.a == l } else { c.b == l };
            if let Some(i) = self.conns.iter().position(mine) {
                self.kill(i);
            }
        }
    }

    fn advance(&mut self, ms: u64) {
        self.now += Duration::from_millis(ms);
        self.a.s.handle_timeout(self.now);
        self.b.s.handle_timeout(self.now);
    }

    fn all_detached(&self) -> bool {
        self.a.owners.values().all(|o| o.detached) && self.b.owners.values().all(|o| o.detached)
    }

    /// Every stream the far side took matches what was sent, both ways, DATA and FEEDBACK.
    fn check(&self) {
        for &(from_a, id) in &self.opened {
            let (near, far) = if from_a {
                (&self.a, &self.b)
            } else {
                (&self.b, &self.a)
            };
            let (Some(n), Some(f)) = (near.owners.get(&id), far.owners.get(&id)) else {
                panic!("stream {id} was never taken by the far side");
            };
            assert!(
                n.got_data == [f.data.as_slice(), &f.tail].concat()
                    && f.got_data == [n.data.as_slice(), &n.tail].concat(),
                "stream {id}: DATA differs"
            );
            assert!(
                n.got_fb == f.feedback && f.got_fb == n.feedback,
                "stream {id}: FEEDBACK differs"
            );
        }
    }
}

#[derive(Clone, Debug)]
enum Action {
    Open { from_a: bool, seed: u16, len: u16 },
    Pump { rounds: u8, cut: u16 },
    Kill(u8),
    Stall(u8),
    AddLink,
    Advance(u16),
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        3 => (any::<bool>(), any::<u16>(), 0u16..60_000).prop_map(|(from_a, seed, len)| Action::Open { from_a, seed, len }),
        6 => (1u8..20, any::<u16>()).prop_map(|(rounds, cut)| Action::Pump { rounds, cut }),
        1 => any::<u8>().prop_map(Action::Kill),
        1 => any::<u8>().prop_map(Action::Stall),
        1 => Just(Action::AddLink),
        2 => (1u16..3000).prop_map(Action::Advance),
    ]
}

fn run(actions: &[Action]) {
    let mut w = World::new();
    let mut step = 0usize;
    for a in actions {
        match a {
            Action::Open { from_a, seed, len } => w.open(
                *from_a,
                u64::from(*seed),
                usize::from(*len),
                usize::from(*len) / 20,
            ),
            Action::Pump { rounds, cut } => {
                for r in 0..*rounds {
                    step += 1;
                    w.owners_act(step);
                    w.pump(usize::from(*cut) * 31 + usize::from(r));
                }
            }
            Action::Kill(i) => w.kill(usize::from(*i)),
            Action::Stall(i) => {
                if !w.conns.is_empty() {
                    let n = w.conns.len();
                    let c = &mut w.conns[usize::from(*i) % n];
                    c.stalled = !c.stalled;
                }
            }
            Action::AddLink => {
                if w.conns.len() < 4 {
                    w.add_link()
                }
            }
            Action::Advance(ms) => w.advance(u64::from(*ms)),
        }
    }
    // Heal: stalls end, a fresh link comes (as a dialer would bring one), and the streams finish.
    for c in &mut w.conns {
        c.stalled = false;
    }
    w.add_link();
    for round in 0..20_000 {
        step += 1;
        w.owners_act(step);
        w.pump(round * 7919);
        if round % 10 == 0 {
            w.advance(5);
        }
        if w.all_detached() {
            break;
        }
    }
    assert!(w.resets.is_empty(), "streams reset: {:?}", w.resets);
    assert!(
        w.all_detached(),
        "streams did not finish after the links healed"
    );
    w.check();
    // Nothing is left behind once the last acknowledgements went through.
    let (mut sa, mut ra, mut sb, mut rb) = (0, 0, 0, 0);
    let live = |w: &World| (w.a.s.stats(w.now).streams, w.b.s.stats(w.now).streams);
    // Up to 10 s: a stream whose final acknowledgement was lost with a link sends its end again
    // after 2 s, and the peer answers from its tombstone.
    for _ in 0..400 {
        w.advance(25);
        w.pump(usize::MAX);
        let (a, b) = (w.a.s.buffered(), w.b.s.buffered());
        (sa, ra) = (a.send, a.data_in + a.feedback_in);
        (sb, rb) = (b.send, b.data_in + b.feedback_in);
        if sa + ra + sb + rb < 200 && live(&w) == (0, 0) {
            break;
        }
    }
    assert_eq!((ra, rb), (0, 0));
    assert!(sa < 1024 && sb < 1024, "left over: {sa} / {sb}");
    // And every stream was retired on both sides: none waits for an acknowledgement that the
    // other side, retiring first, never sent.
    assert_eq!(live(&w), (0, 0), "streams never retired (A, B)");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]
    #[test]
    fn streams_survive_links_killed_stalled_and_replaced(actions in prop::collection::vec(action(), 1..80)) {
        run(&actions);
    }
}

#[test]
fn a_stream_moves_to_a_new_link_after_its_link_dies_mid_transfer() {
    let mut w = World::new();
    w.open(true, 7, 200_000, 5_000);
    for step in 0..30 {
        w.owners_act(step);
        w.pump(step * 13);
    }
    // The only link dies with bytes in flight both ways; streams wait, then a new link comes.
    w.kill(0);
    for step in 30..40 {
        w.owners_act(step);
        w.pump(step);
    }
    assert_eq!(w.a.s.stats(w.now).held, 1);
    w.add_link();
    for step in 40..5_000 {
        w.owners_act(step);
        w.pump(step * 17);
        if w.all_detached() {
            break;
        }
    }
    assert!(w.all_detached());
    w.check();
    let st = w.a.s.stats(w.now);
    assert!(st.resumed >= 1);
    assert_eq!(st.held, 0, "nothing is held once a link answers");
}

/// Two links; A opens 20 streams and sends a request on each without ending them (clients
/// waiting for their answers), and B takes them all. Returns the world and the stream ids.
fn requests_taken(seed: u64) -> (World, Vec<u32>) {
    let mut w = World::new();
    w.add_link();
    for i in 0..20 {
        w.open(true, seed + i, 10, 0);
    }
    let ids: Vec<u32> = w.opened.iter().map(|&(_, id)| id).collect();
    for &id in &ids {
        w.a.s.send(id, false, Bytes::from_static(b"request"));
    }
    for _ in 0..50 {
        w.pump(usize::MAX);
        if w.b.owners.len() == ids.len() {
            break;
        }
    }
    assert_eq!(
        w.b.owners.len(),
        ids.len(),
        "the far side took every stream"
    );
    (w, ids)
}

/// Three seconds of working links: by then every one of `ids` must know it was reset.
fn assert_all_reset(w: &mut World, ids: &[u32]) {
    for _ in 0..300 {
        w.pump(usize::MAX);
        w.advance(10);
    }
    let waiting: Vec<u32> = ids
        .iter()
        .copied()
        .filter(|id| w.a.s.reset_reason(*id).is_none())
        .collect();
    assert!(waiting.is_empty(), "never told of their reset: {waiting:?}");
}

#[test]
fn a_reset_lost_with_a_link_still_reaches_the_peer() {
    // The far side resets streams (its connects to their destination failed), and the link its
    // RSTs went on dies with them. Each side binds a stream to a link of its own choosing, so the
    // near side's half of a stream may sit on the surviving link, where nothing else would tell
    // it: it must still learn of the reset, or its client (which sent its request and waits for
    // the answer) waits for ever.
    let (mut w, ids) = requests_taken(1000);
    for id in &ids {
        w.b.s
            .reset(*id, ditto_proxy::frame::ResetReason::Unreachable);
    }
    // The far side's writers take the RSTs; the first link's die with it before A reads them.
    for c in &mut w.conns {
        let mut out = Vec::new();
        w.b.s.poll_transmit(c.b, &mut out);
        c.ba.extend_from_slice(&out);
    }
    w.kill(0);
    assert_all_reset(&mut w, &ids);
}

#[test]
fn a_reset_sent_on_a_link_the_peer_already_closed_still_reaches_it() {
    // A link dies; the near side notices first and asks again about its streams, which are
    // live. Then the far side resets them (their connects failed), its RSTs going out on the
    // link it has not yet found dead: they are lost, and the near side asked too early to be
    // answered. The far side must send them again once it finds the link dead.
    let (mut w, ids) = requests_taken(2000);
    let c = w.conns.remove(0);
    w.a.s.link_closed(c.a, w.now);
    w.pump(usize::MAX);
    for id in &ids {
        w.b.s
            .reset(*id, ditto_proxy::frame::ResetReason::Unreachable);
    }
    let mut lost = Vec::new();
    w.b.s.poll_transmit(c.b, &mut lost);
    w.b.s.link_closed(c.b, w.now);
    assert_all_reset(&mut w, &ids);
}

#[test]
fn streams_wait_for_the_hold_then_reset() {
    let mut w = World::new();
    w.open(true, 9, 100_000, 0);
    for step in 0..5 {
        w.owners_act(step);
        w.pump(step);
    }
    w.kill(0);
    w.advance(3_599_000);
    assert!(
        w.a.s.reset_reason(1).is_none(),
        "reset before the hold ended"
    );
    w.advance(2_000);
    assert_eq!(
        w.a.s.reset_reason(1),
        Some(ditto_proxy::frame::ResetReason::HoldExpired)
    );
}

#[test]
fn a_silent_link_is_suspect_and_new_streams_are_refused() {
    let mut w = World::new();
    w.pump(usize::MAX);
    w.conns[0].stalled = true;
    w.advance(1_000);
    assert!(w.a.s.can_open().is_ok());
    w.advance(1_000);
    assert_eq!(
        w.a.s.can_open(),
        Err(ditto_proxy::session::OpenError::Unresponsive)
    );
    // It answers again: usable again.
    w.conns[0].stalled = false;
    w.pump(usize::MAX);
    assert!(w.a.s.can_open().is_ok());
}

/// The session fuzz target's corpus replays without a panic (`fuzz/corpus/session`).
#[test]
fn session_fuzz_corpus_replays() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/session");
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut n = 0;
    for e in entries.flatten() {
        if let Ok(bytes) = std::fs::read(e.path()) {
            ditto_proxy::fuzzing::session(&bytes);
            n += 1;
        }
    }
    assert!(n >= 5, "only {n} corpus files");
}

/// Writes seed inputs for the session fuzzer: real frames a peer would send, cut into the
/// target's pieces (run by hand: `cargo test -p ditto-proxy --test session_pair -- --ignored`).
#[test]
#[ignore]
fn write_session_corpus_seeds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/session");
    std::fs::create_dir_all(&dir).expect("corpus dir");
    let target = OpenTarget {
        dest: "server:1".into(),
        client: Some("192.0.2.7:5555".parse().expect("addr")),
    };
    for odd in [0u8, 1] {
        let peer = |n: u32| n * 2 + u32::from(odd ^ 1);
        let mut frames = Vec::new();
        let fs = [
            frame::Frame::Open {
                stream: peer(1),
                target: target.clone(),
            },
            frame::Frame::Data {
                stream: peer(1),
                offset: 0,
                bytes: Bytes::from(vec![1u8; 5000]),
            },
            frame::Frame::Data {
                stream: peer(1),
                offset: 4000,
                bytes: Bytes::from(vec![1u8; 2000]),
            },
            frame::Frame::Feedback {
                stream: peer(1),
                offset: 0,
                bytes: Bytes::from_static(b"fb"),
            },
            frame::Frame::Ack {
                stream: peer(0) ^ 1,
                data: 3000,
                data_limit: 1 << 20,
                feedback: 100,
                fin: false,
                done: false,
            },
            frame::Frame::Fin {
                stream: peer(1),
                offset: 6000,
            },
            frame::Frame::Done {
                stream: peer(1),
                offset: 2,
            },
            frame::Frame::Rst {
                stream: peer(2),
                reason: frame::ResetReason::Closed,
            },
            frame::Frame::Ping(7),
            frame::Frame::Pong(7),
            frame::Frame::GoAway,
        ];
        for f in &fs {
            f.encode(&mut frames);
        }
        for (i, op) in [0u8, 7, 0x21, 0x35, 0x16].iter().enumerate() {
            let mut input = vec![odd];
            for piece in frames.chunks(96) {
                input.push(*op);
                input.extend_from_slice(piece);
            }
            std::fs::write(dir.join(format!("seed-{odd}-{i}")), &input).expect("write");
        }
    }
}
