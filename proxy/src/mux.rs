//! One multiplexed tunnel connection: the stream table, the per-stream send queues and credit, the
//! writer's scheduler and the reader's dispatch.
//!
//! Each connection has exactly two tasks, a reader and a writer; stream tasks never touch the socket.
//! They queue bytes into their stream's slot and the writer picks what goes next:
//!
//! * control frames (WINDOW, PING/PONG, RST, GOAWAY) first, always;
//! * then streams in turn, at most [`QUANTUM`] bytes per turn. Streams that had little queued when
//!   they became ready ("light": interactive traffic) are served before bulk streams, with a
//!   streak limit so bulk streams are never starved.
//!
//! DATA is credit-controlled per stream: a sender sends at most the window the receiver granted,
//! and the receiver grants more only as its stream task consumes. The reader therefore never
//! blocks on a slow stream — its queue is bounded by the window it granted — and one stalled LAN
//! receiver stalls only its own stream. Exceeding the window is a protocol violation that closes
//! the connection.

use crate::frame::{self, Frame, FrameType, OpenTarget, ResetReason, QUANTUM};
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// A stream whose queued bytes are at most this when it becomes ready is served as interactive.
const LIGHT_BYTES: usize = 4096;
/// Consecutive light turns before a bulk stream gets one.
const LIGHT_STREAK: u32 = 8;
/// Bytes the writer collects into one socket write.
pub const BATCH_BYTES: usize = 64 * 1024;
/// Inbound FEEDBACK a stream may have waiting before the stream is reset. Feedback is not
/// window-controlled because the encoder side consumes it without ever waiting on the LAN.
const MAX_INBOUND_FEEDBACK: usize = 8 << 20;
/// Control frames that may wait; more means the peer makes us answer faster than we can write.
const MAX_CONTROL_BYTES: usize = 4 << 20;

/// Connection-wide settings, fixed at the hello.
#[derive(Clone, Debug)]
pub struct ConnParams {
    /// We opened the TCP connection: our stream ids are odd, the acceptor's even.
    pub dialer: bool,
    /// DATA bytes we accept per stream before granting more.
    pub our_window: u32,
    /// DATA bytes the peer accepts per stream: our initial credit.
    pub peer_window: u32,
    /// Streams the peer accepts from us at once.
    pub peer_max_streams: u32,
    /// Streams we accept from the peer at once.
    pub our_max_streams: u32,
}

/// Why a stream could not be opened on this connection.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpenError {
    #[error("the connection is closed or closing")]
    Closed,
    #[error("the peer's stream limit is reached")]
    Full,
    #[error("destination or first bytes do not fit an OPEN frame")]
    TooLarge,
}

/// What the writer keeps per stream.
struct Slot {
    shared: Arc<StreamShared>,
    data: VecDeque<Bytes>,
    data_bytes: usize,
    fb: VecDeque<Bytes>,
    fb_bytes: usize,
    /// DATA bytes we may still send.
    credit: u64,
    fin_pending: bool,
    done_pending: bool,
    /// In one of the ready lists.
    queued: bool,
    /// The stream task is gone: remove the slot once its queues are drained.
    detached: bool,
    /// DATA bytes the peer may still send us.
    recv_allowed: u64,
    /// Consumed bytes not yet granted back.
    to_grant: u64,
    /// Opened by the peer (counts against our_max_streams).
    remote: bool,
}

impl Slot {
    fn sendable(&self) -> bool {
        !self.fb.is_empty()
            || (self.credit > 0 && !self.data.is_empty())
            || (self.fin_pending && self.data.is_empty())
            || (self.done_pending && self.fb.is_empty())
    }
    fn drained(&self) -> bool {
        self.data.is_empty() && self.fb.is_empty() && !self.fin_pending && !self.done_pending
    }
    fn pending_bytes(&self) -> usize {
        self.data_bytes + self.fb_bytes
    }
}

struct State {
    slots: HashMap<u32, Slot>,
    next_local: u32,
    last_remote: u32,
    local_streams: usize,
    remote_streams: usize,
    control: VecDeque<Vec<u8>>,
    control_bytes: usize,
    light: VecDeque<u32>,
    bulk: VecDeque<u32>,
    streak: u32,
    /// We sent GOAWAY: no new streams from either side.
    going_away: bool,
    /// The peer sent GOAWAY: we open no more streams here.
    peer_going_away: bool,
    closed: bool,
}

impl State {
    fn make_ready(&mut self, id: u32) {
        if let Some(s) = self.slots.get_mut(&id) {
            if !s.queued && s.sendable() {
                s.queued = true;
                if s.pending_bytes() <= LIGHT_BYTES {
                    self.light.push_back(id);
                } else {
                    self.bulk.push_back(id);
                }
            }
        }
    }

    fn push_control(&mut self, kind: FrameType, stream: u32, payload: &[u8]) {
        let mut f = Vec::with_capacity(frame::HEADER_LEN + payload.len());
        frame::put_frame(&mut f, kind, stream, payload);
        self.control_bytes += f.len();
        self.control.push_back(f);
    }

    fn remove(&mut self, id: u32) {
        if let Some(s) = self.slots.remove(&id) {
            if s.remote {
                self.remote_streams -= 1;
            } else {
                self.local_streams -= 1;
            }
        }
    }
}

/// Events for a stream's sending half (LAN → tunnel), taken by its task.
#[derive(Default)]
pub struct UpEvents {
    pub feedback: Vec<Bytes>,
    pub done: bool,
    pub reset: Option<ResetReason>,
}

/// Events for a stream's receiving half (tunnel → LAN).
#[derive(Default)]
pub struct DownEvents {
    pub data: Vec<Bytes>,
    pub fin: bool,
    pub reset: Option<ResetReason>,
}

#[derive(Default)]
struct Inbound {
    data: VecDeque<Bytes>,
    data_bytes: usize,
    fb: VecDeque<Bytes>,
    fb_bytes: usize,
    fin: bool,
    done: bool,
    reset: Option<ResetReason>,
}

/// The part of a stream the reader and the stream task share.
pub struct StreamShared {
    inbound: Mutex<Inbound>,
    up_wake: Notify,
    down_wake: Notify,
    /// Cancelled on reset, for waits that must end on a reset but not on other news.
    reset_token: CancellationToken,
}

impl StreamShared {
    fn new() -> Arc<StreamShared> {
        Arc::new(StreamShared {
            inbound: Mutex::new(Inbound::default()),
            up_wake: Notify::new(),
            down_wake: Notify::new(),
            reset_token: CancellationToken::new(),
        })
    }
    fn lock(&self) -> MutexGuard<'_, Inbound> {
        // The critical sections only move queue entries; a poisoned lock still holds consistent data.
        self.inbound.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn set_reset(&self, reason: ResetReason) {
        let mut i = self.lock();
        if i.reset.is_none() {
            i.reset = Some(reason);
        }
        drop(i);
        self.reset_token.cancel();
        self.up_wake.notify_one();
        self.down_wake.notify_one();
    }
}

/// Observers the connection reports to (the node's metrics, by peer).
#[derive(Clone)]
pub struct ConnObserver {
    pub rtt: prometheus::Gauge,
    pub protocol_errors: prometheus::IntCounter,
}

/// The shared state of one tunnel connection.
pub struct Conn {
    pub id: u64,
    pub peer: Arc<str>,
    pub params: ConnParams,
    state: Mutex<State>,
    writer_wake: Notify,
    /// Cancelled when the connection is closed, from either side or by error.
    pub closed: CancellationToken,
    streams_gauge: AtomicUsize,
    rtt_micros: std::sync::atomic::AtomicU64,
    started: Instant,
    observer: ConnObserver,
    close_logged: AtomicBool,
}

/// A stream's endpoint, held by its task. Dropping it detaches the stream: queued frames still leave,
/// then the slot is freed.
pub struct StreamHandle {
    conn: Arc<Conn>,
    shared: Arc<StreamShared>,
    pub id: u32,
}

impl Conn {
    pub fn new(id: u64, peer: Arc<str>, params: ConnParams, observer: ConnObserver) -> Arc<Conn> {
        Arc::new(Conn {
            id,
            peer,
            state: Mutex::new(State {
                slots: HashMap::new(),
                next_local: if params.dialer { 1 } else { 2 },
                last_remote: 0,
                local_streams: 0,
                remote_streams: 0,
                control: VecDeque::new(),
                control_bytes: 0,
                light: VecDeque::new(),
                bulk: VecDeque::new(),
                streak: 0,
                going_away: false,
                peer_going_away: false,
                closed: false,
            }),
            params,
            writer_wake: Notify::new(),
            closed: CancellationToken::new(),
            streams_gauge: AtomicUsize::new(0),
            rtt_micros: std::sync::atomic::AtomicU64::new(0),
            started: Instant::now(),
            observer,
            close_logged: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Streams currently open on this connection (both directions).
    pub fn stream_count(&self) -> usize {
        self.streams_gauge.load(Ordering::Relaxed)
    }

    /// Smoothed RTT from PING/PONG, if measured yet.
    pub fn rtt(&self) -> Option<Duration> {
        match self.rtt_micros.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// Bytes buffered in this connection's stream queues: (waiting to be sent, received and waiting
    /// for their stream task). Both are bounded by the per-stream limits.
    pub fn buffered(&self) -> (usize, usize) {
        let s = self.lock();
        let mut send = s.control_bytes;
        let mut recv = 0;
        for sl in s.slots.values() {
            send += sl.pending_bytes();
            let i = sl.shared.lock();
            recv += i.data_bytes + i.fb_bytes;
        }
        (send, recv)
    }

    /// Whether new streams may be opened here.
    pub fn accepting(&self) -> bool {
        let s = self.lock();
        !s.closed && !s.going_away && !s.peer_going_away
    }

    fn update_gauge(&self, s: &State) {
        self.streams_gauge.store(s.slots.len(), Ordering::Relaxed);
    }

    /// Opens a stream to `target`, carrying `initial` (already encoded) in the OPEN frame.
    pub fn open(
        self: &Arc<Self>,
        target: &OpenTarget,
        initial: &[u8],
    ) -> Result<StreamHandle, OpenError> {
        let payload = frame::open_payload(target, initial).ok_or(OpenError::TooLarge)?;
        let mut s = self.lock();
        if s.closed || s.going_away || s.peer_going_away {
            return Err(OpenError::Closed);
        }
        if s.local_streams >= self.params.peer_max_streams as usize {
            return Err(OpenError::Full);
        }
        let id = s.next_local;
        // Ids are never reused on a connection; at the end of the id space the connection retires.
        s.next_local = match id.checked_add(2) {
            Some(n) => n,
            None => {
                s.going_away = true;
                s.push_control(FrameType::GoAway, 0, &[]);
                self.writer_wake.notify_one();
                return Err(OpenError::Closed);
            }
        };
        let shared = StreamShared::new();
        s.local_streams += 1;
        s.slots.insert(
            id,
            Slot {
                shared: shared.clone(),
                data: VecDeque::new(),
                data_bytes: 0,
                fb: VecDeque::new(),
                fb_bytes: 0,
                credit: u64::from(self.params.peer_window).saturating_sub(initial.len() as u64),
                fin_pending: false,
                done_pending: false,
                queued: false,
                detached: false,
                recv_allowed: u64::from(self.params.our_window),
                to_grant: 0,
                remote: false,
            },
        );
        // OPENs travel in the control queue, which is FIFO: the peer sees them in id order (it
        // refuses an id below one it has seen) and always before the stream's first DATA, which
        // can only follow in a later stream turn.
        s.push_control(FrameType::Open, id, &payload);
        self.update_gauge(&s);
        drop(s);
        self.writer_wake.notify_one();
        Ok(StreamHandle {
            conn: self.clone(),
            shared,
            id,
        })
    }

    /// Closes the connection: every stream on it is reset, tasks notice `closed`.
    pub fn close(&self, why: &str) {
        let slots: Vec<Arc<StreamShared>> = {
            let mut s = self.lock();
            s.closed = true;
            let v = s.slots.drain().map(|(_, sl)| sl.shared).collect();
            s.local_streams = 0;
            s.remote_streams = 0;
            s.light.clear();
            s.bulk.clear();
            self.update_gauge(&s);
            v
        };
        for sh in slots {
            sh.set_reset(ResetReason::Other);
        }
        if !self.close_logged.swap(true, Ordering::Relaxed) {
            tracing::info!(peer = %self.peer, conn = self.id, "tunnel connection closed: {why}");
        }
        self.closed.cancel();
        self.writer_wake.notify_one();
    }

    /// Sends GOAWAY: the peer opens nothing more here; our streams finish.
    pub fn go_away(&self) {
        let mut s = self.lock();
        if !s.going_away && !s.closed {
            s.going_away = true;
            s.push_control(FrameType::GoAway, 0, &[]);
        }
        drop(s);
        self.writer_wake.notify_one();
    }

    /// Queues a PING stamped with the connection's clock.
    pub fn ping(&self) {
        let t = self.started.elapsed().as_micros() as u64;
        self.lock()
            .push_control(FrameType::Ping, 0, &t.to_be_bytes());
        self.writer_wake.notify_one();
    }

    /// Fills `out` with the next frames to write, up to about [`BATCH_BYTES`].
    pub fn next_batch(&self, out: &mut Vec<u8>) {
        let mut wake_up: Vec<Arc<StreamShared>> = Vec::new();
        {
            let mut s = self.lock();
            while out.len() < BATCH_BYTES {
                let Some(f) = s.control.pop_front() else {
                    break;
                };
                s.control_bytes -= f.len();
                out.extend_from_slice(&f);
            }
            while out.len() < BATCH_BYTES {
                let take_light =
                    !s.light.is_empty() && (s.bulk.is_empty() || s.streak < LIGHT_STREAK);
                let id = if take_light {
                    s.streak += 1;
                    s.light.pop_front()
                } else {
                    s.streak = 0;
                    s.bulk.pop_front()
                };
                let Some(id) = id else { break };
                let Some(slot) = s.slots.get_mut(&id) else {
                    continue;
                };
                slot.queued = false;
                let before = slot.data_bytes;
                let mut budget = QUANTUM;
                while budget > 0 {
                    let Some(mut b) = slot.fb.pop_front() else {
                        break;
                    };
                    if b.len() > budget {
                        let rest = b.split_off(budget);
                        slot.fb.push_front(rest);
                    }
                    budget -= b.len();
                    slot.fb_bytes -= b.len();
                    frame::put_frame(out, FrameType::Feedback, id, &b);
                }
                while budget > 0 && slot.credit > 0 {
                    let Some(mut b) = slot.data.pop_front() else {
                        break;
                    };
                    let n = budget.min(usize::try_from(slot.credit).unwrap_or(usize::MAX));
                    if b.len() > n {
                        let rest = b.split_off(n);
                        slot.data.push_front(rest);
                    }
                    budget -= b.len();
                    slot.credit -= b.len() as u64;
                    slot.data_bytes -= b.len();
                    frame::put_frame(out, FrameType::Data, id, &b);
                }
                if slot.fin_pending && slot.data.is_empty() {
                    slot.fin_pending = false;
                    frame::put_frame(out, FrameType::Fin, id, &[]);
                }
                if slot.done_pending && slot.fb.is_empty() {
                    slot.done_pending = false;
                    frame::put_frame(out, FrameType::Done, id, &[]);
                }
                if slot.data_bytes < before {
                    wake_up.push(slot.shared.clone());
                }
                if slot.detached && slot.drained() {
                    s.remove(id);
                    self.update_gauge(&s);
                } else if slot.sendable() {
                    // Had more than a quantum: it goes to the back of the bulk list.
                    slot.queued = true;
                    s.bulk.push_back(id);
                }
            }
        }
        for sh in wake_up {
            sh.up_wake.notify_one();
        }
    }

    /// Waits until the writer has something to do (or the connection closed).
    pub async fn writer_wait(&self) {
        self.writer_wake.notified().await;
    }

    fn violation(&self, why: String) -> Result<(), String> {
        self.observer.protocol_errors.inc();
        Err(why)
    }

    /// Handles one frame from the peer. `Err` closes the connection; `Ok(Some(..))` is a new stream
    /// the caller must start a task for.
    pub fn on_frame(
        self: &Arc<Self>,
        f: Frame,
    ) -> Result<Option<(StreamHandle, OpenTarget)>, String> {
        let id = f.stream;
        match f.kind {
            FrameType::Open => self.on_open(f),
            FrameType::Data => {
                let mut s = self.lock();
                let Some(slot) = s.slots.get_mut(&id) else {
                    // Stream already reset or finished here: its in-flight frames are dropped.
                    return Ok(None);
                };
                let n = f.payload.len() as u64;
                if n > slot.recv_allowed {
                    drop(s);
                    return self
                        .violation(format!("stream {id}: DATA beyond the granted window"))
                        .map(|_| None);
                }
                slot.recv_allowed -= n;
                let sh = slot.shared.clone();
                drop(s);
                let mut i = sh.lock();
                i.data_bytes += f.payload.len();
                i.data.push_back(f.payload);
                drop(i);
                sh.down_wake.notify_one();
                Ok(None)
            }
            FrameType::Feedback => {
                let sh = match self.lock().slots.get(&id) {
                    Some(slot) => slot.shared.clone(),
                    None => return Ok(None),
                };
                let mut i = sh.lock();
                i.fb_bytes += f.payload.len();
                if i.fb_bytes > MAX_INBOUND_FEEDBACK {
                    drop(i);
                    tracing::warn!(peer = %self.peer, stream = id, "feedback backlog over limit; resetting stream");
                    self.reset_stream(id, ResetReason::Protocol);
                    return Ok(None);
                }
                i.fb.push_back(f.payload);
                drop(i);
                sh.up_wake.notify_one();
                Ok(None)
            }
            FrameType::Window => {
                let inc =
                    u32::from_be_bytes([f.payload[0], f.payload[1], f.payload[2], f.payload[3]]);
                let mut s = self.lock();
                let Some(slot) = s.slots.get_mut(&id) else {
                    return Ok(None);
                };
                slot.credit += u64::from(inc);
                if slot.credit > u64::from(crate::hello::MAX_WINDOW) * 2 {
                    drop(s);
                    return self
                        .violation(format!("stream {id}: window grown past the limit"))
                        .map(|_| None);
                }
                s.make_ready(id);
                drop(s);
                self.writer_wake.notify_one();
                Ok(None)
            }
            FrameType::Fin | FrameType::Done => {
                let sh = match self.lock().slots.get(&id) {
                    Some(slot) => slot.shared.clone(),
                    None => return Ok(None),
                };
                let mut i = sh.lock();
                if f.kind == FrameType::Fin {
                    i.fin = true;
                    drop(i);
                    sh.down_wake.notify_one();
                } else {
                    i.done = true;
                    drop(i);
                    sh.up_wake.notify_one();
                }
                Ok(None)
            }
            FrameType::Rst => {
                let reason = ResetReason::from_u8(f.payload[0]);
                let mut s = self.lock();
                let sh = s.slots.get(&id).map(|sl| sl.shared.clone());
                s.remove(id);
                self.update_gauge(&s);
                drop(s);
                if let Some(sh) = sh {
                    sh.set_reset(reason);
                }
                Ok(None)
            }
            FrameType::Ping => {
                self.lock().push_control(FrameType::Pong, 0, &f.payload);
                self.check_control()?;
                self.writer_wake.notify_one();
                Ok(None)
            }
            FrameType::Pong => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&f.payload);
                let sent = u64::from_be_bytes(b);
                let now = self.started.elapsed().as_micros() as u64;
                if let Some(sample) = now.checked_sub(sent) {
                    let sample = sample.max(1);
                    let old = self.rtt_micros.load(Ordering::Relaxed);
                    // Exponentially weighted like TCP's SRTT (gain 1/8).
                    let new = if old == 0 {
                        sample
                    } else {
                        (old * 7 + sample) / 8
                    };
                    self.rtt_micros.store(new.max(1), Ordering::Relaxed);
                    self.observer.rtt.set(new as f64 / 1e6);
                }
                Ok(None)
            }
            FrameType::GoAway => {
                self.lock().peer_going_away = true;
                tracing::debug!(peer = %self.peer, conn = self.id, "peer sent GOAWAY");
                Ok(None)
            }
        }
    }

    fn check_control(&self) -> Result<(), String> {
        if self.lock().control_bytes > MAX_CONTROL_BYTES {
            return self.violation("control frames pile up faster than they can be written".into());
        }
        Ok(())
    }

    fn on_open(self: &Arc<Self>, f: Frame) -> Result<Option<(StreamHandle, OpenTarget)>, String> {
        let id = f.stream;
        let peer_parity = if self.params.dialer { 0 } else { 1 };
        let (target, initial) = match frame::parse_open(&f.payload) {
            Ok(v) => v,
            Err(e) => return self.violation(e.to_string()).map(|_| None),
        };
        let mut s = self.lock();
        if id % 2 != peer_parity || id <= s.last_remote {
            drop(s);
            return self
                .violation(format!("OPEN with stream id {id} not allowed"))
                .map(|_| None);
        }
        s.last_remote = id;
        if initial.len() as u64 > u64::from(self.params.our_window) {
            drop(s);
            return self
                .violation("OPEN carries more than the window".into())
                .map(|_| None);
        }
        if s.closed || s.going_away || s.remote_streams >= self.params.our_max_streams as usize {
            let reason = if s.remote_streams >= self.params.our_max_streams as usize {
                ResetReason::Busy
            } else {
                ResetReason::Shutdown
            };
            s.push_control(FrameType::Rst, id, &[reason as u8]);
            drop(s);
            self.check_control()?;
            self.writer_wake.notify_one();
            return Ok(None);
        }
        let shared = StreamShared::new();
        if !initial.is_empty() {
            let mut i = shared.lock();
            i.data_bytes += initial.len();
            i.data.push_back(initial.clone());
        }
        s.remote_streams += 1;
        s.slots.insert(
            id,
            Slot {
                shared: shared.clone(),
                data: VecDeque::new(),
                data_bytes: 0,
                fb: VecDeque::new(),
                fb_bytes: 0,
                credit: u64::from(self.params.peer_window),
                fin_pending: false,
                done_pending: false,
                queued: false,
                detached: false,
                recv_allowed: u64::from(self.params.our_window) - initial.len() as u64,
                to_grant: 0,
                remote: true,
            },
        );
        self.update_gauge(&s);
        drop(s);
        Ok(Some((
            StreamHandle {
                conn: self.clone(),
                shared,
                id,
            },
            target,
        )))
    }

    fn reset_stream(&self, id: u32, reason: ResetReason) {
        let mut s = self.lock();
        let sh = s.slots.get(&id).map(|sl| sl.shared.clone());
        if sh.is_some() {
            s.remove(id);
            self.update_gauge(&s);
            if !s.closed {
                s.push_control(FrameType::Rst, id, &[reason as u8]);
            }
        }
        drop(s);
        if let Some(sh) = sh {
            sh.set_reset(reason);
        }
        self.writer_wake.notify_one();
    }
}

impl StreamHandle {
    fn with_slot<R>(&self, f: impl FnOnce(&mut Slot) -> R) -> Option<R> {
        let mut s = self.conn.lock();
        let r = s.slots.get_mut(&self.id).map(f);
        if r.is_some() {
            s.make_ready(self.id);
        }
        r
    }

    /// The connection this stream lives on.
    pub fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }

    /// Queues encoded bytes for the peer's decoder.
    pub fn send_data(&self, bytes: Vec<u8>) {
        self.enqueue(bytes, false);
    }

    /// Queues feedback for the peer's encoder.
    pub fn send_feedback(&self, bytes: Vec<u8>) {
        self.enqueue(bytes, true);
    }

    fn enqueue(&self, bytes: Vec<u8>, feedback: bool) {
        if bytes.is_empty() {
            return;
        }
        let b = Bytes::from(bytes);
        let queued = self.with_slot(|sl| {
            let (count, queue) = if feedback {
                (&mut sl.fb_bytes, &mut sl.fb)
            } else {
                (&mut sl.data_bytes, &mut sl.data)
            };
            *count += b.len();
            queue.push_back(b);
        });
        if queued.is_some() {
            self.conn.writer_wake.notify_one();
        }
    }

    /// Queues FIN after the data queued so far.
    pub fn send_fin(&self) {
        if self.with_slot(|sl| sl.fin_pending = true).is_some() {
            self.conn.writer_wake.notify_one();
        }
    }

    /// Queues DONE after the feedback queued so far.
    pub fn send_done(&self) {
        if self.with_slot(|sl| sl.done_pending = true).is_some() {
            self.conn.writer_wake.notify_one();
        }
    }

    /// Aborts the stream: queued bytes are dropped and RST goes out ahead of other traffic.
    pub fn reset(&self, reason: ResetReason) {
        self.conn.reset_stream(self.id, reason);
    }

    /// (DATA bytes queued but not yet written, feedback bytes likewise).
    pub fn queued(&self) -> (usize, usize) {
        let s = self.conn.lock();
        s.slots
            .get(&self.id)
            .map_or((0, 0), |sl| (sl.data_bytes, sl.fb_bytes))
    }

    /// The stream task has consumed `n` DATA bytes: grant them back once enough accumulated.
    pub fn consumed(&self, n: usize) {
        let mut s = self.conn.lock();
        let threshold = u64::from(self.conn.params.our_window / 4);
        let Some(slot) = s.slots.get_mut(&self.id) else {
            return;
        };
        slot.to_grant += n as u64;
        if slot.to_grant >= threshold {
            let g = slot.to_grant;
            slot.to_grant = 0;
            slot.recv_allowed += g;
            let g32 = u32::try_from(g).unwrap_or(u32::MAX);
            s.push_control(FrameType::Window, self.id, &g32.to_be_bytes());
            drop(s);
            self.conn.writer_wake.notify_one();
        }
    }

    /// Takes what arrived for the sending half.
    pub fn take_up(&self) -> UpEvents {
        let mut i = self.shared.lock();
        i.fb_bytes = 0;
        UpEvents {
            feedback: i.fb.drain(..).collect(),
            done: i.done,
            reset: i.reset,
        }
    }

    /// Takes what arrived for the receiving half.
    pub fn take_down(&self) -> DownEvents {
        let mut i = self.shared.lock();
        i.data_bytes = 0;
        DownEvents {
            data: i.data.drain(..).collect(),
            fin: i.fin,
            reset: i.reset,
        }
    }

    /// Waits for news for the sending half: feedback, DONE, reset, or queue space.
    pub async fn up_wait(&self) {
        self.shared.up_wake.notified().await;
    }

    /// The reset reason, if the stream was reset.
    pub fn reset_reason(&self) -> Option<ResetReason> {
        self.shared.lock().reset
    }

    /// Completes when the stream is reset (by either side or with its connection).
    pub async fn reset_wait(&self) {
        self.shared.reset_token.cancelled().await;
    }

    /// Waits for news for the receiving half: data, FIN, or reset.
    pub async fn down_wait(&self) {
        self.shared.down_wake.notified().await;
    }
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        let mut s = self.conn.lock();
        if let Some(slot) = s.slots.get_mut(&self.id) {
            slot.detached = true;
            if slot.drained() && !slot.queued {
                s.remove(self.id);
                self.conn.update_gauge(&s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to(dest: &str) -> OpenTarget {
        OpenTarget {
            dest: dest.into(),
            client: None,
        }
    }

    fn conn(peer_window: u32) -> Arc<Conn> {
        Conn::new(
            1,
            Arc::from("peer"),
            ConnParams {
                dialer: true,
                our_window: 1 << 20,
                peer_window,
                peer_max_streams: 8,
                our_max_streams: 8,
            },
            ConnObserver {
                rtt: prometheus::Gauge::new("rtt", "rtt").expect("gauge"),
                protocol_errors: prometheus::IntCounter::new("errors", "errors").expect("counter"),
            },
        )
    }

    /// (type, stream, payload length) of every frame in a batch.
    fn frames(batch: &[u8]) -> Vec<(u8, u32, usize)> {
        let mut out = Vec::new();
        let mut b = batch;
        while b.len() >= frame::HEADER_LEN {
            let stream = u32::from_be_bytes([b[1], b[2], b[3], b[4]]);
            let len = u32::from_be_bytes([b[5], b[6], b[7], b[8]]) as usize;
            out.push((b[0], stream, len));
            b = &b[frame::HEADER_LEN + len..];
        }
        out
    }

    #[test]
    fn light_streams_overtake_bulk_and_bulk_streams_alternate() {
        let c = conn(16 << 20);
        let bulk1 = c.open(&to("a:1"), b"").expect("open");
        let bulk2 = c.open(&to("a:2"), b"").expect("open");
        bulk1.send_data(vec![1; 1 << 20]);
        bulk2.send_data(vec![2; 1 << 20]);
        let mut batch = Vec::new();
        c.next_batch(&mut batch);
        let f = frames(&batch);
        // Both bulk streams got turns of at most one quantum each, alternating.
        let data: Vec<u32> = f
            .iter()
            .filter(|x| x.0 == FrameType::Data as u8)
            .map(|x| x.1)
            .collect();
        assert!(
            data.len() >= 2 && data.windows(2).all(|w| w[0] != w[1]),
            "{f:?}"
        );
        assert!(f.iter().all(|x| x.2 <= QUANTUM + 300));

        // An interactive stream's bytes go out at the start of the very next batch.
        let light = c.open(&to("a:3"), b"").expect("open");
        light.send_data(vec![3; 100]);
        batch.clear();
        c.next_batch(&mut batch);
        let f = frames(&batch);
        let first_stream_frame = f.iter().find(|x| x.1 != 0).expect("frames");
        assert_eq!(first_stream_frame.1, light.id, "{f:?}");
    }

    #[test]
    fn credit_limits_data_and_window_frames_restore_it() {
        let c = conn(64 * 1024);
        let s = c.open(&to("a:1"), b"").expect("open");
        s.send_data(vec![0; 200_000]);
        let mut sent = 0;
        for _ in 0..10 {
            let mut batch = Vec::new();
            c.next_batch(&mut batch);
            sent += frames(&batch)
                .iter()
                .filter(|x| x.0 == FrameType::Data as u8)
                .map(|x| x.2)
                .sum::<usize>();
        }
        assert_eq!(sent, 64 * 1024, "DATA must stop at the peer's window");
        assert_eq!(s.queued().0, 200_000 - 64 * 1024);
        let w = Frame {
            kind: FrameType::Window,
            stream: s.id,
            payload: Bytes::copy_from_slice(&100_000u32.to_be_bytes()),
        };
        assert!(c.on_frame(w).is_ok());
        let mut batch = Vec::new();
        c.next_batch(&mut batch);
        let more: usize = frames(&batch)
            .iter()
            .filter(|x| x.0 == FrameType::Data as u8)
            .map(|x| x.2)
            .sum();
        assert!(more > 0 && more <= 100_000);
    }

    #[test]
    fn data_beyond_the_granted_window_is_a_violation() {
        let c = conn(1 << 20);
        let target = OpenTarget {
            dest: "a:1".into(),
            client: None,
        };
        let open = frame::open_payload(&target, b"").expect("open");
        let r = c.on_frame(Frame {
            kind: FrameType::Open,
            stream: 2,
            payload: Bytes::from(open),
        });
        let Ok(Some((h, dest))) = r else {
            panic!("open refused")
        };
        assert_eq!(dest, target);
        let big = Bytes::from(vec![0u8; 60_000]);
        let mut violated = false;
        for _ in 0..20 {
            let r = c.on_frame(Frame {
                kind: FrameType::Data,
                stream: 2,
                payload: big.clone(),
            });
            if r.is_err() {
                violated = true;
                break;
            }
        }
        assert!(violated, "1 MiB window exceeded without error");
        drop(h);
    }
}
