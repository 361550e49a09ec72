//! Files and file systems for store tests: a real small tmpfs (for a real "disk full"), and the
//! store's segment files. Shared by the binary's tests and, by path, by the dedup crate's (which
//! include `require.rs` beside it).
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted on a fresh temporary directory, unmounted when dropped (also on panic).
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` when this process cannot mount (not root, no privilege): the test is skipped, or
    /// fails under CI (see [`super::require`]).
    pub fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        let why = match out {
            Ok(o) if o.status.success() => return Some(Tmpfs { dir }),
            Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_owned(),
            Err(e) => format!("cannot run mount: {e}"),
        };
        super::require::skip_without(false, &format!("a tmpfs mount, as root ({why})"));
        None
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Busy (a file still open): detach it now, the kernel frees it when the last user goes.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

/// A slow disk: `bench/scripts/slowfs.py` (a FUSE passthrough that delays every write by
/// `write_ms_per_4k` per 4 KiB and every fsync by `fsync_ms`) mounted on a fresh temporary directory;
/// unmounted when dropped (also on panic).
pub struct SlowFs {
    mnt: tempfile::TempDir,
    _back: tempfile::TempDir,
    child: std::process::Child,
}

impl SlowFs {
    /// `None` (after saying why) when this process cannot mount it: not root, or python3-fusepy
    /// missing. Under CI (`CI` set) a missing package is a failure, not a skip.
    pub fn mount(write_ms_per_4k: f64, fsync_ms: f64) -> Option<SlowFs> {
        let root = fs::read_to_string("/proc/self/status").is_ok_and(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2))
                == Some("0")
        });
        if !root {
            eprintln!("SKIPPED: mounting the slow FUSE file system needs root");
            return None;
        }
        let python = "/usr/bin/python3";
        let has_fusepy = Command::new(python)
            .args(["-c", "import fusepy"])
            .status()
            .is_ok_and(|s| s.success());
        if !has_fusepy {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must install python3-fusepy and fuse3 (see .ci/run)"
            );
            eprintln!("SKIPPED: the slow FUSE file system needs python3-fusepy and fuse3");
            return None;
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .ancestors()
            .map(|d| d.join("bench/scripts/slowfs.py"))
            .find(|p| p.is_file())
            .expect("bench/scripts/slowfs.py");
        let back = tempfile::tempdir().expect("tempdir");
        let mnt = tempfile::tempdir().expect("tempdir");
        let child = Command::new(python)
            .arg(&script)
            .arg(back.path())
            .arg(mnt.path())
            .arg("--write-ms-per-4k")
            .arg(write_ms_per_4k.to_string())
            .arg("--fsync-ms")
            .arg(fsync_ms.to_string())
            .spawn()
            .expect("start slowfs.py");
        let fs = SlowFs {
            mnt,
            _back: back,
            child,
        };
        let want = fs.mnt.path().to_string_lossy().into_owned();
        for _ in 0..100 {
            let mounted = fs::read_to_string("/proc/mounts").is_ok_and(|m| {
                m.lines()
                    .any(|l| l.split(' ').nth(1) == Some(want.as_str()))
            });
            if mounted {
                return Some(fs);
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("slowfs.py did not mount {want} within 10 s");
    }

    pub fn path(&self) -> &Path {
        self.mnt.path()
    }
}

impl Drop for SlowFs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(self.mnt.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.mnt.path())
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The store's segment files in `dir`, in order.
pub fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("dirent").path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("seg-") && n.ends_with(".dat"))
        })
        .collect();
    v.sort();
    v
}

/// Bytes in the segment files of `dir`.
pub fn dir_bytes(dir: &Path) -> u64 {
    segments(dir)
        .iter()
        .map(|p| fs::metadata(p).expect("metadata").len())
        .sum()
}
