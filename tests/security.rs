//! What an appliance keeps and what a peer may reach, with two real `ditto run` daemons on loopback:
//! the chunk stores hold nothing of the traffic in plain text (a marker sent through the pair is
//! grepped for in every file under the store directories), their files are private, a lost store key
//! costs only the store's contents (one log line, traffic stays exact), and a peer's OPENs are held
//! to its `allow` list.

mod common;

use common::{ditto, payload, start_server, write_pair, PairConfig, Proc};
use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `ditto run --config CONFIG` with its log (stderr) in `log` (appended to).
fn start_logged(config: &Path, log: &Path) -> Proc {
    let file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
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

fn wait_for(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn metrics(admin: SocketAddr) -> String {
    common::http_get(admin, "/metrics")
        .filter(|r| r.0 == 200)
        .map(|r| r.1)
        .unwrap_or_default()
}

/// Waits for site-a's tunnel (90 s: a first start on a loaded CI machine can be slow); on a
/// timeout, shows the daemons' logs.
fn tunnel_up(admin_a: SocketAddr, logs: &[&Path]) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !metrics(admin_a).contains("ditto_tunnel_connections{peer=\"site-b\"} 1") {
        if Instant::now() >= deadline {
            let text: Vec<String> = logs
                .iter()
                .map(|l| {
                    format!(
                        "--- {} ---\n{}",
                        l.display(),
                        fs::read_to_string(l).unwrap_or_default()
                    )
                })
                .collect();
            panic!("site-a's tunnel not up after 90 s\n{}", text.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM, then waits for a clean exit.
fn stop(mut p: Proc) {
    let st = Command::new("kill")
        .arg("-TERM")
        .arg(p.0.id().to_string())
        .status()
        .expect("kill");
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = p.0.try_wait().expect("wait") {
            assert!(st.success(), "daemon exited with {st}");
            return;
        }
        assert!(Instant::now() < deadline, "daemon did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `data` to `addr` (the echo server, reached through the pair), half-closes, and returns what
/// came back, reversed back (so it equals `data` when the pair carried it exactly).
fn exchange(addr: SocketAddr, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.write_all(data)?;
    s.shutdown(Shutdown::Write)?;
    let mut back = Vec::new();
    s.read_to_end(&mut back)?;
    back.reverse();
    Ok(back)
}

fn round_trip(fwd: SocketAddr, data: &[u8], what: &str) {
    let back = exchange(fwd, data).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        back.len() == data.len() && back == data,
        "{what}: {} bytes back for {}, not the same",
        back.len(),
        data.len()
    );
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).expect("read dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

fn occurrences(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).expect("stat").permissions().mode() & 0o777
}

/// Data with a distinctive marker in every 4 KiB, the rest varied: chunks both sides store.
fn marked(seed: u64, len: usize, marker: &[u8]) -> Vec<u8> {
    let mut v = payload(seed, len);
    for at in (0..len.saturating_sub(marker.len())).step_by(4096) {
        v[at..at + marker.len()].copy_from_slice(marker);
    }
    v
}

#[test]
fn stores_keep_no_traffic_in_plain_text_and_a_lost_key_costs_only_the_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let target = start_server();
    let store = |s: &str| {
        format!("store_dir = \"store-{s}\"\nstore_ram = \"1MiB\"\nstore_disk = \"64MiB\"")
    };
    let PairConfig {
        cfg_a,
        cfg_b,
        admin_a,
        fwd,
        ..
    } = write_pair(d, target, &store("a"), "connections = 1", &store("b"));
    let out = common::run_ok(ditto().args(["check-config", "-c"]).arg(&cfg_b));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("b.store.key (created at the first start)"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let (log_a, log_b) = (d.join("a.log"), d.join("b.log"));
    let b = start_logged(&cfg_b, &log_b);
    let a = start_logged(&cfg_a, &log_a);
    tunnel_up(admin_a, &[&log_a, &log_b]);

    let marker = b"DITTO-SECRET-MARKER-7f3a9c1e5b2d";
    let rev: Vec<u8> = marker.iter().rev().copied().collect();
    let data = marked(1, 4 << 20, marker);
    round_trip(fwd, &data, "first pass");
    round_trip(fwd, &data, "second pass");
    // A clean stop writes everything queued, and the snapshots.
    stop(a);
    stop(b);

    let mut stored = 0u64;
    for site in ["a", "b"] {
        let sd = d.join(format!("store-{site}"));
        assert_eq!(mode(&sd), 0o700, "{}", sd.display());
        for f in files_under(&sd) {
            let bytes = fs::read(&f).expect("read");
            stored += bytes.len() as u64;
            assert_eq!(
                occurrences(&bytes, marker),
                0,
                "{}: the marker",
                f.display()
            );
            assert_eq!(
                occurrences(&bytes, &rev),
                0,
                "{}: the reversed marker",
                f.display()
            );
            assert_eq!(mode(&f), 0o600, "{}", f.display());
        }
        let k = d.join(format!("{site}.store.key"));
        assert_eq!(mode(&k), 0o600, "{}", k.display());
        assert_eq!(fs::read(&k).expect("key").len(), 32);
    }
    // Both stores did keep the traffic (each direction's data, sealed).
    assert!(stored > 4 << 20, "only {stored} bytes stored");

    // site-b's store key is lost: it starts with an empty store, says so once, traffic stays exact.
    fs::remove_file(d.join("b.store.key")).expect("remove key");
    let b = start_logged(&cfg_b, &log_b);
    let a = start_logged(&cfg_a, &log_a);
    tunnel_up(admin_a, &[&log_a, &log_b]);
    round_trip(fwd, &data, "after the key was lost");
    let log = fs::read_to_string(&log_b).expect("log");
    assert_eq!(
        log.matches("sealed with another store key").count(),
        1,
        "one line saying why the store starts empty:\n{log}"
    );
    assert_eq!(
        log.matches("created the chunk store key").count(),
        2,
        "{log}"
    );
    stop(a);
    stop(b);
}

/// The value of one series (`name{labels}` exactly as rendered) in a scrape, 0 if absent.
fn value(scrape: &str, series: &str) -> f64 {
    common::series_value(scrape, series).unwrap_or(0.0)
}

#[test]
fn opens_outside_the_peers_allow_list_are_refused_and_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let allowed = start_server();
    let denied_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let denied = denied_listener.local_addr().expect("addr");
    let seen = common::serve_reverse(denied_listener);
    let PairConfig {
        cfg_a,
        cfg_b,
        admin_a,
        admin_b,
        fwd,
        ..
    } = write_pair(d, allowed, "", "connections = 1", "");
    // site-b lets site-a reach the allowed server's port only (its [[peer]] is the file's last
    // section); site-a gets a second forward, to the other server.
    let fwd_denied = common::free_port();
    let mut b = fs::read_to_string(&cfg_b).expect("read");
    b.push_str(&format!(
        "allow = [\"127.0.0.0/8:{}\", \"[::1]:{}\"]\n",
        allowed.port(),
        allowed.port()
    ));
    fs::write(&cfg_b, b).expect("write");
    let mut a = fs::read_to_string(&cfg_a).expect("read");
    a.push_str(&format!(
        "\n[[forward]]\nlisten = \"{fwd_denied}\"\npeer = \"site-b\"\ntarget = \"{denied}\"\n"
    ));
    fs::write(&cfg_a, a).expect("write");

    // check-config says what each peer may open, one line per peer.
    let out = common::run_ok(ditto().args(["check-config", "-c"]).arg(&cfg_b));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "peer \"site-a\" may open only 127.0.0.0/8:{0}, [::1/128]:{0}",
            allowed.port()
        )),
        "{text}"
    );
    let out = common::run_ok(ditto().args(["check-config", "-c"]).arg(&cfg_a));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("peer \"site-b\" may open any destination (no allow list)"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let (log_a, log_b) = (d.join("a.log"), d.join("b.log"));
    let pb = start_logged(&cfg_b, &log_b);
    let pa = start_logged(&cfg_a, &log_a);
    tunnel_up(admin_a, &[&log_a, &log_b]);

    // Inside the list: works, byte-exact.
    let data = payload(3, 200_000);
    round_trip(fwd, &data, "allowed destination");
    // Outside: the client's connection is reset, the server never sees a connection.
    for _ in 0..3 {
        let back = exchange(fwd_denied, &data);
        assert!(
            back.as_ref().map_or(true, |b| b.is_empty()),
            "a refused OPEN delivered {:?} bytes",
            back.map(|b| b.len())
        );
    }
    wait_for("the refusals counted", 10, || {
        value(
            &metrics(admin_b),
            "ditto_opens_denied_total{peer=\"site-a\"}",
        ) == 3.0
    });
    let ma = metrics(admin_a);
    assert_eq!(
        value(&ma, "ditto_stream_resets_total{reason=\"denied\"}"),
        3.0,
        "site-a sees RST denied"
    );
    assert!(
        seen.peers().is_empty(),
        "the refused destination was connected to"
    );
    round_trip(fwd, &data, "allowed destination after refusals");
    stop(pa);
    stop(pb);
    let log = fs::read_to_string(&log_b).expect("log");
    assert_eq!(
        log.matches("refused 1 OPEN(s) from peer site-a").count(),
        1,
        "one line for the first refusal, the next ones within the minute are only counted:\n{log}"
    );
    assert_eq!(log.matches("outside its allow list").count(), 1, "{log}");
}
