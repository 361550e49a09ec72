//! Test vectors of the tunnel protocol (version 5): `docs/vectors/tunnel-v5-*.txt` (the format is
//! described in `docs/tunnel.md`, "Test vectors"). They hold hellos and frames with every field
//! annotated and their parsed meaning, malformed frames with the error each must produce, and a
//! transcript of two sessions where a stream resumes on a new link after its link was lost.
//!
//! The checks parse the files: every hello and frame must decode to the meaning written under it
//! and encode back byte for byte, every malformed frame must give its error, and the transcript
//! must be exactly what two [`Session`]s emit today. The files are written by `write_vectors` (run
//! on purpose after a deliberate change of the protocol:
//! `cargo test -p ditto-proxy --test tunnel_vectors -- --ignored write_vectors`). It also writes
//! the seed corpora of the `frame` and `hello` fuzz targets, which `fuzz_corpora_replay` replays.

use bytes::{Bytes, BytesMut};
use ditto_proxy::frame::{self, Frame, OpenTarget, ResetReason};
use ditto_proxy::hello::Hello;
use ditto_proxy::session::{PeerParams, Session, SessionConfig};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const CODEC_FILE: &str = "tunnel-v5-codec.txt";
const RESUME_FILE: &str = "tunnel-v5-resume.txt";

fn vectors_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/vectors")
}

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .fold(String::with_capacity(b.len() * 2), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

fn unhex(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) {
        return Err(format!("odd hex length: {s}"));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .and_then(|d| u8::from_str_radix(d, 16).ok())
                .ok_or_else(|| format!("bad hex: {s}"))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Meanings: one line of text per hello or frame, independent of any language's types.

fn describe_hello(h: &Hello) -> String {
    format!(
        "versions={:?} store_id=0x{:032x} session_id=0x{:032x} window={} max_streams={} codec={:?} chunking={:?} name={:?}",
        h.versions, h.store_id, h.session_id, h.window, h.max_streams, h.codec, h.chunking, h.name
    )
}

fn describe(f: &Frame) -> String {
    match f {
        Frame::Open { stream, target } => format!(
            "OPEN stream={stream} dest={:?} client={}",
            target.dest,
            target.client.map_or("none".to_string(), |c| c.to_string())
        ),
        Frame::Data {
            stream,
            offset,
            bytes,
        } => format!("DATA stream={stream} offset={offset} bytes={}", hex(bytes)),
        Frame::Feedback {
            stream,
            offset,
            bytes,
        } => format!("FEEDBACK stream={stream} offset={offset} bytes={}", hex(bytes)),
        Frame::Ack {
            stream,
            data,
            data_limit,
            feedback,
            fin,
            done,
        } => format!(
            "ACK stream={stream} data={data} data_limit={data_limit} feedback={feedback} fin={fin} done={done}"
        ),
        Frame::Fin { stream, offset } => format!("FIN stream={stream} offset={offset}"),
        Frame::Done { stream, offset } => format!("DONE stream={stream} offset={offset}"),
        Frame::Rst { stream, reason } => format!(
            "RST stream={stream} reason={}({})",
            reason.as_str(),
            reason.to_wire()
        ),
        Frame::Ping(v) => format!("PING 0x{v:016x}"),
        Frame::Pong(v) => format!("PONG 0x{v:016x}"),
        Frame::GoAway => "GOAWAY".to_string(),
        Frame::Summary(b) => format!("SUMMARY bytes={}", hex(b)),
    }
}

// ---------------------------------------------------------------------------------------------
// Annotated fields, written by hand from docs/tunnel.md (not by the encoder under test).

type Fields = Vec<(Vec<u8>, String)>;

fn str_field(f: &mut Fields, name: &str, s: &str) {
    f.push((vec![s.len() as u8], format!("{name}_len = {}", s.len())));
    if !s.is_empty() {
        f.push((s.as_bytes().to_vec(), format!("{name} = {s:?}")));
    }
}

fn hello_fields(h: &Hello) -> Fields {
    let mut body: Fields = Vec::new();
    body.push((
        vec![h.versions.len() as u8],
        format!("versions_len = {}", h.versions.len()),
    ));
    for v in &h.versions {
        body.push((v.to_be_bytes().to_vec(), format!("  version {v} spoken")));
    }
    body.push((
        h.store_id.to_be_bytes().to_vec(),
        "store_id (u128): identity of the sender's chunk store".into(),
    ));
    body.push((
        h.session_id.to_be_bytes().to_vec(),
        "session_id (u128): identity of the sender's process".into(),
    ));
    body.push((
        h.window.to_be_bytes().to_vec(),
        format!("window = {} DATA bytes per stream", h.window),
    ));
    body.push((
        h.max_streams.to_be_bytes().to_vec(),
        format!("max_streams = {}", h.max_streams),
    ));
    str_field(&mut body, "codec", &h.codec);
    str_field(&mut body, "chunking", &h.chunking);
    str_field(&mut body, "name", &h.name);
    let len: usize = body.iter().map(|(b, _)| b.len()).sum();
    let top = h.versions.iter().copied().max().unwrap_or(0);
    let mut f: Fields = vec![
        (b"DITTO".to_vec(), "magic \"DITTO\"".into()),
        (
            top.to_be_bytes().to_vec(),
            format!("version = {top} (the highest the sender speaks)"),
        ),
        (
            (len as u16).to_be_bytes().to_vec(),
            format!("body_len = {len}"),
        ),
    ];
    f.extend(body);
    f
}

fn frame_fields(f: &Frame) -> Fields {
    let (kind, name, stream): (u8, &str, u32) = match f {
        Frame::Open { stream, .. } => (1, "OPEN", *stream),
        Frame::Data { stream, .. } => (2, "DATA", *stream),
        Frame::Feedback { stream, .. } => (3, "FEEDBACK", *stream),
        Frame::Ack { stream, .. } => (4, "ACK", *stream),
        Frame::Fin { stream, .. } => (5, "FIN", *stream),
        Frame::Done { stream, .. } => (6, "DONE", *stream),
        Frame::Rst { stream, .. } => (7, "RST", *stream),
        Frame::Ping(_) => (8, "PING", 0),
        Frame::Pong(_) => (9, "PONG", 0),
        Frame::GoAway => (10, "GOAWAY", 0),
        Frame::Summary(_) => (11, "SUMMARY", 0),
    };
    let mut p: Fields = Vec::new();
    let u64f = |p: &mut Fields, v: u64, what: String| p.push((v.to_be_bytes().to_vec(), what));
    match f {
        Frame::Open { target, .. } => {
            str_field(&mut p, "dest", &target.dest);
            let client = target.client.map(|c| c.to_string()).unwrap_or_default();
            str_field(&mut p, "client", &client);
        }
        Frame::Data { offset, bytes, .. } | Frame::Feedback { offset, bytes, .. } => {
            u64f(&mut p, *offset, format!("offset = {offset}"));
            p.push((bytes.to_vec(), format!("{} stream bytes", bytes.len())));
        }
        Frame::Ack {
            data,
            data_limit,
            feedback,
            fin,
            done,
            ..
        } => {
            u64f(
                &mut p,
                *data,
                format!("data = {data} (DATA bytes received)"),
            );
            u64f(&mut p, *data_limit, format!("data_limit = {data_limit}"));
            u64f(
                &mut p,
                *feedback,
                format!("feedback = {feedback} (FEEDBACK bytes received)"),
            );
            let flags = u8::from(*fin) | u8::from(*done) << 1;
            p.push((
                vec![flags],
                format!("flags = {flags}: fin received = {fin}, done received = {done}"),
            ));
        }
        Frame::Fin { offset, .. } => u64f(&mut p, *offset, format!("offset = {offset} (DATA end)")),
        Frame::Done { offset, .. } => {
            u64f(&mut p, *offset, format!("offset = {offset} (FEEDBACK end)"))
        }
        Frame::Rst { reason, .. } => p.push((
            vec![reason.to_wire()],
            format!("reason = {} ({})", reason.to_wire(), reason.as_str()),
        )),
        Frame::Ping(v) | Frame::Pong(v) => u64f(&mut p, *v, "8 opaque bytes".into()),
        Frame::GoAway => {}
        Frame::Summary(b) => p.push((
            b.to_vec(),
            format!(
                "{} bytes: a store summary message (docs/tunnel.md)",
                b.len()
            ),
        )),
    }
    let len: usize = p.iter().map(|(b, _)| b.len()).sum();
    let mut out: Fields = vec![
        (vec![kind], format!("type = {kind} ({name})")),
        (stream.to_be_bytes().to_vec(), format!("stream = {stream}")),
        (
            (len as u32).to_be_bytes().to_vec(),
            format!("length = {len}"),
        ),
    ];
    out.extend(p);
    out
}

// ---------------------------------------------------------------------------------------------
// The codec file: hellos, frames, malformed frames.

fn hellos() -> Vec<(&'static str, Hello)> {
    vec![
        (
            "the hello of site-a, a dedup node (versions 3 and 4: both sides then use 4)",
            Hello {
                versions: vec![3, 4],
                store_id: 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210,
                session_id: 0x5e55_1010_0000_0000_0000_0000_0000_002a,
                window: 4 << 20,
                max_streams: 4096,
                codec: "dedup/1".into(),
                chunking: "fastcdc-v2020-n1/1024/4096/16384".into(),
                name: "site-a".into(),
            },
        ),
        (
            "a later build that speaks versions 3, 4 and 5 (both sides then use 4), raw codec",
            Hello {
                versions: vec![3, 4, 5],
                store_id: 1,
                session_id: u128::MAX - 1,
                window: 64 * 1024,
                max_streams: 1,
                codec: "raw".into(),
                chunking: "none".into(),
                name: "hub".into(),
            },
        ),
    ]
}

fn frames() -> Vec<(&'static str, Frame)> {
    let st = 7;
    vec![
        (
            "OPEN of a forwarded flow: no client address",
            Frame::Open {
                stream: st,
                target: OpenTarget {
                    dest: "db.internal:5432".into(),
                    client: None,
                },
            },
        ),
        (
            "OPEN of an intercepted flow, with the LAN client's address",
            Frame::Open {
                stream: 9,
                target: OpenTarget {
                    dest: "example.com:443".into(),
                    client: Some("192.0.2.7:40000".parse().expect("addr")),
                },
            },
        ),
        (
            "OPEN with an IPv6 client address",
            Frame::Open {
                stream: 10,
                target: OpenTarget {
                    dest: "[2001:db8::1]:22".into(),
                    client: Some("[fd00::7]:5555".parse().expect("addr")),
                },
            },
        ),
        (
            "DATA: encoded stream bytes at offset 0",
            Frame::Data {
                stream: st,
                offset: 0,
                bytes: Bytes::from_static(b"\xd1\x70\x01\x00hello"),
            },
        ),
        (
            "DATA at a later offset",
            Frame::Data {
                stream: st,
                offset: 1 << 32,
                bytes: Bytes::from_static(b"tail"),
            },
        ),
        (
            "FEEDBACK: decoder feedback bytes",
            Frame::Feedback {
                stream: st,
                offset: 12,
                bytes: Bytes::from_static(b"\x02\x01\x00"),
            },
        ),
        (
            "ACK with no flags",
            Frame::Ack {
                stream: st,
                data: 9,
                data_limit: 9 + (4 << 20),
                feedback: 0,
                fin: false,
                done: false,
            },
        ),
        (
            "ACK: FIN received",
            Frame::Ack {
                stream: st,
                data: 4096,
                data_limit: 4096 + (4 << 20),
                feedback: 15,
                fin: true,
                done: false,
            },
        ),
        (
            "ACK: FIN and DONE received",
            Frame::Ack {
                stream: st,
                data: 4096,
                data_limit: 4096 + (4 << 20),
                feedback: 15,
                fin: true,
                done: true,
            },
        ),
        (
            "ACK: DONE received only",
            Frame::Ack {
                stream: st,
                data: 0,
                data_limit: 64 * 1024,
                feedback: 300,
                fin: false,
                done: true,
            },
        ),
        (
            "FIN: the client's bytes end at DATA offset 4096",
            Frame::Fin {
                stream: st,
                offset: 4096,
            },
        ),
        (
            "DONE: feedback ends at offset 15",
            Frame::Done {
                stream: st,
                offset: 15,
            },
        ),
        (
            "RST: the LAN endpoint reset",
            Frame::Rst {
                stream: st,
                reason: ResetReason::Reset,
            },
        ),
        (
            "RST: the far node could not connect (refused)",
            Frame::Rst {
                stream: st,
                reason: ResetReason::Refused,
            },
        ),
        (
            "RST: at the stream limit",
            Frame::Rst {
                stream: st,
                reason: ResetReason::Busy,
            },
        ),
        (
            "RST answering an ACK for a stream the receiver does not know",
            Frame::Rst {
                stream: st,
                reason: ResetReason::Gone,
            },
        ),
        (
            "RST answering an ACK for a stream that ended cleanly",
            Frame::Rst {
                stream: st,
                reason: ResetReason::Closed,
            },
        ),
        (
            "RST with reason other",
            Frame::Rst {
                stream: st,
                reason: ResetReason::Other,
            },
        ),
        ("PING", Frame::Ping(0x0000_0000_0001_e240)),
        ("PONG echoing it", Frame::Pong(0x0000_0000_0001_e240)),
        ("GOAWAY", Frame::GoAway),
        (
            "SUMMARY carrying a WANT for segment 3 from byte 4096 (version 4)",
            Frame::Summary(Bytes::from(
                ditto_dedup::summary::Msg::Want { seq: 3, from: 4096 }.encode(),
            )),
        ),
    ]
}

/// (what, bytes, the error's text).
fn malformed() -> Vec<(&'static str, Vec<u8>, String)> {
    let h = |kind: u8, stream: u32, len: u32| {
        let mut v = vec![kind];
        v.extend_from_slice(&stream.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v
    };
    let with = |mut head: Vec<u8>, p: &[u8]| {
        head.extend_from_slice(p);
        head
    };
    let mut ack_bad = vec![0u8; 24];
    ack_bad.push(4);
    let list = vec![
        ("unknown frame type 11", h(11, 1, 0)),
        ("unknown frame type 0", h(0, 0, 0)),
        ("payload length over the limit (65 537)", h(2, 1, 65_537)),
        ("PING on a stream", with(h(8, 3, 8), &[0; 8])),
        ("DATA on stream 0", with(h(2, 0, 9), &[0; 9])),
        ("GOAWAY on a stream", h(10, 5, 0)),
        ("DATA without stream bytes", with(h(2, 1, 8), &[0; 8])),
        ("ACK with flag bit 2 set", with(h(4, 1, 25), &ack_bad)),
        ("ACK one byte short", with(h(4, 1, 24), &[0; 24])),
        (
            "OPEN with a trailing byte",
            with(h(1, 1, 4), &[1, b'a', 0, 7]),
        ),
        ("OPEN without a destination", with(h(1, 1, 2), &[0, 0])),
        (
            "OPEN whose client is no address",
            with(h(1, 1, 6), &[1, b'a', 3, b'x', b':', b'1']),
        ),
        ("RST without a reason", h(7, 1, 0)),
        ("FIN with a 7-byte offset", with(h(5, 1, 7), &[0; 7])),
    ];
    list.into_iter()
        .map(|(what, bytes)| {
            let mut buf = BytesMut::from(&bytes[..]);
            let err = match frame::decode(&mut buf) {
                Err(e) => e.to_string(),
                Ok(f) => panic!("{what}: decoded as {f:?}"),
            };
            (what, bytes, err)
        })
        .collect()
}

/// (what, bytes, the error's text) of hellos that must be refused.
fn bad_hellos() -> Vec<(&'static str, Vec<u8>, String)> {
    let good = hellos().remove(0).1;
    let with = |f: &dyn Fn(&mut Hello)| {
        let mut h = good.clone();
        f(&mut h);
        h.encode()
    };
    let mut v2 = good.encode();
    v2[5..7].copy_from_slice(&2u16.to_be_bytes());
    let mut magic = good.encode();
    magic[0] = b'd';
    let truncated = good.encode();
    let list = vec![
        ("a version 2 build (its body has no version list)", v2),
        (
            "a build that speaks only version 7",
            with(&|h| h.versions = vec![7]),
        ),
        ("not a ditto hello (bad magic)", magic),
        ("window below 64 KiB", with(&|h| h.window = 65_535)),
        ("window above 1 GiB", with(&|h| h.window = (1 << 30) + 1)),
        ("max_streams 0", with(&|h| h.max_streams = 0)),
        (
            "body cut before the last byte of the name",
            truncated[..truncated.len() - 1].to_vec(),
        ),
    ];
    list.into_iter()
        .map(|(what, bytes)| {
            let mut head = [0u8; 9];
            head.copy_from_slice(&bytes[..9]);
            let err = match Hello::decode(&head, &bytes[9..]) {
                Err(e) => e.to_string(),
                Ok(h) => panic!("{what}: decoded as {h:?}"),
            };
            (what, bytes, err)
        })
        .collect()
}

fn field_lines(out: &mut String, fields: &Fields) {
    for (b, what) in fields {
        // Long byte fields are cut into lines of 32 bytes, annotated on the first.
        for (i, piece) in b.chunks(32).enumerate() {
            let note = if i == 0 { what.as_str() } else { "" };
            let line = format!("bytes {}", hex(piece));
            if note.is_empty() {
                let _ = writeln!(out, "{line}");
            } else {
                let _ = writeln!(out, "{line:<72}  # {note}");
            }
        }
    }
}

fn codec_text() -> String {
    let mut out = String::new();
    out.push_str(
        "# ditto tunnel protocol version 3 test vectors: hellos, refused hellos, frames, malformed frames.\n\
         # Format and replay rules: docs/tunnel.md, \"Test vectors\". Written by proxy/tests/tunnel_vectors.rs.\n",
    );
    for (what, h) in hellos() {
        let fields = hello_fields(&h);
        let _ = writeln!(out, "\nhello  # {what}");
        field_lines(&mut out, &fields);
        let _ = writeln!(out, "is {}", describe_hello(&h));
    }
    for (what, bytes, err) in bad_hellos() {
        let _ = writeln!(out, "\nbad-hello  # {what}");
        for piece in bytes.chunks(32) {
            let _ = writeln!(out, "bytes {}", hex(piece));
        }
        let _ = writeln!(out, "error {err}");
    }
    for (what, f) in frames() {
        let _ = writeln!(out, "\nframe  # {what}");
        field_lines(&mut out, &frame_fields(&f));
        let _ = writeln!(out, "is {}", describe(&f));
    }
    for (what, bytes, err) in malformed() {
        let _ = writeln!(out, "\nmalformed  # {what}");
        let _ = writeln!(out, "bytes {}", hex(&bytes));
        let _ = writeln!(out, "error {err}");
    }
    out
}

/// One entry of the codec file.
#[derive(Debug)]
struct Entry {
    kind: String,
    bytes: Vec<u8>,
    is: Option<String>,
    error: Option<String>,
    line: usize,
}

fn parse_codec(text: &str) -> Vec<Entry> {
    let mut out: Vec<Entry> = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split("  #").next().unwrap_or("").trim_end();
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (key, rest) = line.split_once(' ').unwrap_or((line, ""));
        match key {
            "hello" | "bad-hello" | "frame" | "malformed" => out.push(Entry {
                kind: key.to_string(),
                bytes: Vec::new(),
                is: None,
                error: None,
                line: n + 1,
            }),
            "bytes" => {
                let e = out.last_mut().expect("bytes before any entry");
                e.bytes
                    .extend(unhex(rest.trim()).unwrap_or_else(|e| panic!("line {}: {e}", n + 1)));
            }
            "is" => out.last_mut().expect("is before any entry").is = Some(rest.to_string()),
            "error" => {
                out.last_mut().expect("error before any entry").error = Some(rest.to_string())
            }
            other => panic!("line {}: unknown keyword {other:?}", n + 1),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The resume transcript: two sessions, a stream, a lost link.

fn config() -> SessionConfig {
    SessionConfig {
        window: 64 * 1024,
        max_streams: 16,
        ping_interval: Duration::from_secs(10),
        suspect_after: Duration::from_secs(30),
        dead_after: Duration::from_secs(60),
        hold: Duration::from_secs(600),
    }
}

struct Pair {
    base: Instant,
    ms: u64,
    a: Session,
    b: Session,
    link: u64,
    out: String,
}

impl Pair {
    fn new() -> Pair {
        let base = Instant::now();
        let peer = |odd| PeerParams {
            window: 64 * 1024,
            max_streams: 16,
            odd,
        };
        Pair {
            base,
            ms: 0,
            a: Session::new(config(), peer(true), base),
            b: Session::new(config(), peer(false), base),
            link: 0,
            out: String::new(),
        }
    }

    fn now(&self) -> Instant {
        self.base + Duration::from_millis(self.ms)
    }

    fn note(&mut self, line: impl AsRef<str>) {
        self.out.push_str(line.as_ref());
        self.out.push('\n');
    }

    fn link_up(&mut self) {
        let now = self.now();
        let a = self.a.add_link(now);
        let b = self.b.add_link(now);
        assert_eq!(a, b, "both sides number links alike here");
        self.link = a.0;
        self.note(format!("link-up {}", a.0));
    }

    fn link_lost(&mut self) {
        let now = self.now();
        let l = ditto_proxy::session::LinkId(self.link);
        self.a.link_closed(l, now);
        self.b.link_closed(l, now);
        self.note(format!("link-lost {}", self.link));
    }

    fn time(&mut self, ms: u64) {
        self.ms = ms;
        let now = self.now();
        self.a.handle_timeout(now);
        self.b.handle_timeout(now);
        self.note(format!("time {ms}"));
    }

    /// What `from_a`'s side writes on the current link now; delivered to the other side unless
    /// `lost`.
    fn transmit(&mut self, from_a: bool, lost: bool) {
        let now = self.now();
        let link = ditto_proxy::session::LinkId(self.link);
        let mut bytes = Vec::new();
        let (from, to) = if from_a {
            (&mut self.a, &mut self.b)
        } else {
            (&mut self.b, &mut self.a)
        };
        from.poll_transmit(link, &mut bytes);
        let mut buf = BytesMut::from(&bytes[..]);
        let mut lines = Vec::new();
        loop {
            let before = buf.len();
            match frame::decode(&mut buf) {
                Ok(Some(f)) => {
                    let raw = &bytes[bytes.len() - before..bytes.len() - buf.len()];
                    let dir = if from_a { "a>b" } else { "b>a" };
                    let key = if lost {
                        format!("{dir}-lost")
                    } else {
                        dir.to_string()
                    };
                    lines.push(format!("{key} {}  # {}", hex(raw), describe(&f)));
                    if !lost {
                        to.on_frame(link, f, now).expect("a valid frame");
                    }
                }
                Ok(None) => break,
                Err(e) => panic!("session wrote a bad frame: {e}"),
            }
        }
        assert!(buf.is_empty(), "a partial frame was written");
        for l in lines {
            self.note(l);
        }
    }

    /// What stream `id`'s owner on `a`'s or `b`'s side received.
    fn owner_takes(&mut self, on_a: bool, id: u32) {
        let side = if on_a { &mut self.a } else { &mut self.b };
        let who = if on_a { "a" } else { "b" };
        let down = side.take_down(id);
        let up = side.take_up(id);
        let mut lines = Vec::new();
        let mut n = 0;
        for d in &down.data {
            n += d.len();
            lines.push(format!("{who}-gets-data {id} {}", hex(d)));
        }
        for f in &up.feedback {
            lines.push(format!("{who}-gets-feedback {id} {}", hex(f)));
        }
        if down.fin {
            lines.push(format!("{who}-gets-fin {id}"));
        }
        if up.done {
            lines.push(format!("{who}-gets-done {id}"));
        }
        side.consumed(id, n);
        for l in lines {
            self.note(l);
        }
    }

    fn send(&mut self, on_a: bool, id: u32, feedback: bool, bytes: &[u8]) {
        let side = if on_a { &mut self.a } else { &mut self.b };
        side.send(id, feedback, Bytes::copy_from_slice(bytes));
        let who = if on_a { "a" } else { "b" };
        let what = if feedback { "feedback" } else { "data" };
        self.note(format!("{who}-sends-{what} {id} {}", hex(bytes)));
    }

    fn finish(&mut self, on_a: bool, id: u32, feedback: bool) {
        let side = if on_a { &mut self.a } else { &mut self.b };
        side.finish(id, feedback);
        let who = if on_a { "a" } else { "b" };
        let what = if feedback { "feedback" } else { "data" };
        self.note(format!("{who}-finishes-{what} {id}"));
    }
}

/// The resume scenario, driven through the real sessions; returns the transcript.
fn resume_text() -> String {
    let mut p = Pair::new();
    p.note(
        "# ditto tunnel protocol version 3 test vector: a stream resumes on a new link.\n\
         # Side a opens stream 1 and sends its bytes 16 at a time. The ACK for bytes 0..16 arrives;\n\
         # DATA 16..32 arrives but its ACK is still delayed when link 1 is lost, and DATA 32..48 is\n\
         # lost with the link. On link 2, a resends from the acknowledged offset 16: b drops the\n\
         # duplicate 16..32, delivers only 32..48 and acknowledges at once. Then both halves close.\n\
         # Format and replay rules: docs/tunnel.md, \"Test vectors\". Written by proxy/tests/tunnel_vectors.rs.",
    );
    p.link_up();
    let id =
        p.a.open(OpenTarget {
            dest: "server.lan:8080".into(),
            client: None,
        })
        .expect("open");
    p.note(format!("a-opens {id} server.lan:8080"));
    let pieces: [&[u8]; 3] = [
        b"GET /a HTTP/1.1\n",
        b"Host: server.la\n",
        b"n:8080\n\n.......\n",
    ];
    p.send(true, id, false, pieces[0]);
    p.transmit(true, false);
    p.owner_takes(false, id);
    p.transmit(false, false);
    p.time(20);
    p.transmit(false, false);
    p.transmit(true, false);
    p.transmit(false, false);
    p.send(true, id, false, pieces[1]);
    p.transmit(true, false);
    p.owner_takes(false, id);
    p.send(true, id, false, pieces[2]);
    p.transmit(true, true);
    p.time(30);
    p.link_lost();
    p.link_up();
    p.transmit(true, false);
    p.owner_takes(false, id);
    p.transmit(false, false);
    p.transmit(true, false);
    // Both halves close: a's client is done, b answers with feedback and ends too.
    p.finish(true, id, false);
    p.transmit(true, false);
    p.owner_takes(false, id);
    p.send(false, id, true, b"\x02\x01\x00");
    p.finish(false, id, true);
    p.finish(false, id, false);
    p.transmit(false, false);
    p.owner_takes(true, id);
    p.finish(true, id, true);
    p.transmit(true, false);
    p.owner_takes(false, id);
    p.transmit(false, false);
    p.transmit(true, false);
    p.time(60);
    p.transmit(true, false);
    p.transmit(false, false);
    p.transmit(true, false);
    p.out
}

// ---------------------------------------------------------------------------------------------
// The checks.

fn read(name: &str) -> String {
    let path = vectors_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn hellos_and_frames_decode_to_their_meaning_and_back() {
    let entries = parse_codec(&read(CODEC_FILE));
    let count = |k: &str| entries.iter().filter(|e| e.kind == k).count();
    assert!(count("hello") >= 2 && count("bad-hello") >= 3);
    assert!(count("frame") >= 10 && count("malformed") >= 6);
    for e in &entries {
        let at = format!("{CODEC_FILE} line {}", e.line);
        match e.kind.as_str() {
            "hello" => {
                assert!(e.bytes.len() >= 9, "{at}: short hello");
                let mut head = [0u8; 9];
                head.copy_from_slice(&e.bytes[..9]);
                let h = Hello::decode(&head, &e.bytes[9..]).unwrap_or_else(|x| panic!("{at}: {x}"));
                assert_eq!(Some(describe_hello(&h)), e.is, "{at}");
                assert_eq!(hex(&h.encode()), hex(&e.bytes), "{at}: re-encoded");
            }
            "bad-hello" => {
                assert!(e.bytes.len() >= 9, "{at}: short hello");
                let mut head = [0u8; 9];
                head.copy_from_slice(&e.bytes[..9]);
                match Hello::decode(&head, &e.bytes[9..]) {
                    Err(x) => assert_eq!(Some(x.to_string()), e.error, "{at}"),
                    Ok(h) => panic!("{at}: accepted as {h:?}"),
                }
            }
            "frame" => {
                let mut buf = BytesMut::from(&e.bytes[..]);
                let f = frame::decode(&mut buf)
                    .unwrap_or_else(|x| panic!("{at}: {x}"))
                    .unwrap_or_else(|| panic!("{at}: incomplete frame"));
                assert!(buf.is_empty(), "{at}: bytes left after the frame");
                assert_eq!(Some(describe(&f)), e.is, "{at}");
                let mut again = Vec::new();
                f.encode(&mut again);
                assert_eq!(hex(&again), hex(&e.bytes), "{at}: re-encoded");
                // Whole frames only: every proper prefix is incomplete, not an error.
                for cut in 0..e.bytes.len() {
                    let mut part = BytesMut::from(&e.bytes[..cut]);
                    assert_eq!(frame::decode(&mut part), Ok(None), "{at}: prefix {cut}");
                }
            }
            "malformed" => {
                let mut buf = BytesMut::from(&e.bytes[..]);
                match frame::decode(&mut buf) {
                    Err(x) => assert_eq!(Some(x.to_string()), e.error, "{at}"),
                    Ok(f) => panic!("{at}: accepted as {f:?}"),
                }
            }
            other => panic!("{at}: {other}"),
        }
    }
}

#[test]
fn the_resume_transcript_replays() {
    let text = read(RESUME_FILE);
    // Every frame line decodes to what its comment says and encodes back.
    let mut frames = 0;
    let (mut lost, mut resent) = (false, false);
    for (n, line) in text.lines().enumerate() {
        lost |= line.starts_with("link-lost");
        let at = format!("{RESUME_FILE} line {}", n + 1);
        let (body, note) = line.split_once("  # ").unwrap_or((line, ""));
        let mut words = body.split_whitespace();
        let (Some(key), Some(h)) = (words.next(), words.next()) else {
            continue;
        };
        if !key.starts_with("a>b") && !key.starts_with("b>a") {
            continue;
        }
        let bytes = unhex(h).unwrap_or_else(|e| panic!("{at}: {e}"));
        let mut buf = BytesMut::from(&bytes[..]);
        let f = frame::decode(&mut buf)
            .unwrap_or_else(|e| panic!("{at}: {e}"))
            .unwrap_or_else(|| panic!("{at}: incomplete"));
        assert!(buf.is_empty(), "{at}");
        assert_eq!(describe(&f), note, "{at}");
        let mut again = Vec::new();
        f.encode(&mut again);
        assert_eq!(again, bytes, "{at}");
        frames += 1;
        resent |= lost && matches!(f, Frame::Data { offset: 16, .. });
    }
    assert!(frames >= 8, "only {frames} frames");
    assert!(
        resent,
        "the transcript shows no resend from offset 16 after the link loss"
    );
    // And it is exactly what two sessions do today.
    let now = resume_text();
    for (i, (want, got)) in text.lines().zip(now.lines()).enumerate() {
        assert_eq!(got, want, "{RESUME_FILE} line {}", i + 1);
    }
    assert_eq!(text.lines().count(), now.lines().count(), "{RESUME_FILE}");
}

/// The seed corpora of the `frame` and `hello` fuzz targets replay without a panic, and so do
/// their one-byte corruptions and prefixes.
#[test]
fn fuzz_corpora_replay() {
    for (target, run) in [
        ("frame", ditto_proxy::fuzzing::frame as fn(&[u8])),
        ("hello", ditto_proxy::fuzzing::hello),
    ] {
        let dir = corpus_dir(target);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let mut n = 0;
        for e in entries.flatten() {
            if let Ok(mut bytes) = std::fs::read(e.path()) {
                run(&bytes);
                n += 1;
                // And every one-byte corruption of it, and every cut.
                for i in 0..bytes.len() {
                    for x in [0x01, 0x80, 0xff] {
                        bytes[i] ^= x;
                        run(&bytes);
                        bytes[i] ^= x;
                    }
                    run(&bytes[..i]);
                }
            }
        }
        assert!(n >= 2, "{target}: only {n} corpus files");
    }
}

/// Writes the vector files and the fuzz seed corpora (run on purpose, see the module doc).
#[test]
#[ignore]
fn write_vectors() {
    std::fs::create_dir_all(vectors_dir()).expect("vectors dir");
    std::fs::write(vectors_dir().join(CODEC_FILE), codec_text()).expect("write");
    std::fs::write(vectors_dir().join(RESUME_FILE), resume_text()).expect("write");
    // The hand-written fields must be what the encoders produce.
    for (_, h) in hellos() {
        let mine: Vec<u8> = hello_fields(&h).into_iter().flat_map(|(b, _)| b).collect();
        assert_eq!(mine, h.encode());
    }
    for (_, f) in frames() {
        let mine: Vec<u8> = frame_fields(&f).into_iter().flat_map(|(b, _)| b).collect();
        let mut enc = Vec::new();
        f.encode(&mut enc);
        assert_eq!(mine, enc);
    }
    let (fd, hd) = (corpus_dir("frame"), corpus_dir("hello"));
    std::fs::create_dir_all(&fd).expect("corpus dir");
    std::fs::create_dir_all(&hd).expect("corpus dir");
    let mut all = Vec::new();
    for (i, (_, f)) in frames().iter().enumerate() {
        let mut b = Vec::new();
        f.encode(&mut b);
        all.extend_from_slice(&b);
        std::fs::write(fd.join(format!("vector-{i:02}")), &b).expect("write");
    }
    std::fs::write(fd.join("all-frames"), &all).expect("write");
    for (i, (_, bytes, _)) in malformed().iter().enumerate() {
        std::fs::write(fd.join(format!("malformed-{i:02}")), bytes).expect("write");
    }
    for (i, (_, h)) in hellos().iter().enumerate() {
        std::fs::write(hd.join(format!("vector-{i}")), h.encode()).expect("write");
    }
    for (i, (_, bytes, _)) in bad_hellos().iter().enumerate() {
        std::fs::write(hd.join(format!("bad-{i}")), bytes).expect("write");
    }
}
