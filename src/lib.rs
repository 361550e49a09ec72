//! The library half of the `ditto` command: its configuration (parsed and validated here, used by
//! the binary, fuzzed by `fuzz/`).

#![deny(unsafe_code)]

pub mod config;

/// Entry points for fuzzing (shared by the cargo-fuzz targets in `fuzz/` and by the test that replays
/// their corpus). Whatever the input, they must return without panicking.
#[doc(hidden)]
pub mod fuzzing {
    use crate::config::Loaded;
    use std::path::Path;

    /// Parses `data` as a config file and, if it is valid, converts it as `ditto run` would.
    pub fn config(data: &[u8]) {
        let Ok(src) = std::str::from_utf8(data) else {
            return;
        };
        let Ok(l) = Loaded::from_source(src.to_owned(), Path::new("/etc/ditto/ditto.toml")) else {
            return;
        };
        let _ = l.settings();
        let _ = l.intercept();
        let _ = l.watchdog();
        let _ = l.peers_and_forwards();
        let _ = l.key_file();
        let _ = l.store_key_file();
        for p in &l.config.peers {
            let _ = p.allow_list().to_string();
        }
    }
}

#[cfg(test)]
mod tests {
    /// The config fuzzer's corpus replays without a panic (and holds valid configs).
    #[test]
    fn fuzz_corpus_replays_without_panic() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/config");
        let mut n = 0;
        let mut valid = 0;
        for e in std::fs::read_dir(&dir).expect("fuzz/corpus/config") {
            let bytes = std::fs::read(e.expect("entry").path()).expect("read");
            super::fuzzing::config(&bytes);
            let parsed = std::str::from_utf8(&bytes).ok().and_then(|s| {
                crate::config::Loaded::from_source(s.to_owned(), std::path::Path::new("c.toml"))
                    .ok()
            });
            valid += usize::from(parsed.is_some());
            n += 1;
        }
        assert!(n >= 10 && valid >= 3, "{n} corpus files, {valid} valid");
    }
}
