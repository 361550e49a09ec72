//! Tunnel frames: the unit every tunnel connection carries after the hello.
//!
//! A frame is a 9-byte header — type (u8), stream id (u32, big-endian), payload length (u32,
//! big-endian) — followed by the payload. The length is checked against [`MAX_PAYLOAD`] before a
//! single payload byte is buffered, so a peer can never make us allocate more than that per frame.
//! docs/tunnel.md is the normative description; this module is its implementation.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Bytes of a frame header.
pub const HEADER_LEN: usize = 9;
/// Largest payload a frame may carry. Senders keep DATA/FEEDBACK frames at [`QUANTUM`] or below; the
/// extra room is for OPEN (destination + first client bytes).
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Largest DATA or FEEDBACK payload a sender puts into one frame, and the scheduler's per-turn share.
pub const QUANTUM: usize = 16 * 1024;
/// Longest destination ("host:port") an OPEN may carry.
pub const MAX_DEST_LEN: usize = 255;

/// Frame types. The numeric values are part of the wire protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    /// Opens stream `id`: destination, then the first encoded bytes (counted against the window).
    Open = 1,
    /// Encoded stream bytes (encoder → decoder), counted against the receiver's window.
    Data = 2,
    /// Decoder feedback (decoder → encoder), not window-controlled (see docs/tunnel.md).
    Feedback = 3,
    /// Window increment (u32) for DATA on stream `id`.
    Window = 4,
    /// The sender's encoder has emitted its whole input: its client half-closed.
    Fin = 5,
    /// The sender's decoder has delivered everything up to the peer's FIN: no more FEEDBACK follows.
    Done = 6,
    /// Abort stream `id`; payload is one reason byte ([`ResetReason`]).
    Rst = 7,
    /// Keepalive probe on stream 0; payload 8 opaque bytes echoed in PONG.
    Ping = 8,
    /// Answer to PING with the same payload.
    Pong = 9,
    /// The sender opens no more streams on this connection and will close it when its streams end.
    GoAway = 10,
}

impl FrameType {
    fn from_u8(v: u8) -> Option<FrameType> {
        Some(match v {
            1 => FrameType::Open,
            2 => FrameType::Data,
            3 => FrameType::Feedback,
            4 => FrameType::Window,
            5 => FrameType::Fin,
            6 => FrameType::Done,
            7 => FrameType::Rst,
            8 => FrameType::Ping,
            9 => FrameType::Pong,
            10 => FrameType::GoAway,
            _ => return None,
        })
    }
}

/// Why a stream was reset. Carried in RST; unknown values are read as [`ResetReason::Other`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ResetReason {
    /// A LAN endpoint reset its connection (or an I/O error ended it).
    Reset = 0,
    /// The far side could not connect: connection refused.
    Refused = 1,
    /// The far side could not connect: timeout, unreachable or unresolvable.
    Unreachable = 2,
    /// The dedup engine rejected the stream's bytes.
    Protocol = 3,
    /// The far side is at its stream or flow limit.
    Busy = 4,
    /// The far side is shutting down.
    Shutdown = 5,
    /// Anything else.
    Other = 255,
}

impl ResetReason {
    pub fn from_u8(v: u8) -> ResetReason {
        match v {
            0 => ResetReason::Reset,
            1 => ResetReason::Refused,
            2 => ResetReason::Unreachable,
            3 => ResetReason::Protocol,
            4 => ResetReason::Busy,
            5 => ResetReason::Shutdown,
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
            ResetReason::Other => "other",
        }
    }
}

/// A decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameType,
    pub stream: u32,
    pub payload: Bytes,
}

/// Why a byte sequence is not a valid frame. Any of these closes the connection.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("frame payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLong(u32),
    #[error("{kind:?} frame with a {len}-byte payload is malformed")]
    BadPayload { kind: FrameType, len: usize },
    #[error("{kind:?} frame on stream {stream} is not allowed there")]
    BadStream { kind: FrameType, stream: u32 },
}

/// Appends the header of a frame with `len` payload bytes to `out`.
pub fn put_header(out: &mut Vec<u8>, kind: FrameType, stream: u32, len: usize) {
    debug_assert!(len <= MAX_PAYLOAD);
    out.push(kind as u8);
    out.put_u32(stream);
    // Callers never build payloads above MAX_PAYLOAD; the saturating conversion only keeps this total.
    out.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
}

/// Appends a whole frame to `out`.
pub fn put_frame(out: &mut Vec<u8>, kind: FrameType, stream: u32, payload: &[u8]) {
    put_header(out, kind, stream, payload.len());
    out.extend_from_slice(payload);
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

/// Builds an OPEN payload: `dest_len u8`, destination, `client_len u8`, the client address as text
/// (empty when unknown), then initial encoded bytes.
pub fn open_payload(target: &OpenTarget, initial: &[u8]) -> Option<Vec<u8>> {
    let dest = target.dest.as_bytes();
    let client = target.client.map(|c| c.to_string()).unwrap_or_default();
    let len = 2 + dest.len() + client.len() + initial.len();
    if dest.is_empty() || dest.len() > MAX_DEST_LEN || len > MAX_PAYLOAD {
        return None;
    }
    let mut p = Vec::with_capacity(len);
    p.push(dest.len() as u8);
    p.extend_from_slice(dest);
    p.push(client.len() as u8);
    p.extend_from_slice(client.as_bytes());
    p.extend_from_slice(initial);
    Some(p)
}

/// Room left for initial bytes in an OPEN to `target`.
pub fn open_room(target: &OpenTarget) -> usize {
    let client = target.client.map_or(0, |c| c.to_string().len());
    MAX_PAYLOAD.saturating_sub(2 + target.dest.len() + client)
}

/// Splits an OPEN payload into target and initial bytes.
pub fn parse_open(payload: &Bytes) -> Result<(OpenTarget, Bytes), FrameError> {
    let bad = || FrameError::BadPayload {
        kind: FrameType::Open,
        len: payload.len(),
    };
    let n = *payload.first().ok_or_else(bad)? as usize;
    if n == 0 || payload.len() < 2 + n {
        return Err(bad());
    }
    let dest = std::str::from_utf8(&payload[1..1 + n])
        .map_err(|_| bad())?
        .to_owned();
    let c = payload[1 + n] as usize;
    let start = 2 + n;
    if payload.len() < start + c {
        return Err(bad());
    }
    let client = match c {
        0 => None,
        _ => Some(
            std::str::from_utf8(&payload[start..start + c])
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(bad)?,
        ),
    };
    Ok((OpenTarget { dest, client }, payload.slice(start + c..)))
}

/// Checks a frame's payload length and stream id against its type.
fn check(kind: FrameType, stream: u32, len: usize) -> Result<(), FrameError> {
    let on_zero = matches!(kind, FrameType::Ping | FrameType::Pong | FrameType::GoAway);
    if on_zero != (stream == 0) {
        return Err(FrameError::BadStream { kind, stream });
    }
    let ok = match kind {
        FrameType::Open => len >= 2,
        FrameType::Data | FrameType::Feedback => (1..=QUANTUM * 4).contains(&len),
        FrameType::Window => len == 4,
        FrameType::Fin | FrameType::Done | FrameType::GoAway => len == 0,
        FrameType::Rst => len == 1,
        FrameType::Ping | FrameType::Pong => len == 8,
    };
    if ok {
        Ok(())
    } else {
        Err(FrameError::BadPayload { kind, len })
    }
}

/// Reads frames from a byte stream, buffering at most one header plus [`MAX_PAYLOAD`].
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            buf: BytesMut::with_capacity(64 * 1024),
        }
    }

    /// Reads until `self.buf` holds `n` bytes. `Ok(false)` on a clean end of stream before any byte.
    async fn fill(&mut self, n: usize) -> std::io::Result<bool> {
        while self.buf.len() < n {
            if self.buf.capacity() - self.buf.len() < 4096 {
                self.buf.reserve(64 * 1024);
            }
            let got = self.inner.read_buf(&mut self.buf).await?;
            if got == 0 {
                if self.buf.is_empty() {
                    return Ok(false);
                }
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(true)
    }

    /// The next frame; `Ok(None)` when the peer closed cleanly between frames.
    pub async fn next(&mut self) -> Result<Option<Frame>, ReadError> {
        if !self.fill(HEADER_LEN).await? {
            return Ok(None);
        }
        let kind_byte = self.buf[0];
        let stream = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        let len32 = u32::from_be_bytes([self.buf[5], self.buf[6], self.buf[7], self.buf[8]]);
        let kind = FrameType::from_u8(kind_byte).ok_or(FrameError::UnknownType(kind_byte))?;
        if len32 as usize > MAX_PAYLOAD {
            return Err(FrameError::TooLong(len32).into());
        }
        let len = len32 as usize;
        check(kind, stream, len)?;
        self.fill(HEADER_LEN + len).await?;
        self.buf.advance(HEADER_LEN);
        let payload = self.buf.split_to(len).freeze();
        Ok(Some(Frame {
            kind,
            stream,
            payload,
        }))
    }

    /// Gives back the underlying reader and whatever was read past the last frame.
    pub fn into_parts(self) -> (R, BytesMut) {
        (self.inner, self.buf)
    }

    /// A reader that starts with `buf` already read.
    pub fn with_buffer(inner: R, buf: BytesMut) -> Self {
        FrameReader { inner, buf }
    }
}

/// Failure to read a frame.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(bytes: Vec<u8>) -> Vec<Result<Option<Frame>, String>> {
        let mut r = FrameReader::new(&bytes[..]);
        let mut out = Vec::new();
        loop {
            match r.next().await {
                Ok(Some(f)) => out.push(Ok(Some(f))),
                Ok(None) => {
                    out.push(Ok(None));
                    break;
                }
                Err(e) => {
                    out.push(Err(e.to_string()));
                    break;
                }
            }
        }
        out
    }

    #[tokio::test]
    async fn roundtrip() {
        let mut b = Vec::new();
        put_frame(&mut b, FrameType::Data, 7, b"hello");
        put_frame(&mut b, FrameType::Window, 7, &65536u32.to_be_bytes());
        put_frame(&mut b, FrameType::Ping, 0, &[1; 8]);
        let target = OpenTarget {
            dest: "example.com:22".into(),
            client: Some("[fd00::7]:40000".parse().expect("addr")),
        };
        let open = open_payload(&target, b"x").expect("fits");
        put_frame(&mut b, FrameType::Open, 9, &open);
        let got = read_all(b).await;
        assert_eq!(got.len(), 5);
        let Ok(Some(f)) = &got[3] else {
            panic!("{got:?}")
        };
        assert_eq!(f.kind, FrameType::Open);
        let (got_target, init) = parse_open(&f.payload).expect("valid open");
        assert_eq!(got_target, target);
        assert_eq!(&init[..], b"x");
        assert!(matches!(got[4], Ok(None)));
    }

    #[tokio::test]
    async fn rejects_bad_frames() {
        // Unknown type.
        let got = read_all(vec![99, 0, 0, 0, 1, 0, 0, 0, 0]).await;
        assert!(got[0]
            .as_ref()
            .is_err_and(|e| e.contains("unknown frame type")));
        // Oversized length: rejected from the header alone.
        let mut b = vec![2, 0, 0, 0, 1];
        b.extend_from_slice(&(1u32 << 30).to_be_bytes());
        let got = read_all(b).await;
        assert!(got[0].as_ref().is_err_and(|e| e.contains("exceeds")));
        // PING on a stream, DATA on stream 0, WINDOW of the wrong size.
        let mut b = Vec::new();
        put_frame(&mut b, FrameType::Ping, 3, &[0; 8]);
        assert!(read_all(b).await[0].is_err());
        let mut b = Vec::new();
        put_frame(&mut b, FrameType::Data, 0, b"x");
        assert!(read_all(b).await[0].is_err());
        let mut b = Vec::new();
        put_frame(&mut b, FrameType::Window, 1, &[0; 3]);
        assert!(read_all(b).await[0].is_err());
        // Truncated frame.
        let mut b = Vec::new();
        put_frame(&mut b, FrameType::Data, 1, b"hello");
        b.truncate(b.len() - 1);
        assert!(read_all(b).await[0].is_err());
        // Bad OPEN payloads.
        assert!(parse_open(&Bytes::from_static(&[5, b'a'])).is_err());
        assert!(parse_open(&Bytes::from_static(&[0, b'a'])).is_err());
        assert!(parse_open(&Bytes::from_static(&[1, 0xff, 0])).is_err());
        // No client length byte, a client longer than the payload, a client that is no address.
        assert!(parse_open(&Bytes::from_static(&[1, b'a'])).is_err());
        assert!(parse_open(&Bytes::from_static(&[1, b'a', 9, b'1'])).is_err());
        assert!(parse_open(&Bytes::from_static(&[1, b'a', 3, b'x', b':', b'1'])).is_err());
        let (t, init) = parse_open(&Bytes::from_static(&[1, b'a', 0, 7])).expect("no client");
        assert_eq!(
            (t.dest.as_str(), t.client, &init[..]),
            ("a", None, &[7u8][..])
        );
    }
}
