//! The `ditto` command: CLI parsing and wiring of the engine and the proxy.

#![forbid(unsafe_code)]

mod analyze;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "ditto", version, about = "ditto: a deduplicating, compressing WAN accelerator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Feed files through an encoder/decoder pair, as if sent one after another over one link, and report
    /// the wire bytes and savings.
    Analyze(analyze::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Analyze(args) => analyze::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("ditto: {err:#}");
            ExitCode::from(2)
        }
    }
}
