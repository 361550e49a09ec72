//! Harness shared by the binary's integration tests: the `ditto` command, keys, free ports, an echo
//! server and daemons that are killed whatever way a test ends.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub fn ditto() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ditto"))
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn ditto");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A plain HTTP/1.0 GET (no chunked encoding, connection closed at the end): (status, body).
pub fn http_get(addr: SocketAddr, target: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(format!("GET {target} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .ok()?;
    let mut r = Vec::new();
    s.read_to_end(&mut r).ok()?;
    let r = String::from_utf8_lossy(&r).into_owned();
    let (head, body) = r.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_owned()))
}

/// A loopback port that was free a moment ago (the daemons bind it themselves).
pub fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// Deterministic pseudo-random bytes.
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A two-node pair on loopback, configured in one directory: site-b listens for the tunnel,
/// site-a dials it and forwards `fwd` to a target through it (through a group of one member, so
/// every test of the pair also carries the group's path and metrics).
pub struct PairConfig {
    pub cfg_a: PathBuf,
    pub cfg_b: PathBuf,
    pub fp_a: String,
    pub fp_b: String,
    pub tunnel: SocketAddr,
    pub admin_a: SocketAddr,
    pub admin_b: SocketAddr,
    pub fwd: SocketAddr,
}

/// Writes keys and configs of a [`PairConfig`] into `d`. `a_node`/`b_node` are extra `[node]`
/// lines of each site (stores), `a_tunnel` extra `[tunnel]` lines of site-a.
pub fn write_pair(
    d: &Path,
    target: SocketAddr,
    a_node: &str,
    a_tunnel: &str,
    b_node: &str,
) -> PairConfig {
    let fp_a = key(d, "a");
    let fp_b = key(d, "b");
    let (tunnel, admin_a, admin_b, fwd) = (free_port(), free_port(), free_port(), free_port());
    let cfg_b = d.join("b.toml");
    std::fs::write(
        &cfg_b,
        format!(
            "[node]\nname = \"site-b\"\nkey = \"b.key\"\nadmin = \"{admin_b}\"\n{b_node}\n\n\
             [tunnel]\nlisten = \"{tunnel}\"\n\n[[peer]]\nname = \"site-a\"\nfingerprint = \"{fp_a}\"\n"
        ),
    )
    .expect("write config");
    let cfg_a = d.join("a.toml");
    std::fs::write(
        &cfg_a,
        format!(
            "[node]\nname = \"site-a\"\nkey = \"a.key\"\nadmin = \"{admin_a}\"\n{a_node}\n\n\
             [tunnel]\n{a_tunnel}\n\n[[peer]]\nname = \"site-b\"\naddress = \"{tunnel}\"\n\
             fingerprint = \"{fp_b}\"\n\n[[group]]\nname = \"site-b-group\"\nmembers = [\"site-b\"]\n\n\
             [[forward]]\nlisten = \"{fwd}\"\npeer = \"site-b-group\"\ntarget = \"{target}\"\n"
        ),
    )
    .expect("write config");
    PairConfig {
        cfg_a,
        cfg_b,
        fp_a,
        fp_b,
        tunnel,
        admin_a,
        admin_b,
        fwd,
    }
}

/// The fingerprint of `dir/name.key`, made first if it does not exist.
pub fn key(dir: &Path, name: &str) -> String {
    let k = dir.join(format!("{name}.key"));
    if !k.exists() {
        return keygen(dir, name);
    }
    let out = run_ok(ditto().arg("fingerprint").arg(&k));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Makes a key pair `dir/name.key` and returns its fingerprint.
pub fn keygen(dir: &Path, name: &str) -> String {
    let out = run_ok(ditto().arg("keygen").arg("--out").arg(dir.join(name)));
    let fp = String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_owned();
    assert_eq!(fp.len(), 64, "fingerprint {fp:?}");
    fp
}

/// Echo-after-EOF server on loopback: reads the request to EOF, then sends it back reversed.
pub fn start_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    serve_reverse(l);
    addr
}

/// What a test server saw: the peer address of each accepted connection.
#[derive(Clone, Default)]
pub struct Seen(pub Arc<Mutex<Vec<SocketAddr>>>);

impl Seen {
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

/// Serves on `l`: reads each request to EOF, then sends it back reversed.
pub fn serve_reverse(l: TcpListener) -> Seen {
    let seen = Seen::default();
    let s2 = seen.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            if let Ok(p) = s.peer_addr() {
                if let Ok(mut v) = s2.0.lock() {
                    v.push(p);
                }
            }
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if s.read_to_end(&mut buf).is_ok() {
                    buf.reverse();
                    let _ = s.write_all(&buf);
                    let _ = s.shutdown(Shutdown::Write);
                }
            });
        }
    });
    seen
}

/// A child process killed when the test ends, however it ends.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `ditto run --config CONFIG`, its log (stderr) in CONFIG with the extension `log`.
pub fn start_daemon(config: &Path) -> Proc {
    start_daemon_with(ditto(), config)
}

/// [`start_daemon`] with `ditto` run by `cmd` (e.g. inside a network namespace).
pub fn start_daemon_with(mut cmd: Command, config: &Path) -> Proc {
    let log = std::fs::File::create(config.with_extension("log")).expect("log file");
    Proc(
        cmd.arg("run")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn ditto run"),
    )
}

/// The log of a daemon started by [`start_daemon`] with `config` (for failure messages).
pub fn daemon_log(config: &Path) -> String {
    std::fs::read_to_string(config.with_extension("log")).unwrap_or_default()
}
/// The value of one series (`name{labels}` exactly as rendered) in a Prometheus scrape.
/// Resident memory of a process (`VmRSS`), KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

pub fn series_value(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

pub mod disk;
pub mod frr;
pub mod netns;
pub mod require;
pub mod wan;
