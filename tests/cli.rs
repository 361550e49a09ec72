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

/// Waits (polling the admin endpoint: the only view into another process) for `cond`.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

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
    let out = run_ok(ditto().arg("check-config").arg(&cfg_a));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&fp_a));
    // A broken config is refused with its line.
    let bad = d.join("bad.toml");
    std::fs::write(&bad, "[node]\nname = \"x\"\nkey = \"a.key\"\nwindow = 3\n").expect("write");
    let out = ditto().arg("check-config").arg(&bad).output().expect("run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("line 4"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut b = start(&cfg_b);
    let mut a = start(&cfg_a);
    wait_for("site-a's tunnel", || {
        http_get(admin_a, "/metrics")
            .is_some_and(|m| m.1.contains("ditto_tunnel_connections{peer=\"site-b\"} 2"))
    });

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
    let out = run_ok(
        ditto()
            .arg("status")
            .arg("--config")
            .arg(&cfg_b)
            .arg("--json"),
    );
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
    let child = ditto()
        .arg("run")
        .arg("--config")
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "200000")
        .stderr(std::process::Stdio::null())
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
}
