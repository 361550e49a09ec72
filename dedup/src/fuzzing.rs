//! Entry points for fuzzing untrusted input (shared by the cargo-fuzz targets in `fuzz/` and by the
//! test that replays their corpus): the data and feedback streams from a peer, and the store's
//! segment files on disk. Whatever the input, these must return without panicking, and the
//! memory they use stays bounded by the engine's limits.

use crate::{ChunkStore, Decoder, Encoder, EngineConfig, PeerView, StoreConfig};
use std::sync::Arc;

fn pair() -> (Arc<ChunkStore>, Arc<PeerView>, EngineConfig) {
    let store = match ChunkStore::open(StoreConfig::in_memory(1 << 20)) {
        Ok(s) => Arc::new(s),
        Err(e) => panic!("a RAM store cannot fail to open: {e}"),
    };
    let view = Arc::new(PeerView::new(store.identity()));
    let cfg = EngineConfig {
        max_output_buffer: 1 << 16,
        ..EngineConfig::default()
    };
    (store, view, cfg)
}

/// Feeds `data` to a decoder as the peer's data stream, in pieces whose sizes come from the first byte,
/// reading output as it goes. Seeds a few chunks into the store so references can resolve.
pub fn decoder(data: &[u8]) {
    let (store, view, cfg) = pair();
    let seeds = [&b"ditto"[..], &[0u8; 4096][..], &[1u8; 1024][..]];
    for seed in seeds {
        let _ = store.insert(&crate::ChunkId::of(seed), seed);
    }
    // Hints for runs to walk (and ERUNs to rebuild edits along): "ditto", zeros, ones.
    for pair in seeds.windows(2) {
        store.set_successor(&crate::ChunkId::of(pair[0]), &crate::ChunkId::of(pair[1]));
    }
    let mut dec = Decoder::new(store, view, cfg);
    let piece = data.first().map_or(1, |&b| usize::from(b) * 7 + 1);
    let mut out = Vec::new();
    let mut fb = Vec::new();
    for part in data.get(1..).unwrap_or_default().chunks(piece) {
        if dec.receive(part).is_err() {
            return;
        }
        out.clear();
        if dec.read(&mut out).is_err() {
            return;
        }
        dec.feedback(&mut fb);
        fb.clear();
    }
}

/// Feeds `data` to an encoder as the peer's feedback stream after it has sent a little data.
pub fn encoder_feedback(data: &[u8]) {
    let (store, view, cfg) = pair();
    let mut enc = Encoder::new(store, view, cfg);
    let mut out = Vec::new();
    enc.write(&[7u8; 50_000], &mut out);
    enc.flush(&mut out);
    let _ = enc.feedback(data, &mut out);
}

/// The key and store id the fuzzing of sealed segment files uses.
fn fuzz_sealer() -> crate::store::seal::Sealer {
    use crate::store::{seal::Sealer, StoreId, StoreKey};
    Sealer::new(&StoreKey::from_bytes([0x5e; 32]), StoreId(0xd1770))
}

/// Scans `data` as the bytes of a chunk store segment file, as recovery does at startup: once as a
/// plain segment, once as segment 1 of a sealed store (the key of [`store_records_seeds`]). Every
/// record the scan reports must lie inside `data` and hold what its header says.
pub fn store_records(data: &[u8]) {
    use crate::store::record::{scan, scan_sealed, Record};
    let mut opened = data.to_vec();
    let mut found = Vec::new();
    let summary = scan_sealed(&mut opened, &fuzz_sealer(), 1, |r| found.push(r));
    assert!(summary.good_end <= data.len());
    for r in found {
        if let Record::Chunk { id, payload, len } = r {
            let Some(bytes) = opened.get(payload..payload + len as usize) else {
                panic!("sealed chunk record at {payload} with {len} bytes past the segment's end");
            };
            assert!(
                id.matches(bytes),
                "sealed chunk record at {payload} does not hold its chunk"
            );
        }
    }
    let summary = scan(data, |r| {
        if let Record::Chunk { id, payload, len } = r {
            let Some(bytes) = data.get(payload..payload + len as usize) else {
                panic!("chunk record at {payload} with {len} bytes past the segment's end");
            };
            assert!(
                id.matches(bytes),
                "chunk record at {payload} does not hold its chunk"
            );
        }
    });
    assert!(summary.good_end <= data.len());
}

/// Segment files to start fuzzing [`store_records`] from: valid chunk and successor records, a torn
/// tail, garbage between records.
pub fn store_records_seeds() -> Vec<Vec<u8>> {
    use crate::store::record::{encode_chunk, encode_succ};
    let chunks: Vec<Vec<u8>> = (0u8..4)
        .map(|i| {
            (0..40 + usize::from(i) * 7)
                .map(|j| (j as u8) ^ i)
                .collect()
        })
        .collect();
    let ids: Vec<crate::ChunkId> = chunks.iter().map(|c| crate::ChunkId::of(c)).collect();
    let mut clean = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        encode_chunk(&mut clean, &ids[i], c);
        if i > 0 {
            encode_succ(&mut clean, &ids[i - 1], &ids[i]);
        }
    }
    let mut torn = clean.clone();
    torn.truncate(clean.len() - 9);
    let mut garbage = clean[..clean.len() / 2].to_vec();
    garbage.extend_from_slice(b"garbage between records");
    garbage.extend_from_slice(&clean[clean.len() / 2..]);
    let mut one = Vec::new();
    encode_chunk(&mut one, &ids[0], &chunks[0]);
    // The same, sealed as segment 1 of the store `store_records` opens sealed segments of.
    let fmt = crate::store::record::Format::Sealed;
    let mut sealed = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        fmt.encode_chunk(&mut sealed, &ids[i], c);
        if i > 0 {
            fmt.encode_succ(&mut sealed, &ids[i - 1], &ids[i]);
        }
    }
    crate::store::record::seal_all(&fuzz_sealer(), &mut sealed, 1, 0);
    let mut sealed_torn = sealed.clone();
    sealed_torn.truncate(sealed.len() - 9);
    let mut sealed_garbage = sealed[..sealed.len() / 2].to_vec();
    sealed_garbage.extend_from_slice(b"garbage between records");
    sealed_garbage.extend_from_slice(&sealed[sealed.len() / 2..]);
    vec![
        clean,
        torn,
        garbage,
        one,
        sealed,
        sealed_torn,
        sealed_garbage,
    ]
}

/// Store summaries from a peer. The first byte chooses: even, `data` is a sequence of summary
/// messages (each preceded by its length, u16 big-endian) for a learner; odd, `data` is the bytes
/// of a persisted view file. Whatever is believed afterwards must come from a part that parsed.
pub fn summary(data: &[u8]) {
    use crate::summary::{Msg, Reconciler};
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let store = crate::StoreId(0x5eed);
    if mode % 2 == 1 {
        let v = crate::PeerView::from_log_bytes(store, rest);
        let _ = v.summarized_chunks();
        return;
    }
    let view = std::sync::Arc::new(crate::PeerView::new(store));
    let mut r = Reconciler::new(view.clone(), None);
    let now = std::time::Instant::now();
    let mut out = Vec::new();
    let mut rest = rest;
    let mut parsed = false;
    while rest.len() >= 2 {
        let n = usize::from(u16::from_be_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let (m, tail) = rest[2..].split_at(n);
        parsed |= matches!(Msg::parse(m), Ok(Msg::Part(_)));
        let _ = r.on_message(m, now, &mut out);
        rest = tail;
    }
    r.poll(now + std::time::Duration::from_secs(60), &mut out);
    assert!(parsed || view.summarized_chunks() == 0);
}

/// Seeds for [`summary`]: a real exchange's messages (an index and parts of a store), and the view
/// file they leave.
pub fn summary_seeds() -> Vec<Vec<u8>> {
    use crate::summary::{Msg, Part, SegInfo};
    let keys: Vec<u64> = (1..200u64).map(|i| i * 5_000_000_007 % (1 << 40)).collect();
    let mut keys = keys;
    keys.sort_unstable();
    keys.dedup();
    let (k, bits) = crate::summary::encode_keys(&keys);
    let fold = keys.iter().fold(0u64, |a, x| a.wrapping_add(*x));
    let part = Part {
        seq: 1,
        from: 0,
        to: 900_000,
        fold_before: 0,
        fold,
        count: keys.len() as u32,
        k,
        bits,
    };
    let msgs = [
        Msg::Index {
            first: true,
            last: true,
            entries: vec![SegInfo {
                seq: 1,
                len: 900_000,
                keys: keys.len() as u32,
                fold,
            }],
        },
        Msg::Part(part.clone()),
        Msg::Gone { seq: 1 },
        Msg::Want { seq: 1, from: 0 },
    ];
    let mut exchange = vec![0u8];
    for m in &msgs {
        let b = m.encode();
        exchange.extend_from_slice(&(b.len() as u16).to_be_bytes());
        exchange.extend_from_slice(&b);
    }
    let view = crate::PeerView::new(crate::StoreId(0x5eed));
    view.apply_part(&part);
    let mut file = vec![1u8];
    file.extend_from_slice(&view.log_bytes());
    let mut torn = file.clone();
    torn.truncate(file.len() - 7);
    vec![exchange, file, torn]
}

/// The streaming chunker, fed `data` in pieces of 1 to 64 bytes (their sizes read from the data
/// itself), cuts where one pass over all of it cuts, at small and at default chunk sizes. A
/// difference panics: boundaries that depend on how a stream was read would be a bug.
pub fn chunker(data: &[u8]) {
    use crate::chunker::{chunk_all, chunk_in_pieces, ChunkParams};
    let small = ChunkParams {
        min_size: 64,
        avg_size: 256,
        max_size: 1024,
    };
    for params in [small, ChunkParams::default()] {
        let lens = chunk_in_pieces(params, data, |rest| 1 + usize::from(rest[0]) % 64);
        assert_eq!(
            chunk_all(params, data),
            lens,
            "boundaries depend on the read sizes"
        );
    }
}

/// Seed inputs for [`chunker`]: noise, text and zeros, long enough for many cuts at small sizes.
pub fn chunker_seeds() -> Vec<Vec<u8>> {
    let mut noise = vec![0u8; 4000];
    blake3::Hasher::new()
        .update(b"chunker seed")
        .finalize_xof()
        .fill(&mut noise);
    let text = b"COPY t (a, b) FROM stdin;\n1\thello\n2\tworld\n".repeat(90);
    let mut mixed = noise[..1500].to_vec();
    mixed.extend(std::iter::repeat_n(0u8, 1500));
    mixed.extend_from_slice(&text[..1000]);
    vec![noise, text, mixed]
}
