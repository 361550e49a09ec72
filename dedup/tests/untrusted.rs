//! The decoder's input comes from the network: every malformed input is an error (or, when merely
//! incomplete, a wait), never a panic and never unbounded memory.

mod common;

use common::{ram_store, random_bytes, Link};
use ditto_dedup::wire::{self, put_varint};
use ditto_dedup::{Decoder, Encoder, EngineConfig, PeerView, WireError};
use rand::{Rng, SeedableRng};
use std::sync::Arc;

fn decoder() -> Decoder {
    let s = ram_store(1 << 20);
    let v = Arc::new(PeerView::new(s.identity()));
    Decoder::new(s, v, EngineConfig::default())
}

/// A valid data stream for `data`, flushed every `flush_every` bytes.
fn valid_stream(data: &[u8], flush_every: usize) -> Vec<u8> {
    let a = ram_store(8 << 20);
    let v = Arc::new(PeerView::new(a.identity()));
    let mut enc = Encoder::new(a, v, EngineConfig::default());
    let mut out = Vec::new();
    for piece in data.chunks(flush_every) {
        enc.write(piece, &mut out);
        enc.flush(&mut out);
    }
    enc.finish(&mut out);
    out
}

fn header() -> Vec<u8> {
    let mut h = Vec::new();
    wire::put_header(&mut h, wire::KIND_DATA);
    h
}

fn decode_all(dec: &mut Decoder, input: &[u8]) -> Result<Vec<u8>, WireError> {
    dec.receive(input)?;
    let mut out = Vec::new();
    dec.read(&mut out)?;
    Ok(out)
}

#[test]
fn garbage_is_refused() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for i in 0..2000 {
        let len = rng.gen_range(0..4000);
        let mut g = random_bytes(&mut rng, len);
        if i % 2 == 0 {
            // Past the header, so the message parser sees the garbage.
            let mut h = header();
            h.append(&mut g);
            g = h;
        }
        let mut dec = decoder();
        let _ = decode_all(&mut dec, &g);
        assert!(dec.queued_bytes() <= g.len() + 16);
    }
    let mut dec = decoder();
    assert_eq!(
        decode_all(&mut dec, b"SSH-2.0-OpenSSH_9.2\r\n"),
        Err(WireError::BadMagic)
    );
    // The error is final.
    assert!(dec.receive(&header()).is_err());
}

#[test]
fn unknown_version_is_refused() {
    let mut dec = decoder();
    let r = decode_all(
        &mut dec,
        &[
            wire::MAGIC[0],
            wire::MAGIC[1],
            wire::VERSION + 1,
            wire::KIND_DATA,
        ],
    );
    assert_eq!(r, Err(WireError::UnsupportedVersion(wire::VERSION + 1)));
}

#[test]
fn truncated_streams_wait_and_output_only_a_prefix() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    let data = common::texty(&mut rng, 60_000);
    let stream = valid_stream(&data, 7_000);
    for cut in (0..stream.len()).step_by(97) {
        let mut dec = decoder();
        let out = decode_all(&mut dec, &stream[..cut])
            .expect("a prefix of a valid stream is not an error");
        assert!(
            data.starts_with(&out),
            "cut at {cut} output bytes that are not a prefix"
        );
    }
    let mut dec = decoder();
    assert_eq!(decode_all(&mut dec, &stream).expect("whole"), data);
}

#[test]
fn flipped_bytes_never_panic() {
    // Integrity on the wire is TLS's job; here we only require that no corruption crashes the decoder.
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    let data = random_bytes(&mut rng, 30_000);
    let mut data2 = common::texty(&mut rng, 30_000);
    data2.extend_from_slice(&data);
    let stream = valid_stream(&data2, 9_000);
    for _ in 0..3000 {
        let mut s = stream.clone();
        let pos = rng.gen_range(0..s.len());
        s[pos] ^= 1 << rng.gen_range(0..8);
        let mut dec = decoder();
        let _ = decode_all(&mut dec, &s);
    }
}

fn batch(ops: &[u8], n_ops: u64, literals: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    put_varint(&mut body, n_ops);
    body.extend_from_slice(ops);
    body.extend_from_slice(literals);
    let mut m = header();
    wire::put_message(&mut m, wire::MSG_BATCH, &body);
    m
}

#[test]
fn oversized_fields_are_refused() {
    // Message length.
    let mut m = header();
    m.push(wire::MSG_BATCH);
    put_varint(&mut m, u64::MAX >> 1);
    assert!(matches!(
        decode_all(&mut decoder(), &m),
        Err(WireError::TooLarge { .. })
    ));
    // Op count.
    let m = batch(&[], wire::MAX_OPS as u64 + 1, &[]);
    assert!(matches!(
        decode_all(&mut decoder(), &m),
        Err(WireError::TooLarge { .. })
    ));
    // Literal op length.
    let mut ops = vec![wire::OP_LIT];
    put_varint(&mut ops, wire::MAX_CHUNK as u64 + 1);
    assert!(matches!(
        decode_all(&mut decoder(), &batch(&ops, 1, &[])),
        Err(WireError::TooLarge { .. })
    ));
    // Run length.
    let mut ops = vec![wire::OP_RUN];
    put_varint(&mut ops, wire::MAX_RUN + 1);
    ops.extend_from_slice(&[0u8; 32]);
    assert!(matches!(
        decode_all(&mut decoder(), &batch(&ops, 1, &[])),
        Err(WireError::TooLarge { .. })
    ));
    // Literal section that disagrees with the ops.
    let mut ops = vec![wire::OP_LIT];
    put_varint(&mut ops, 10);
    let mut lits = vec![wire::CODEC_RAW];
    put_varint(&mut lits, 11);
    lits.extend_from_slice(&[0u8; 11]);
    assert!(matches!(
        decode_all(&mut decoder(), &batch(&ops, 1, &lits)),
        Err(WireError::Malformed(_))
    ));
    // Unknown op, unknown codec, unknown message.
    assert!(matches!(
        decode_all(&mut decoder(), &batch(&[0x7f], 1, &[])),
        Err(WireError::UnknownOp(0x7f))
    ));
    let mut ops = vec![wire::OP_LIT];
    put_varint(&mut ops, 1);
    assert!(decode_all(&mut decoder(), &batch(&ops, 1, &[9, 1, 0])).is_err());
    let mut m = header();
    wire::put_message(&mut m, 0x55, &[]);
    assert_eq!(
        decode_all(&mut decoder(), &m),
        Err(WireError::UnknownMessage(0x55))
    );
}

/// The ends `data` keeps from `base` and the zstd frame of its middle, as docs/protocol.md says:
/// the common ends kept, the middle a zstd frame against the base's.
fn trimmed_delta(base: &[u8], data: &[u8]) -> (usize, usize, Vec<u8>) {
    let head = base.iter().zip(data).take_while(|(a, b)| a == b).count();
    let room = base.len().min(data.len()) - head;
    let tail = (base.iter().rev().zip(data.iter().rev()))
        .take(room)
        .take_while(|(a, b)| a == b)
        .count();
    let mut cctx = zstd::zstd_safe::CCtx::create();
    cctx.ref_prefix(&base[head..base.len() - tail])
        .expect("prefix");
    let mid = &data[head..data.len() - tail];
    let mut payload = Vec::with_capacity(zstd::zstd_safe::compress_bound(mid.len()));
    cctx.compress2(&mut payload, mid).expect("compress");
    (head, tail, payload)
}

/// A batch of one TDELTA against `base`, rebuilding `data` (ends computed as an encoder does)
/// unless `ends` overrides them.
fn tdelta(base: &[u8], data: &[u8], ends: Option<(u64, u64)>) -> Vec<u8> {
    let (head, tail, payload) = trimmed_delta(base, data);
    let (head, tail) = ends.unwrap_or((head as u64, tail as u64));
    let mut ops = vec![wire::OP_TDELTA];
    ops.extend_from_slice(ditto_dedup::ChunkId::of(base).as_bytes());
    put_varint(&mut ops, data.len() as u64);
    put_varint(&mut ops, head);
    put_varint(&mut ops, tail);
    put_varint(&mut ops, payload.len() as u64);
    ops.extend_from_slice(&payload);
    let mut lits = vec![wire::CODEC_RAW];
    put_varint(&mut lits, 0);
    batch(&ops, 1, &lits)
}

#[test]
fn trimmed_delta_ends_that_do_not_fit_are_refused() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(15);
    let base = random_bytes(&mut rng, 1_000);
    let mut data = base.clone();
    data[400] ^= 1;
    data.splice(700..700, *b"inserted");
    let with_base = || {
        let s = ram_store(1 << 20);
        s.insert(&ditto_dedup::ChunkId::of(&base), &base)
            .expect("insert");
        let v = Arc::new(PeerView::new(s.identity()));
        Decoder::new(s, v, EngineConfig::default())
    };
    // The encoder's own ends: the chunk, byte for byte.
    assert_eq!(
        decode_all(&mut with_base(), &tdelta(&base, &data, None)),
        Ok(data.clone())
    );
    // Ends longer than the chunk: refused as the op is read, before any base is looked up.
    let n = data.len() as u64;
    for ends in [(n + 1, 0), (n, 1), (u64::MAX >> 1, 0)] {
        assert!(
            matches!(
                decode_all(&mut decoder(), &tdelta(&base, &data, Some(ends))),
                Err(WireError::TooLarge { .. })
            ),
            "ends {ends:?}"
        );
    }
    // Ends that fit the chunk but not the base (1,000 bytes), or that disagree with the payload:
    // errors when applied, and nothing of the chunk is output.
    for ends in [(600, 450), (1_000, 1), (399, 292)] {
        let mut dec = with_base();
        let got = dec.receive(&tdelta(&base, &data, Some(ends)));
        let mut out = Vec::new();
        let got = got.and_then(|_| dec.read(&mut out));
        assert!(got.is_err(), "ends {ends:?} accepted");
        assert!(out.is_empty(), "ends {ends:?}: {} bytes output", out.len());
    }
}

#[test]
fn decompression_bomb_is_refused() {
    // Ops claim 1000 literal bytes; the zstd payload expands to 64 MiB.
    let frame = zstd::bulk::compress(&vec![0u8; 64 << 20], 19).expect("compress");
    let mut ops = vec![wire::OP_LIT];
    put_varint(&mut ops, 1000);
    let mut lits = vec![wire::CODEC_ZSTD];
    put_varint(&mut lits, 1000);
    lits.extend_from_slice(&frame);
    let mut dec = decoder();
    assert!(decode_all(&mut dec, &batch(&ops, 1, &lits)).is_err());
}

#[test]
fn endless_partial_chunk_is_refused() {
    // PART ops grow the open chunk; past the largest chunk size it is an error, not a growing buffer.
    let mut dec = decoder();
    let mut total = 0usize;
    let mut failed = false;
    for _ in 0..100 {
        let mut ops = vec![wire::OP_PART];
        put_varint(&mut ops, 60_000);
        let mut lits = vec![wire::CODEC_RAW];
        put_varint(&mut lits, 60_000);
        lits.extend_from_slice(&[b'x'; 60_000]);
        let m = batch(&ops, 1, &lits);
        let m = if total == 0 {
            m
        } else {
            m[wire::HEADER_LEN..].to_vec()
        };
        total += 60_000;
        if decode_all(&mut dec, &m).is_err() {
            failed = true;
            break;
        }
    }
    assert!(failed, "an open chunk of {total} bytes was accepted");
    assert!(total <= wire::MAX_CHUNK + 60_000);
}

#[test]
fn unrequested_fill_is_refused() {
    let mut body = Vec::new();
    put_varint(&mut body, 0);
    put_varint(&mut body, 0);
    put_varint(&mut body, 0);
    body.extend_from_slice(&[wire::CODEC_RAW, 1, b'x']);
    let mut m = header();
    wire::put_message(&mut m, wire::MSG_FILL, &body);
    assert!(matches!(
        decode_all(&mut decoder(), &m),
        Err(WireError::UnexpectedFill { .. })
    ));
}

#[test]
fn bad_feedback_is_refused() {
    let a = ram_store(1 << 20);
    let v = Arc::new(PeerView::new(a.identity()));
    let mut enc = Encoder::new(a, v, EngineConfig::default());
    let mut out = Vec::new();
    enc.write(&[1u8; 10_000], &mut out);
    enc.flush(&mut out);
    let mut fb = Vec::new();
    wire::put_header(&mut fb, wire::KIND_FEEDBACK);
    let mut body = Vec::new();
    put_varint(&mut body, 99);
    wire::put_message(&mut fb, wire::MSG_ACK, &body);
    assert!(
        enc.feedback(&fb, &mut out).is_err(),
        "ack of a batch never sent"
    );
    let mut enc2 = {
        let a = ram_store(1 << 20);
        let v = Arc::new(PeerView::new(a.identity()));
        Encoder::new(a, v, EngineConfig::default())
    };
    let mut fb = Vec::new();
    wire::put_header(&mut fb, wire::KIND_FEEDBACK);
    let mut body = Vec::new();
    put_varint(&mut body, 5);
    put_varint(&mut body, 1);
    put_varint(&mut body, 0);
    wire::put_message(&mut fb, wire::MSG_NEED, &body);
    assert!(matches!(
        enc2.feedback(&fb, &mut out),
        Err(WireError::UnknownNeed { .. })
    ));
}

#[test]
fn fuzz_corpus_replays_without_panic() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let mut n = 0;
    for (target, f) in [
        ("decoder", ditto_dedup::fuzzing::decoder as fn(&[u8])),
        ("encoder_feedback", ditto_dedup::fuzzing::encoder_feedback),
        ("store_records", ditto_dedup::fuzzing::store_records),
        ("summary", ditto_dedup::fuzzing::summary),
        ("chunker", ditto_dedup::fuzzing::chunker),
    ] {
        let dir = root.join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            panic!("fuzz corpus {} is missing", dir.display());
        };
        for e in entries.flatten() {
            if let Ok(bytes) = std::fs::read(e.path()) {
                f(&bytes);
                n += 1;
            }
        }
    }
    assert!(n >= 10, "only {n} corpus files");
}

/// Writes seed inputs for the fuzzers (run by hand: `cargo test -p ditto-dedup --test untrusted -- --ignored`).
#[test]
#[ignore]
fn write_corpus_seeds() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for (i, seed) in ditto_dedup::fuzzing::store_records_seeds()
        .iter()
        .enumerate()
    {
        std::fs::write(root.join(format!("store_records/seed-{i}")), seed).expect("write");
    }
    std::fs::create_dir_all(root.join("summary")).expect("mkdir");
    for (i, seed) in ditto_dedup::fuzzing::summary_seeds().iter().enumerate() {
        std::fs::write(root.join(format!("summary/seed-{i}")), seed).expect("write");
    }
    std::fs::create_dir_all(root.join("chunker")).expect("mkdir");
    for (i, seed) in ditto_dedup::fuzzing::chunker_seeds().iter().enumerate() {
        std::fs::write(root.join(format!("chunker/seed-{i}")), seed).expect("write");
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(14);
    for (i, (len, flush)) in [
        (100usize, 50usize),
        (5_000, 1_000),
        (40_000, 40_000),
        (70_000, 3_000),
    ]
    .iter()
    .enumerate()
    {
        let mut data = common::texty(&mut rng, *len);
        data.extend_from_slice(&data.clone());
        let mut s = vec![(i * 40) as u8];
        s.extend_from_slice(&valid_stream(&data, *flush));
        std::fs::write(root.join(format!("decoder/seed-{i}")), &s).expect("write");
    }
    // A stream with references and runs: the second half repeats the first.
    let a = ram_store(8 << 20);
    let b = ram_store(8 << 20);
    let va = Arc::new(PeerView::new(b.identity()));
    let vb = Arc::new(PeerView::new(a.identity()));
    let mut link = Link::new(&a, &b, va.clone(), vb, EngineConfig::default(), 1);
    let data = random_bytes(&mut rng, 100_000);
    link.send(&data, 10_000, 0.3, true);
    let mut enc = ditto_dedup::Encoder::new(a.clone(), va, EngineConfig::default());
    let mut out = vec![3u8];
    enc.write(&data, &mut out);
    enc.finish(&mut out);
    std::fs::write(root.join("decoder/seed-refs"), &out).expect("write");
    // TDELTAs against a chunk the fuzz target's store holds (4,096 zero bytes).
    let zeros = vec![0u8; 4096];
    for (i, at) in [0usize, 100, 2_000, 4_090].iter().enumerate() {
        let mut edited = zeros.clone();
        edited.splice(at..at, *b"an edit");
        let mut s = vec![(i * 50) as u8];
        s.extend_from_slice(&tdelta(&zeros, &edited, None));
        std::fs::write(root.join(format!("decoder/seed-tdelta-{i}")), &s).expect("write");
    }
    // ERUNs along the fuzz target's hints ("ditto", then the 4,096 zero bytes).
    for (i, at) in [0usize, 2_000].iter().enumerate() {
        let mut edited = zeros.clone();
        edited.splice(at..at, *b"an edit");
        let mut s = vec![(i * 60) as u8];
        s.extend_from_slice(&erun(b"ditto", &zeros, &edited));
        std::fs::write(root.join(format!("decoder/seed-erun-{i}")), &s).expect("write");
    }
    let mut fb = Vec::new();
    wire::put_header(&mut fb, wire::KIND_FEEDBACK);
    let mut body = Vec::new();
    put_varint(&mut body, 0);
    put_varint(&mut body, 1);
    put_varint(&mut body, 0);
    wire::put_message(&mut fb, wire::MSG_NEED, &body);
    let mut body = Vec::new();
    put_varint(&mut body, 1);
    wire::put_message(&mut fb, wire::MSG_ACK, &body);
    std::fs::write(root.join("encoder_feedback/seed-0"), &fb).expect("write");
    for i in 0..4 {
        std::fs::write(
            root.join(format!("encoder_feedback/garbage-{i}")),
            random_bytes(&mut rng, 64 * (i + 1)),
        )
        .expect("write");
        std::fs::write(
            root.join(format!("decoder/garbage-{i}")),
            random_bytes(&mut rng, 64 * (i + 1)),
        )
        .expect("write");
    }
}

#[test]
fn corrupt_fill_is_refused_not_delivered() {
    // The receiver lost its store; the sender's answer to its request is damaged on the way (or by a
    // bug). The decoder must refuse it rather than output it.
    let mut rng = rand::rngs::StdRng::seed_from_u64(15);
    let data = random_bytes(&mut rng, 300_000);
    for flip_at_end in [1usize, 5000] {
        // A request makes the sender forget its belief, so each case starts from a fresh first pass.
        let a = ram_store(8 << 20);
        let b = ram_store(8 << 20);
        let va = Arc::new(PeerView::new(b.identity()));
        let vb = Arc::new(PeerView::new(a.identity()));
        let mut link = Link::new(&a, &b, va.clone(), vb.clone(), EngineConfig::default(), 1);
        link.send(&data, 50_000, 0.0, true);
        let mut enc = Encoder::new(a.clone(), va.clone(), EngineConfig::default());
        let mut dec = Decoder::new(ram_store(8 << 20), vb.clone(), EngineConfig::default());
        let mut wire = Vec::new();
        enc.write(&data, &mut wire);
        enc.finish(&mut wire);
        dec.receive(&wire).expect("refs are fine");
        let mut out = Vec::new();
        dec.read(&mut out).expect("read");
        assert!(out.is_empty(), "nothing resolvable yet");
        let mut fb = Vec::new();
        dec.feedback(&mut fb);
        let mut fill = Vec::new();
        enc.feedback(&fb, &mut fill).expect("need is valid");
        assert!(fill.len() > 100_000);
        let n = fill.len();
        fill[n - flip_at_end] ^= 0x40;
        let r = dec.receive(&fill).and_then(|()| dec.read(&mut out));
        assert!(matches!(r, Err(WireError::FillMismatch { .. })), "{r:?}");
        assert!(data.starts_with(&out));
    }
}

/// An ERUN of chunk `a` and an edit `n` of the chunk that follows `a` (`base`), as an encoder
/// writes it (docs/protocol.md): the digest over the ids of `a` and `n`, the edit a trimmed delta
/// against `base` without the zstd frame's magic number.
fn erun(a: &[u8], base: &[u8], n: &[u8]) -> Vec<u8> {
    use ditto_dedup::ChunkId;
    let mut digest = blake3::Hasher::new();
    digest.update(ChunkId::of(a).as_bytes());
    digest.update(ChunkId::of(n).as_bytes());
    let mut ops = vec![wire::OP_ERUN];
    put_varint(&mut ops, 2);
    ops.extend_from_slice(ChunkId::of(a).as_bytes());
    ops.extend_from_slice(&digest.finalize().as_bytes()[..16]);
    put_varint(&mut ops, 1);
    put_varint(&mut ops, 1);
    let (head, tail, payload) = trimmed_delta(base, n);
    assert_eq!(payload[..4], [0x28, 0xb5, 0x2f, 0xfd]);
    for v in [n.len(), head, tail, payload.len() - 4] {
        put_varint(&mut ops, v as u64);
    }
    ops.extend_from_slice(&payload[4..]);
    let mut lits = vec![wire::CODEC_RAW];
    put_varint(&mut lits, 0);
    batch(&ops, 1, &lits)
}

#[test]
fn edited_run_over_a_wrong_walk_is_requested_not_delivered() {
    use ditto_dedup::ChunkId;
    let mut rng = rand::rngs::StdRng::seed_from_u64(16);
    let a = random_bytes(&mut rng, 1_000);
    let base = random_bytes(&mut rng, 1_000);
    // Another chunk of the same length: an edit meant for `base` applies to it without error.
    let other = random_bytes(&mut rng, 1_000);
    let mut n = base.clone();
    n[500..504].copy_from_slice(b"EDIT");
    let op = erun(&a, &base, &n);
    let decoder_whose_walk_reaches = |next: &[u8]| {
        let s = ram_store(1 << 20);
        for c in [&a, &base, &other] {
            s.insert(&ChunkId::of(c), c).expect("insert");
        }
        s.set_successor(&ChunkId::of(&a), &ChunkId::of(next));
        let v = Arc::new(PeerView::new(s.identity()));
        Decoder::new(s, v, EngineConfig::default())
    };
    // Hints that agree with the encoder's: `a` and the edited chunk, byte for byte.
    let mut dec = decoder_whose_walk_reaches(&base);
    assert_eq!(decode_all(&mut dec, &op), Ok([&a[..], &n[..]].concat()));
    // Hints that lead the walk to `other`: the edit rebuilds a chunk of the right length from it,
    // but not the one the digest names. Nothing is output; the run is requested.
    let mut dec = decoder_whose_walk_reaches(&other);
    assert_eq!(decode_all(&mut dec, &op), Ok(Vec::new()));
    let st = dec.stats();
    assert_eq!((st.run_mismatches, st.needs_sent), (1, 1), "{st:?}");
    // The encoder's answer carries the run's bytes and lengths; a fill of other bytes is refused.
    let fill = |second: &[u8]| {
        let mut body = Vec::new();
        put_varint(&mut body, 0);
        put_varint(&mut body, 0);
        put_varint(&mut body, 2);
        put_varint(&mut body, a.len() as u64);
        put_varint(&mut body, second.len() as u64);
        body.push(wire::CODEC_RAW);
        put_varint(&mut body, (a.len() + second.len()) as u64);
        body.extend_from_slice(&a);
        body.extend_from_slice(second);
        let mut m = Vec::new();
        wire::put_message(&mut m, wire::MSG_FILL, &body);
        m
    };
    let mut wrong = decoder_whose_walk_reaches(&other);
    assert_eq!(decode_all(&mut wrong, &op), Ok(Vec::new()));
    assert!(matches!(
        decode_all(&mut wrong, &fill(&other)),
        Err(WireError::FillMismatch { .. })
    ));
    assert_eq!(
        decode_all(&mut dec, &fill(&n)),
        Ok([&a[..], &n[..]].concat())
    );
    // A walk that ends early (no hint after `a`) is requested too.
    let s = ram_store(1 << 20);
    s.insert(&ChunkId::of(&a), &a).expect("insert");
    let v = Arc::new(PeerView::new(s.identity()));
    let mut dec = Decoder::new(s, v, EngineConfig::default());
    assert_eq!(decode_all(&mut dec, &op), Ok(Vec::new()));
    assert_eq!(dec.stats().needs_sent, 1);
}

#[test]
fn malformed_edited_runs_are_refused() {
    // count, first id, digest, then the edits: (gap, raw_len, head, tail, plen) each, no payloads.
    let erun = |count: u64, edits: &[[u64; 5]]| {
        let mut ops = vec![wire::OP_ERUN];
        put_varint(&mut ops, count);
        ops.extend_from_slice(&[7u8; 32]);
        put_varint(&mut ops, edits.len() as u64);
        for e in edits {
            for v in e {
                put_varint(&mut ops, *v);
            }
        }
        let mut lits = vec![wire::CODEC_RAW];
        put_varint(&mut lits, 0);
        decode_all(&mut decoder(), &batch(&ops, 1, &lits))
    };
    let malformed = |r: Result<Vec<u8>, WireError>| matches!(r, Err(WireError::Malformed(_)));
    let too_large = |r: Result<Vec<u8>, WireError>| matches!(r, Err(WireError::TooLarge { .. }));
    let mib = wire::MAX_CHUNK as u64;
    assert!(malformed(erun(1, &[[0, 10, 0, 0, 0]])), "a run of one");
    assert!(malformed(erun(3, &[])), "no edits");
    assert!(
        too_large(erun(3, &[[0, 10, 0, 0, 0]; 4])),
        "more edits than chunks"
    );
    assert!(
        malformed(erun(3, &[[3, 10, 0, 0, 0]])),
        "an edit past the end"
    );
    assert!(
        malformed(erun(3, &[[1, 10, 0, 0, 0], [1, 10, 0, 0, 0]])),
        "past the end"
    );
    assert!(
        too_large(erun(3, &[[0, mib + 1, 0, 0, 0]])),
        "a chunk too large"
    );
    assert!(
        too_large(erun(3, &[[0, 10, 11, 0, 0]])),
        "ends longer than the chunk"
    );
    assert!(
        too_large(erun(3, &[[0, 10, 5, 6, 0]])),
        "ends longer than the chunk"
    );
    // Edits that would decode to more than a decoder holds for one run.
    let n = wire::MAX_RUN_EDIT_BYTES / mib + 1;
    assert!(too_large(erun(n, &vec![[0, mib, 0, 0, 0]; n as usize])));
    // Within every limit: the walk finds nothing in an empty store, so the run is requested.
    assert_eq!(erun(3, &[[1, 10, 0, 0, 0]]), Ok(Vec::new()));
}
