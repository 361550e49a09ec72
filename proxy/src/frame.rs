//! Tunnel frames (protocol version 3): what every tunnel connection carries after the hello.
//!
//! A frame is a 9-byte header — type (u8), stream id (u32, big-endian), payload length (u32,
//! big-endian) — followed by the payload. Frames are parsed once, here, into the typed [`Frame`]:
//! nothing past this module looks at raw payload bytes. The length is checked against
//! [`MAX_PAYLOAD`] from the header alone, so a peer can never make us buffer more than that per
//! frame. docs/tunnel.md is the normative description; this module is its implementation.
//!
//! Pure: no sockets, no runtime. [`decode`] takes whatever bytes have arrived and returns a frame
//! once a whole one is there.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Bytes of a frame header.
pub const HEADER_LEN: usize = 9;
/// Largest payload a frame may carry.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Largest DATA or FEEDBACK bytes a sender puts into one frame, and the scheduler's per-turn share.
pub const QUANTUM: usize = 16 * 1024;
/// Longest destination ("host:port") an OPEN may carry.
pub const MAX_DEST_LEN: usize = 255;
/// Bytes before the stream bytes of DATA and FEEDBACK: the offset.
const OFFSET_LEN: usize = 8;

/// Frame type numbers. Part of the wire protocol.
pub mod kind {
    pub const OPEN: u8 = 1;
    pub const DATA: u8 = 2;
    pub const FEEDBACK: u8 = 3;
    pub const ACK: u8 = 4;
    pub const FIN: u8 = 5;
    pub const DONE: u8 = 6;
    pub const RST: u8 = 7;
    pub const PING: u8 = 8;
    pub const PONG: u8 = 9;
    pub const GOAWAY: u8 = 10;
    /// From version 4.
    pub const SUMMARY: u8 = 11;
}

/// Why a stream was reset. The first seven travel in RST; the rest are local outcomes that only
/// label metrics and logs. Unknown wire values are read as [`ResetReason::Other`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResetReason {
    /// A LAN endpoint reset its connection (or an I/O error ended it).
    Reset,
    /// The far side could not connect: connection refused.
    Refused,
    /// The far side could not connect: timeout, unreachable or unresolvable.
    Unreachable,
    /// The dedup engine rejected the stream's bytes, or the stream broke a limit.
    Protocol,
    /// The far side is at its stream or flow limit.
    Busy,
    /// The far side is shutting down.
    Shutdown,
    /// The stream is not known (any more) on the sending side, and did not end cleanly there.
    Gone,
    /// The stream ended cleanly on the sending side: it received everything and everything it sent
    /// was acknowledged. Only the final acknowledgement was lost.
    Closed,
    /// The far side refused the OPEN: its destination is outside the opening peer's allow list.
    Denied,
    /// Local: the peer was unreachable for longer than `tunnel.hold`.
    HoldExpired,
    /// Local: the peer process restarted (new session id); its side of the stream is gone.
    PeerRestarted,
    /// Anything else.
    Other,
}

impl ResetReason {
    /// The byte RST carries.
    pub fn to_wire(self) -> u8 {
        match self {
            ResetReason::Reset => 0,
            ResetReason::Refused => 1,
            ResetReason::Unreachable => 2,
            ResetReason::Protocol => 3,
            ResetReason::Busy => 4,
            ResetReason::Shutdown => 5,
            ResetReason::Gone => 6,
            ResetReason::Closed => 7,
            ResetReason::Denied => 8,
            ResetReason::HoldExpired | ResetReason::PeerRestarted | ResetReason::Other => 255,
        }
    }

    pub fn from_wire(v: u8) -> ResetReason {
        match v {
            0 => ResetReason::Reset,
            1 => ResetReason::Refused,
            2 => ResetReason::Unreachable,
            3 => ResetReason::Protocol,
            4 => ResetReason::Busy,
            5 => ResetReason::Shutdown,
            6 => ResetReason::Gone,
            7 => ResetReason::Closed,
            8 => ResetReason::Denied,
            _ => ResetReason::Other,
        }
    }

    /// Label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ResetReason::Reset => "reset",
            ResetReason::Refused => "refused",
            ResetReason::Unreachable => "unreachable",
            ResetReason::Protocol => "protocol",
            ResetReason::Busy => "busy",
            ResetReason::Shutdown => "shutdown",
            ResetReason::Gone => "gone",
            ResetReason::Closed => "closed",
            ResetReason::Denied => "denied",
            ResetReason::HoldExpired => "hold-expired",
            ResetReason::PeerRestarted => "peer-restarted",
            ResetReason::Other => "other",
        }
    }
}

/// What an OPEN asks for: where the far node connects, and on whose behalf.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenTarget {
    /// "host:port" the far node connects to.
    pub dest: String,
    /// The LAN client's own address, sent for intercepted flows: a far node configured to preserve
    /// client addresses connects from it, so servers see the real client.
    pub client: Option<std::net::SocketAddr>,
}

impl OpenTarget {
    /// Whether it fits an OPEN frame.
    pub fn fits(&self) -> bool {
        !self.dest.is_empty() && self.dest.len() <= MAX_DEST_LEN
    }
}

/// One frame, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Opens `stream`. Its DATA follows from offset 0 (counted against the window).
    Open {
        stream: u32,
        target: OpenTarget,
    },
    /// Encoded stream bytes (encoder → decoder) starting at `offset` of the stream's DATA.
    Data {
        stream: u32,
        offset: u64,
        bytes: Bytes,
    },
    /// Decoder feedback (decoder → encoder) starting at `offset` of the stream's FEEDBACK.
    Feedback {
        stream: u32,
        offset: u64,
        bytes: Bytes,
    },
    /// What the sender has received of the stream (DATA and FEEDBACK bytes, and whether FIN and
    /// DONE arrived), and how far it lets the peer send DATA.
    Ack {
        stream: u32,
        data: u64,
        data_limit: u64,
        feedback: u64,
        fin: bool,
        done: bool,
    },
    /// The client half-closed: its bytes end at DATA `offset`. More DATA may follow (the encoder's
    /// answers to the decoder's requests), until DONE.
    Fin {
        stream: u32,
        offset: u64,
    },
    /// The decoder delivered everything up to FIN and needs nothing more: FEEDBACK ends at
    /// `offset`.
    Done {
        stream: u32,
        offset: u64,
    },
    /// Abort `stream`.
    Rst {
        stream: u32,
        reason: ResetReason,
    },
    /// Liveness probe; echoed in PONG.
    Ping(u64),
    Pong(u64),
    /// The sender opens no more streams in this session (it is shutting down).
    GoAway,
    /// A store summary message (`ditto_dedup::summary`), carried opaquely (version 4 on).
    Summary(Bytes),
}

/// Why a byte sequence is not a valid frame. Any of these closes the connection.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("frame payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLong(u32),
    #[error("frame of type {kind} with a {len}-byte payload is malformed")]
    BadPayload { kind: u8, len: usize },
    #[error("frame of type {kind} on stream {stream} is not allowed there")]
    BadStream { kind: u8, stream: u32 },
}

fn header(out: &mut Vec<u8>, kind: u8, stream: u32, len: usize) {
    debug_assert!(len <= MAX_PAYLOAD);
    out.push(kind);
    out.put_u32(stream);
    // Callers never build payloads above MAX_PAYLOAD; saturating only keeps this total.
    out.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
}

/// Appends DATA (`feedback` false) or FEEDBACK without building a [`Frame`] first (the hot path).
pub fn put_bytes(out: &mut Vec<u8>, feedback: bool, stream: u32, offset: u64, bytes: &[u8]) {
    let k = if feedback { kind::FEEDBACK } else { kind::DATA };
    header(out, k, stream, OFFSET_LEN + bytes.len());
    out.put_u64(offset);
    out.extend_from_slice(bytes);
}

impl Frame {
    /// Appends the frame's bytes to `out`. An OPEN whose target does not fit is the caller's
    /// error ([`OpenTarget::fits`]); its destination is then cut to the limit.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Frame::Open { stream, target } => {
                let mut end = target.dest.len().min(MAX_DEST_LEN);
                while !target.dest.is_char_boundary(end) {
                    end -= 1;
                }
                let dest = &target.dest.as_bytes()[..end];
                let client = target.client.map(|c| c.to_string()).unwrap_or_default();
                header(out, kind::OPEN, *stream, 2 + dest.len() + client.len());
                out.push(dest.len() as u8);
                out.extend_from_slice(dest);
                out.push(client.len() as u8);
                out.extend_from_slice(client.as_bytes());
            }
            Frame::Data {
                stream,
                offset,
                bytes,
            } => put_bytes(out, false, *stream, *offset, bytes),
            Frame::Feedback {
                stream,
                offset,
                bytes,
            } => put_bytes(out, true, *stream, *offset, bytes),
            Frame::Ack {
                stream,
                data,
                data_limit,
                feedback,
                fin,
                done,
            } => {
                header(out, kind::ACK, *stream, 25);
                out.put_u64(*data);
                out.put_u64(*data_limit);
                out.put_u64(*feedback);
                out.push(u8::from(*fin) | u8::from(*done) << 1);
            }
            Frame::Fin { stream, offset } => {
                header(out, kind::FIN, *stream, 8);
                out.put_u64(*offset);
            }
            Frame::Done { stream, offset } => {
                header(out, kind::DONE, *stream, 8);
                out.put_u64(*offset);
            }
            Frame::Rst { stream, reason } => {
                header(out, kind::RST, *stream, 1);
                out.push(reason.to_wire());
            }
            Frame::Ping(v) => {
                header(out, kind::PING, 0, 8);
                out.put_u64(*v);
            }
            Frame::Pong(v) => {
                header(out, kind::PONG, 0, 8);
                out.put_u64(*v);
            }
            Frame::GoAway => header(out, kind::GOAWAY, 0, 0),
            Frame::Summary(b) => {
                header(out, kind::SUMMARY, 0, b.len());
                out.extend_from_slice(b);
            }
        }
    }

    /// Parses one frame's payload, given its header fields.
    pub fn parse(kind: u8, stream: u32, mut p: Bytes) -> Result<Frame, FrameError> {
        let len = p.len();
        let bad = || FrameError::BadPayload { kind, len };
        let on_zero = matches!(kind, kind::PING | kind::PONG | kind::GOAWAY | kind::SUMMARY);
        if !(kind::OPEN..=kind::SUMMARY).contains(&kind) {
            return Err(FrameError::UnknownType(kind));
        }
        if on_zero != (stream == 0) {
            return Err(FrameError::BadStream { kind, stream });
        }
        let exact = |n: usize| if len == n { Ok(()) } else { Err(bad()) };
        Ok(match kind {
            kind::OPEN => Frame::Open {
                stream,
                target: parse_open(&p).ok_or_else(bad)?,
            },
            kind::DATA | kind::FEEDBACK => {
                if !(OFFSET_LEN + 1..=OFFSET_LEN + QUANTUM * 4).contains(&len) {
                    return Err(bad());
                }
                let offset = p.get_u64();
                if offset.checked_add(p.len() as u64).is_none() {
                    return Err(bad());
                }
                if kind == kind::DATA {
                    Frame::Data {
                        stream,
                        offset,
                        bytes: p,
                    }
                } else {
                    Frame::Feedback {
                        stream,
                        offset,
                        bytes: p,
                    }
                }
            }
            kind::ACK => {
                exact(25)?;
                let (data, data_limit, feedback) = (p.get_u64(), p.get_u64(), p.get_u64());
                let flags = p.get_u8();
                if flags > 3 {
                    return Err(bad());
                }
                Frame::Ack {
                    stream,
                    data,
                    data_limit,
                    feedback,
                    fin: flags & 1 != 0,
                    done: flags & 2 != 0,
                }
            }
            kind::FIN | kind::DONE => {
                exact(8)?;
                let offset = p.get_u64();
                if kind == kind::FIN {
                    Frame::Fin { stream, offset }
                } else {
                    Frame::Done { stream, offset }
                }
            }
            kind::RST => {
                exact(1)?;
                Frame::Rst {
                    stream,
                    reason: ResetReason::from_wire(p[0]),
                }
            }
            kind::PING | kind::PONG => {
                exact(8)?;
                let v = p.get_u64();
                if kind == kind::PING {
                    Frame::Ping(v)
                } else {
                    Frame::Pong(v)
                }
            }
            kind::SUMMARY => {
                if p.is_empty() {
                    return Err(bad());
                }
                Frame::Summary(p)
            }
            _ => {
                exact(0)?;
                Frame::GoAway
            }
        })
    }
}

/// `dest_len u8 | dest | client_len u8 | client`, nothing after.
fn parse_open(p: &[u8]) -> Option<OpenTarget> {
    let n = *p.first()? as usize;
    if n == 0 {
        return None;
    }
    let dest = std::str::from_utf8(p.get(1..1 + n)?).ok()?.to_owned();
    let c = *p.get(1 + n)? as usize;
    let rest = p.get(2 + n..)?;
    if rest.len() != c {
        return None;
    }
    let client = match c {
        0 => None,
        _ => Some(std::str::from_utf8(rest).ok()?.parse().ok()?),
    };
    Some(OpenTarget { dest, client })
}

/// Takes one whole frame off the front of `buf`, if there is one. Errors are final: the
/// connection is closed.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let kind = buf[0];
    let stream = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    let len32 = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]);
    if !(kind::OPEN..=kind::SUMMARY).contains(&kind) {
        return Err(FrameError::UnknownType(kind));
    }
    if len32 as usize > MAX_PAYLOAD {
        return Err(FrameError::TooLong(len32));
    }
    let len = len32 as usize;
    if buf.len() < HEADER_LEN + len {
        buf.reserve(HEADER_LEN + len - buf.len());
        return Ok(None);
    }
    buf.advance(HEADER_LEN);
    let payload = buf.split_to(len).freeze();
    Frame::parse(kind, stream, payload).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(bytes: &[u8]) -> Vec<Result<Frame, FrameError>> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        loop {
            match decode(&mut buf) {
                Ok(Some(f)) => out.push(Ok(f)),
                Ok(None) => break,
                Err(e) => {
                    out.push(Err(e));
                    break;
                }
            }
        }
        out
    }

    #[test]
    fn every_frame_roundtrips_in_any_split() {
        let frames = vec![
            Frame::Open {
                stream: 9,
                target: OpenTarget {
                    dest: "example.com:22".into(),
                    client: Some("[fd00::7]:40000".parse().expect("addr")),
                },
            },
            Frame::Open {
                stream: 11,
                target: OpenTarget {
                    dest: "a:1".into(),
                    client: None,
                },
            },
            Frame::Data {
                stream: 9,
                offset: 1 << 40,
                bytes: Bytes::from_static(b"hello"),
            },
            Frame::Feedback {
                stream: 9,
                offset: 3,
                bytes: Bytes::from_static(b"fb"),
            },
            Frame::Ack {
                stream: 9,
                data: 5,
                data_limit: 1 << 22,
                feedback: 2,
                fin: true,
                done: false,
            },
            Frame::Fin {
                stream: 9,
                offset: 5,
            },
            Frame::Done {
                stream: 9,
                offset: 5,
            },
            Frame::Rst {
                stream: 9,
                reason: ResetReason::Closed,
            },
            Frame::Ping(7),
            Frame::Pong(7),
            Frame::GoAway,
            Frame::Summary(Bytes::from_static(b"\x02summary")),
        ];
        let mut bytes = Vec::new();
        for f in &frames {
            f.encode(&mut bytes);
        }
        let got: Vec<Frame> = all(&bytes).into_iter().map(|r| r.expect("ok")).collect();
        assert_eq!(got, frames);
        // Byte at a time: nothing is returned before a frame is whole.
        let mut buf = BytesMut::new();
        let mut n = 0;
        for b in &bytes {
            buf.extend_from_slice(&[*b]);
            while let Some(f) = decode(&mut buf).expect("ok") {
                assert_eq!(f, frames[n]);
                n += 1;
            }
        }
        assert_eq!(n, frames.len());
    }

    #[test]
    fn malformed_frames_are_refused() {
        assert_eq!(
            all(&[99, 0, 0, 0, 1, 0, 0, 0, 0])[0],
            Err(FrameError::UnknownType(99))
        );
        let mut b = vec![kind::DATA, 0, 0, 0, 1];
        b.extend_from_slice(&(1u32 << 30).to_be_bytes());
        assert_eq!(all(&b)[0], Err(FrameError::TooLong(1 << 30)));
        let bad = |k: u8, s: u32, p: &[u8]| Frame::parse(k, s, Bytes::copy_from_slice(p)).is_err();
        assert!(bad(kind::PING, 3, &[0; 8]));
        assert!(bad(kind::DATA, 0, &[0; 9]));
        assert!(bad(kind::DATA, 1, &[0; 8]), "DATA without bytes");
        assert!(bad(kind::ACK, 1, &[0; 24]));
        assert!(bad(kind::ACK, 1, &[[0; 24].as_slice(), &[4]].concat()));
        assert!(bad(kind::FIN, 1, &[0; 7]));
        assert!(bad(kind::RST, 1, &[]));
        assert!(bad(kind::GOAWAY, 0, &[1]));
        let mut wrap = u64::MAX.to_be_bytes().to_vec();
        wrap.push(1);
        assert!(bad(kind::DATA, 1, &wrap), "offset + length overflows");
        // OPEN: no destination, a destination longer than the payload, invalid UTF-8, trailing
        // bytes, a client that is no address.
        assert!(bad(kind::OPEN, 1, &[0, 0]));
        assert!(bad(kind::OPEN, 1, &[5, b'a', 0]));
        assert!(bad(kind::OPEN, 1, &[1, 0xff, 0]));
        assert!(bad(kind::OPEN, 1, &[1, b'a', 0, 7]));
        assert!(bad(kind::OPEN, 1, &[1, b'a', 3, b'x', b':', b'1']));
        assert!(!bad(kind::OPEN, 1, &[1, b'a', 0]));
    }
}
