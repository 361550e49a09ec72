//! The guard: a small child process that takes ditto's interception rules out of the kernel when
//! the daemon can no longer serve them.
//!
//! Rules that divert traffic to a process that is gone or hung would black-hole it. Some rules fail
//! open by themselves (tproxy, inline); redirect does not, and no rule notices a hang. So `ditto run`
//! starts `ditto guard` with a pipe: the daemon's event loop writes a heartbeat byte at a quarter of
//! the timeout. The guard removes the rules when the pipe closes without a goodbye (the daemon died,
//! however: SIGKILL, crash, OOM) or when, once the heartbeats began, none came for the timeout (hung,
//! SIGSTOP); a hung
//! daemon is then killed, so connections it held end with a reset instead of hanging (a supervisor
//! such as systemd restarts it). The guard is its own process group, so a terminal's ^C reaches
//! only the daemon, which stops gracefully and says goodbye.

use anyhow::{Context, Result};
use ditto_proxy::intercept::RuleNames;
use std::io::{Read, Write};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BEAT: u8 = b'.';
const BYE: u8 = b'q';

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long)]
    table: String,
    #[arg(long)]
    fwmark: u32,
    #[arg(long)]
    route_table: u32,
    #[arg(long)]
    announce_table: u32,
    #[arg(long)]
    timeout_ms: u64,
    /// The daemon: killed if it hangs.
    #[arg(long)]
    parent: u32,
}

/// The daemon's end of the guard.
pub struct Guard {
    child: Child,
    pipe: Option<ChildStdin>,
    pub interval: Duration,
}

impl Guard {
    /// Starts the guard for the rules `names`.
    pub fn spawn(names: &RuleNames, timeout: Duration) -> Result<Guard> {
        use std::os::unix::process::CommandExt;
        let exe = std::env::current_exe().context("locating the ditto binary for the guard")?;
        let mut child = Command::new(exe)
            .arg("guard")
            .args(["--table", &names.table])
            .args(["--fwmark", &names.fwmark.to_string()])
            .args(["--route-table", &names.route_table.to_string()])
            .args(["--announce-table", &names.announce_table.to_string()])
            .args(["--timeout-ms", &timeout.as_millis().to_string()])
            .args(["--parent", &std::process::id().to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()
            .context("starting the guard process")?;
        let pipe = child.stdin.take();
        Ok(Guard {
            child,
            pipe,
            interval: timeout / 4,
        })
    }

    /// One heartbeat.
    pub fn beat(&mut self) {
        if let Some(p) = &mut self.pipe {
            if p.write_all(&[BEAT]).is_err() {
                tracing::error!(
                    "the guard process is gone: rules will not be removed if ditto dies"
                );
                self.pipe = None;
            }
        }
    }

    /// Tells the guard the daemon stopped cleanly (and removed its rules itself).
    pub fn goodbye(mut self) {
        if let Some(mut p) = self.pipe.take() {
            let _ = p.write_all(&[BYE]);
        }
        let _ = self.child.wait();
    }
}

enum Event {
    Beat,
    Bye,
    Closed,
}

/// `ditto guard` (started by `ditto run`, not by hand).
pub fn run(args: Args) -> Result<ExitCode> {
    crate::daemon::init_logging();
    let names = RuleNames {
        table: args.table,
        fwmark: args.fwmark,
        route_table: args.route_table,
        announce_table: args.announce_table,
    };
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 64];
        loop {
            let ev = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => Event::Closed,
                Ok(n) if buf[..n].contains(&BYE) => Event::Bye,
                Ok(_) => Event::Beat,
            };
            let last = !matches!(ev, Event::Beat);
            if tx.send(ev).is_err() || last {
                return;
            }
        }
    });
    // Silence counts as a hang only once the daemon's event loop has beaten: a start that takes
    // longer than the timeout (a slow machine, a first boot making its keys) is not a hang. A start
    // that never ends is the supervisor's to catch (systemd's start timeout: READY=1 never comes);
    // a daemon that dies while starting closes the pipe like any other.
    let mut beating = false;
    let hung = loop {
        let ev = if beating {
            rx.recv_timeout(timeout)
        } else {
            rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected)
        };
        match ev {
            Ok(Event::Beat) => beating = true,
            Ok(Event::Bye) => return Ok(ExitCode::SUCCESS),
            Ok(Event::Closed) | Err(mpsc::RecvTimeoutError::Disconnected) => break false,
            Err(mpsc::RecvTimeoutError::Timeout) => break true,
        }
    };
    let why = if hung {
        "the daemon stopped responding"
    } else {
        "the daemon exited without stopping cleanly"
    };
    match ditto_proxy::rules::remove(&names) {
        Ok(()) => tracing::warn!(
            table = %names.table,
            "guard: {why}; interception rules removed and announced prefixes withdrawn, traffic passes unaccelerated"
        ),
        Err(e) => tracing::error!(table = %names.table, "guard: {why}; removing rules failed: {e}"),
    }
    if hung {
        tracing::warn!(pid = args.parent, "guard: killing the hung daemon");
        if let Err(e) = crate::sys::kill(args.parent) {
            tracing::error!(pid = args.parent, "guard: kill: {e}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
