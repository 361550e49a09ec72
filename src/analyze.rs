//! `ditto analyze FILE...`: what ditto would put on the WAN for these files.
//!
//! The files are sent one after another, each as its own stream, through an encoder and a decoder that
//! share the two sides' stores for the whole run (as two appliances would), and the decoded bytes are
//! checked against the input. Nothing touches the network.

use anyhow::{bail, Context};
use ditto_dedup::{ChunkStore, Decoder, Encoder, EngineConfig, PeerView, StoreConfig};
use serde::Serialize;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Files to send, in order.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// RAM of each side's chunk store, in MiB.
    #[arg(long, default_value_t = 4096)]
    pub store_mib: u64,
    /// Average chunk size in bytes (a power of two; min is a quarter, max four times this).
    #[arg(long, default_value_t = 4096)]
    pub avg_chunk: u32,
    /// zstd level for literals (0 turns compression off).
    #[arg(long, default_value_t = 3)]
    pub zstd_level: i32,
    /// Bytes per read from each file.
    #[arg(long, default_value_t = 1 << 20)]
    pub read_size: usize,
    /// Flush after every read, as a proxy does when its socket runs dry (worst case for dedup).
    #[arg(long)]
    pub flush_every_read: bool,
}

#[derive(Serialize, Default, Clone)]
struct Report {
    file: String,
    input_bytes: u64,
    /// Bytes of the data stream (encoder to decoder).
    wire_bytes: u64,
    /// Bytes of the feedback stream (acknowledgements and requests back).
    feedback_bytes: u64,
    dedup_saved_bytes: u64,
    compression_saved_bytes: u64,
    /// Fraction of the input removed by dedup, and by compression.
    dedup_reduction: f64,
    compression_reduction: f64,
    /// Input bytes over wire bytes.
    ratio: f64,
    seconds: f64,
    throughput_mb_s: f64,
    /// What the data stream was made of.
    chunks: u64,
    literal_chunks: u64,
    delta_chunks: u64,
    reference_ops: u64,
    run_ops: u64,
    batches: u64,
    verified: bool,
}

impl Report {
    fn finish(&mut self) {
        let input = self.input_bytes.max(1) as f64;
        self.dedup_reduction = self.dedup_saved_bytes as f64 / input;
        self.compression_reduction = self.compression_saved_bytes as f64 / input;
        self.ratio = self.input_bytes as f64 / (self.wire_bytes.max(1)) as f64;
        self.throughput_mb_s = self.input_bytes as f64 / 1e6 / self.seconds.max(1e-9);
    }
}

struct Sides {
    cfg: EngineConfig,
    a: Arc<ChunkStore>,
    b: Arc<ChunkStore>,
    view_a: Arc<PeerView>,
    view_b: Arc<PeerView>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let avg = args.avg_chunk;
    let mut cfg = EngineConfig::default();
    cfg.chunking.avg_size = avg;
    cfg.chunking.min_size = avg / 4;
    cfg.chunking.max_size = avg.saturating_mul(4);
    cfg.zstd_level = args.zstd_level;
    cfg.validate()
        .map_err(anyhow::Error::msg)
        .context("invalid --avg-chunk or --zstd-level")?;
    // Check every path before spending time on any.
    for f in &args.files {
        std::fs::File::open(f).with_context(|| format!("cannot read {}", f.display()))?;
    }
    let ram = args.store_mib << 20;
    let a = Arc::new(ChunkStore::open(StoreConfig::in_memory(ram))?);
    let b = Arc::new(ChunkStore::open(StoreConfig::in_memory(ram))?);
    let sides = Sides {
        view_a: Arc::new(PeerView::new(b.identity())),
        view_b: Arc::new(PeerView::new(a.identity())),
        a,
        b,
        cfg,
    };
    if args.read_size == 0 {
        bail!("--read-size must be at least 1");
    }
    let mut reports = Vec::new();
    for f in &args.files {
        reports.push(send_file(&sides, f, args.read_size, args.flush_every_read)?);
    }
    let mut total = Report {
        file: "total".into(),
        verified: reports.iter().all(|r| r.verified),
        ..Report::default()
    };
    for r in &reports {
        total.input_bytes += r.input_bytes;
        total.wire_bytes += r.wire_bytes;
        total.feedback_bytes += r.feedback_bytes;
        total.dedup_saved_bytes += r.dedup_saved_bytes;
        total.compression_saved_bytes += r.compression_saved_bytes;
        total.seconds += r.seconds;
        total.chunks += r.chunks;
        total.literal_chunks += r.literal_chunks;
        total.delta_chunks += r.delta_chunks;
        total.reference_ops += r.reference_ops;
        total.run_ops += r.run_ops;
        total.batches += r.batches;
    }
    total.finish();
    if args.json {
        let out = serde_json::json!({ "files": reports, "total": total });
        println!("{out}");
    } else {
        print_table(&reports, &total);
    }
    if !total.verified {
        eprintln!("ditto: decoded bytes differ from the input: this is a bug, please report it");
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

fn send_file(s: &Sides, path: &PathBuf, read_size: usize, flush: bool) -> anyhow::Result<Report> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut enc = Encoder::new(s.a.clone(), s.view_a.clone(), s.cfg.clone());
    let mut dec = Decoder::new(s.b.clone(), s.view_b.clone(), s.cfg.clone());
    let mut report = Report {
        file: path.display().to_string(),
        ..Report::default()
    };
    let mut in_hash = blake3::Hasher::new();
    let mut out_hash = blake3::Hasher::new();
    let mut buf = vec![0u8; read_size];
    let mut wire = Vec::new();
    let mut fb = Vec::new();
    let mut decoded = Vec::new();
    let start = Instant::now();
    let mut eof = false;
    while !eof {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            enc.finish(&mut wire);
            eof = true;
        } else {
            in_hash.update(&buf[..n]);
            enc.write(&buf[..n], &mut wire);
            if flush {
                enc.flush(&mut wire);
            }
        }
        // Carry both directions until nothing is in flight.
        loop {
            report.wire_bytes += wire.len() as u64;
            dec.receive(&wire)
                .context("decoder refused the encoder's stream")?;
            wire.clear();
            dec.read(&mut decoded).context("decoding failed")?;
            out_hash.update(&decoded);
            decoded.clear();
            dec.feedback(&mut fb);
            if fb.is_empty() {
                break;
            }
            report.feedback_bytes += fb.len() as u64;
            enc.feedback(&fb, &mut wire)
                .context("encoder refused the decoder's feedback")?;
            fb.clear();
        }
    }
    if !dec.is_idle() {
        bail!("the decoder did not finish {}", path.display());
    }
    report.seconds = start.elapsed().as_secs_f64();
    let st = enc.stats();
    report.input_bytes = st.input_bytes;
    report.dedup_saved_bytes = st.dedup_saved_bytes;
    report.compression_saved_bytes = st.compression_saved_bytes;
    report.chunks = st.chunks;
    report.literal_chunks = st.literal_chunks;
    report.delta_chunks = st.delta_chunks;
    report.reference_ops = st.ref_ops;
    report.run_ops = st.run_ops;
    report.batches = st.batches;
    report.verified = in_hash.finalize() == out_hash.finalize();
    report.finish();
    Ok(report)
}

/// Width of the file column; longer paths keep their end, after a leading "…".
const NAME_WIDTH: usize = 40;

fn print_table(reports: &[Report], total: &Report) {
    println!(
        "{:<NAME_WIDTH$} {:>14} {:>14} {:>8} {:>10} {:>10} {:>10} {:>8}",
        "file", "input B", "wire B", "ratio", "dedup %in", "zstd %in", "MB/s", "verified"
    );
    for r in reports.iter().chain(std::iter::once(total)) {
        let empty = r.input_bytes == 0;
        let pct = |x: f64| {
            if empty {
                "-".to_string()
            } else {
                format!("{:.1}%", x * 100.0)
            }
        };
        println!(
            "{:<NAME_WIDTH$} {:>14} {:>14} {:>8} {:>10} {:>10} {:>10} {:>8}",
            shorten(&r.file, NAME_WIDTH),
            r.input_bytes,
            r.wire_bytes,
            if empty {
                "-".to_string()
            } else {
                format!("{:.1}x", r.ratio)
            },
            pct(r.dedup_reduction),
            pct(r.compression_reduction),
            if empty {
                "-".to_string()
            } else {
                format!("{:.0}", r.throughput_mb_s)
            },
            if r.verified { "yes" } else { "NO" }
        );
    }
    println!(
        "dedup %in and zstd %in: share of the input bytes removed by deduplication and by compression"
    );
}

/// `name` if it fits in `width` characters, else "…" and its last `width - 1` characters.
fn shorten(name: &str, width: usize) -> String {
    let n = name.chars().count();
    if n <= width {
        return name.to_string();
    }
    let tail: String = name.chars().skip(n - (width - 1)).collect();
    format!("…{tail}")
}

#[cfg(test)]
mod tests {
    use super::shorten;

    #[test]
    fn long_names_keep_their_end_behind_a_marker() {
        assert_eq!(shorten("short.tar", 40), "short.tar");
        let long = format!("/very/long/{}/backup.tar", "x".repeat(50));
        let s = shorten(&long, 40);
        assert_eq!(s.chars().count(), 40);
        assert!(s.starts_with('…'), "{s}");
        assert!(s.ends_with("/backup.tar"), "{s}");
    }
}
