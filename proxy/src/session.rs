//! The session with one peer process: streams, their sequencing, acknowledgements and credit,
//! retained bytes, link liveness and timers. Sans-IO: no sockets, no runtime, no clock of its own
//! (every call that needs the time is given `now`).
//!
//! A *link* is one tunnel connection; the caller ([`crate::peer`] and [`crate::link`]) moves frames
//! between a link's socket and the session with [`Session::on_frame`] and [`Session::poll_transmit`].
//! Links come and go; the session, and every stream in it, lives until the peer process changes
//! (the caller then drops it) or the peer stays unreachable for `hold`.
//!
//! Invariants, and why they hold:
//! * **Each byte reaches the decoder exactly once, in order.** Per stream and direction, DATA and
//!   FEEDBACK carry their offset. A receiver takes only bytes at its `recv` offset and beyond, and
//!   refuses a frame that would leave a gap. A sender keeps every byte until the peer acknowledges
//!   it; a stream is bound to one link at a time, and when it moves to another link it starts again
//!   from the last acknowledged offset, which the receiver has already passed. So every frame a
//!   receiver sees starts at or before its `recv`.
//! * **Nothing a peer still needs is forgotten.** FIN and DONE count as one unit after the last
//!   byte, so a stream is retired only when everything it sent (ends included) was acknowledged and
//!   everything it expected arrived. A retired or reset stream leaves a tombstone, so a peer that
//!   lost the last acknowledgement learns that the stream ended cleanly (RST `closed`) rather
//!   than being reset.
//! * **Memory is bounded by credit.** DATA a peer may send is limited by the window it was granted
//!   (consumption + window), so retained DATA per stream is at most a window plus what is queued.

use crate::frame::{self, Frame, OpenTarget, ResetReason, QUANTUM};
use bytes::Bytes;
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

/// Bytes `poll_transmit` collects into one socket write.
pub const BATCH_BYTES: usize = 64 * 1024;
/// A stream whose queued bytes are at most this when it becomes ready is served as interactive.
const LIGHT_BYTES: usize = 4096;
/// Largest first turn of a new stream ([`Session::set_first_turn`]): a first batch is one chunk
/// (16 KiB at most) and its header.
const MAX_FIRST_TURN: usize = 2 * QUANTUM;
/// Consecutive light turns before a bulk stream gets one.
const LIGHT_STREAK: u32 = 8;
/// Inbound FEEDBACK a stream may have waiting before the stream is reset.
const MAX_INBOUND_FEEDBACK: usize = 8 << 20;
/// Control bytes (PONG, RST, GOAWAY) that may wait on a link before the link is closed.
const MAX_CONTROL_BYTES: usize = 4 << 20;
/// Received bytes after which an acknowledgement goes out without waiting for the ack timer.
const ACK_EVERY: u64 = 64 * 1024;
/// Longest an acknowledgement of fewer bytes waits.
const ACK_DELAY: Duration = Duration::from_millis(20);
/// A stream that has everything from the peer and waits only for the acknowledgement of its own
/// last bytes sends its end markers again after this long: the peer may have retired its side
/// already, its final acknowledgement lost with a connection (it then answers from its tombstone).
const END_RESEND: Duration = Duration::from_secs(2);
/// Ended streams remembered to answer a peer that resumes one of them.
const TOMBSTONES: usize = 65_536;
/// RSTs we sent, remembered with their link: those on a link that dies are sent again.
const RSTS_REMEMBERED: usize = 16_384;
/// Largest credit a peer may grant beyond what it acknowledged.
const MAX_CREDIT: u64 = 2 * crate::hello::MAX_WINDOW as u64;

/// Fixed for the life of a session.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// DATA bytes we accept per stream beyond what we consumed.
    pub window: u32,
    /// Streams we accept from the peer at once.
    pub max_streams: u32,
    /// Liveness probe interval of every link.
    pub ping_interval: Duration,
    /// A link silent this long (or 2 RTT + a probe interval, if longer) is suspect: no new streams.
    pub suspect_after: Duration,
    /// A link silent this long is closed.
    pub dead_after: Duration,
    /// Streams wait this long for an unreachable peer before they are reset.
    pub hold: Duration,
}

/// What the peer's hello told us.
#[derive(Clone, Copy, Debug)]
pub struct PeerParams {
    /// DATA bytes the peer accepts per stream: our initial credit.
    pub window: u32,
    /// Streams the peer accepts from us at once.
    pub max_streams: u32,
    /// Our stream ids are odd (the peer's even), decided from the two session ids.
    pub odd: bool,
}

/// A link of this session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkId(pub u64);

/// Which half of a stream's owner has news: `Up` (LAN → tunnel: feedback, DONE, room to send) or
/// `Down` (tunnel → LAN: data, FIN).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Half {
    Up,
    Down,
}

/// What the caller must act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The peer opened a stream: start a flow for it.
    Incoming { stream: u32, target: OpenTarget },
    /// Close this link's socket (then call [`Session::link_closed`]).
    CloseLink { link: LinkId, why: String },
    /// The link stopped answering: dial a replacement if we dial.
    LinkSuspect(LinkId),
    /// A store summary message from the peer, for the owner's reconciler.
    Summary(Bytes),
}

/// Why a stream could not be opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("no tunnel connection to the peer")]
    NoLink,
    #[error("the peer does not answer")]
    Unresponsive,
    #[error("the peer's stream limit is reached")]
    Full,
    #[error("the session is going away")]
    GoingAway,
    #[error("the destination does not fit an OPEN frame")]
    TooLarge,
}

/// News for a stream's sending half.
#[derive(Debug, Default)]
pub struct UpEvents {
    pub feedback: Vec<Bytes>,
    /// The peer's decoder delivered everything and needs nothing more.
    pub done: bool,
    pub reset: Option<ResetReason>,
}

/// News for a stream's receiving half.
#[derive(Debug, Default)]
pub struct DownEvents {
    pub data: Vec<Bytes>,
    /// The peer's encoder finished and every byte arrived.
    pub fin: bool,
    pub reset: Option<ResetReason>,
}

/// Bytes a session holds for its streams.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Buffered {
    /// To send, or sent and not yet acknowledged (both halves), and link control frames.
    pub send: usize,
    /// DATA received and not yet taken by the flows: per stream at most the window granted.
    pub data_in: usize,
    /// FEEDBACK received and not yet taken by the flows' encoders: small and brief, as each
    /// stream's sending half takes it as soon as it is woken (a backlog past 8 MiB resets it).
    pub feedback_in: usize,
}

impl std::ops::AddAssign for Buffered {
    fn add_assign(&mut self, o: Buffered) {
        self.send += o.send;
        self.data_in += o.data_in;
        self.feedback_in += o.feedback_in;
    }
}

/// Totals and gauges for metrics and status.
#[derive(Clone, Copy, Debug, Default)]
pub struct SessionStats {
    pub streams: usize,
    pub links: usize,
    pub healthy_links: usize,
    /// Streams waiting for the peer now (no healthy link).
    pub held: usize,
    /// Streams moved to another link after theirs was lost, since the session began.
    pub resumed: u64,
    /// Stream-seconds spent waiting for an unreachable peer, since the session began.
    pub held_seconds: f64,
    /// Smallest smoothed RTT over links.
    pub rtt: Option<Duration>,
}

/// One direction's bytes we send: kept from the last acknowledged offset until acknowledged.
#[derive(Default)]
struct Outbound {
    /// Sent on the current link, not acknowledged.
    inflight: VecDeque<Bytes>,
    inflight_bytes: usize,
    /// Not sent on the current link yet.
    unsent: VecDeque<Bytes>,
    unsent_bytes: usize,
    /// Offset of the first byte of `inflight`.
    acked: u64,
    /// Where the bytes end (FIN/DONE), once the writer finished.
    end: Option<u64>,
    end_sent: bool,
    end_acked: bool,
}

impl Outbound {
    fn sent(&self) -> u64 {
        self.acked + self.inflight_bytes as u64
    }
    fn written(&self) -> u64 {
        self.sent() + self.unsent_bytes as u64
    }
    fn bytes(&self) -> usize {
        self.inflight_bytes + self.unsent_bytes
    }
    fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.unsent_bytes += b.len();
            self.unsent.push_back(b);
        }
    }
    fn finish(&mut self) {
        if self.end.is_none() {
            self.end = Some(self.written());
        }
    }
    /// The end marker goes out once the bytes before it did.
    fn end_due(&self) -> bool {
        self.end.is_some_and(|e| self.sent() >= e) && !self.end_sent && !self.end_acked
    }
    /// Everything, the end included, was acknowledged.
    fn delivered(&self) -> bool {
        self.end_acked && self.bytes() == 0
    }
    /// Takes up to `max` unsent bytes to transmit: (offset, bytes).
    fn take(&mut self, max: usize) -> Option<(u64, Bytes)> {
        let mut b = self.unsent.pop_front()?;
        if b.len() > max {
            let rest = b.split_off(max);
            self.unsent.push_front(rest);
        }
        let offset = self.sent();
        self.unsent_bytes -= b.len();
        self.inflight_bytes += b.len();
        self.inflight.push_back(b.clone());
        Some((offset, b))
    }
    /// Everything not acknowledged is sent again (on the next link).
    fn rewind(&mut self) {
        while let Some(b) = self.inflight.pop_back() {
            self.unsent.push_front(b);
        }
        self.unsent_bytes += self.inflight_bytes;
        self.inflight_bytes = 0;
        self.end_sent = false;
    }
    /// The peer has `bytes` bytes, and the end marker if `end`: drop what it holds. True on
    /// progress.
    fn ack(&mut self, bytes: u64, end: bool) -> Result<bool, &'static str> {
        if bytes > self.written() {
            return Err("acknowledges bytes never sent");
        }
        if end && self.end.is_none() {
            return Err("acknowledges an end never sent");
        }
        let mut progress = false;
        if end && !self.end_acked {
            self.end_acked = true;
            progress = true;
        }
        if bytes > self.acked {
            self.drop_to(bytes);
            progress = true;
        }
        Ok(progress)
    }
    fn drop_to(&mut self, upto: u64) {
        let mut n = upto.saturating_sub(self.acked) as usize;
        self.acked = self.acked.max(upto);
        for (queue, count) in [
            (&mut self.inflight, &mut self.inflight_bytes),
            (&mut self.unsent, &mut self.unsent_bytes),
        ] {
            while n > 0 {
                let Some(front) = queue.front_mut() else {
                    break;
                };
                let k = n.min(front.len());
                if k == front.len() {
                    queue.pop_front();
                } else {
                    let _ = front.split_to(k);
                }
                *count -= k;
                n -= k;
            }
        }
    }
    /// Treat everything as delivered (the peer told us it ended cleanly).
    fn settle(&mut self) {
        let w = self.written();
        self.drop_to(w);
        self.end.get_or_insert(w);
        self.end_acked = true;
    }
}

/// One direction's bytes we receive.
#[derive(Default)]
struct Inbound {
    recv: u64,
    end: Option<u64>,
    queue: Vec<Bytes>,
    queued: usize,
}

impl Inbound {
    /// Takes the part of `b` (at `offset`) not received yet. Returns the new bytes' count.
    fn on_bytes(&mut self, offset: u64, b: Bytes) -> Result<usize, &'static str> {
        if offset > self.recv {
            return Err("bytes beyond a gap");
        }
        let skip = (self.recv - offset) as usize;
        if skip >= b.len() {
            return Ok(0);
        }
        let b = b.slice(skip..);
        let n = b.len();
        self.recv += n as u64;
        self.queued += n;
        self.queue.push(b);
        Ok(n)
    }
    fn set_end(&mut self, offset: u64) -> Result<(), &'static str> {
        if self.end.is_some_and(|e| e != offset) {
            return Err("end moved");
        }
        self.end = Some(offset);
        Ok(())
    }
    /// The end marker arrived, and every byte before it.
    fn complete(&self) -> bool {
        self.end.is_some_and(|e| self.recv >= e)
    }
    fn take(&mut self) -> Vec<Bytes> {
        self.queued = 0;
        std::mem::take(&mut self.queue)
    }
}

struct Stream {
    local: bool,
    /// Kept until the peer confirms the stream, to open it again on another link.
    target: Option<OpenTarget>,
    confirmed: bool,
    open_due: bool,
    link: Option<LinkId>,
    /// In its link's ready list, or in the waiting list.
    queued: bool,
    /// Its link was lost: the next binding is a resume.
    moved: bool,
    data_out: Outbound,
    fb_out: Outbound,
    data_in: Inbound,
    fb_in: Inbound,
    /// The peer lets us send DATA up to here.
    data_limit: u64,
    /// We let the peer send DATA up to here.
    granted: u64,
    consumed: u64,
    ack_due: bool,
    /// What our last ACK said.
    acked_data: u64,
    acked_fb: u64,
    /// The owner dropped its handle.
    detached: bool,
    reset: Option<ResetReason>,
    /// DATA bytes the stream's first turn carries (0: a quantum): the first unit the peer's
    /// decoder can deliver, so a burst of new streams each gets its first bytes through in turn.
    first_turn: usize,
}

impl Stream {
    fn new(local: bool, target: Option<OpenTarget>, peer_window: u32, window: u32) -> Stream {
        Stream {
            local,
            confirmed: !local,
            open_due: local,
            target,
            link: None,
            queued: false,
            moved: false,
            data_out: Outbound::default(),
            fb_out: Outbound::default(),
            data_in: Inbound::default(),
            fb_in: Inbound::default(),
            data_limit: u64::from(peer_window),
            granted: u64::from(window),
            consumed: 0,
            ack_due: !local,
            acked_data: 0,
            acked_fb: 0,
            detached: false,
            reset: None,
            first_turn: 0,
        }
    }
    fn credit(&self) -> u64 {
        self.data_limit.saturating_sub(self.data_out.sent())
    }
    fn sendable(&self) -> bool {
        self.reset.is_none()
            && (self.open_due
                || self.ack_due
                || !self.fb_out.unsent.is_empty()
                || self.fb_out.end_due()
                || (!self.data_out.unsent.is_empty() && self.credit() > 0)
                || self.data_out.end_due())
    }
    fn finished(&self) -> bool {
        self.data_out.delivered()
            && self.fb_out.delivered()
            && self.data_in.complete()
            && self.fb_in.complete()
    }
    fn pending_bytes(&self) -> usize {
        self.data_out.unsent_bytes + self.fb_out.unsent_bytes
    }
}

struct Link {
    control: Vec<u8>,
    /// Encoded summary frames: one leaves per [`Session::poll_transmit`], after the control frames.
    summaries: VecDeque<Vec<u8>>,
    light: VecDeque<u32>,
    bulk: VecDeque<u32>,
    streak: u32,
    bound: usize,
    last_rx: Instant,
    next_ping: Instant,
    srtt: Option<Duration>,
    suspect: bool,
}

impl Link {
    fn suspect_threshold(&self, cfg: &SessionConfig) -> Duration {
        let rtt = self.srtt.unwrap_or_default();
        cfg.suspect_after.max(rtt * 2 + cfg.ping_interval)
    }
}

/// The state shared with one peer process. See the module documentation.
pub struct Session {
    cfg: SessionConfig,
    peer: PeerParams,
    /// Clock origin for PING payloads.
    origin: Instant,
    next_local: u32,
    /// Peer stream ids at or below this ended here and were forgotten.
    remote_floor: u32,
    local_count: usize,
    remote_count: usize,
    streams: HashMap<u32, Stream>,
    tombstones: HashMap<u32, bool>,
    tomb_order: VecDeque<u32>,
    /// The latest RSTs we sent of our own accord (stream, link, reason), oldest first.
    rsts_sent: VecDeque<(u32, LinkId, ResetReason)>,
    links: HashMap<LinkId, Link>,
    next_link: u64,
    /// Sendable streams with no healthy link to go to.
    waiting: VecDeque<u32>,
    /// Streams with acknowledgements due after [`ACK_DELAY`].
    ack_later: HashSet<u32>,
    /// Detached streams that have everything from the peer and wait for the acknowledgement of
    /// their last bytes, with when a timeout first saw them waiting (see [`END_RESEND`]).
    closing: HashMap<u32, Option<Instant>>,
    /// When the timeout looks at `closing` next.
    closing_check: Option<Instant>,
    ack_at: Option<Instant>,
    going_away: bool,
    peer_going_away: bool,
    /// Since when no healthy link exists (`None` while one does).
    unreachable_since: Option<Instant>,
    held_seconds: f64,
    resumed: u64,
    events: VecDeque<Event>,
    wakes: Vec<(u32, Half)>,
    dirty: HashSet<LinkId>,
}

impl Session {
    pub fn new(cfg: SessionConfig, peer: PeerParams, now: Instant) -> Session {
        Session {
            cfg,
            peer,
            origin: now,
            next_local: if peer.odd { 1 } else { 2 },
            remote_floor: 0,
            local_count: 0,
            remote_count: 0,
            streams: HashMap::new(),
            tombstones: HashMap::new(),
            tomb_order: VecDeque::new(),
            rsts_sent: VecDeque::new(),
            links: HashMap::new(),
            next_link: 1,
            waiting: VecDeque::new(),
            ack_later: HashSet::new(),
            closing: HashMap::new(),
            closing_check: None,
            ack_at: None,
            going_away: false,
            peer_going_away: false,
            unreachable_since: Some(now),
            held_seconds: 0.0,
            resumed: 0,
            events: VecDeque::new(),
            wakes: Vec::new(),
            dirty: HashSet::new(),
        }
    }

    // ----- links -------------------------------------------------------------------------------

    /// A new link is up: waiting streams go to it, and so do streams on links that stopped
    /// answering (those links are closed by their owner or by the dead timer).
    pub fn add_link(&mut self, now: Instant) -> LinkId {
        let id = LinkId(self.next_link);
        self.next_link += 1;
        self.links.insert(
            id,
            Link {
                control: Vec::new(),
                summaries: VecDeque::new(),
                light: VecDeque::new(),
                bulk: VecDeque::new(),
                streak: 0,
                bound: 0,
                last_rx: now,
                next_ping: now,
                srtt: None,
                suspect: false,
            },
        );
        if self.going_away {
            self.push_control(id, &Frame::GoAway);
        }
        let suspect: Vec<LinkId> = self
            .links
            .iter()
            .filter(|(_, l)| l.suspect)
            .map(|(id, _)| *id)
            .collect();
        if !suspect.is_empty() {
            self.unbind(|l| suspect.contains(&l));
        }
        self.check_reachable(now);
        self.rebind_waiting();
        id
    }

    /// The link's socket is gone: its streams continue on other links, from what was acknowledged.
    pub fn link_closed(&mut self, link: LinkId, now: Instant) {
        if self.links.remove(&link).is_none() {
            return;
        }
        self.dirty.remove(&link);
        self.unbind(|l| l == link);
        // Frames about streams bound to other links may have gone with it too: each side binds a
        // stream to a link of its own choosing, so an RST the peer sent on this link can belong
        // to a stream we keep on another, which would then wait for ever. Every live stream
        // acknowledges again; the peer answers one it reset or forgot with an RST.
        let live: Vec<u32> = self
            .streams
            .iter_mut()
            .filter(|(_, s)| s.reset.is_none())
            .map(|(id, s)| {
                s.ack_due = true;
                *id
            })
            .collect();
        for id in live {
            self.make_ready(id);
        }
        // Our RSTs on it may be lost; sent again, they are ignored by a peer that had them.
        let (lost, kept): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.rsts_sent)
            .into_iter()
            .partition(|(_, l, _)| *l == link);
        self.rsts_sent = kept;
        for (id, _, reason) in lost {
            self.send_rst(None, id, reason);
        }
        self.check_reachable(now);
        self.rebind_waiting();
    }

    /// Whether `link` is attached and answers.
    pub fn link_healthy(&self, link: LinkId) -> bool {
        self.links.get(&link).is_some_and(|l| !l.suspect)
    }

    fn healthy_links(&self) -> usize {
        self.links.values().filter(|l| !l.suspect).count()
    }

    /// Unbinds every stream on links matching `dead`, to be sent again from what was acknowledged.
    fn unbind(&mut self, dead: impl Fn(LinkId) -> bool) {
        let mut moved = Vec::new();
        for (id, s) in self.streams.iter_mut() {
            let Some(l) = s.link.filter(|l| dead(*l)) else {
                continue;
            };
            s.link = None;
            if let Some(link) = self.links.get_mut(&l) {
                link.bound -= 1;
            }
            s.queued = false;
            s.data_out.rewind();
            s.fb_out.rewind();
            if !s.confirmed {
                s.open_due = true;
            }
            // Our acknowledgements on that link may have been lost with it.
            s.ack_due = true;
            s.moved = s.reset.is_none();
            moved.push(*id);
        }
        if moved.is_empty() {
            return;
        }
        let moved_set: HashSet<u32> = moved.iter().copied().collect();
        for l in self.links.values_mut() {
            l.light.retain(|x| !moved_set.contains(x));
            l.bulk.retain(|x| !moved_set.contains(x));
        }
        for id in moved {
            self.make_ready(id);
        }
    }

    fn rebind_waiting(&mut self) {
        if self.healthy_links() == 0 {
            return;
        }
        for id in std::mem::take(&mut self.waiting) {
            if let Some(s) = self.streams.get_mut(&id) {
                s.queued = false;
            }
            self.make_ready(id);
        }
    }

    fn check_reachable(&mut self, now: Instant) {
        let healthy = self.healthy_links() > 0;
        match (healthy, self.unreachable_since) {
            (true, Some(since)) => {
                self.held_seconds +=
                    now.saturating_duration_since(since).as_secs_f64() * self.live() as f64;
                self.unreachable_since = None;
            }
            (false, None) => self.unreachable_since = Some(now),
            _ => {}
        }
    }

    fn live(&self) -> usize {
        self.local_count + self.remote_count
    }

    // ----- streams: the owner's side ---------------------------------------------------------------

    /// Streams the peer accepts from us at once (its hello's `max_streams`).
    pub fn peer_max_streams(&self) -> u32 {
        self.peer.max_streams
    }

    /// Whether a new stream can be opened now (a healthy link, not going away, under the limit).
    pub fn can_open(&self) -> Result<(), OpenError> {
        if self.links.is_empty() {
            Err(OpenError::NoLink)
        } else if self.going_away || self.peer_going_away {
            Err(OpenError::GoingAway)
        } else if self.healthy_links() == 0 {
            Err(OpenError::Unresponsive)
        } else if self.local_count >= self.peer.max_streams as usize {
            Err(OpenError::Full)
        } else {
            Ok(())
        }
    }

    /// Opens a stream to `target` on a healthy link.
    pub fn open(&mut self, target: OpenTarget) -> Result<u32, OpenError> {
        if !target.fits() {
            return Err(OpenError::TooLarge);
        }
        self.can_open()?;
        let id = self.next_local;
        self.next_local = match id.checked_add(2) {
            Some(n) => n,
            None => {
                // Ids are never reused within a session; at the end of the space it retires.
                self.go_away();
                return Err(OpenError::GoingAway);
            }
        };
        self.local_count += 1;
        self.streams.insert(
            id,
            Stream::new(true, Some(target), self.peer.window, self.cfg.window),
        );
        self.make_ready(id);
        Ok(id)
    }

    /// Queues encoded bytes (`feedback` false: DATA for the peer's decoder; true: FEEDBACK for its
    /// encoder).
    pub fn send(&mut self, id: u32, feedback: bool, bytes: Bytes) {
        if let Some(s) = self.live_mut(id) {
            if feedback {
                // Nothing follows DONE.
                if s.fb_out.end.is_none() {
                    s.fb_out.push(bytes);
                }
            } else {
                s.data_out.push(bytes);
            }
            self.make_ready(id);
        }
    }

    /// The DATA bytes of stream `id`'s first turn, if it has sent none yet: `bytes` (the peer's
    /// first decodable unit, at most [`MAX_FIRST_TURN`]) instead of a quantum.
    pub fn set_first_turn(&mut self, id: u32, bytes: usize) {
        if let Some(s) = self.live_mut(id) {
            if s.data_out.sent() == 0 {
                s.first_turn = bytes.min(MAX_FIRST_TURN);
            }
        }
    }

    /// No more bytes of that kind: FIN (DATA) or DONE (FEEDBACK) follows what is queued.
    pub fn finish(&mut self, id: u32, feedback: bool) {
        if let Some(s) = self.live_mut(id) {
            if feedback {
                s.fb_out.finish();
            } else {
                s.data_out.finish();
            }
            self.make_ready(id);
        }
    }

    /// The owner consumed `n` DATA bytes: the peer may send as many more.
    pub fn consumed(&mut self, id: u32, n: usize) {
        let window = u64::from(self.cfg.window);
        if let Some(s) = self.live_mut(id) {
            s.consumed += n as u64;
            if s.consumed + window - s.granted >= window / 4 {
                s.granted = s.consumed + window;
                s.ack_due = true;
                self.make_ready(id);
            }
        }
    }

    /// What arrived for the sending half.
    pub fn take_up(&mut self, id: u32) -> UpEvents {
        match self.streams.get_mut(&id) {
            None => UpEvents {
                reset: Some(ResetReason::Gone),
                ..Default::default()
            },
            Some(s) => UpEvents {
                feedback: s.fb_in.take(),
                done: s.fb_in.complete(),
                reset: s.reset,
            },
        }
    }

    /// What arrived for the receiving half.
    pub fn take_down(&mut self, id: u32) -> DownEvents {
        match self.streams.get_mut(&id) {
            None => DownEvents {
                reset: Some(ResetReason::Gone),
                ..Default::default()
            },
            Some(s) => DownEvents {
                data: s.data_in.take(),
                fin: s.data_in.complete(),
                reset: s.reset,
            },
        }
    }

    /// (DATA, FEEDBACK) bytes queued and not yet sent on a link.
    pub fn unsent(&self, id: u32) -> (usize, usize) {
        self.streams
            .get(&id)
            .map_or((0, 0), |s| (s.data_out.unsent_bytes, s.fb_out.unsent_bytes))
    }

    /// Bytes the stream keeps until the peer acknowledges them (both kinds, sent or not).
    pub fn retained(&self, id: u32) -> usize {
        self.streams
            .get(&id)
            .map_or(0, |s| s.data_out.bytes() + s.fb_out.bytes())
    }

    /// Why the stream was reset, if it was (a stream this session does not know counts as gone).
    pub fn reset_reason(&self, id: u32) -> Option<ResetReason> {
        match self.streams.get(&id) {
            None => Some(ResetReason::Gone),
            Some(s) => s.reset,
        }
    }

    /// Aborts the stream: RST goes out ahead of other traffic.
    pub fn reset(&mut self, id: u32, reason: ResetReason) {
        let Some(s) = self.live_mut(id) else {
            return;
        };
        let link = s.link;
        self.kill_stream(id, reason);
        self.send_rst(link, id, reason);
    }

    /// Sends an RST of our own and remembers on which link: if that link dies, it is sent again
    /// (it may have died with it, and nothing else would tell the peer).
    fn send_rst(&mut self, prefer: Option<LinkId>, id: u32, reason: ResetReason) {
        if let Some(l) = self.send_control(prefer, &Frame::Rst { stream: id, reason }) {
            if self.rsts_sent.len() >= RSTS_REMEMBERED {
                self.rsts_sent.pop_front();
            }
            self.rsts_sent.push_back((id, l, reason));
        }
    }

    /// The owner is gone. A stream that finished both ways lingers until the peer acknowledged
    /// everything; one that did not is reset.
    pub fn detach(&mut self, id: u32) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        s.detached = true;
        if s.reset.is_none() && (s.data_out.end.is_none() || s.fb_out.end.is_none()) {
            self.reset(id, ResetReason::Other);
        }
        self.maybe_retire(id);
    }

    /// Sends again the end markers (FIN, DONE) of streams that waited [`END_RESEND`] for their
    /// acknowledgement in [`Session::handle_timeout`]: a peer that retired its side answers from
    /// its tombstone (RST `closed`), and the stream retires.
    fn resend_ends(&mut self, now: Instant) {
        let mut due = Vec::new();
        self.closing.retain(|id, since| match self.streams.get(id) {
            None => false,
            Some(_) => match since {
                None => {
                    *since = Some(now);
                    true
                }
                Some(t) if now.saturating_duration_since(*t) >= END_RESEND => {
                    *since = Some(now);
                    due.push(*id);
                    true
                }
                Some(_) => true,
            },
        });
        for id in due {
            // Only the end markers: a peer that retired had every byte, and one that did not
            // (its acknowledgement is only slow) acknowledges again what it has. Bytes are
            // never sent twice for this.
            if let Some(s) = self.streams.get_mut(&id) {
                for o in [&mut s.data_out, &mut s.fb_out] {
                    if o.end.is_some() && !o.end_acked {
                        o.end_sent = false;
                    }
                }
            }
            self.make_ready(id);
        }
    }

    /// Resets every stream (the node is stopping, or the peer stayed away too long).
    pub fn reset_all(&mut self, reason: ResetReason) {
        let ids: Vec<u32> = self.streams.keys().copied().collect();
        for id in ids {
            self.reset(id, reason);
        }
    }

    /// We open no more streams, and tell the peer to open none either.
    pub fn go_away(&mut self) {
        if !self.going_away {
            self.going_away = true;
            let links: Vec<LinkId> = self.links.keys().copied().collect();
            for l in links {
                self.push_control(l, &Frame::GoAway);
            }
        }
    }

    fn live_mut(&mut self, id: u32) -> Option<&mut Stream> {
        self.streams.get_mut(&id).filter(|s| s.reset.is_none())
    }

    /// Marks a live stream reset (its owner learns the reason) and frees its place in the limits.
    fn kill_stream(&mut self, id: u32, reason: ResetReason) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.reset.is_some() {
            return;
        }
        s.reset = Some(reason);
        s.data_out = Outbound::default();
        s.fb_out = Outbound::default();
        if s.local {
            self.local_count -= 1;
        } else {
            self.remote_count -= 1;
        }
        self.wakes.push((id, Half::Up));
        self.wakes.push((id, Half::Down));
        self.tombstone(id, false);
        self.maybe_retire(id);
    }

    /// Removes a stream its owner left, once nothing more is owed either way.
    fn maybe_retire(&mut self, id: u32) {
        let Some(s) = self.streams.get(&id) else {
            return;
        };
        let clean = s.reset.is_none() && s.finished();
        if !s.detached || (s.reset.is_none() && !clean) {
            if s.detached && s.reset.is_none() && s.data_in.complete() && s.fb_in.complete() {
                self.closing.entry(id).or_insert(None);
            }
            return;
        }
        // The peer retires its side once we acknowledged its last bytes: an acknowledgement we
        // still owe leaves first (the stream retires right after its turn), or the peer's side
        // would wait for it for the rest of the session.
        if clean && (s.ack_due || self.ack_later.contains(&id)) {
            self.ack_later.remove(&id);
            if let Some(s) = self.streams.get_mut(&id) {
                s.ack_due = true;
            }
            self.make_ready(id);
            return;
        }
        let Some(s) = self.streams.remove(&id) else {
            return;
        };
        self.closing.remove(&id);
        // A burst of streams leaves no table sized for it (a stream is 464 bytes: a table of
        // 1,024 kept after every burst was half a megabyte per peer).
        if self.streams.capacity() > 64 && self.streams.len() * 4 < self.streams.capacity() {
            self.streams.shrink_to(self.streams.len() * 2);
        }
        if let Some(l) = s.link.and_then(|l| self.links.get_mut(&l)) {
            l.bound -= 1;
        }
        if clean {
            if s.local {
                self.local_count -= 1;
            } else {
                self.remote_count -= 1;
            }
            self.tombstone(id, true);
        }
        self.ack_later.remove(&id);
    }

    fn tombstone(&mut self, id: u32, clean: bool) {
        if self.tombstones.insert(id, clean).is_none() {
            self.tomb_order.push_back(id);
            if self.tomb_order.len() > TOMBSTONES {
                if let Some(old) = self.tomb_order.pop_front() {
                    self.tombstones.remove(&old);
                    if old % 2 == u32::from(!self.peer.odd) {
                        self.remote_floor = self.remote_floor.max(old);
                    }
                }
            }
        }
    }

    /// Puts a stream with something to send into its link's ready list, binding it to the least
    /// loaded healthy link if it has none, or into the waiting list if there is none.
    fn make_ready(&mut self, id: u32) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.queued || !s.sendable() {
            return;
        }
        if s.link.is_none() {
            let best = self
                .links
                .iter()
                .filter(|(_, l)| !l.suspect)
                .min_by_key(|(lid, l)| (l.bound, **lid))
                .map(|(lid, _)| *lid);
            let Some(l) = best else {
                s.queued = true;
                self.waiting.push_back(id);
                return;
            };
            s.link = Some(l);
            if std::mem::take(&mut s.moved) {
                self.resumed += 1;
            }
            if let Some(link) = self.links.get_mut(&l) {
                link.bound += 1;
            }
        }
        let Some(l) = s.link else {
            return;
        };
        // A stream that has sent nothing yet is served as interactive for its first turn, whatever
        // it has queued (as a fair queue serves new flows first): under a burst of new flows, each
        // one's first bytes leave before anyone's second quantum.
        let light = s.pending_bytes() <= LIGHT_BYTES || s.data_out.sent() == 0;
        s.queued = true;
        if let Some(link) = self.links.get_mut(&l) {
            if light {
                link.light.push_back(id);
            } else {
                link.bulk.push_back(id);
            }
            self.dirty.insert(l);
        }
    }

    // ----- frames --------------------------------------------------------------------------------

    fn push_control(&mut self, link: LinkId, f: &Frame) {
        if let Some(l) = self.links.get_mut(&link) {
            f.encode(&mut l.control);
            self.dirty.insert(link);
            if l.control.len() > MAX_CONTROL_BYTES {
                self.events.push_back(Event::CloseLink {
                    link,
                    why: "control frames pile up faster than they can be written".into(),
                });
            }
        }
    }

    /// Sends a control frame on `prefer`, or on any link (healthy ones first), or not at all: a
    /// peer that resumes the stream later is answered from the tombstone. Returns the link.
    fn send_control(&mut self, prefer: Option<LinkId>, f: &Frame) -> Option<LinkId> {
        let link = prefer.filter(|l| self.links.contains_key(l)).or_else(|| {
            self.links
                .iter()
                .min_by_key(|(id, l)| (l.suspect, **id))
                .map(|(id, _)| *id)
        });
        if let Some(l) = link {
            self.push_control(l, f);
        }
        link
    }

    /// Handles one frame from `link`. `Err` is a protocol violation: close the link.
    pub fn on_frame(&mut self, link: LinkId, f: Frame, now: Instant) -> Result<(), String> {
        let Some(l) = self.links.get_mut(&link) else {
            return Ok(());
        };
        l.last_rx = now;
        if l.suspect {
            l.suspect = false;
            self.check_reachable(now);
            self.rebind_waiting();
        }
        match f {
            Frame::Open { stream, target } => self.on_open(link, stream, target),
            Frame::Data {
                stream,
                offset,
                bytes,
            } => self.on_bytes(stream, false, offset, bytes, now),
            Frame::Feedback {
                stream,
                offset,
                bytes,
            } => self.on_bytes(stream, true, offset, bytes, now),
            Frame::Ack {
                stream,
                data,
                data_limit,
                feedback,
                fin,
                done,
            } => self.on_ack(link, stream, (data, fin), data_limit, (feedback, done)),
            Frame::Fin { stream, offset } => self.on_end(link, stream, false, offset),
            Frame::Done { stream, offset } => self.on_end(link, stream, true, offset),
            Frame::Rst { stream, reason } => {
                self.on_rst(stream, reason);
                Ok(())
            }
            Frame::Ping(v) => {
                self.push_control(link, &Frame::Pong(v));
                Ok(())
            }
            Frame::Pong(v) => {
                let sent = self.origin + Duration::from_micros(v);
                if let (Some(sample), Some(l)) =
                    (now.checked_duration_since(sent), self.links.get_mut(&link))
                {
                    // Smoothed like TCP's SRTT (gain 1/8).
                    l.srtt = Some(match l.srtt {
                        None => sample,
                        Some(old) => (old * 7 + sample) / 8,
                    });
                }
                Ok(())
            }
            Frame::GoAway => {
                self.peer_going_away = true;
                Ok(())
            }
            Frame::Summary(b) => {
                self.events.push_back(Event::Summary(b));
                Ok(())
            }
        }
    }

    /// Queues a store summary message on a link (healthy ones first); dropped if there is none (the
    /// reconcilers ask again). Their own window bounds how many wait.
    pub fn send_summary(&mut self, body: Vec<u8>) {
        let link = self
            .links
            .iter()
            .min_by_key(|(id, l)| (l.suspect, **id))
            .map(|(id, _)| *id);
        if let Some(id) = link {
            if let Some(l) = self.links.get_mut(&id) {
                let mut f = Vec::with_capacity(body.len() + crate::frame::HEADER_LEN);
                Frame::Summary(Bytes::from(body)).encode(&mut f);
                l.summaries.push_back(f);
                self.dirty.insert(id);
            }
        }
    }

    /// Answers a frame about a stream we do not have: it ended here, cleanly or not.
    fn answer_unknown(&mut self, link: LinkId, stream: u32) {
        let reason = match self.tombstones.get(&stream) {
            Some(true) => ResetReason::Closed,
            _ => ResetReason::Gone,
        };
        self.push_control(link, &Frame::Rst { stream, reason });
    }

    fn on_open(&mut self, link: LinkId, id: u32, target: OpenTarget) -> Result<(), String> {
        let peer_parity = u32::from(!self.peer.odd);
        if id % 2 != peer_parity {
            return Err(format!("OPEN with stream id {id} of our parity"));
        }
        if let Some(s) = self.streams.get_mut(&id) {
            match s.reset {
                // Opened again after a link was lost: it is known; confirm it.
                None => {
                    s.ack_due = true;
                    self.make_ready(id);
                }
                Some(_) => self.answer_unknown(link, id),
            }
            return Ok(());
        }
        // OPENs of different links arrive in any order, so a lower id than one seen before may still
        // be new; only ids whose tombstones were forgotten are known to be old.
        if self.tombstones.contains_key(&id) || id <= self.remote_floor {
            self.answer_unknown(link, id);
            return Ok(());
        }
        let refuse = if self.going_away {
            Some(ResetReason::Shutdown)
        } else if self.remote_count >= self.cfg.max_streams as usize {
            Some(ResetReason::Busy)
        } else {
            None
        };
        if let Some(reason) = refuse {
            self.tombstone(id, false);
            self.push_control(link, &Frame::Rst { stream: id, reason });
            return Ok(());
        }
        self.remote_count += 1;
        self.streams.insert(
            id,
            Stream::new(false, None, self.peer.window, self.cfg.window),
        );
        self.make_ready(id);
        self.events
            .push_back(Event::Incoming { stream: id, target });
        Ok(())
    }

    fn on_bytes(
        &mut self,
        id: u32,
        feedback: bool,
        offset: u64,
        bytes: Bytes,
        now: Instant,
    ) -> Result<(), String> {
        let Some(s) = self.live_mut(id) else {
            // Reset or ended here: in-flight bytes are dropped.
            return Ok(());
        };
        let len = bytes.len() as u64;
        if !feedback && offset + len > s.granted {
            return Err(format!("stream {id}: DATA beyond the granted window"));
        }
        if feedback && s.fb_in.end.is_some_and(|e| offset + len > e) {
            return Err(format!("stream {id}: FEEDBACK past DONE"));
        }
        let (space, half) = if feedback {
            (&mut s.fb_in, Half::Up)
        } else {
            (&mut s.data_in, Half::Down)
        };
        let n = space
            .on_bytes(offset, bytes)
            .map_err(|e| format!("stream {id}: {e}"))?;
        let over_feedback = feedback && space.queued > MAX_INBOUND_FEEDBACK;
        let behind = (s.data_in.recv - s.acked_data) + (s.fb_in.recv - s.acked_fb);
        if n == 0 || behind >= ACK_EVERY {
            // A duplicate means the peer resent from an older acknowledgement: tell it where we are.
            s.ack_due = true;
            self.make_ready(id);
        } else {
            self.ack_later.insert(id);
            self.ack_at.get_or_insert(now + ACK_DELAY);
        }
        if n > 0 {
            self.wakes.push((id, half));
        }
        if over_feedback {
            tracing::warn!(stream = id, "feedback backlog over limit; resetting stream");
            self.reset(id, ResetReason::Protocol);
        }
        Ok(())
    }

    fn on_end(&mut self, link: LinkId, id: u32, feedback: bool, offset: u64) -> Result<(), String> {
        let Some(s) = self.live_mut(id) else {
            if !self.streams.contains_key(&id) {
                self.answer_unknown(link, id);
            }
            return Ok(());
        };
        let (space, half) = if feedback {
            (&mut s.fb_in, Half::Up)
        } else {
            (&mut s.data_in, Half::Down)
        };
        if feedback && offset < space.recv {
            return Err(format!(
                "stream {id}: DONE before FEEDBACK already received"
            ));
        }
        space
            .set_end(offset)
            .map_err(|e| format!("stream {id}: {e}"))?;
        s.ack_due = true;
        self.wakes.push((id, half));
        self.make_ready(id);
        Ok(())
    }

    fn on_ack(
        &mut self,
        link: LinkId,
        id: u32,
        data: (u64, bool),
        limit: u64,
        feedback: (u64, bool),
    ) -> Result<(), String> {
        let Some(s) = self.live_mut(id) else {
            match self.streams.get(&id) {
                None => self.answer_unknown(link, id),
                // Reset here, and the peer still acknowledges: our RST was lost (with a link).
                Some(s) => {
                    if let Some(reason) = s.reset {
                        self.push_control(link, &Frame::Rst { stream: id, reason });
                    }
                }
            }
            return Ok(());
        };
        let bad = |e: &str| format!("stream {id}: {e}");
        if s.local {
            s.confirmed = true;
            s.open_due = false;
            s.target = None;
        }
        let progress = s.data_out.ack(data.0, data.1).map_err(bad)?
            | s.fb_out.ack(feedback.0, feedback.1).map_err(bad)?;
        if limit.saturating_sub(s.data_out.acked) > MAX_CREDIT {
            return Err(bad("window grown past the limit"));
        }
        let more_credit = limit > s.data_limit;
        s.data_limit = s.data_limit.max(limit);
        if progress || more_credit {
            self.wakes.push((id, Half::Up));
        }
        self.make_ready(id);
        self.maybe_retire(id);
        Ok(())
    }

    fn on_rst(&mut self, id: u32, reason: ResetReason) {
        let Some(s) = self.live_mut(id) else {
            return;
        };
        if reason == ResetReason::Closed && s.data_in.complete() && s.fb_in.complete() {
            // The peer ended cleanly, so it has everything we sent; only our acknowledgement of
            // that was lost.
            s.data_out.settle();
            s.fb_out.settle();
            self.wakes.push((id, Half::Up));
            self.maybe_retire(id);
            return;
        }
        let reason = if reason == ResetReason::Closed {
            ResetReason::Gone
        } else {
            reason
        };
        self.kill_stream(id, reason);
    }

    /// Fills `out` with the next frames for `link`, up to about [`BATCH_BYTES`]: control frames
    /// first, then streams in turn, one [`QUANTUM`] each, interactive streams before bulk ones.
    pub fn poll_transmit(&mut self, link: LinkId, out: &mut Vec<u8>) {
        self.dirty.remove(&link);
        let Some(l) = self.links.get_mut(&link) else {
            return;
        };
        out.append(&mut l.control);
        if let Some(f) = l.summaries.pop_front() {
            out.extend_from_slice(&f);
        }
        while out.len() < BATCH_BYTES {
            let Some(l) = self.links.get_mut(&link) else {
                return;
            };
            let take_light = !l.light.is_empty() && (l.bulk.is_empty() || l.streak < LIGHT_STREAK);
            let id = if take_light {
                l.streak += 1;
                l.light.pop_front()
            } else {
                l.streak = 0;
                l.bulk.pop_front()
            };
            let Some(id) = id else {
                break;
            };
            let Some(s) = self.streams.get_mut(&id) else {
                continue;
            };
            if s.link != Some(link) || s.reset.is_some() {
                continue;
            }
            s.queued = false;
            if transmit(id, s, out) {
                self.wakes.push((id, Half::Up));
            }
            if s.sendable() {
                // More than a quantum: to the back of the bulk list.
                s.queued = true;
                if let Some(l) = self.links.get_mut(&link) {
                    l.bulk.push_back(id);
                }
            }
            self.maybe_retire(id);
        }
        if self.links.get(&link).is_some_and(|l| {
            !l.light.is_empty()
                || !l.bulk.is_empty()
                || !l.control.is_empty()
                || !l.summaries.is_empty()
        }) {
            self.dirty.insert(link);
        }
    }

    // ----- time ----------------------------------------------------------------------------------

    /// When [`Session::handle_timeout`] must run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t: Option<Instant> = self.ack_at;
        let mut earliest = |x: Instant| t = Some(t.map_or(x, |t| t.min(x)));
        for l in self.links.values() {
            earliest(l.next_ping);
            earliest(l.last_rx + self.cfg.dead_after);
            if !l.suspect {
                earliest(l.last_rx + l.suspect_threshold(&self.cfg));
            }
        }
        if let Some(since) = self.unreachable_since {
            if self.live() > 0 {
                earliest(since + self.cfg.hold);
            }
        }
        // Streams waiting for the acknowledgement of their end: the first look is due at once.
        if !self.closing.is_empty() {
            earliest(self.closing_check.unwrap_or(self.origin));
        }
        t
    }

    /// Probes links, judges their liveness, sends delayed acknowledgements, and resets streams
    /// that waited longer than the hold for an unreachable peer.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut pings = Vec::new();
        let mut lost_health = false;
        for (id, l) in self.links.iter_mut() {
            if now >= l.next_ping {
                let stamp = now.saturating_duration_since(self.origin).as_micros() as u64;
                pings.push((*id, stamp));
                l.next_ping = now + self.cfg.ping_interval;
            }
            let silent = now.saturating_duration_since(l.last_rx);
            if silent >= self.cfg.dead_after {
                self.events.push_back(Event::CloseLink {
                    link: *id,
                    why: format!(
                        "no frame for {:.1}s: peer unresponsive",
                        silent.as_secs_f64()
                    ),
                });
            } else if !l.suspect && silent >= l.suspect_threshold(&self.cfg) {
                l.suspect = true;
                lost_health = true;
                self.events.push_back(Event::LinkSuspect(*id));
            }
        }
        for (id, stamp) in pings {
            self.push_control(id, &Frame::Ping(stamp));
        }
        if lost_health {
            self.check_reachable(now);
        }
        if self.ack_at.is_some_and(|t| now >= t) {
            self.ack_at = None;
            for id in std::mem::take(&mut self.ack_later) {
                if let Some(s) = self.live_mut(id) {
                    s.ack_due = true;
                    self.make_ready(id);
                }
            }
        }
        if !self.closing.is_empty() && self.closing_check.is_none_or(|t| now >= t) {
            self.closing_check = Some(now + END_RESEND / 8);
            self.resend_ends(now);
        }
        if let Some(since) = self.unreachable_since {
            if now.saturating_duration_since(since) >= self.cfg.hold && self.live() > 0 {
                tracing::warn!(
                    streams = self.live(),
                    "peer unreachable for {:?} (tunnel.hold): resetting its streams",
                    self.cfg.hold
                );
                self.held_seconds +=
                    now.saturating_duration_since(since).as_secs_f64() * self.live() as f64;
                self.unreachable_since = Some(now);
                self.reset_all(ResetReason::HoldExpired);
            }
        }
    }

    // ----- for the caller ------------------------------------------------------------------------

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Streams whose owner has news since the last call, appended to `into`.
    pub fn take_wakes(&mut self, into: &mut Vec<(u32, Half)>) {
        into.append(&mut self.wakes);
    }

    /// Links with frames to write since the last call.
    pub fn take_dirty(&mut self) -> Vec<LinkId> {
        self.dirty.drain().collect()
    }

    /// Bytes held for streams, see [`Buffered`].
    pub fn buffered(&self) -> Buffered {
        let mut t = Buffered::default();
        for s in self.streams.values() {
            t.send += s.data_out.bytes() + s.fb_out.bytes();
            t.data_in += s.data_in.queued;
            t.feedback_in += s.fb_in.queued;
        }
        t.send += self
            .links
            .values()
            .map(|l| l.control.len() + l.summaries.iter().map(Vec::len).sum::<usize>())
            .sum::<usize>();
        t
    }

    pub fn stats(&self, now: Instant) -> SessionStats {
        let (held, held_now) = match self.unreachable_since {
            Some(since) => (
                self.live(),
                now.saturating_duration_since(since).as_secs_f64() * self.live() as f64,
            ),
            None => (0, 0.0),
        };
        SessionStats {
            streams: self.live(),
            links: self.links.len(),
            healthy_links: self.healthy_links(),
            held,
            resumed: self.resumed,
            held_seconds: self.held_seconds + held_now,
            rtt: self.links.values().filter_map(|l| l.srtt).min(),
        }
    }
}

/// One stream's turn: OPEN, ACK, FEEDBACK then DONE, DATA (within credit) then FIN, at most a
/// quantum of bytes. True if DATA left (room for the owner to queue more).
fn transmit(id: u32, s: &mut Stream, out: &mut Vec<u8>) -> bool {
    if s.open_due {
        s.open_due = false;
        if let Some(target) = &s.target {
            Frame::Open {
                stream: id,
                target: target.clone(),
            }
            .encode(out);
        }
    }
    if s.ack_due {
        s.ack_due = false;
        s.acked_data = s.data_in.recv;
        s.acked_fb = s.fb_in.recv;
        Frame::Ack {
            stream: id,
            data: s.acked_data,
            data_limit: s.granted,
            feedback: s.acked_fb,
            fin: s.data_in.end.is_some(),
            done: s.fb_in.end.is_some(),
        }
        .encode(out);
    }
    let mut budget = QUANTUM;
    while budget > 0 {
        let Some((offset, b)) = s.fb_out.take(budget) else {
            break;
        };
        budget -= b.len();
        frame::put_bytes(out, true, id, offset, &b);
    }
    if s.fb_out.end_due() {
        s.fb_out.end_sent = true;
        Frame::Done {
            stream: id,
            offset: s.fb_out.end.unwrap_or_default(),
        }
        .encode(out);
    }
    let mut room = false;
    if s.data_out.sent() == 0 && s.first_turn > 0 {
        budget = s.first_turn;
    }
    while budget > 0 {
        let credit = usize::try_from(s.credit()).unwrap_or(usize::MAX);
        if credit == 0 {
            break;
        }
        let Some((offset, b)) = s.data_out.take(budget.min(credit)) else {
            break;
        };
        budget -= b.len();
        room = true;
        frame::put_bytes(out, false, id, offset, &b);
    }
    if s.data_out.end_due() {
        s.data_out.end_sent = true;
        Frame::Fin {
            stream: id,
            offset: s.data_out.end.unwrap_or_default(),
        }
        .encode(out);
    }
    room
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbound_acks_rewinds_and_ends() {
        let mut o = Outbound::default();
        o.push(Bytes::from_static(b"hello"));
        o.push(Bytes::from_static(b"world"));
        assert_eq!(o.take(3), Some((0, Bytes::from_static(b"hel"))));
        assert_eq!(o.take(100), Some((3, Bytes::from_static(b"lo"))));
        assert_eq!((o.sent(), o.written()), (5, 10));
        assert_eq!(o.ack(2, false), Ok(true));
        assert_eq!(
            o.ack(1, false),
            Ok(false),
            "stale acknowledgements are ignored"
        );
        o.rewind();
        assert_eq!(o.take(100), Some((2, Bytes::from_static(b"l"))));
        assert_eq!(o.take(100), Some((3, Bytes::from_static(b"lo"))));
        assert_eq!(o.ack(11, false), Err("acknowledges bytes never sent"));
        assert_eq!(o.ack(5, true), Err("acknowledges an end never sent"));
        // An acknowledgement may cover bytes taken back into `unsent` by a rewind.
        assert_eq!(o.ack(7, false), Ok(true));
        assert_eq!(o.take(100), Some((7, Bytes::from_static(b"rld"))));
        o.finish();
        assert!(o.end_due());
        o.end_sent = true;
        // Bytes after the end marker (answers to the decoder's requests) are still carried.
        o.push(Bytes::from_static(b"fill"));
        assert_eq!(o.ack(10, true), Ok(true));
        assert!(!o.delivered());
        assert_eq!(o.take(100), Some((10, Bytes::from_static(b"fill"))));
        assert_eq!(o.ack(14, true), Ok(true));
        assert!(o.delivered());
    }

    #[test]
    fn inbound_takes_each_byte_once_and_refuses_gaps() {
        let mut i = Inbound::default();
        assert_eq!(i.on_bytes(0, Bytes::from_static(b"abc")), Ok(3));
        assert_eq!(i.on_bytes(1, Bytes::from_static(b"bcde")), Ok(2));
        assert_eq!(i.on_bytes(0, Bytes::from_static(b"ab")), Ok(0));
        assert!(i.on_bytes(9, Bytes::from_static(b"x")).is_err());
        assert_eq!(i.take().concat(), b"abcde");
        assert_eq!(i.set_end(6), Ok(()));
        assert!(!i.complete());
        assert!(i.set_end(7).is_err());
        assert_eq!(i.on_bytes(5, Bytes::from_static(b"fg")), Ok(2));
        assert!(i.complete());
    }
}
