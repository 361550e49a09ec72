//! Network namespaces for tests: hosts, links and bridges built with `ip`, sockets opened inside a
//! namespace from a thread that joined it (a socket keeps its namespace, so the test uses it from
//! anywhere), and daemons started inside with `ip netns exec`. Everything is removed on drop, also
//! when a test fails. Needs root; tests call [`skip_unless_root`] first.
#![allow(dead_code, unsafe_code)]

use serde_json::Value;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// True when the test cannot run here (see [`super::require`]: under CI it fails instead).
pub fn skip_unless_root() -> bool {
    let ok = is_root() && (Path::new("/usr/sbin/nft").exists() || which("nft"));
    super::require::skip_without(ok, "root and nftables (network namespaces)")
}

fn which(p: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {p}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs a command, panicking with its output if it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A unique short prefix for this test's namespaces (pid + sequence).
pub fn unique(tag: &str) -> String {
    format!(
        "{tag}{}x{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// A network namespace, deleted (with every process in it) on drop.
pub struct Ns {
    pub name: String,
}

impl Ns {
    pub fn new(name: String) -> Ns {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Ns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        // No duplicate address detection: link-local addresses (neighbour discovery, routers)
        // are usable at once instead of after a second of tentative state.
        ns.sysctl("net.ipv6.conf.all.accept_dad=0");
        ns.sysctl("net.ipv6.conf.default.accept_dad=0");
        ns
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> String {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A shell script inside the namespace.
    pub fn sh(&self, script: &str) -> String {
        run(self.cmd("sh").args(["-c", script]))
    }

    /// Like [`Ns::sh`], returning success instead of panicking.
    pub fn try_sh(&self, script: &str) -> bool {
        self.cmd("sh")
            .args(["-c", script])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// A command that runs inside the namespace.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    pub fn sysctl(&self, kv: &str) {
        self.sh(&format!("sysctl -q -w {kv}"));
    }

    /// Runs `f` on a thread that joined this namespace: sockets it creates live here.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            use std::os::fd::AsRawFd;
            // SAFETY: setns on a valid namespace fd; it changes only this thread's namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("thread in namespace")
    }

    /// Connects from inside this namespace.
    pub fn connect(&self, to: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
        self.run(move || TcpStream::connect_timeout(&to, timeout))
    }

    pub fn listen(&self, at: SocketAddr) -> TcpListener {
        self.run(move || TcpListener::bind(at).unwrap_or_else(|e| panic!("bind {at}: {e}")))
    }

    /// The nftables tables in this namespace, as "family name" lines.
    pub fn nft_tables(&self) -> Vec<String> {
        self.sh("nft list tables")
            .lines()
            .filter_map(|l| l.strip_prefix("table ").map(str::to_owned))
            .collect()
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-KILL", pid]).output();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A veth pair: `a_dev` in `a`, `b_dev` in `b`, both up.
pub fn link(a: &Ns, a_dev: &str, b: &Ns, b_dev: &str) {
    a.ip(&[
        "link", "add", a_dev, "type", "veth", "peer", "name", b_dev, "netns", &b.name,
    ]);
    a.ip(&["link", "set", a_dev, "up"]);
    b.ip(&["link", "set", b_dev, "up"]);
}

/// Adds addresses (without duplicate address detection, so IPv6 works at once).
pub fn addr(ns: &Ns, dev: &str, cidrs: &[&str]) {
    for c in cidrs {
        if c.contains(':') {
            ns.ip(&["addr", "add", c, "dev", dev, "nodad"]);
        } else {
            ns.ip(&["addr", "add", c, "dev", dev]);
        }
    }
}

/// One request through `s` to a [`serve_reverse`] server; true if the answer is exact.
pub fn exchange(mut s: TcpStream, data: &[u8], timeout: Duration) -> std::io::Result<bool> {
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let w = {
        let mut s2 = s.try_clone()?;
        let data = data.to_vec();
        std::thread::spawn(move || {
            s2.write_all(&data)?;
            s2.shutdown(Shutdown::Write)
        })
    };
    let mut got = Vec::with_capacity(data.len());
    s.read_to_end(&mut got)?;
    w.join()
        .map_err(|_| std::io::Error::other("writer panicked"))??;
    got.reverse();
    Ok(got == data)
}

/// Polls `f` every 20 ms until it is true or `timeout` passes; the time it took.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Serves on `l`: echoes every byte back as it arrives.
pub fn serve_echo(l: TcpListener) {
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => {
                            let _ = s.shutdown(Shutdown::Write);
                            return;
                        }
                        Ok(n) => {
                            if s.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
}

/// Writes `data` to an echo connection and reads it back; true if exact.
pub fn echo_round(s: &mut TcpStream, data: &[u8]) -> std::io::Result<bool> {
    let mut w = s.try_clone()?;
    let d = data.to_vec();
    let writer = std::thread::spawn(move || w.write_all(&d));
    let mut got = vec![0u8; data.len()];
    let r = s.read_exact(&mut got);
    writer
        .join()
        .map_err(|_| std::io::Error::other("writer panicked"))??;
    r?;
    Ok(got == data)
}

/// A daemon inside a namespace, its log kept for failure messages.
pub struct Daemon {
    proc: Option<super::Proc>,
    log: PathBuf,
}

impl Daemon {
    /// `ditto run --config CONFIG` inside `ns`, its log (stderr) next to the config.
    pub fn start(ns: &Ns, config: &Path) -> Daemon {
        Daemon::start_logged(ns, config, config.with_extension("log"))
    }

    /// Like [`Daemon::start`], its log in `log` (a restarted daemon keeps the old one).
    pub fn start_logged(ns: &Ns, config: &Path, log: PathBuf) -> Daemon {
        let f = std::fs::File::create(&log).expect("log file");
        let child = ns
            .cmd(env!("CARGO_BIN_EXE_ditto"))
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info,ditto_proxy=debug")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .expect("spawn ditto run");
        Daemon {
            proc: Some(super::Proc(child)),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.proc.as_ref().map_or(0, |p| p.0.id())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        let st = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(st.success(), "kill -{sig}");
    }

    /// Sends `sig` and waits for the process to exit.
    pub fn stop(&mut self, sig: &str) -> Option<std::process::ExitStatus> {
        self.signal(sig);
        let mut p = self.proc.take()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = p.0.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("ditto did not exit after SIG{sig}:\n{}", self.log());
    }

    pub fn exited(&mut self) -> bool {
        match &mut self.proc {
            Some(p) => matches!(p.0.try_wait(), Ok(Some(_))),
            None => true,
        }
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        self.signal("KILL");
        if let Some(mut p) = self.proc.take() {
            let _ = p.0.wait();
        }
    }
}

/// GET on the admin endpoint (127.0.0.1:9090 inside `ns`, where the tests' configs put it): the body.
pub fn admin_get(ns: &Ns, path: &str) -> Option<String> {
    let path = path.to_owned();
    ns.run(move || super::http_get(SocketAddr::from(([127, 0, 0, 1], 9090)), &path))
        .filter(|r| r.0 == 200)
        .map(|r| r.1)
}

pub fn status(ns: &Ns) -> Option<Value> {
    serde_json::from_str(&admin_get(ns, "/status")?).ok()
}

pub fn wait_tunnel_up(ns: &Ns, d: &Daemon) {
    let up = wait_until(Duration::from_secs(20), || {
        status(ns).is_some_and(|s| s["peers"][0]["up"].as_bool() == Some(true))
    });
    assert!(up.is_some(), "tunnel never came up:\n{}", d.log());
}

pub fn wait_admin(ns: &Ns, d: &Daemon) {
    let up = wait_until(Duration::from_secs(20), || status(ns).is_some());
    assert!(up.is_some(), "admin endpoint never answered:\n{}", d.log());
}

/// `ditto_flows_total{outcome,reason}` from /metrics.
pub fn flows(ns: &Ns, outcome: &str, reason: &str) -> u64 {
    let m = admin_get(ns, "/metrics").unwrap_or_default();
    let key = format!("ditto_flows_total{{outcome=\"{outcome}\",reason=\"{reason}\"}} ");
    m.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}
