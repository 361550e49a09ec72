//! The admin endpoint: a deliberately tiny HTTP/1.1 server (one request per connection, GET only)
//! serving `/metrics` (Prometheus text), `/healthz`, `/status` (JSON for `ditto status`), a status page
//! at `/` (self-contained HTML that polls `/status` and `/history`) and `/history` (JSON: the savings
//! totals sampled every [`HISTORY_INTERVAL`] over the last hour, then the current totals).
//!
//! Requests are bounded in size and time, and connections in number, so a misbehaving scraper
//! cannot hold resources.

use crate::lifecycle::Lifecycle;
use crate::metrics::HISTORY_INTERVAL;
use crate::status::StatusSource;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MAX_REQUEST: usize = 8 * 1024;
/// Connections at once; past it, a new one replaces the oldest of the address holding the most.
const MAX_CONNECTIONS: usize = 32;
/// Connections at once from one address.
const PER_SOURCE: usize = 8;
/// A request must arrive whole within this long; the answer is then sent within [`REQUEST_TIMEOUT`].
const READ_TIMEOUT: Duration = Duration::from_secs(3);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const STATUS_PAGE: &str = include_str!("status_page.html");

pub(crate) async fn serve(inner: Arc<StatusSource>, life: Lifecycle, listener: TcpListener) {
    let sampler = inner.clone();
    let kill = life.kill.clone();
    life.tasks.spawn(async move {
        let mut tick = tokio::time::interval(HISTORY_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => sampler.metrics.history.push(sampler.metrics.savings_now()),
                _ = kill.cancelled() => return,
            }
        }
    });
    let slots = crate::preauth::PreAuth::new(PER_SOURCE, MAX_CONNECTIONS);
    let metrics = inner.metrics.clone();
    let closed = |why: &str| metrics.preauth_closed.with_label_values(&["admin", why]);
    loop {
        let (sock, from) = tokio::select! {
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!("admin accept: {e}");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                        _ = life.kill.cancelled() => return,
                    }
                }
            },
            _ = life.kill.cancelled() => return,
        };
        let ticket = match slots.admit(from.ip()) {
            crate::preauth::Admit::Ok { ticket, evicted } => {
                if evicted {
                    closed("evicted").inc();
                    metrics
                        .limits
                        .hit(crate::limits::ADMIN_CONNECTIONS, MAX_CONNECTIONS as u64);
                }
                ticket
            }
            crate::preauth::Admit::PerSource => {
                closed("per-source").inc();
                metrics
                    .limits
                    .hit(crate::limits::ADMIN_PER_SOURCE, PER_SOURCE as u64);
                crate::sock::reset(sock);
                continue;
            }
        };
        let inner2 = inner.clone();
        let stopping = life.stop.clone();
        let timeouts = closed("timeout");
        life.tasks.spawn(async move {
            let r = tokio::select! {
                r = tokio::time::timeout(REQUEST_TIMEOUT, handle(&inner2, &stopping, sock)) => r,
                _ = ticket.evicted.cancelled() => return,
            };
            let timed_out = match &r {
                Err(_) => true,
                Ok(Err(e)) => e.kind() == std::io::ErrorKind::TimedOut,
                Ok(Ok(())) => false,
            };
            if timed_out {
                timeouts.inc();
            }
            drop(ticket);
        });
    }
}

async fn handle(
    inner: &StatusSource,
    stopping: &tokio_util::sync::CancellationToken,
    mut sock: TcpStream,
) -> std::io::Result<()> {
    let read_deadline = tokio::time::Instant::now() + READ_TIMEOUT;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() >= MAX_REQUEST {
            return respond(&mut sock, 431, "text/plain", b"request too large\n").await;
        }
        let n = tokio::time::timeout_at(read_deadline, sock.read(&mut chunk))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request too slow"))??;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if method != "GET" && method != "HEAD" {
        return respond(&mut sock, 405, "text/plain", b"only GET\n").await;
    }
    match path {
        "/metrics" => {
            inner.refresh_gauges();
            let body = inner.metrics.render();
            respond(&mut sock, 200, "text/plain; version=0.0.4", body.as_bytes()).await
        }
        "/healthz" => {
            let body = if stopping.is_cancelled() {
                "stopping\n"
            } else {
                "ok\n"
            };
            let code = if stopping.is_cancelled() { 503 } else { 200 };
            respond(&mut sock, code, "text/plain", body.as_bytes()).await
        }
        "/status" => {
            inner.refresh_gauges();
            let body = serde_json::to_vec_pretty(&inner.status()).unwrap_or_default();
            respond(&mut sock, 200, "application/json", &body).await
        }
        "/" => {
            respond(
                &mut sock,
                200,
                "text/html; charset=utf-8",
                STATUS_PAGE.as_bytes(),
            )
            .await
        }
        "/history" => {
            let mut samples = inner.metrics.history.samples();
            samples.push(inner.metrics.savings_now());
            let body = serde_json::to_vec(&samples).unwrap_or_default();
            respond(&mut sock, 200, "application/json", &body).await
        }
        _ => respond(&mut sock, 404, "text/plain", b"not found\n").await,
    }
}

async fn respond(sock: &mut TcpStream, code: u16, ctype: &str, body: &[u8]) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(body).await?;
    sock.shutdown().await
}

/// Fetches `path` from an admin endpoint (used by `ditto status` and tests). Returns (status, body).
pub async fn get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let fut = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut resp = Vec::new();
        s.take(64 << 20).read_to_end(&mut resp).await?;
        let text = String::from_utf8_lossy(&resp).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "no HTTP header end")
        })?;
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, "bad status line")
            })?;
        Ok((code, body.to_owned()))
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "admin request timed out"))?
}
