//! The `ditto` command: CLI parsing and wiring of the engine and the proxy.

#![deny(unsafe_code)]

mod alloc;
mod analyze;
mod daemon;
mod demo;
mod guard;
mod keygen;
mod notify;
mod status;
mod sys;

use clap::{Parser, Subcommand};
use ditto::config;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "ditto",
    version,
    about = "ditto: a deduplicating, compressing WAN accelerator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Feed files through an encoder/decoder pair, as if sent one after another over one link, and report
    /// the wire bytes and savings.
    Analyze(analyze::Args),
    /// Generate a node key: PREFIX.key (private) and PREFIX.pub; prints the fingerprint peers pin.
    Keygen(keygen::KeygenArgs),
    /// Print the fingerprint of an existing key file.
    Fingerprint(keygen::FingerprintArgs),
    /// Run the appliance daemon until SIGTERM/SIGINT.
    Run(daemon::RunArgs),
    /// Parse and validate a config file (and load its key) without starting anything.
    CheckConfig(daemon::CheckArgs),
    /// Remove ditto's interception rules (nftables tables, policy routing); for ExecStopPost.
    Cleanup(daemon::CleanupArgs),
    /// Internal: the process that removes the rules if `ditto run` dies or hangs.
    #[command(hide = true)]
    Guard(guard::Args),
    /// Show a running node's peers, tunnels, flows and savings (from its admin endpoint).
    Status(status::Args),
    /// Two appliances in this process over an emulated slow WAN: plain vs ditto, twice.
    Demo(demo::Args),
}

/// jemalloc with its background threads gives freed memory back to the system (dirty pages after
/// 10 s): after a burst of thousands of flows, a node's resident memory comes back down, where
/// glibc's malloc kept it (BENCHMARKS.md, "Load").
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Analyze(args) => analyze::run(args),
        Command::Keygen(args) => keygen::keygen(args),
        Command::Fingerprint(args) => keygen::fingerprint(args),
        Command::Run(args) => daemon::run(args),
        Command::CheckConfig(args) => daemon::check_config(args),
        Command::Cleanup(args) => daemon::cleanup(args),
        Command::Guard(args) => guard::run(args),
        Command::Status(args) => status::run(args),
        Command::Demo(args) => demo::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("ditto: {}", error_chain(&err));
            ExitCode::from(2)
        }
    }
}

/// The error and its causes on one line, each cause once. The workspace's library errors put their
/// cause in their own message (their logs need it) and also return it as `source()`; a cause the
/// message so far already includes is not repeated.
fn error_chain(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::error_chain;
    use anyhow::Context;

    #[derive(Debug, thiserror::Error)]
    #[error("reading key file k: {source}")]
    struct Read {
        source: std::io::Error,
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }

    #[test]
    fn each_cause_is_printed_once() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let text = io.to_string();
        let err = Err::<(), _>(Read { source: io })
            .context("a.toml:3: node.key")
            .expect_err("error");
        assert_eq!(
            error_chain(&err),
            format!("a.toml:3: node.key: reading key file k: {text}")
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_chain(&plain), "outer: inner");
    }
}
