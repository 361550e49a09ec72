//! A failing chunk store under two real `ditto run` daemons: site-b's `store_dir` is on a small tmpfs
//! that fills up, and later its segment files are overwritten in the middle. Traffic through the
//! forward listener must keep flowing byte-exact throughout; `/metrics`, `/status` and the daemon's log
//! must say what happened and why; freeing space must bring the disk tier back.
//!
//! Mounting a tmpfs needs root: without it the test is skipped (and fails under CI).

mod common;

use common::disk::{segments, Tmpfs};
use common::{ditto, payload, start_server, write_pair, PairConfig, Proc};
use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// `ditto run --config CONFIG` with its log (stderr) in `log`.
fn start_daemon_logged(config: &Path, log: &Path) -> Proc {
    let file = fs::File::create(log).expect("log file");
    Proc(
        ditto()
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn ditto run"),
    )
}

/// GET, the body of a 200 answer.
fn http_get(addr: SocketAddr, target: &str) -> Option<String> {
    common::http_get(addr, target)
        .filter(|r| r.0 == 200)
        .map(|r| r.1)
}

/// The value of one series (`name{labels}` exactly as rendered) in a scrape.
fn value(scrape: &str, series: &str) -> Option<f64> {
    common::series_value(scrape, series)
}

fn metric(admin: SocketAddr, series: &str) -> f64 {
    let m = http_get(admin, "/metrics").expect("scrape /metrics");
    value(&m, series).unwrap_or_else(|| panic!("{series} missing from\n{m}"))
}

/// Polls `cond` until it yields a value, at most `secs` seconds.
fn wait_for<T>(what: &str, secs: u64, mut cond: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends `data` through the forward listener (to the echo server behind site-b) and checks that the
/// reply is exactly `data` reversed.
fn round_trip(fwd: SocketAddr, data: &[u8], what: &str) {
    let mut s = TcpStream::connect(fwd).expect("connect forward");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.set_write_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.write_all(data).expect("send");
    s.shutdown(Shutdown::Write).expect("half-close");
    let mut back = Vec::with_capacity(data.len());
    s.read_to_end(&mut back).expect("reply");
    back.reverse();
    assert!(
        back.len() == data.len(),
        "{what}: {} bytes back for {}",
        back.len(),
        data.len()
    );
    let first_diff = back.iter().zip(data).position(|(a, b)| a != b);
    assert!(first_diff.is_none(), "{what}: byte {first_diff:?} differs");
}

fn count(log: &Path, needle: &str) -> usize {
    fs::read_to_string(log)
        .unwrap_or_default()
        .matches(needle)
        .count()
}

const DEGRADED: &str = "ditto_store_degraded{reason=\"disk-full\"}";
const WRITE_ERRORS: &str = "ditto_store_errors_total{kind=\"write\"}";
const CORRUPT_ERRORS: &str = "ditto_store_errors_total{kind=\"corrupt\"}";
const DISABLED: &str =
    "chunk store disk tier disabled: No space left on device (os error 28) writing seg-";
const REENABLED: &str = "chunk store disk tier re-enabled";

#[test]
fn full_disk_and_corrupt_segments_keep_traffic_exact() {
    let started = Instant::now();
    let Some(tmpfs) = Tmpfs::mount("6m") else {
        return;
    };
    let store = tmpfs.path().join("store");
    let filler = tmpfs.path().join("filler");
    // Half of the file system is taken by something else; site-b's store may use 16 MiB.
    fs::write(&filler, vec![7u8; 3 << 20]).expect("filler");

    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let target = start_server();
    let PairConfig {
        cfg_a,
        cfg_b,
        admin_a,
        admin_b,
        fwd,
        ..
    } = write_pair(
        d,
        target,
        "store_ram = \"64MiB\"",
        "connections = 1",
        &format!(
            "store_dir = \"{}\"\nstore_ram = \"1MiB\"\nstore_disk = \"16MiB\"",
            store.display()
        ),
    );
    let log_b = d.join("b.log");
    // Declared after the tmpfs guard: dropped (killed) first, so the unmount finds no open file.
    let _b = start_daemon_logged(&cfg_b, &log_b);
    let log_a = d.join("a.log");
    let _a = start_daemon_logged(&cfg_a, &log_a);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !http_get(admin_a, "/metrics")
        .is_some_and(|m| m.contains("ditto_tunnel_connections{peer=\"site-b\"} 1"))
    {
        assert!(
            Instant::now() < deadline,
            "site-a's tunnel is not up; site-a log:\n{}\nsite-b log:\n{}",
            fs::read_to_string(&log_a).unwrap_or_default(),
            fs::read_to_string(&log_b).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(metric(admin_b, DEGRADED), 0.0);

    // 1. Fill the disk: fresh data until site-b's disk tier turns itself off.
    let mut sent: Vec<Vec<u8>> = Vec::new();
    for round in 0..12u64 {
        let data = payload(round, 1 << 20);
        round_trip(fwd, &data, &format!("filling round {round}"));
        sent.push(data);
        if metric(admin_b, DEGRADED) == 1.0 {
            break;
        }
    }
    assert_eq!(
        metric(admin_b, DEGRADED),
        1.0,
        "the disk never filled up; site-b log:\n{}",
        fs::read_to_string(&log_b).unwrap_or_default()
    );
    assert!(metric(admin_b, WRITE_ERRORS) >= 1.0);
    assert_eq!(count(&log_b, DISABLED), 1, "one line saying why");
    let status = http_get(admin_b, "/status").expect("status");
    assert!(
        status.contains("\"store_degraded\": \"disk-full: No space left on device"),
        "{status}"
    );

    // Take whatever the failed write gave back (it is truncated away), so that retries fail too. The
    // first retry comes a second after the failure; the round that failed ended a moment ago.
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(&filler)
        .expect("filler");
    while f.write_all(&[7u8; 4096]).is_ok() {}
    drop(f);

    // 2. Traffic keeps flowing, exact, while the disk is full: data seen before (site-a refers to
    // chunks site-b could not keep) and new data, until a retry of the disk has failed too.
    round_trip(fwd, &sent[sent.len() - 1], "repeat while full");
    round_trip(fwd, &sent[0], "first round again while full");
    let data = payload(100, 1 << 20);
    round_trip(fwd, &data, "new data while full");
    sent.push(data);
    let mut n = 0u64;
    wait_for("a failed retry of the full disk", 15, || {
        n += 1;
        round_trip(
            fwd,
            &payload(300 + n, 64 << 10),
            "small transfer while full",
        );
        std::thread::sleep(Duration::from_millis(200));
        let status = http_get(admin_b, "/status")?;
        status.contains(", 2 failed attempts").then_some(())
    });
    assert_eq!(metric(admin_b, DEGRADED), 1.0);
    let log = fs::read_to_string(&log_b).unwrap_or_default();
    assert_eq!(
        log.matches(DISABLED).count(),
        1,
        "rate-limited: not one line per chunk or per retry:\n{log}"
    );

    // 3. Space comes back: within the backoff the disk tier is retried and back on.
    fs::remove_file(&filler).expect("free space");
    let mut n = 0u64;
    wait_for("the disk tier to come back", 40, || {
        n += 1;
        round_trip(fwd, &payload(200 + n, 64 << 10), "small transfer");
        std::thread::sleep(Duration::from_millis(250));
        (metric(admin_b, DEGRADED) == 0.0).then_some(())
    });
    let log = fs::read_to_string(&log_b).unwrap_or_default();
    assert_eq!(log.matches(REENABLED).count(), 1, "{log}");
    assert!(!log.contains("(1 failed attempts"), "{log}");
    assert_eq!(count(&log_b, DISABLED), 1);
    let status = http_get(admin_b, "/status").expect("status");
    assert!(status.contains("\"store_degraded\": null"), "{status}");

    // 4. Overwrite the middle of every segment file of the running site-b, then send the first
    // rounds again: site-a refers to chunks site-b holds on disk, which no longer verify.
    let segs = segments(&store);
    assert!(!segs.is_empty());
    for seg in &segs {
        let len = fs::metadata(seg).expect("segment").len();
        let f = fs::OpenOptions::new()
            .write(true)
            .open(seg)
            .expect("open segment");
        let span = (len / 2).min(512 << 10);
        f.write_all_at(&vec![0x5a; span as usize], len / 4)
            .expect("overwrite");
    }
    let corrupt_before = metric(admin_b, CORRUPT_ERRORS);
    let verify_before = metric(admin_b, "ditto_verify_failures_total");
    for (i, data) in sent.iter().enumerate().take(2) {
        round_trip(fwd, data, &format!("round {i} after corruption"));
    }
    assert!(
        metric(admin_b, CORRUPT_ERRORS) > corrupt_before,
        "site-b log:\n{}",
        fs::read_to_string(&log_b).unwrap_or_default()
    );
    assert!(metric(admin_b, "ditto_verify_failures_total") > verify_before);
    let log = fs::read_to_string(&log_b).unwrap_or_default();
    assert!(log.contains("chunk store: damaged chunk in seg-"), "{log}");
    // A failed reference is answered with the bytes of its whole op, so each transfer finds only a
    // few damaged chunks; repeated transfers find more, until the segment is dropped whole.
    for n in 0..40 {
        if count(&log_b, "chunk store: dropped segment seg-") > 0 {
            break;
        }
        round_trip(fwd, &sent[0], &format!("repeat {n} after corruption"));
    }
    let log = fs::read_to_string(&log_b).unwrap_or_default();
    assert!(log.contains("chunk store: dropped segment seg-"), "{log}");
    // And once more, now that the damaged data is gone: still exact.
    round_trip(fwd, &sent[0], "round 0 once more");
    round_trip(fwd, &sent[1], "round 1 once more");

    // Every flow was carried through the tunnel; none fell back to pass-through or failed.
    let m = http_get(admin_a, "/metrics").expect("scrape");
    for l in m.lines().filter(|l| l.starts_with("ditto_flows_total{")) {
        if l.contains("outcome=\"passthrough\"") || l.contains("outcome=\"failed\"") {
            assert!(l.ends_with(" 0"), "{l}");
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}
