//! # ditto-dedup: the sans-IO dedup engine
//!
//! Bytes in, bytes out: no sockets, no runtime, no clocks (except the chunk store, which paces its
//! retries of a failing disk and writes to disk from a thread of its own, so that no caller ever waits
//! for the disk). The proxy drives these state machines; tests drive them in memory.
//!
//! - [`chunker`]: content-defined chunk boundaries (FastCDC v2020) that do not depend on how the stream
//!   was split into reads.
//! - [`fingerprint`]: chunks are named by 128 bits of BLAKE3.
//! - [`store`]: the chunk store, a RAM tier over an append-only, checksummed disk tier that survives
//!   restarts, written behind a bounded queue.
//! - [`encoder`] / [`decoder`]: one direction of one stream. The encoder emits literals, references and
//!   runs of references; the decoder resolves them and asks for what it lacks.
//! - [`wire`]: the byte encoding, specified in `docs/protocol.md`.
//! - [`summary`]: compact descriptions of a store's disk tier that peers exchange, so each knows what
//!   the other holds across restarts and whoever put it there (`docs/tunnel.md`, section 6a).
//!
//! ## Invariants
//! - **Mirrored, not trusted.** Each side tracks what it believes its peer's store holds ([`PeerView`]):
//!   the chunks it sent to or received from that peer, and what the peer's store summaries
//!   ([`summary`]) list, whoever sent those chunks there; forgotten when the peer announces a new
//!   store identity. The belief only decides efficiency. A reference the decoder cannot resolve is requested
//!   back (`NEED`) and the encoder answers with the exact bytes (`FILL`) from the copy it keeps of every
//!   batch until the decoder acknowledges it. A wrong belief costs a round trip, never a wrong byte.
//! - **Verified.** Chunks read from disk are hashed again before use; a mismatch is a miss. A run of
//!   references is accepted only if the chunk ids found by following the local successor hints hash to
//!   the digest the encoder sent.
//! - **Bounded.** Every length on the wire is checked against a limit before allocation; decompression
//!   writes into a buffer of the declared size; decoded output pauses while unread bytes pile up.

#![forbid(unsafe_code)]

pub mod chunker;
mod compress;
pub mod config;
pub mod decoder;
pub mod encoder;
pub mod fingerprint;
#[doc(hidden)]
pub mod fuzzing;
mod hints;
pub mod peer;
pub mod store;
pub mod summary;
pub mod wire;

pub use chunker::{ChunkParams, Chunker};
pub use config::EngineConfig;
pub use decoder::{Decoder, DecoderStats};
pub use encoder::{Encoder, EncoderStats};
pub use fingerprint::{ChunkId, CHUNK_ID_LEN};
pub use peer::PeerView;
pub use store::{ChunkStore, StoreConfig, StoreError, StoreId, StoreKey, StoreStats};
pub use summary::{Reconciler, Summarizer};
pub use wire::WireError;
