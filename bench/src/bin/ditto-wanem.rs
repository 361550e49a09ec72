//! `ditto-wanem`: a packet-level WAN link emulator between two TUN devices.

use clap::Parser;
use ditto_bench::wanem::{self, WanemArgs};
use std::process::ExitCode;

/// Forwards IP packets between two TUN devices with delay, rate, queue, loss, jitter and MTU
/// limits. Counters are printed on SIGINT/SIGTERM and kept in --stats-file while running.
#[derive(Parser, Debug)]
#[command(name = "ditto-wanem", version)]
struct Cli {
    #[command(flatten)]
    args: WanemArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match wanem::run(cli.args) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ditto-wanem: {e:#}");
            ExitCode::from(1)
        }
    }
}
