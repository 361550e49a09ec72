//! # ditto-dedup: the sans-IO dedup engine
//!
//! (crate documentation is completed with the encoder; see docs/protocol.md)

#![forbid(unsafe_code)]

pub mod fingerprint;
pub mod store;

pub use fingerprint::{ChunkId, CHUNK_ID_LEN};
