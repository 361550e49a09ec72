//! The per-stream codecs: what turns LAN bytes into tunnel DATA and back.
//!
//! Everything the tunnel needs from the dedup engine goes through [`SendCodec`] and [`RecvCodec`], so
//! the tunnel does not care whether a stream is deduplicated (`ditto-dedup`'s Encoder/Decoder) or
//! carried verbatim ([`Engine::Raw`], used to measure the tunnel alone and for links where dedup is
//! switched off). Both ends must use the same engine; the hello checks it.

use std::sync::Arc;

/// The engine rejected bytes from the peer: the stream is reset.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CodecError(pub String);

/// Counters an encoder keeps, as totals since it was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendStats {
    pub input_bytes: u64,
    pub output_bytes: u64,
    pub dedup_saved_bytes: u64,
    pub compression_saved_bytes: u64,
    /// Chunks sent as references.
    pub references: u64,
    /// References the peer asked for again (NEED).
    pub needs: u64,
}

/// Counters a decoder keeps, as totals since it was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecvStats {
    pub chunk_misses: u64,
    pub verify_failures: u64,
}

/// The sending half of a stream direction (LAN → tunnel).
pub trait SendCodec: Send {
    /// Encodes `data`, appending bytes for the peer (possibly none yet) to `out`.
    fn write(&mut self, data: &[u8], out: &mut Vec<u8>);
    /// The LAN socket has nothing more right now: everything pending leaves.
    fn flush(&mut self, out: &mut Vec<u8>);
    /// The LAN client half-closed: the stream's input is complete and everything leaves.
    fn finish(&mut self, out: &mut Vec<u8>);
    /// Feedback from the peer's decoder; answers (resent chunks) are appended to `out`.
    fn feedback(&mut self, fb: &[u8], out: &mut Vec<u8>) -> Result<(), CodecError>;
    /// Unacknowledged input bytes kept to answer requests.
    fn retained_bytes(&self) -> usize;
    fn stats(&self) -> SendStats;
    /// Output bytes from the start to the end of the first unit the peer can decode and deliver
    /// (0: not known yet, or any byte is one).
    fn first_unit(&self) -> usize {
        0
    }
}

/// The receiving half of a stream direction (tunnel → LAN).
pub trait RecvCodec: Send {
    /// Bytes from the peer's encoder, any split.
    fn receive(&mut self, data: &[u8]) -> Result<(), CodecError>;
    /// Appends decoded bytes ready for the LAN, in order.
    fn read(&mut self, out: &mut Vec<u8>) -> Result<(), CodecError>;
    /// Appends feedback for the peer's encoder.
    fn feedback(&mut self, out: &mut Vec<u8>);
    /// Every received op has been output: nothing waits for missing chunks.
    fn is_idle(&self) -> bool;
    /// Some op waits for bytes requested from the peer's encoder.
    fn is_stalled(&self) -> bool;
    /// Received bytes not yet decoded (waiting behind a missing chunk).
    fn queued_bytes(&self) -> usize;
    fn stats(&self) -> RecvStats;
}

/// Which engine a node runs.
#[derive(Clone)]
pub enum Engine {
    /// Bytes carried verbatim. `id` stands in for the store identity in the hello.
    Raw { id: u128 },
    /// The dedup engine over a chunk store shared by all streams and peers.
    Dedup {
        store: Arc<ditto_dedup::ChunkStore>,
        config: ditto_dedup::EngineConfig,
    },
}

/// What a peer view is for each engine: the dedup engine's belief of the peer's store, or nothing.
#[derive(Clone)]
pub enum View {
    Raw,
    Dedup(Arc<ditto_dedup::PeerView>),
}

impl Engine {
    /// A raw engine with a random identity.
    pub fn raw() -> Engine {
        Engine::Raw { id: random_u128() }
    }

    /// The name both ends compare in the hello.
    pub fn codec_name(&self) -> &'static str {
        match self {
            Engine::Raw { .. } => "raw",
            Engine::Dedup { .. } => "dedup/1",
        }
    }

    /// The chunking parameters id sent in the hello (informational: mismatches still interoperate).
    pub fn chunking_id(&self) -> String {
        match self {
            Engine::Raw { .. } => "none".to_owned(),
            Engine::Dedup { config, .. } => config.chunking.id(),
        }
    }

    /// Our store identity.
    pub fn store_id(&self) -> u128 {
        match self {
            Engine::Raw { id } => *id,
            Engine::Dedup { store, .. } => store.identity().0,
        }
    }

    /// A view for a peer store. With a disk tier it is kept in `<store dir>/peers` (sealed with
    /// the store key), so what the peer's summaries told us survives our restarts.
    pub fn new_view(&self, peer_store: u128) -> View {
        match self {
            Engine::Raw { .. } => View::Raw,
            Engine::Dedup { store, .. } => {
                let id = ditto_dedup::StoreId(peer_store);
                View::Dedup(ditto_dedup::PeerView::open_for(store, id))
            }
        }
    }

    /// What describes our store to peers: with a disk tier only (a RAM-only store forgets its
    /// chunks on restart; peers learn it from our traffic alone).
    pub fn summarizer(&self) -> Option<Arc<ditto_dedup::Summarizer>> {
        match self {
            Engine::Dedup { store, .. } if store.dir().is_some() => {
                Some(Arc::new(ditto_dedup::Summarizer::new(store.clone())))
            }
            _ => None,
        }
    }

    /// Store occupancy (bytes, chunks), when there is a store.
    pub fn store_usage(&self) -> Option<(u64, u64)> {
        match self {
            Engine::Raw { .. } => None,
            Engine::Dedup { store, .. } => {
                let s = store.stats();
                Some((s.bytes, s.chunks))
            }
        }
    }

    /// An encoder/decoder pair for one stream to a peer that speaks tunnel protocol
    /// `peer_version` (the encoder sends only ops the peer's decoder knows).
    pub fn pair(&self, view: &View, peer_version: u16) -> (Box<dyn SendCodec>, Box<dyn RecvCodec>) {
        match (self, view) {
            (Engine::Dedup { store, config }, View::Dedup(v)) => {
                // The codecs run on async workers: a chunk read that must wait for the disk hands
                // the worker's other tasks to another thread first (idempotent, first call wins).
                store.set_blocking_section(off_worker);
                self.dedup_pair(store, &config_for(config, peer_version), v)
            }
            // A raw view with a dedup engine cannot happen (views come from the same engine);
            // carrying bytes verbatim is the safe answer if it ever did.
            _ => (Box::new(RawSend::default()), Box::new(RawRecv::default())),
        }
    }

    fn dedup_pair(
        &self,
        store: &Arc<ditto_dedup::ChunkStore>,
        config: &ditto_dedup::EngineConfig,
        v: &Arc<ditto_dedup::PeerView>,
    ) -> (Box<dyn SendCodec>, Box<dyn RecvCodec>) {
        (
            Box::new(DedupSend(ditto_dedup::Encoder::new(
                store.clone(),
                v.clone(),
                config.clone(),
            ))),
            Box::new(DedupRecv(ditto_dedup::Decoder::new(
                store.clone(),
                v.clone(),
                config.clone(),
            ))),
        )
    }
}

/// The engine settings of a stream to a peer that speaks tunnel protocol `peer_version`: a
/// peer's decoder older than version 6 does not know ERUN ops, so its edited chunks end runs; one
/// older than version 5 does not know TDELTA ops either, so it gets whole-chunk DELTAs.
fn config_for(config: &ditto_dedup::EngineConfig, peer_version: u16) -> ditto_dedup::EngineConfig {
    let mut config = config.clone();
    config.trimmed_deltas &= peer_version >= crate::hello::TRIMMED_DELTAS;
    config.edited_runs &= config.trimmed_deltas && peer_version >= crate::hello::EDITED_RUNS;
    config
}

/// The chunk store's blocking section (see `ChunkStore::set_blocking_section`): on a worker of a
/// multi-threaded tokio runtime, a read that waits for the disk runs in `block_in_place`, so the
/// worker's other tasks (other flows) move to another thread instead of waiting behind it. Elsewhere
/// (a current-thread runtime, a plain thread) it just runs. Reads the page cache holds never get here.
fn off_worker(read: &mut dyn FnMut()) {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(read)
        }
        _ => read(),
    }
}

/// 128 random bits from the OS (ring's system RNG).
pub fn random_u128() -> u128 {
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; 16];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        // No OS randomness is not worth refusing to start a raw engine over: fall back to the clock.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        return t ^ (u128::from(std::process::id()) << 64);
    }
    u128::from_le_bytes(b)
}

#[derive(Default)]
struct RawSend {
    stats: SendStats,
}

impl SendCodec for RawSend {
    fn write(&mut self, data: &[u8], out: &mut Vec<u8>) {
        self.stats.input_bytes += data.len() as u64;
        self.stats.output_bytes += data.len() as u64;
        out.extend_from_slice(data);
    }
    fn flush(&mut self, _out: &mut Vec<u8>) {}
    fn finish(&mut self, _out: &mut Vec<u8>) {}
    fn feedback(&mut self, fb: &[u8], _out: &mut Vec<u8>) -> Result<(), CodecError> {
        if fb.is_empty() {
            Ok(())
        } else {
            Err(CodecError("raw streams carry no feedback".into()))
        }
    }
    fn retained_bytes(&self) -> usize {
        0
    }
    fn stats(&self) -> SendStats {
        self.stats
    }
}

#[derive(Default)]
struct RawRecv {
    buf: Vec<u8>,
}

impl RecvCodec for RawRecv {
    fn receive(&mut self, data: &[u8]) -> Result<(), CodecError> {
        self.buf.extend_from_slice(data);
        Ok(())
    }
    fn read(&mut self, out: &mut Vec<u8>) -> Result<(), CodecError> {
        if out.is_empty() {
            std::mem::swap(out, &mut self.buf);
        } else {
            out.append(&mut self.buf);
        }
        Ok(())
    }
    fn feedback(&mut self, _out: &mut Vec<u8>) {}
    fn is_idle(&self) -> bool {
        true
    }
    fn is_stalled(&self) -> bool {
        false
    }
    fn queued_bytes(&self) -> usize {
        0
    }
    fn stats(&self) -> RecvStats {
        RecvStats::default()
    }
}

struct DedupSend(ditto_dedup::Encoder);

impl SendCodec for DedupSend {
    fn write(&mut self, data: &[u8], out: &mut Vec<u8>) {
        self.0.write(data, out);
    }
    fn flush(&mut self, out: &mut Vec<u8>) {
        self.0.flush(out);
    }
    fn finish(&mut self, out: &mut Vec<u8>) {
        self.0.finish(out);
    }
    fn feedback(&mut self, fb: &[u8], out: &mut Vec<u8>) -> Result<(), CodecError> {
        self.0
            .feedback(fb, out)
            .map_err(|e| CodecError(e.to_string()))
    }
    fn retained_bytes(&self) -> usize {
        self.0.retained_bytes()
    }
    fn first_unit(&self) -> usize {
        self.0.first_unit()
    }
    fn stats(&self) -> SendStats {
        let s = self.0.stats();
        SendStats {
            input_bytes: s.input_bytes,
            output_bytes: s.output_bytes,
            dedup_saved_bytes: s.dedup_saved_bytes,
            compression_saved_bytes: s.compression_saved_bytes,
            references: s.chunks_deduped,
            needs: s.needs_received,
        }
    }
}

struct DedupRecv(ditto_dedup::Decoder);

impl RecvCodec for DedupRecv {
    fn receive(&mut self, data: &[u8]) -> Result<(), CodecError> {
        self.0.receive(data).map_err(|e| CodecError(e.to_string()))
    }
    fn read(&mut self, out: &mut Vec<u8>) -> Result<(), CodecError> {
        self.0.read(out).map_err(|e| CodecError(e.to_string()))
    }
    fn feedback(&mut self, out: &mut Vec<u8>) {
        self.0.feedback(out);
    }
    fn is_idle(&self) -> bool {
        self.0.is_idle()
    }
    fn is_stalled(&self) -> bool {
        self.0.is_stalled()
    }
    fn queued_bytes(&self) -> usize {
        self.0.queued_bytes()
    }
    fn stats(&self) -> RecvStats {
        let s = self.0.stats();
        RecvStats {
            // Each NEED names one op the decoder could not resolve from its store.
            chunk_misses: s.needs_sent,
            verify_failures: s.run_mismatches,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn older_peers_get_whole_chunk_deltas() {
        let cfg = ditto_dedup::EngineConfig::default();
        assert!(cfg.trimmed_deltas);
        for old in [3, 4] {
            assert!(!config_for(&cfg, old).trimmed_deltas, "version {old}");
        }
        assert!(config_for(&cfg, crate::hello::TRIMMED_DELTAS).trimmed_deltas);
        assert!(config_for(&cfg, crate::hello::PROTOCOL_VERSION).trimmed_deltas);
        let off = ditto_dedup::EngineConfig {
            trimmed_deltas: false,
            ..cfg
        };
        assert!(!config_for(&off, crate::hello::PROTOCOL_VERSION).trimmed_deltas);
        assert!(!config_for(&off, crate::hello::PROTOCOL_VERSION).edited_runs);
    }

    #[test]
    fn only_version_6_peers_get_edited_runs() {
        let cfg = ditto_dedup::EngineConfig::default();
        assert!(cfg.edited_runs);
        for old in [3, 4, 5] {
            assert!(!config_for(&cfg, old).edited_runs, "version {old}");
        }
        assert!(config_for(&cfg, crate::hello::EDITED_RUNS).edited_runs);
        assert!(config_for(&cfg, crate::hello::PROTOCOL_VERSION).edited_runs);
    }
}
