//! One accelerated flow: the LAN socket bridged to a tunnel stream through an encoder (LAN → tunnel)
//! and a decoder (tunnel → LAN).
//!
//! The two directions run as independent halves, like TCP's: the sending half owns the encoder and
//! the LAN read side, the receiving half the decoder and the LAN write side, so a LAN receiver that
//! stops reading holds up only the bytes headed to it.
//!
//! Closing follows the data: the client's FIN becomes our FIN frame once the encoder emitted
//! everything; the peer shuts down its LAN write side once its decoder delivered everything and then
//! answers DONE, after which our encoder has nothing left to answer for. A flow ends when both
//! halves finished. Any error or RST instead resets both LAN ends (SO_LINGER 0).

use crate::codec::{RecvCodec, RecvStats, SendCodec, SendStats};
use crate::frame::ResetReason;
use crate::peer::StreamHandle;
use crate::sock;
use prometheus::IntCounter;
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

/// Largest LAN read, and how much one pass of the sending half reads before it lets others run.
const READ_BUF: usize = 64 * 1024;
const READ_BUDGET: usize = 1 << 20;
/// Encoded bytes a decoder may hold waiting for missing chunks. Window credit is returned as bytes
/// enter the decoder (withholding it could deadlock: the missing chunks arrive as DATA too), so
/// this is what bounds a stream whose peer keeps sending past a stall. A correct peer stays far
/// below: its encoder stops at its retention limit until we acknowledge.
const MAX_DECODER_QUEUE: usize = 64 << 20;

/// Counters and limits a flow reports to and obeys.
#[derive(Clone)]
pub struct FlowCtx {
    pub lan_sent: IntCounter,
    pub lan_received: IntCounter,
    pub dedup_saved: IntCounter,
    pub compression_saved: IntCounter,
    pub references: IntCounter,
    pub needs: IntCounter,
    pub chunk_misses: IntCounter,
    pub verify_failures: IntCounter,
    pub resets: prometheus::IntCounterVec,
    /// Stop reading the LAN while this many DATA bytes wait in the stream's send queue.
    pub send_queue_limit: usize,
    /// Bytes all flows keep until acknowledged: a flow stops reading its LAN while it is spent.
    pub retained: Arc<RetainBudget>,
}

/// What all flows of a node together keep until their peers acknowledge it: their encoders'
/// retained input and their streams' unacknowledged encoded bytes. While it is spent, flows stop
/// reading their LAN sockets (nothing is dropped); it frees up as acknowledgements arrive.
#[derive(Debug)]
pub struct RetainBudget {
    used: AtomicUsize,
    limit: usize,
}

impl RetainBudget {
    pub fn new(limit: usize) -> Arc<RetainBudget> {
        Arc::new(RetainBudget {
            used: AtomicUsize::new(0),
            limit,
        })
    }
    /// Bytes counted now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
    pub fn spent(&self) -> bool {
        self.used() >= self.limit
    }
    /// Takes up to `want` bytes of what is left for one flow (counted in its `mine`), before it
    /// reads: flows reading at once cannot together overshoot the budget.
    fn reserve(&self, mine: &mut usize, want: usize) -> usize {
        let mut got = 0;
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                got = want.min(self.limit.saturating_sub(used));
                Some(used + got)
            });
        *mine += got;
        got
    }
    /// One flow's share went from `*mine` to `now`.
    fn update(&self, mine: &mut usize, now: usize) {
        if now > *mine {
            self.used.fetch_add(now - *mine, Ordering::Relaxed);
        } else {
            self.used.fetch_sub(*mine - now, Ordering::Relaxed);
        }
        *mine = now;
    }
}

/// How a flow ended.
#[derive(Debug)]
pub enum FlowEnd {
    /// Both directions completed.
    Closed,
    /// Reset, with the reason (from the LAN side here or from the peer).
    Reset(ResetReason),
    /// The far side refused the stream as busy before it connected anywhere, and we still hold
    /// every byte the client sent: the caller may carry the client on without the tunnel.
    Refused {
        lan: TcpStream,
        /// What the client sent, and whether it half-closed.
        sent: Vec<u8>,
        eof: bool,
    },
}

/// Client bytes a near flow keeps until the far side shows it took the stream (see [`Replay`]).
const REPLAY_MAX: usize = 64 * 1024;

/// What a near flow keeps so that a stream the far side refuses as busy (at its flow or stream
/// limit) can pass through instead of resetting the client. The far side refuses only before it
/// connects to the destination, so nothing the client sent reached a server yet: replaying it on
/// a direct connection delivers each byte once. The copy is kept until the far side shows it took
/// the stream (any data or feedback from it), at most [`REPLAY_MAX`] bytes; a client that sends
/// more before that gives up the fallback (a refusal then resets it, as the far side's limit is
/// what the operator must raise).
pub struct Replay {
    /// `None` once the far side took the stream or the copy grew past its cap.
    bytes: Option<Vec<u8>>,
    eof: bool,
}

impl Replay {
    /// A replay holding the bytes that went in the OPEN.
    pub fn new(initial: Vec<u8>, eof: bool) -> Replay {
        Replay {
            bytes: Some(initial),
            eof,
        }
    }

    fn len(&self) -> usize {
        self.bytes.as_ref().map_or(0, Vec::len)
    }

    fn push(&mut self, b: &[u8]) {
        if let Some(v) = self.bytes.as_mut() {
            if v.len() + b.len() > REPLAY_MAX {
                self.bytes = None;
            } else {
                v.extend_from_slice(b);
            }
        }
    }

    /// The far side took the stream: nothing more to keep.
    fn taken(&mut self) {
        self.bytes = None;
    }
}

/// Runs a flow to its end. `initial_eof`: the LAN client already half-closed before the stream
/// opened (its FIN is then sent right away). `replay`: on the near side, the client's bytes kept
/// so that a refused stream can pass through ([`FlowEnd::Refused`]).
pub async fn bridge(
    mut lan: TcpStream,
    h: StreamHandle,
    enc: Box<dyn SendCodec>,
    dec: Box<dyn RecvCodec>,
    initial_eof: bool,
    ctx: &FlowCtx,
    mut replay: Option<Replay>,
) -> FlowEnd {
    // Set by the receiving half when the far side sent anything: it took the stream.
    let answered = AtomicBool::new(false);
    let id = h.id;
    let end = {
        let (rd, wr) = lan.split();
        let (up, down) = tokio::join!(
            up_half(rd, &h, enc, initial_eof, ctx, &mut replay, &answered),
            down_half(wr, &h, dec, ctx, &answered)
        );
        match (up, down) {
            (Ok(()), Ok(())) => FlowEnd::Closed,
            (Err(r), _) | (_, Err(r)) => FlowEnd::Reset(r),
        }
    };
    if let (FlowEnd::Reset(ResetReason::Busy), Some(r)) = (&end, replay.as_mut()) {
        if let Some(sent) = r.bytes.take() {
            return FlowEnd::Refused {
                lan,
                sent,
                eof: r.eof,
            };
        }
    }
    match end {
        FlowEnd::Reset(r) => {
            tracing::debug!(stream = id, "flow reset: {}", r.as_str());
            ctx.resets.with_label_values(&[r.as_str()]).inc();
            sock::set_reset_on_close(&lan);
        }
        FlowEnd::Closed => sock::finished(&lan),
        FlowEnd::Refused { .. } => {}
    }
    drop(lan);
    end
}

fn report_send(stats: SendStats, last: &mut SendStats, ctx: &FlowCtx) {
    ctx.dedup_saved.inc_by(
        stats
            .dedup_saved_bytes
            .saturating_sub(last.dedup_saved_bytes),
    );
    ctx.compression_saved.inc_by(
        stats
            .compression_saved_bytes
            .saturating_sub(last.compression_saved_bytes),
    );
    ctx.references
        .inc_by(stats.references.saturating_sub(last.references));
    ctx.needs.inc_by(stats.needs.saturating_sub(last.needs));
    *last = stats;
}

fn report_recv(stats: RecvStats, last: &mut RecvStats, ctx: &FlowCtx) {
    ctx.chunk_misses
        .inc_by(stats.chunk_misses.saturating_sub(last.chunk_misses));
    ctx.verify_failures
        .inc_by(stats.verify_failures.saturating_sub(last.verify_failures));
    *last = stats;
}

/// How often a flow paused by a spent retain budget looks whether it was freed.
const BUDGET_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// Longest a paused client's bytes wait in the encoder while the stream's tunnel queue is busy.
const FLUSH_DEFER: std::time::Duration = std::time::Duration::from_millis(1);

async fn up_half(
    rd: ReadHalf<'_>,
    h: &StreamHandle,
    mut enc: Box<dyn SendCodec>,
    initial_eof: bool,
    ctx: &FlowCtx,
    replay: &mut Option<Replay>,
    answered: &AtomicBool,
) -> Result<(), ResetReason> {
    let mut out = Vec::new();
    let mut eof = initial_eof;
    if eof {
        h.send_fin();
    }
    let mut last = SendStats::default();
    // When the client pauses while earlier bytes of this stream still wait in the tunnel queue,
    // flushing at once gains no latency (they leave behind that queue anyway) and only makes small
    // batches, which compress worse. Such a flush is deferred until the queue is empty, or 1 ms.
    let mut flush_at: Option<tokio::time::Instant> = None;
    // This flow's part of the node's retain budget.
    let mut mine = 0usize;
    // The stream was told the size of the encoder's first unit.
    let mut told = false;
    let result = loop {
        if let Some(at) = flush_at {
            if h.queued().0 == 0 || tokio::time::Instant::now() >= at {
                flush_at = None;
                enc.flush(&mut out);
            }
        }
        let ev = h.take_up();
        if let Some(r) = ev.reset {
            break Err(r);
        }
        if let Some(r) = replay.as_mut().filter(|r| r.bytes.is_some()) {
            if !ev.feedback.is_empty() || answered.load(Ordering::Relaxed) {
                r.taken();
            }
        }
        let mut bad = false;
        for fb in &ev.feedback {
            if let Err(e) = enc.feedback(fb, &mut out) {
                tracing::warn!(stream = h.id, "peer feedback rejected: {e}");
                bad = true;
                break;
            }
        }
        if bad {
            h.reset(ResetReason::Protocol);
            break Err(ResetReason::Protocol);
        }
        if !out.is_empty() {
            send_data(h, enc.as_ref(), &mut out, &mut told);
        }
        if ev.done && eof {
            break Ok(());
        }
        let (queued, _) = h.queued();
        let kept = replay.as_ref().map_or(0, Replay::len);
        ctx.retained
            .update(&mut mine, h.retained() + enc.retained_bytes() + kept);
        let budget_spent = ctx.retained.spent();
        let can_read = !eof && queued < ctx.send_queue_limit && !budget_spent;
        tokio::select! {
            _ = h.up_wait() => {}
            _ = tokio::time::sleep_until(flush_at.unwrap_or_else(tokio::time::Instant::now)), if flush_at.is_some() => {}
            // Other flows free the budget without telling this one: look again shortly.
            _ = tokio::time::sleep(BUDGET_POLL), if budget_spent && !eof => {}
            r = rd.readable(), if can_read => {
                if let Err(e) = r {
                    tracing::debug!(stream = h.id, "LAN socket error: {e}");
                    h.reset(ResetReason::Reset);
                    break Err(ResetReason::Reset);
                }
                // What this pass may read: its share of the node's retain budget (read bytes are
                // kept twice until acknowledged: by the encoder, and encoded in the stream).
                let want = 2 * READ_BUDGET.min(ctx.send_queue_limit.saturating_sub(queued).max(READ_BUF));
                let allowed = ctx.retained.reserve(&mut mine, want) / 2;
                if allowed == 0 {
                    continue;
                }
                // Read what is there now, up to that; an empty socket means the client paused,
                // which is when the encoder must let pending bytes go.
                let limit = ctx.send_queue_limit;
                let pass = read_pass(&rd, allowed, queued, limit, enc.as_mut(), &mut out, replay);
                let (total, paused, err) = (pass.total, pass.paused, pass.err);
                if pass.eof {
                    eof = true;
                    if let Some(r) = replay.as_mut() {
                        r.eof = true;
                    }
                }
                ctx.lan_sent.inc_by(total as u64);
                if let Some(e) = err {
                    tracing::debug!(stream = h.id, "LAN read error: {e}");
                    h.reset(ResetReason::Reset);
                    break Err(ResetReason::Reset);
                }
                if eof {
                    flush_at = None;
                    enc.finish(&mut out);
                } else if paused {
                    if queued == 0 {
                        flush_at = None;
                        enc.flush(&mut out);
                    } else if flush_at.is_none() {
                        flush_at = Some(tokio::time::Instant::now() + FLUSH_DEFER);
                    }
                }
                if !out.is_empty() {
                    send_data(h, enc.as_ref(), &mut out, &mut told);
                }
                if eof {
                    h.send_fin();
                }
                report_send(enc.stats(), &mut last, ctx);
                // A full pass encodes up to 1 MiB: milliseconds of this worker. The tunnel writer
                // it just woke waits in this worker's LIFO slot, which no other worker may steal,
                // until this task yields; a socket that is always readable never makes it yield,
                // so a fast source's whole transfer was encoded before its first batch left
                // (BENCHMARKS.md, "Encoding and sending in turn"). Short passes (a small flow, a
                // request) end with the socket drained and leave the worker anyway.
                if total >= READ_BUF {
                    tokio::task::yield_now().await;
                }
            }
        }
    };
    report_send(enc.stats(), &mut last, ctx);
    ctx.retained.update(&mut mine, 0);
    result
}

thread_local! {
    /// The runtime worker's read buffer. A pass reads into it and encodes what it read before it
    /// awaits anything, so a flow needs no read buffer of its own: an idle flow holds none, and a
    /// chatty one does not allocate and clear 64 KiB for every request.
    static READ_SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with the worker's read buffer, `len` bytes of it.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    READ_SCRATCH.with(|cell| {
        // Nothing awaits while the buffer is borrowed, so it is always free here; a fresh one
        // would do if it were not.
        let mut own = Vec::new();
        let mut scratch = cell.try_borrow_mut();
        let buf = match scratch.as_deref_mut() {
            Ok(b) => b,
            Err(_) => &mut own,
        };
        if buf.len() < len {
            buf.resize(len, 0);
        }
        f(&mut buf[..len])
    })
}

/// What one pass over a readable LAN socket did.
struct Pass {
    total: usize,
    /// The socket had nothing more (the client paused).
    paused: bool,
    eof: bool,
    err: Option<std::io::Error>,
}

/// Reads what the LAN socket holds, up to `allowed` bytes and until the encoder's output would
/// overfill the send queue, and encodes it into `out` (and the replay, while one is kept).
fn read_pass(
    rd: &ReadHalf<'_>,
    allowed: usize,
    queued: usize,
    limit: usize,
    enc: &mut dyn SendCodec,
    out: &mut Vec<u8>,
    replay: &mut Option<Replay>,
) -> Pass {
    with_scratch(READ_BUF, |buf| {
        let mut pass = Pass {
            total: 0,
            paused: false,
            eof: false,
            err: None,
        };
        while pass.total < allowed && queued + out.len() < limit {
            let room = buf.len().min(allowed - pass.total);
            match rd.try_read(&mut buf[..room]) {
                Ok(0) => {
                    pass.eof = true;
                    break;
                }
                Ok(n) => {
                    pass.total += n;
                    if let Some(r) = replay.as_mut() {
                        r.push(&buf[..n]);
                    }
                    enc.write(&buf[..n], out);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    pass.paused = true;
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    pass.err = Some(e);
                    break;
                }
            }
        }
        pass
    })
}

/// Queues the encoder's output. Once the encoder's first unit is out, tells the stream its size
/// (the stream's first turn carries that much: fair first bytes under a burst of new streams);
/// `told` remembers that it did.
pub fn send_data(h: &StreamHandle, enc: &dyn SendCodec, out: &mut Vec<u8>, told: &mut bool) {
    if !*told {
        let n = enc.first_unit();
        if n > 0 {
            h.set_first_turn(n);
            *told = true;
        }
    }
    h.send_data(std::mem::take(out));
}

async fn down_half(
    mut wr: WriteHalf<'_>,
    h: &StreamHandle,
    mut dec: Box<dyn RecvCodec>,
    ctx: &FlowCtx,
    answered: &AtomicBool,
) -> Result<(), ResetReason> {
    let mut out = Vec::new();
    let mut fb = Vec::new();
    let mut fin = false;
    let mut last = RecvStats::default();
    let result = 'outer: loop {
        let ev = h.take_down();
        if let Some(r) = ev.reset {
            break Err(r);
        }
        if !ev.data.is_empty() && !answered.load(Ordering::Relaxed) {
            answered.store(true, Ordering::Relaxed);
            h.wake_up();
        }
        for d in &ev.data {
            if let Err(e) = dec.receive(d) {
                tracing::warn!(stream = h.id, "peer stream bytes rejected: {e}");
                h.reset(ResetReason::Protocol);
                break 'outer Err(ResetReason::Protocol);
            }
            if dec.queued_bytes() > MAX_DECODER_QUEUE {
                tracing::warn!(
                    stream = h.id,
                    "peer keeps sending while the stream waits for missing chunks"
                );
                h.reset(ResetReason::Protocol);
                break 'outer Err(ResetReason::Protocol);
            }
            // Requests for missing chunks leave at once; acknowledgements once per batch below.
            if dec.is_stalled() {
                dec.feedback(&mut fb);
                if !fb.is_empty() {
                    h.send_feedback(std::mem::take(&mut fb));
                }
            }
            // The decoder pauses output while its buffer is full; read until it has nothing more.
            loop {
                if let Err(e) = dec.read(&mut out) {
                    tracing::warn!(stream = h.id, "peer stream bytes rejected: {e}");
                    h.reset(ResetReason::Protocol);
                    break 'outer Err(ResetReason::Protocol);
                }
                if out.is_empty() {
                    break;
                }
                if let Err(r) = write_lan(&mut wr, &out, h).await {
                    break 'outer Err(r);
                }
                ctx.lan_received.inc_by(out.len() as u64);
                out.clear();
            }
            h.consumed(d.len());
        }
        dec.feedback(&mut fb);
        if !fb.is_empty() {
            h.send_feedback(std::mem::take(&mut fb));
        }
        // Everything arrived so far is written: a flow that waits keeps no output buffer.
        out = Vec::new();
        report_recv(dec.stats(), &mut last, ctx);
        fin |= ev.fin;
        if fin && dec.is_idle() {
            if let Err(e) = wr.shutdown().await {
                tracing::debug!(stream = h.id, "LAN shutdown error: {e}");
                h.reset(ResetReason::Reset);
                break Err(ResetReason::Reset);
            }
            h.send_done();
            break Ok(());
        }
        h.down_wait().await;
    };
    report_recv(dec.stats(), &mut last, ctx);
    result
}

/// Writes to the LAN, giving up if the stream is reset meanwhile (a stalled LAN receiver must not
/// keep a reset stream alive).
async fn write_lan(
    wr: &mut WriteHalf<'_>,
    data: &[u8],
    h: &StreamHandle,
) -> Result<(), ResetReason> {
    let mut written = 0;
    while written < data.len() {
        tokio::select! {
            r = wr.write(&data[written..]) => match r {
                Ok(0) => {
                    h.reset(ResetReason::Reset);
                    return Err(ResetReason::Reset);
                }
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(stream = h.id, "LAN write error: {e}");
                    h.reset(ResetReason::Reset);
                    return Err(ResetReason::Reset);
                }
            },
            _ = h.reset_wait() => {
                return Err(h.reset_reason().unwrap_or(ResetReason::Other));
            }
        }
    }
    Ok(())
}

/// Reads what a newly accepted LAN client already sent, without waiting: it travels in the OPEN.
/// Returns (bytes, eof).
pub fn read_waiting(lan: &TcpStream, max: usize) -> std::io::Result<(Vec<u8>, bool)> {
    // Read into the worker's buffer: usually a few bytes or none arrived, and only those are kept
    // for the life of the flow.
    with_scratch(max, |buf| {
        let mut n = 0;
        while n < max {
            match lan.try_read(&mut buf[n..]) {
                Ok(0) => return Ok((buf[..n].to_vec(), true)),
                Ok(m) => n += m,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok((buf[..n].to_vec(), false))
    })
}
