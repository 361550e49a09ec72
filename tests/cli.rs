//! The `ditto` binary end to end: keygen, check-config, two `ditto run` daemons carrying a transfer,
//! `ditto status`, and graceful stop on SIGTERM/SIGINT.

mod common;

use common::{
    ditto, free_port, http_get, keygen, run_ok, start_daemon as start, start_server, write_pair,
    PairConfig, Proc as Daemon,
};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

fn signal(child: &Child, sig: &str) {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .expect("kill");
    assert!(st.success());
}

fn wait_exit(d: &mut Daemon) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = d.0.try_wait().expect("wait") {
            return st;
        }
        assert!(Instant::now() < deadline, "daemon did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn keygen_check_config_run_status_and_stop() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let fp_a = keygen(d, "a");
    let fp_b = keygen(d, "b");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.join("a.key"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // keygen refuses to overwrite a key.
    assert!(!ditto()
        .arg("keygen")
        .arg("--out")
        .arg(d.join("a"))
        .output()
        .expect("run")
        .status
        .success());
    let out = run_ok(ditto().arg("fingerprint").arg(d.join("b.key")));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), fp_b);

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
        "store_dir = \"store-a\"\nstore_ram = \"64MiB\"\nstore_disk = \"256MiB\"",
        "connections = 2",
        "",
    );
    let out = run_ok(ditto().args(["check-config", "-c"]).arg(&cfg_a));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&fp_a));
    // A broken config is refused with its line.
    let bad = d.join("bad.toml");
    std::fs::write(&bad, "[node]\nname = \"x\"\nkey = \"a.key\"\nwindow = 3\n").expect("write");
    let out = ditto()
        .args(["check-config", "--config"])
        .arg(&bad)
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("line 4"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut b = start(&cfg_b);
    let mut a = start(&cfg_a);
    // Polls the admin endpoint (the only view into another process). A daemon's first start after a
    // build can be slow on a loaded 2-core machine, and the dialer backs off (0.2 s doubling up to
    // 30 s) while site-b is not listening yet.
    let deadline = Instant::now() + Duration::from_secs(90);
    while !http_get(admin_a, "/metrics")
        .is_some_and(|m| m.1.contains("ditto_tunnel_connections{peer=\"site-b\"} 2"))
    {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for site-a's tunnel\n--- site-a ---\n{}\n--- site-b ---\n{}",
            common::daemon_log(&cfg_a),
            common::daemon_log(&cfg_b)
        );
        std::thread::sleep(Duration::from_millis(25));
    }

    // A transfer through the pair, both directions, with half-close.
    let payload: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    for _ in 0..2 {
        let mut s = TcpStream::connect(fwd).expect("connect forward");
        s.write_all(&payload).expect("send");
        s.shutdown(Shutdown::Write).expect("half-close");
        let mut back = Vec::new();
        s.read_to_end(&mut back).expect("reply");
        back.reverse();
        assert!(back == payload, "reply differs");
    }

    let out = run_ok(
        ditto()
            .arg("status")
            .arg("--admin")
            .arg(admin_a.to_string()),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("site-b") && text.contains("UP"), "{text}");
    let out = run_ok(ditto().arg("status").arg("-c").arg(&cfg_b).arg("--json"));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    assert_eq!(v["node"], "site-b");
    assert_eq!(v["peers"][0]["up"], true);
    assert!(http_get(admin_b, "/healthz").is_some_and(|r| r.0 == 200));

    // Graceful stop: SIGTERM for one, SIGINT for the other; both exit 0.
    signal(&b.0, "TERM");
    assert!(wait_exit(&mut b).success());
    signal(&a.0, "INT");
    assert!(wait_exit(&mut a).success());
    assert!(
        d.join("store-a").is_dir(),
        "the disk store lives beside the config"
    );
}

/// `Type=notify` and `WatchdogSec=` as systemd runs them: READY=1 once the node serves, WATCHDOG=1
/// at half the watchdog interval from the event loop, STOPPING=1 on SIGTERM. A datagram socket
/// plays systemd's part.
#[test]
fn systemd_readiness_and_watchdog_notifications() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    keygen(d, "n");
    let admin = free_port();
    let cfg = d.join("n.toml");
    std::fs::write(
        &cfg,
        format!("[node]\nname = \"n\"\nkey = \"n.key\"\nadmin = \"{admin}\"\n"),
    )
    .expect("write");
    let sock_path = d.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // Its stderr is a file that JOURNAL_STREAM names, as systemd's journal stream would be.
    let log_path = d.join("stderr.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let journal_stream = {
        use std::os::unix::fs::MetadataExt;
        let m = log.metadata().expect("log metadata");
        format!("{}:{}", m.dev(), m.ino())
    };
    let child = ditto()
        .arg("run")
        .arg("--config")
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "200000")
        .env("JOURNAL_STREAM", journal_stream)
        .env("RUST_LOG", "info")
        .stderr(log)
        .spawn()
        .expect("spawn");
    let mut daemon = Daemon(child);
    let mut buf = [0u8; 256];
    let mut recv = || {
        let n = sock.recv(&mut buf).expect("a notification within 10 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(recv(), "READY=1");
    // Serving by then.
    assert!(http_get(admin, "/healthz").is_some_and(|r| r.0 == 200));
    let start = Instant::now();
    for _ in 0..3 {
        assert_eq!(recv(), "WATCHDOG=1");
    }
    // Three pings at 100 ms intervals (the first at once).
    assert!(start.elapsed() < Duration::from_secs(2));
    signal(&daemon.0, "TERM");
    let mut seen_stopping = false;
    for _ in 0..20 {
        if recv() == "STOPPING=1" {
            seen_stopping = true;
            break;
        }
    }
    assert!(seen_stopping);
    assert!(wait_exit(&mut daemon).success());
    // Plain lines for the journal: no colour codes, no timestamps (the journal has its own).
    let log = std::fs::read_to_string(&log_path).expect("read log");
    assert!(log.contains("INFO"), "{log}");
    assert!(
        !log.contains('\x1b'),
        "colour codes in the journal: {log:?}"
    );
    assert!(
        log.lines()
            .all(|l| !l.starts_with(|c: char| c.is_ascii_digit())),
        "timestamps in the journal: {log}"
    );
}

/// `ditto analyze`: the JSON total sums every per-file count, the table marks a cut path and shows
/// no ratio for an empty file.
#[test]
fn analyze_totals_and_table() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let data = common::payload(7, 600_000);
    let long = d.join(format!("{}.bin", "n".repeat(60)));
    std::fs::write(d.join("one.bin"), &data).expect("write");
    std::fs::write(&long, &data).expect("write");
    std::fs::write(d.join("empty.bin"), b"").expect("write");
    let files = [d.join("one.bin"), long, d.join("empty.bin")];
    let out = run_ok(ditto().arg("analyze").arg("--json").args(&files));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("analyze json");
    let per_file = v["files"].as_array().expect("files");
    assert_eq!(per_file.len(), 3);
    for key in [
        "input_bytes",
        "wire_bytes",
        "batches",
        "chunks",
        "literal_chunks",
        "delta_chunks",
        "reference_ops",
        "run_ops",
    ] {
        let sum: u64 = per_file.iter().map(|f| f[key].as_u64().expect(key)).sum();
        assert_eq!(v["total"][key].as_u64(), Some(sum), "total {key}");
    }
    // The second copy is all references: the sums above are not of zeros.
    let refs = |k: &str| v["total"][k].as_u64().expect(k);
    assert!(refs("reference_ops") + refs("run_ops") > 0, "{v}");
    assert!(v["total"]["chunks"].as_u64().is_some_and(|n| n > 0));

    let out = run_ok(ditto().arg("analyze").args(&files));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("share of the input bytes"), "{text}");
    let long_row = text
        .lines()
        .find(|l| l.contains("nnnn.bin"))
        .expect("row of the long name");
    assert!(long_row.starts_with('…'), "{long_row}");
    let empty_row = text
        .lines()
        .find(|l| l.contains("empty.bin"))
        .expect("row of the empty file");
    assert!(!empty_row.contains("0.0x"), "{empty_row}");
    assert!(empty_row.contains(" - "), "{empty_row}");
}

/// Error messages a user meets first: each names what is wrong and where, and says it once.
#[test]
fn error_messages_name_the_key_and_line_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let fail = |cmd: &mut Command| {
        let out = cmd.output().expect("spawn ditto");
        assert!(!out.status.success(), "{cmd:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let once = |text: &str, part: &str| {
        assert_eq!(text.matches(part).count(), 1, "{part:?} once in: {text}");
    };

    // A key file that does not exist: the config key and its line, the cause once.
    let cfg = d.join("nokey.toml");
    std::fs::write(&cfg, "[node]\nname = \"a\"\nkey = \"missing.key\"\n").expect("write");
    let enoent = std::io::Error::from_raw_os_error(libc::ENOENT).to_string();
    // check-config still takes the file as its one positional argument, as it did.
    for args in [
        &["check-config"][..],
        &["check-config", "-c"],
        &["run", "-c"],
    ] {
        let e = fail(ditto().args(args).arg(&cfg));
        assert!(e.contains("nokey.toml:3: node.key: "), "{e}");
        assert!(e.contains("missing.key"), "{e}");
        once(&e, &enoent);
    }

    // A key file that holds a public key.
    keygen(d, "k");
    let junk = d.join("public.key");
    std::fs::copy(d.join("k.pub"), &junk).expect("copy");
    let e = fail(ditto().arg("fingerprint").arg(&junk));
    assert!(e.contains("is not a PKCS#8 PEM private key"), "{e}");
    once(&e, "parse key pair");
    // The public half given by its name.
    let e = fail(ditto().arg("fingerprint").arg(d.join("k.pub")));
    assert!(e.contains("is a public key file"), "{e}");

    // A port out of range says so, at its line.
    let cfg = d.join("port.toml");
    std::fs::write(
        &cfg,
        "[node]\nname = \"a\"\nkey = \"k.key\"\nadmin = \"127.0.0.1:70000\"\n",
    )
    .expect("write");
    let e = fail(ditto().args(["check-config", "-c"]).arg(&cfg));
    assert!(e.contains("line 4"), "{e}");
    once(&e, "port 70000 is out of range 0-65535");
}

/// `ditto demo` on a small directory: both passes verified, WAN bytes of plain and of ditto, and the
/// JSON names the dataset and the link.
#[test]
fn demo_reports_both_passes_and_the_link() {
    let dir = tempfile::tempdir().expect("tmp");
    for i in 0..4u64 {
        std::fs::write(
            dir.path().join(format!("f{i}")),
            common::payload(i, 600_000),
        )
        .expect("write");
    }
    let out = run_ok(
        ditto()
            .args([
                "demo", "--json", "--mbit", "200", "--rtt-ms", "10", "--path",
            ])
            .arg(dir.path()),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("plain WAN MiB") && text.contains("ditto WAN MiB"),
        "{text}"
    );
    let json = text.lines().last().expect("JSON line");
    let v: serde_json::Value = serde_json::from_str(json).expect("demo json");
    let dataset = v["dataset_bytes"].as_u64().expect("dataset_bytes");
    assert!(dataset > 2_400_000, "{v}");
    assert_eq!(v["link"]["mbit"].as_f64(), Some(200.0));
    assert_eq!(v["link"]["rtt_ms"].as_u64(), Some(10));
    assert_eq!(v["link"]["delay_ms"].as_f64(), Some(5.0));
    let passes = v["passes"].as_array().expect("passes");
    assert_eq!(passes.len(), 2);
    for p in passes {
        assert_eq!(p["verified"], true, "{p}");
        // Plain carries the dataset, and a little more (the one-byte verdict back).
        let plain = p["plain_wan_bytes"].as_u64().expect("plain_wan_bytes");
        assert!(plain > dataset && plain < dataset + 100, "{p}");
    }
    // The second pass is deduplicated: far fewer WAN bytes than plain.
    let second = passes[1]["wan_bytes"].as_u64().expect("wan_bytes");
    assert!(second * 10 < dataset, "{v}");
}
