//! Files of a disk tier: naming, positional I/O, the meta file and the index snapshot.
//!
//! Directory layout (nothing else in the directory is touched):
//! - `store.meta`: magic, version (1: plain records, 2: sealed records), the [`StoreId`], for version
//!   2 the key check (see `seal.rs`), blake3 check. Written temp-then-rename.
//! - `seg-NNNNNNNN.dat`: append-only segment files (see `record.rs`), numbered in creation order.
//! - `index.snap`: index snapshot written by a clean `close`, valid only if every segment file still has
//!   exactly the length recorded in it; otherwise the segments are scanned. In a sealed store the
//!   whole snapshot is sealed (AES-256-GCM, magic `DITTOSNE`, then nonce, ciphertext, tag): it holds
//!   chunk ids, which name contents.
//!
//! The directory is created with mode 0700 and every file with mode 0600 (on Unix).

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use super::index::{loc_offset, loc_seg, Entry, LOC_RAM};
use super::record::Format;
use super::seal::Sealer;
use super::{StoreError, StoreId};
use crate::ChunkId;

pub(crate) const META: &str = "store.meta";
pub(crate) const SNAPSHOT: &str = "index.snap";
const META_MAGIC: &[u8; 8] = b"DITTOSTM";
const SNAP_MAGIC: &[u8; 8] = b"DITTOSNP";
const SNAP_SEALED_MAGIC: &[u8; 8] = b"DITTOSNE";
const VERSION: u32 = 1;
/// Meta version of a store with sealed records.
const VERSION_SEALED: u32 = 2;
const META_LEN: usize = 8 + 4 + 16 + 8;
const META_SEALED_LEN: usize = 8 + 4 + 16 + 16 + 8;

/// What a meta file says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Meta {
    /// A store of plain records (no key).
    Plain(StoreId),
    /// A store of sealed records, with the key check of the key it was sealed with.
    Sealed(StoreId, [u8; 16]),
}

/// Creates a new file readable and writable by its owner only (mode 0600 on Unix); never replaces an
/// existing file. For every file the daemon writes that may hold anything about traffic or keys.
pub fn create_private(path: &Path) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    o.open(path)
}

/// Warns (once per call) if the file at `path` may be read by group or others (Unix): for keys.
pub fn warn_if_readable_by_others(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = fs::metadata(path) {
            let mode = m.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    "{} has mode {mode:o}: other users may read it; chmod 600 it",
                    path.display()
                );
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// Creates `dir` (and missing parents) with mode 0700 on Unix, or checks an existing one: a
/// directory that group or others may enter is left as it is, with a warning (once per call).
pub fn private_dir(dir: &Path) -> io::Result<()> {
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                "{} has mode {mode:o}: other users may list or read what it holds;                  chmod 700 it (ditto creates it so)",
                dir.display()
            );
        }
    }
    Ok(())
}

pub(crate) fn io_err(path: &Path, source: io::Error) -> StoreError {
    StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub(crate) fn seg_name(seq: u32) -> String {
    format!("seg-{seq:08}.dat")
}

pub(crate) fn seg_path(dir: &Path, seq: u32) -> PathBuf {
    dir.join(seg_name(seq))
}

fn parse_seg_name(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("seg-")?.strip_suffix(".dat")?;
    if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|&s| s != 0 && s != u32::MAX)
}

#[cfg(unix)]
pub(crate) fn read_at(file: &File, buf: &mut [u8], off: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, off)
}

/// Reads `buf.len()` bytes at `off` only if the page cache holds them all (`RWF_NOWAIT`): never waits
/// for the device. False if any part is not cached, or on any error (the caller then reads normally).
#[cfg(target_os = "linux")]
pub(crate) fn read_cached(file: &File, buf: &mut [u8], off: u64) -> bool {
    use rustix::io::{preadv2, ReadWriteFlags};
    let mut done = 0;
    while done < buf.len() {
        let mut iov = [io::IoSliceMut::new(&mut buf[done..])];
        match preadv2(file, &mut iov, off + done as u64, ReadWriteFlags::NOWAIT) {
            Ok(0) | Err(_) => return false,
            Ok(n) => done += n,
        }
    }
    true
}

/// Whether `dir` is on a file system in RAM (tmpfs, ramfs), whose reads never wait for a device.
#[cfg(target_os = "linux")]
pub(crate) fn in_ram(dir: &Path) -> bool {
    const TMPFS_MAGIC: u64 = 0x0102_1994;
    const RAMFS_MAGIC: u64 = 0x8584_58f6;
    rustix::fs::statfs(dir).is_ok_and(|s| matches!(s.f_type as u64, TMPFS_MAGIC | RAMFS_MAGIC))
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn in_ram(_dir: &Path) -> bool {
    false
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn read_cached(_file: &File, _buf: &mut [u8], _off: u64) -> bool {
    false
}

#[cfg(unix)]
pub(crate) fn write_at(file: &File, buf: &[u8], off: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, buf, off)
}

#[cfg(windows)]
pub(crate) fn read_at(file: &File, mut buf: &mut [u8], mut off: u64) -> io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_read(buf, off) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                buf = &mut buf[n..];
                off += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(windows)]
pub(crate) fn write_at(file: &File, mut buf: &[u8], mut off: u64) -> io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_write(buf, off) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                buf = &buf[n..];
                off += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Makes renames and removals in `dir` durable. Best effort: not every platform can fsync a directory.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Writes `bytes` to `dir/name` atomically: a crash leaves either the old file or the new one.
fn write_atomic(
    dir: &Path,
    name: &str,
    write: impl FnOnce(&mut BufWriter<&File>) -> io::Result<()>,
) -> Result<(), StoreError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let dst = dir.join(name);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&tmp, e)),
    }
    let file = create_private(&tmp).map_err(|e| io_err(&tmp, e))?;
    let res = (|| {
        let mut w = BufWriter::with_capacity(1 << 20, &file);
        write(&mut w)?;
        w.flush()?;
        drop(w);
        file.sync_all()
    })();
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(&tmp, e));
    }
    fs::rename(&tmp, &dst).map_err(|e| io_err(&dst, e))?;
    sync_dir(dir);
    Ok(())
}

/// The meta file's contents, or `None` if it is missing, unreadable or garbled.
pub(crate) fn read_meta(dir: &Path) -> Option<Meta> {
    let b = fs::read(dir.join(META)).ok()?;
    if b.len() < 12 || &b[..8] != META_MAGIC {
        return None;
    }
    let sealed = match u32::from_le_bytes([b[8], b[9], b[10], b[11]]) {
        VERSION if b.len() == META_LEN => false,
        VERSION_SEALED if b.len() == META_SEALED_LEN => true,
        _ => return None,
    };
    let body = b.len() - 8;
    if blake3::hash(&b[..body]).as_bytes()[..8] != b[body..] {
        return None;
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(&b[12..28]);
    let id = StoreId(u128::from_le_bytes(id));
    if !sealed {
        return Some(Meta::Plain(id));
    }
    let mut check = [0u8; 16];
    check.copy_from_slice(&b[28..44]);
    Some(Meta::Sealed(id, check))
}

pub(crate) fn write_meta(dir: &Path, meta: Meta) -> Result<(), StoreError> {
    let mut b = Vec::with_capacity(META_SEALED_LEN);
    b.extend_from_slice(META_MAGIC);
    match meta {
        Meta::Plain(id) => {
            b.extend_from_slice(&VERSION.to_le_bytes());
            b.extend_from_slice(&id.0.to_le_bytes());
        }
        Meta::Sealed(id, check) => {
            b.extend_from_slice(&VERSION_SEALED.to_le_bytes());
            b.extend_from_slice(&id.0.to_le_bytes());
            b.extend_from_slice(&check);
        }
    }
    let check = blake3::hash(&b);
    b.extend_from_slice(&check.as_bytes()[..8]);
    write_atomic(dir, META, |w| w.write_all(&b))
}

/// Sequence numbers of the segment files in `dir`, ascending.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<u32>, StoreError> {
    let mut seqs = Vec::new();
    for ent in fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let ent = ent.map_err(|e| io_err(dir, e))?;
        if let Some(seq) = ent.file_name().to_str().and_then(parse_seg_name) {
            seqs.push(seq);
        }
    }
    seqs.sort_unstable();
    Ok(seqs)
}

/// Removes every file this store owns in `dir` (segments, snapshot, meta, temporaries).
pub(crate) fn wipe(dir: &Path) -> Result<(), StoreError> {
    for ent in fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let ent = ent.map_err(|e| io_err(dir, e))?;
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        let ours = parse_seg_name(name).is_some()
            || name == META
            || name == SNAPSHOT
            || name == format!("{META}.tmp")
            || name == format!("{SNAPSHOT}.tmp");
        if ours {
            let p = ent.path();
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&p, e)),
            }
        }
    }
    sync_dir(dir);
    Ok(())
}

/// Associated data of a sealed snapshot.
fn snap_ad(id: StoreId) -> [u8; 24] {
    let mut ad = [0u8; 24];
    ad[..8].copy_from_slice(SNAP_SEALED_MAGIC);
    ad[8..].copy_from_slice(&id.0.to_le_bytes());
    ad
}

/// Writes the snapshot of `slots` (every index slot, live or free) for the segments `segs` (seq, length),
/// sealed if `sealer` is given.
pub(crate) fn write_snapshot(
    dir: &Path,
    id: StoreId,
    segs: &[(u32, u64)],
    slots: impl ExactSizeIterator<Item = Entry>,
    sealer: Option<&Sealer>,
) -> Result<(), StoreError> {
    let mut plain = Vec::with_capacity(64 + segs.len() * 12 + slots.len() * 32);
    snapshot_bytes(&mut plain, id, segs, slots).map_err(|e| io_err(&dir.join(SNAPSHOT), e))?;
    let bytes = match sealer {
        Some(s) => {
            let mut out = SNAP_SEALED_MAGIC.to_vec();
            out.extend_from_slice(&s.seal_snapshot(&snap_ad(id), plain));
            out
        }
        None => plain,
    };
    write_atomic(dir, SNAPSHOT, |w| w.write_all(&bytes))
}

fn snapshot_bytes(
    w: &mut Vec<u8>,
    id: StoreId,
    segs: &[(u32, u64)],
    slots: impl ExactSizeIterator<Item = Entry>,
) -> io::Result<()> {
    {
        let mut h = blake3::Hasher::new();
        let mut put = |w: &mut Vec<u8>, b: &[u8]| {
            h.update(b);
            w.write_all(b)
        };
        put(w, SNAP_MAGIC)?;
        put(w, &VERSION.to_le_bytes())?;
        put(w, &id.0.to_le_bytes())?;
        put(w, &(segs.len() as u32).to_le_bytes())?;
        for &(seq, len) in segs {
            put(w, &seq.to_le_bytes())?;
            put(w, &len.to_le_bytes())?;
        }
        put(w, &(slots.len() as u32).to_le_bytes())?;
        let mut rec = [0u8; 32];
        for e in slots {
            rec[..16].copy_from_slice(e.id.as_bytes());
            rec[16..24].copy_from_slice(&e.loc.to_le_bytes());
            rec[24..28].copy_from_slice(&e.len.to_le_bytes());
            rec[28..32].copy_from_slice(&e.succ.to_le_bytes());
            put(w, &rec)?;
        }
        w.write_all(h.finalize().as_bytes())
    }
}

struct Rd<'a> {
    b: &'a [u8],
    p: usize,
}

impl Rd<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let s = self.b.get(self.p..self.p + N)?;
        self.p += N;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Some(a)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }
}

/// The slots of a snapshot that is intact and matches `id` and the segment files `segs` (seq, length)
/// exactly; every live entry is checked to lie inside its segment. `None` means: scan instead.
pub(crate) fn read_snapshot(
    dir: &Path,
    id: StoreId,
    segs: &[(u32, u64)],
    fmt: Format,
    sealer: Option<&Sealer>,
) -> Option<Vec<Entry>> {
    let b = fs::read(dir.join(SNAPSHOT)).ok()?;
    let b = match sealer {
        Some(s) => {
            let sealed = b.strip_prefix(&SNAP_SEALED_MAGIC[..])?.to_vec();
            s.open_snapshot(&snap_ad(id), sealed)?
        }
        None => b,
    };
    let body_len = b.len().checked_sub(32)?;
    let (body, sum) = b.split_at(body_len);
    if blake3::hash(body).as_bytes()[..] != sum[..] {
        return None;
    }
    let mut r = Rd { b: body, p: 0 };
    if &r.take::<8>()? != SNAP_MAGIC || r.u32()? != VERSION || r.take::<16>()? != id.0.to_le_bytes()
    {
        return None;
    }
    let nsegs = r.u32()? as usize;
    if nsegs != segs.len() {
        return None;
    }
    for &(seq, len) in segs {
        if r.u32()? != seq || r.u64()? != len {
            return None;
        }
    }
    let nslots = r.u32()? as usize;
    if body.len() - r.p != nslots.checked_mul(32)? {
        return None;
    }
    let mut slots = Vec::with_capacity(nslots);
    for _ in 0..nslots {
        let e = Entry {
            id: ChunkId(r.take()?),
            loc: r.u64()?,
            len: r.u32()?,
            succ: r.u32()?,
        };
        if e.is_live() {
            if e.loc == LOC_RAM {
                return None;
            }
            let i = segs
                .binary_search_by_key(&loc_seg(e.loc), |&(s, _)| s)
                .ok()?;
            let off = u64::from(loc_offset(e.loc));
            let (pre, post) = (fmt.pre() as u64, fmt.post() as u64);
            if off < pre || off + u64::from(e.len) + post > segs[i].1 {
                return None;
            }
        }
        slots.push(e);
    }
    Some(slots)
}

/// Opens a segment for reading, and also for writing if it is the one to append to.
pub(crate) fn open_segment(path: &Path, writable: bool) -> io::Result<File> {
    OpenOptions::new().read(true).write(writable).open(path)
}

/// Creates a new, empty segment (mode 0600); never overwrites an existing file.
pub(crate) fn create_segment(path: &Path) -> io::Result<File> {
    create_private(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seg_names() {
        assert_eq!(parse_seg_name(&seg_name(42)), Some(42));
        assert_eq!(parse_seg_name("seg-00000000.dat"), None);
        assert_eq!(parse_seg_name("seg-0000001.dat"), None);
        assert_eq!(parse_seg_name("seg-0000000x.dat"), None);
        assert_eq!(parse_seg_name("seg-00000001.dat.tmp"), None);
    }

    #[test]
    fn meta_round_trip_and_garbled() {
        let d = tempfile::tempdir().expect("tempdir");
        assert_eq!(read_meta(d.path()), None);
        write_meta(d.path(), Meta::Plain(StoreId(0x1234_5678_9abc))).expect("write");
        assert_eq!(
            read_meta(d.path()),
            Some(Meta::Plain(StoreId(0x1234_5678_9abc)))
        );
        let sealed = Meta::Sealed(StoreId(5), [3; 16]);
        write_meta(d.path(), sealed).expect("write");
        assert_eq!(read_meta(d.path()), Some(sealed));
        write_meta(d.path(), Meta::Plain(StoreId(0x1234_5678_9abc))).expect("write");
        let p = d.path().join(META);
        let mut b = fs::read(&p).expect("read");
        b[14] ^= 1;
        fs::write(&p, &b).expect("write");
        assert_eq!(read_meta(d.path()), None);
    }
}
