//! Entry points for the fuzz targets in `fuzz/` (and for replaying their corpus in tests).

use crate::frame::{self, OpenTarget, ResetReason};
use crate::session::{PeerParams, Session, SessionConfig};
use bytes::{Bytes, BytesMut};
use std::time::{Duration, Instant};

/// Feeds arbitrary bytes to a session as if they came from a peer on one of its links, with the
/// session's own streams and clock moving in between. Must never panic, whatever the bytes; a
/// protocol error only closes the link (and the input goes on over a new one).
pub fn session(data: &[u8]) {
    let now0 = Instant::now();
    let cfg = SessionConfig {
        window: 64 * 1024,
        max_streams: 8,
        ping_interval: Duration::from_millis(500),
        suspect_after: Duration::from_millis(1500),
        dead_after: Duration::from_secs(30),
        hold: Duration::from_secs(60),
    };
    let odd = data.first().is_some_and(|b| b & 1 == 1);
    let mut s = Session::new(
        cfg,
        PeerParams {
            window: 64 * 1024,
            max_streams: 8,
            odd,
        },
        now0,
    );
    let mut now = now0;
    let mut link = s.add_link(now);
    // A few streams of our own, with bytes queued, so frames about them have something to act on.
    for i in 0..3u8 {
        if let Ok(id) = s.open(OpenTarget {
            dest: format!("server:{i}"),
            client: None,
        }) {
            s.send(id, false, Bytes::from(vec![i; 3000]));
            s.send(id, true, Bytes::from(vec![i; 100]));
        }
    }
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    // The input is cut into pieces; the byte before each piece also drives the session's own side.
    for piece in data.get(1..).unwrap_or_default().chunks(97) {
        let Some((&op, bytes)) = piece.split_first() else {
            break;
        };
        buf.extend_from_slice(bytes);
        loop {
            match frame::decode(&mut buf) {
                Ok(Some(f)) => {
                    if s.on_frame(link, f, now).is_err() {
                        s.link_closed(link, now);
                        link = s.add_link(now);
                        buf.clear();
                        break;
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    s.link_closed(link, now);
                    link = s.add_link(now);
                    buf.clear();
                    break;
                }
            }
        }
        let id = u32::from(op >> 4) * 2 + u32::from(odd);
        match op & 15 {
            0 => now += Duration::from_millis(u64::from(op) * 40),
            1 => s.consumed(id, usize::from(op) * 100),
            2 => s.finish(id, op & 16 != 0),
            3 => s.reset(id, ResetReason::Reset),
            4 => s.detach(id),
            5 => s.link_closed(link, now),
            6 => link = s.add_link(now),
            7 => {
                let _ = s.take_up(id);
                let _ = s.take_down(id);
            }
            8 => s.send(
                id,
                op & 16 != 0,
                Bytes::from(vec![op; usize::from(op) * 10]),
            ),
            _ => {}
        }
        s.handle_timeout(now);
        out.clear();
        s.poll_transmit(link, &mut out);
        while s.poll_event().is_some() {}
        let mut wakes = Vec::new();
        s.take_wakes(&mut wakes);
        let _ = s.take_dirty();
        let _ = s.stats(now);
        let _ = s.buffered();
    }
}

/// Decodes arbitrary bytes as a sequence of frames, as a link reader does. Must never panic. A
/// decoded frame encodes back to the bytes it came from, except for the two places where the wire
/// allows more than one spelling of a value: an RST reason this build does not know (read as
/// `other`, written as 255) and an OPEN client address not in its canonical text form; those must
/// still decode again to the same frame.
pub fn frame(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    let mut at = 0;
    while let Ok(Some(f)) = frame::decode(&mut buf) {
        let end = data.len() - buf.len();
        let raw = &data[at..end];
        at = end;
        let mut again = Vec::new();
        f.encode(&mut again);
        if again != raw {
            assert!(
                matches!(
                    f,
                    frame::Frame::Rst {
                        reason: ResetReason::Other,
                        ..
                    } | frame::Frame::Open { .. }
                ),
                "{f:?} re-encodes differently"
            );
            let mut b = BytesMut::from(&again[..]);
            assert_eq!(frame::decode(&mut b), Ok(Some(f)), "re-encoded frame");
            assert!(b.is_empty());
        }
    }
}

/// Decodes arbitrary bytes as a hello (a 9-byte head, then the body). Must never panic. A decoded
/// hello encodes and decodes again to the same value (bytes may differ: a later version's fields
/// after the name are ignored, and the head's length is the reader's business).
pub fn hello(data: &[u8]) {
    let Some(head) = data.get(..9) else {
        return;
    };
    let mut h = [0u8; 9];
    h.copy_from_slice(head);
    if let Ok(hello) = crate::hello::Hello::decode(&h, &data[9..]) {
        let bytes = hello.encode();
        h.copy_from_slice(&bytes[..9]);
        let again = crate::hello::Hello::decode(&h, &bytes[9..]).expect("a re-encoded hello");
        assert_eq!(again, hello);
    }
}
