//! A sender/receiver pair driven in memory: the test harness of the engine.
#![allow(dead_code)]

use ditto_dedup::{ChunkStore, Decoder, Encoder, EngineConfig, PeerView, StoreConfig};
use rand::{Rng, RngCore, SeedableRng};
use std::sync::Arc;

pub fn ram_store(bytes: u64) -> Arc<ChunkStore> {
    Arc::new(ChunkStore::open(StoreConfig::in_memory(bytes)).expect("ram store"))
}

pub fn random_bytes(rng: &mut impl RngCore, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

/// Text-like data: compressible, with repeated words.
pub fn texty(rng: &mut impl Rng, len: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "select", "from", "where", "backup", "replica", "chunk", "the", "of", "and", "table",
        "index", "insert", "value", "commit", "segment", "stream", "ditto", "wan", "link", "\n",
    ];
    let mut v = Vec::with_capacity(len + 16);
    while v.len() < len {
        v.extend_from_slice(WORDS[rng.gen_range(0..WORDS.len())].as_bytes());
        v.push(b' ');
        if rng.gen_ratio(1, 50) {
            v.extend_from_slice(format!("{}", rng.gen::<u32>()).as_bytes());
        }
    }
    v.truncate(len);
    v
}

/// An encoder on A sending to a decoder on B, over an in-order channel in each direction whose delivery
/// is split and delayed at random.
pub struct Link {
    pub enc: Encoder,
    pub dec: Decoder,
    pub data_wire: Vec<u8>,
    pub fb_wire: Vec<u8>,
    pub wire_bytes: u64,
    pub received: Vec<u8>,
    pub rng: rand::rngs::StdRng,
}

impl Link {
    pub fn new(
        a: &Arc<ChunkStore>,
        b: &Arc<ChunkStore>,
        view_a: Arc<PeerView>,
        view_b: Arc<PeerView>,
        cfg: EngineConfig,
        seed: u64,
    ) -> Link {
        Link {
            enc: Encoder::new(a.clone(), view_a, cfg.clone()),
            dec: Decoder::new(b.clone(), view_b, cfg),
            data_wire: Vec::new(),
            fb_wire: Vec::new(),
            wire_bytes: 0,
            received: Vec::new(),
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        }
    }

    /// Delivers a random part of what is in flight in both directions.
    pub fn step(&mut self) {
        if !self.data_wire.is_empty() {
            let n = self.rng.gen_range(1..=self.data_wire.len());
            let piece: Vec<u8> = self.data_wire.drain(..n).collect();
            self.wire_bytes += piece.len() as u64;
            self.dec
                .receive(&piece)
                .expect("decoder accepts the encoder's stream");
        }
        self.dec.read(&mut self.received).expect("read");
        let mut fb = Vec::new();
        self.dec.feedback(&mut fb);
        self.fb_wire.extend_from_slice(&fb);
        if !self.fb_wire.is_empty() {
            let n = self.rng.gen_range(1..=self.fb_wire.len());
            let piece: Vec<u8> = self.fb_wire.drain(..n).collect();
            let mut out = Vec::new();
            self.enc
                .feedback(&piece, &mut out)
                .expect("encoder accepts the decoder's feedback");
            self.data_wire.extend_from_slice(&out);
        }
    }

    /// Runs the link until nothing is in flight.
    pub fn settle(&mut self) {
        for _ in 0..100_000 {
            self.step();
            if self.data_wire.is_empty() && self.fb_wire.is_empty() {
                let mut fb = Vec::new();
                self.dec.feedback(&mut fb);
                if fb.is_empty() && self.dec.readable() == 0 {
                    return;
                }
                self.fb_wire.extend_from_slice(&fb);
            }
        }
        panic!("link did not settle");
    }

    /// Sends `data` in random read sizes up to `max_read`, flushing at random with probability
    /// `flush_ratio`, and returns the wire bytes it cost. The receiver's output must equal `data`.
    pub fn send(&mut self, data: &[u8], max_read: usize, flush_ratio: f64, finish: bool) -> u64 {
        let start_wire = self.wire_bytes;
        self.received.clear();
        let mut rest = data;
        while !rest.is_empty() {
            let n = self.rng.gen_range(1..=max_read.min(rest.len()));
            let mut out = Vec::new();
            self.enc.write(&rest[..n], &mut out);
            rest = &rest[n..];
            if self.rng.gen_bool(flush_ratio) {
                self.enc.flush(&mut out);
            }
            self.data_wire.extend_from_slice(&out);
            if self.rng.gen_ratio(1, 3) {
                self.step();
            }
        }
        let mut out = Vec::new();
        if finish {
            self.enc.finish(&mut out);
        } else {
            self.enc.flush(&mut out);
        }
        self.data_wire.extend_from_slice(&out);
        self.settle();
        self.wire_bytes - start_wire
    }
}

/// Deterministic, distinct chunk contents: chunk `n` of `len` bytes, and its id.
pub fn chunk(n: u32, len: usize) -> (ditto_dedup::ChunkId, Vec<u8>) {
    let mut x = u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut data = Vec::with_capacity(len);
    for _ in 0..len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.push(x as u8);
    }
    if len >= 4 {
        data[..4].copy_from_slice(&n.to_le_bytes());
    }
    (ditto_dedup::ChunkId::of(&data), data)
}
