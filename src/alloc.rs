//! The allocator's own figures, exported with the node's metrics: where a node's memory is
//! (in live objects, in pages the allocator holds for reuse, in its own tables), so that "RSS went
//! up" can be told apart from "something is kept alive" without a debugger.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntGaugeVec, Opts};
use std::cell::Cell;
use std::time::{Duration, Instant};
use tikv_jemalloc_ctl::{epoch, stats};

/// `ditto_allocator_bytes{kind}`, read from jemalloc at each scrape.
pub struct AllocatorStats {
    gauge: IntGaugeVec,
}

impl AllocatorStats {
    pub fn new() -> prometheus::Result<AllocatorStats> {
        let gauge = IntGaugeVec::new(
            Opts::new(
                "ditto_allocator_bytes",
                "The memory allocator's figures: allocated (live objects), active (pages holding \
                 them), resident (pages of the allocator in RAM, its tables and freed pages not \
                 yet returned included), metadata (its own tables), retained (address space kept \
                 for reuse, not in RAM).",
            ),
            &["kind"],
        )?;
        Ok(AllocatorStats { gauge })
    }
}

impl Collector for AllocatorStats {
    fn desc(&self) -> Vec<&Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        // jemalloc's statistics are a snapshot taken when the epoch advances. A figure it cannot
        // read is left out rather than shown as zero.
        if epoch::advance().is_ok() {
            let figures = [
                ("allocated", stats::allocated::read()),
                ("active", stats::active::read()),
                ("resident", stats::resident::read()),
                ("metadata", stats::metadata::read()),
                ("retained", stats::retained::read()),
            ];
            for (kind, v) in figures {
                if let Ok(v) = v {
                    self.gauge
                        .with_label_values(&[kind])
                        .set(i64::try_from(v).unwrap_or(i64::MAX));
                }
            }
        }
        self.gauge.collect()
    }
}

/// How often at most a runtime worker gives its cached objects back when it runs out of work.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// For the runtime's `on_thread_park`: a worker with no more work gives the freed objects its
/// allocator cache keeps back to the arenas, at most once per [`FLUSH_EVERY`]. Without this, a
/// worker that served a burst of thousands of flows and went idle kept the pages those objects
/// pin: RSS stayed at 1.5-1.75x its level before the burst, 1.1-1.2x with this (BENCHMARKS.md,
/// "Memory after a burst, given back"). Once a second costs nothing measurable on a busy worker;
/// an idle one still wakes for the node's periodic tasks (tunnel pings every second, the limits
/// log every 5 s, the metrics history every 10 s), so its cache is flushed soon after the burst.
pub fn worker_idle() {
    thread_local! {
        static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
    }
    let now = Instant::now();
    LAST.with(|last| {
        if last
            .get()
            .is_none_or(|t| now.duration_since(t) >= FLUSH_EVERY)
        {
            last.set(Some(now));
            crate::sys::flush_thread_cache();
        }
    });
}
