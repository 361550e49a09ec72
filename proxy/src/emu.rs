//! A small in-process WAN emulator: a TCP relay whose two directions each behave like one
//! bottleneck link shared by all relayed connections — bytes leave at `rate` after waiting their
//! turn, then arrive `delay` later. Enough for `ditto demo` and tests to show what a slow,
//! high-latency link does without root or netem.
//!
//! The bottleneck queue is modelled by backpressure rather than loss: a direction stops reading
//! while its queue holds more than `queue` worth of transmission time.

use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Link parameters, the same in both directions.
#[derive(Clone, Copy, Debug)]
pub struct LinkSpec {
    /// Bits per second.
    pub rate_bps: u64,
    /// One-way propagation delay (RTT = 2 × this).
    pub delay: Duration,
    /// Longest queueing delay at the bottleneck before senders are pushed back.
    pub queue: Duration,
}

impl LinkSpec {
    /// `mbit` Mbit/s with `rtt` round-trip time and a queue of one RTT.
    pub fn new(mbit: f64, rtt: Duration) -> LinkSpec {
        LinkSpec {
            rate_bps: (mbit * 1e6) as u64,
            delay: rtt / 2,
            queue: rtt.max(Duration::from_millis(20)),
        }
    }
}

/// One direction's bottleneck: when it is next free, and the bytes it has carried.
struct Pacer {
    next_free: Mutex<Instant>,
    spec: LinkSpec,
    bytes: AtomicU64,
}

impl Pacer {
    fn new(spec: LinkSpec) -> Arc<Pacer> {
        Arc::new(Pacer {
            next_free: Mutex::new(Instant::now()),
            spec,
            bytes: AtomicU64::new(0),
        })
    }

    /// Schedules `n` bytes; returns when they have fully arrived at the far end.
    fn schedule(&self, n: usize) -> Instant {
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        let tx = Duration::from_secs_f64(n as f64 * 8.0 / self.spec.rate_bps.max(1) as f64);
        let mut nf = self.next_free.lock().unwrap_or_else(|e| e.into_inner());
        let start = (*nf).max(Instant::now());
        *nf = start + tx;
        *nf + self.spec.delay
    }

    /// How long until the queue is short enough to accept more.
    fn backlog(&self) -> Duration {
        let nf = *self.next_free.lock().unwrap_or_else(|e| e.into_inner());
        nf.saturating_duration_since(Instant::now())
    }
}

/// A running emulated link.
pub struct Link {
    pub addr: SocketAddr,
    stop: CancellationToken,
    tasks: TaskTracker,
    up: Arc<Pacer>,
    down: Arc<Pacer>,
}

impl Link {
    /// Listens on `listen`; each accepted connection is relayed to `upstream` through the link.
    pub async fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
        spec: LinkSpec,
    ) -> std::io::Result<Link> {
        let l = TcpListener::bind(listen).await?;
        let addr = l.local_addr()?;
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let (up, down) = (Pacer::new(spec), Pacer::new(spec));
        let (up2, down2) = (up.clone(), down.clone());
        let (stop2, tasks2) = (stop.clone(), tasks.clone());
        tasks.spawn(async move {
            loop {
                let (a, _) = tokio::select! {
                    r = l.accept() => match r { Ok(v) => v, Err(_) => continue },
                    _ = stop2.cancelled() => return,
                };
                let (up, down, stop3) = (up2.clone(), down2.clone(), stop2.clone());
                tasks2.spawn(async move {
                    let Ok(b) = TcpStream::connect(upstream).await else {
                        crate::sock::reset(a);
                        return;
                    };
                    let _ = a.set_nodelay(true);
                    let _ = b.set_nodelay(true);
                    let (ar, aw) = a.into_split();
                    let (br, bw) = b.into_split();
                    tokio::select! {
                        _ = async { tokio::join!(pipe(ar, bw, up), pipe(br, aw, down)) } => {}
                        _ = stop3.cancelled() => {}
                    }
                });
            }
        });
        Ok(Link {
            addr,
            stop,
            tasks,
            up,
            down,
        })
    }

    /// Bytes the link has carried so far, both directions together (TCP payload: what a WAN
    /// carries, less the packet headers).
    pub fn bytes(&self) -> u64 {
        self.up.bytes.load(Ordering::Relaxed) + self.down.bytes.load(Ordering::Relaxed)
    }

    /// Stops the link and every relayed connection.
    pub async fn stop(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

async fn pipe(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    pacer: Arc<Pacer>,
) {
    // Bounded: with the backlog limit this holds at most queue + delay worth of bytes anyway.
    let (tx, mut rx) = mpsc::channel::<Option<(Instant, Bytes)>>(4096);
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let backlog = pacer.backlog();
            if backlog > pacer.spec.queue {
                tokio::time::sleep(backlog - pacer.spec.queue).await;
            }
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = tx.send(None).await;
                    return;
                }
                Ok(n) => {
                    let at = pacer.schedule(n);
                    if tx
                        .send(Some((at, Bytes::copy_from_slice(&buf[..n]))))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some(Some((at, b))) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if w.write_all(&b).await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    };
    tokio::join!(reader, writer);
}
