//! `ditto analyze` (to come).
use std::process::ExitCode;
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Files to send, in order.
    pub files: Vec<std::path::PathBuf>,
}
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not yet implemented")
}
