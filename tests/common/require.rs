//! Tests that need something a machine may lack: root, nftables, a tmpfs, Prometheus, Chromium.
//!
//! Under CI (`CI=true`), which installs all of it and runs as root, a missing requirement fails the
//! test. Elsewhere the test is skipped and says so on the terminal, one `SKIPPED` line per test
//! (written to stderr directly, past the test harness's capture, so it shows beside the passes and
//! `grep -c SKIPPED` counts them). Shared by the workspace's tests, by path.
#![allow(dead_code)]

use std::io::Write;

/// True when running under CI.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Whether the calling test must stop here because `need` is not `available`: under CI it panics
/// (the test fails); elsewhere it prints `SKIPPED <test>: needs <need>` and returns true.
pub fn skip_without(available: bool, need: &str) -> bool {
    if available {
        return false;
    }
    let current = std::thread::current();
    let test = current.name().unwrap_or("a test");
    assert!(
        !ci(),
        "{test} needs {need}; CI (CI=true) must provide it, so this is a failure, not a skip"
    );
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED {test}: needs {need}");
    true
}

/// `found`, or `None` after [`skip_without`] said why (under CI: a failure).
pub fn need<T>(found: Option<T>, need: &str) -> Option<T> {
    if skip_without(found.is_some(), need) {
        return None;
    }
    found
}
