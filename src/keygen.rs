//! `ditto keygen --out PREFIX` and `ditto fingerprint KEY`: node keys and their pinned fingerprints.

use anyhow::{Context, Result};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct KeygenArgs {
    /// Writes PREFIX.key (private, mode 0600) and PREFIX.pub (public key and fingerprint).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct FingerprintArgs {
    /// A private key file written by `ditto keygen`.
    pub key: PathBuf,
}

pub fn keygen(args: KeygenArgs) -> Result<ExitCode> {
    let files = ditto_proxy::identity::write_key_files(&args.out).context("generating the key")?;
    eprintln!(
        "wrote {} (private: keep it on this node) and {}",
        files.key_path.display(),
        files.pub_path.display()
    );
    eprintln!("put this fingerprint in the peer's config ([[peer]] fingerprint = ...):");
    println!("{}", files.fingerprint);
    Ok(ExitCode::SUCCESS)
}

pub fn fingerprint(args: FingerprintArgs) -> Result<ExitCode> {
    if args.key.extension().is_some_and(|e| e == "pub") {
        anyhow::bail!(
            "{} is a public key file: give the private key (PREFIX.key); the .pub file's first line already names its fingerprint",
            args.key.display()
        );
    }
    let id = ditto_proxy::Identity::load(&args.key)?;
    println!("{}", id.fingerprint);
    Ok(ExitCode::SUCCESS)
}
