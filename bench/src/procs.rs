//! Process helpers that run inside the namespaces: `rusage` (run a command, forward SIGTERM,
//! record CPU seconds and peak RSS of it and its waited-for descendants) and `zrelay` (a TCP
//! relay that pipes the server-to-client direction through the `zstd` binary).

use crate::sys;
use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Options of `rusage`.
#[derive(Args, Debug, Clone)]
pub struct RusageArgs {
    /// Where to write the JSON usage report when the command exits.
    #[arg(long)]
    pub out: PathBuf,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, required = true)]
    pub command: Vec<String>,
}

/// CPU and memory of a command tree.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Usage {
    pub user_s: f64,
    pub sys_s: f64,
    /// Peak resident set of the largest single process of the tree, KiB.
    pub max_rss_kib: u64,
    pub exit_code: Option<i32>,
}

/// Runs the command, forwarding SIGINT/SIGTERM to it, and writes its usage to `--out`.
pub fn rusage(args: &RusageArgs) -> Result<()> {
    let signals = [libc::SIGINT, libc::SIGTERM];
    let (prog, rest) = args.command.split_first().context("no command given")?;
    // Spawn before blocking the signals: the command would inherit a blocked mask.
    let mut child = Command::new(prog)
        .args(rest)
        .spawn()
        .with_context(|| format!("starting {prog}"))?;
    sys::block_signals(&signals)?;
    let mut kill_at = None;
    let status = loop {
        if let Some(sig) = sys::wait_signal(&signals, Duration::from_millis(50)) {
            let _ = sys::kill(child.id(), sig);
            kill_at.get_or_insert(std::time::Instant::now() + Duration::from_millis(1500));
        }
        if kill_at.is_some_and(|t| std::time::Instant::now() > t) {
            eprintln!("rusage: {prog} ignored the signal for 1.5 s; killing it");
            let _ = child.kill();
            kill_at = None;
        }
        if let Some(st) = child.try_wait()? {
            break st;
        }
    };
    let (user_s, sys_s, max_rss_kib) = sys::children_rusage();
    let usage = Usage {
        user_s,
        sys_s,
        max_rss_kib,
        exit_code: status.code(),
    };
    std::fs::write(&args.out, serde_json::to_vec_pretty(&usage)?)
        .with_context(|| format!("writing {}", args.out.display()))?;
    Ok(())
}

/// Options of `zrelay`.
#[derive(Args, Debug, Clone)]
pub struct ZrelayArgs {
    /// Address to accept connections on.
    #[arg(long)]
    pub listen: String,
    /// Address to connect each accepted connection to.
    #[arg(long)]
    pub connect: String,
    /// `compress`: data coming back from --connect is compressed with `zstd -LEVEL` before it is
    /// sent to the accepted peer (server side). `decompress`: data coming back from --connect is
    /// decompressed with `zstd -d` (client side). The other direction passes unchanged.
    #[arg(long)]
    pub mode: String,
    /// zstd compression level.
    #[arg(long, default_value_t = 3)]
    pub level: i32,
}

fn pipe(mut from: impl Read, mut to: impl Write) -> std::io::Result<u64> {
    let n = std::io::copy(&mut from, &mut to)?;
    to.flush()?;
    Ok(n)
}

fn relay_one(accepted: TcpStream, args: &ZrelayArgs) -> Result<()> {
    let upstream = TcpStream::connect(&args.connect)
        .with_context(|| format!("connecting {}", args.connect))?;
    accepted.set_nodelay(true)?;
    upstream.set_nodelay(true)?;
    let zargs: Vec<String> = match args.mode.as_str() {
        "compress" => vec![format!("-{}", args.level), "-q".into(), "-c".into()],
        "decompress" => vec!["-d".into(), "-q".into(), "-c".into()],
        m => bail!("unknown mode {m:?}"),
    };
    let mut z = Command::new("zstd")
        .args(&zargs)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting zstd (is the zstd package installed?)")?;
    let zin = z.stdin.take().context("no zstd stdin")?;
    let zout = z.stdout.take().context("no zstd stdout")?;
    let (acc_r, up_w) = (accepted.try_clone()?, upstream.try_clone()?);
    std::thread::scope(|s| {
        // Forward direction: accepted -> upstream, unchanged.
        s.spawn(move || {
            let _ = pipe(&acc_r, &up_w);
            let _ = up_w.shutdown(Shutdown::Write);
        });
        // Return direction: upstream -> zstd -> accepted.
        let up_r = &upstream;
        s.spawn(move || {
            let _ = pipe(up_r, zin);
        });
        let acc_w = &accepted;
        s.spawn(move || {
            let _ = pipe(zout, acc_w);
            let _ = acc_w.shutdown(Shutdown::Write);
        });
    });
    let _ = z.wait();
    Ok(())
}

/// Runs the relay until killed.
pub fn zrelay(args: ZrelayArgs) -> Result<()> {
    let listener =
        TcpListener::bind(&args.listen).with_context(|| format!("binding {}", args.listen))?;
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let a = args.clone();
        let _ = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || {
                if let Err(e) = relay_one(conn, &a) {
                    eprintln!("zrelay: {e:#}");
                }
            });
    }
    Ok(())
}
