//! Engine configuration shared by encoders and decoders.

use crate::chunker::ChunkParams;

/// Tunables of one encoder/decoder. Every buffer the engine keeps has a limit here or in `wire`.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub chunking: ChunkParams,
    /// zstd level for literals (1..=19); 0 turns compression off.
    pub zstd_level: i32,
    /// A batch is sent once it holds this many literal bytes (bigger batches compress better).
    pub batch_literal_bytes: usize,
    /// A batch is sent once it stands for this many stream bytes (bounds what a request can ask back).
    pub batch_stream_bytes: usize,
    /// Longest run of references sent as one op (a run the peer cannot follow costs at most this many
    /// chunks resent).
    pub max_run: u32,
    /// The decoder stops producing output while this many decoded bytes wait to be read.
    pub max_output_buffer: usize,
    /// Send edited chunks as TDELTA ops (trimmed to the bytes between the first and the last edit)
    /// rather than whole-chunk DELTAs. Only for a peer whose decoder knows TDELTA: every decoder
    /// of this version does; the tunnel turns it off for a peer older than tunnel protocol 5.
    pub trimmed_deltas: bool,
    /// Let a run of successor-hinted chunks carry edited chunks as deltas against the chunks the
    /// walk reaches (ERUN ops), instead of ending the run at each edit: a changed row costs its
    /// delta and a few bytes, not a base id and a new run. Only for a peer whose decoder knows
    /// ERUN: the tunnel turns it off for a peer older than tunnel protocol 6. Needs
    /// `trimmed_deltas`.
    pub edited_runs: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            chunking: ChunkParams::default(),
            zstd_level: 3,
            batch_literal_bytes: 1 << 20,
            batch_stream_bytes: 4 << 20,
            max_run: 1024,
            max_output_buffer: 4 << 20,
            trimmed_deltas: true,
            edited_runs: true,
        }
    }
}

impl EngineConfig {
    pub fn validate(&self) -> Result<(), String> {
        self.chunking.validate()?;
        if !(0..=19).contains(&self.zstd_level) {
            return Err(format!("zstd level {} is outside 0..=19", self.zstd_level));
        }
        if self.batch_literal_bytes == 0 || self.batch_literal_bytes > crate::wire::MAX_MESSAGE / 2
        {
            return Err("batch_literal_bytes must be between 1 and 4 MiB".into());
        }
        if self.batch_stream_bytes < self.chunking.max_size as usize
            || self.batch_stream_bytes as u64 > crate::wire::MAX_BATCH_DECODED / 2
        {
            return Err("batch_stream_bytes must be between the max chunk size and 32 MiB".into());
        }
        if self.max_run == 0 || u64::from(self.max_run) > crate::wire::MAX_RUN {
            return Err(format!(
                "max_run must be between 1 and {}",
                crate::wire::MAX_RUN
            ));
        }
        Ok(())
    }
}
