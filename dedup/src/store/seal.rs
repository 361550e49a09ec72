//! Encryption at rest: the store key, and the sealing of records and of the index snapshot.
//!
//! A store with a [`StoreKey`] seals every record with AES-256-GCM (`ring`). The keys actually used
//! are derived per store *incarnation* with HKDF-SHA256 from the store key and the [`StoreId`]: a store
//! that is wiped and started anew (new id) never reuses a key, and a record copied from another store
//! (another id, or another key) does not open. Within one incarnation, each record's nonce is a
//! counter started at a random 96-bit value each time the store is opened, so no nonce repeats even
//! when a torn tail is rewritten at the same offset. The record's place (segment number and offset)
//! and its plaintext header are the associated data: a record moved within the store, replayed at
//! another place or altered fails to open, exactly like a damaged one.
//!
//! The meta file holds a key check (16 bytes derived from the key and the store id, revealing
//! nothing about the key): a store opened with another key, or without one, is recognised at once and
//! started anew.

use std::fmt;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::hkdf;

use super::StoreId;

/// Length of a store key file: 32 random bytes, nothing else.
pub const STORE_KEY_LEN: usize = 32;
/// Length of the AEAD tag after every sealed message.
pub(crate) const TAG_LEN: usize = 16;
/// Length of a nonce.
pub(crate) const NONCE_LEN: usize = 12;

/// The secret every disk-tier file of a store is sealed with. Keep it like the node's private key
/// (mode 0600, next to it); losing it only costs the store's contents (the store starts empty).
#[derive(Clone, PartialEq, Eq)]
pub struct StoreKey([u8; STORE_KEY_LEN]);

impl fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StoreKey(..)")
    }
}

impl StoreKey {
    /// A key from its bytes.
    pub fn from_bytes(b: [u8; STORE_KEY_LEN]) -> StoreKey {
        StoreKey(b)
    }

    /// A new random key.
    pub fn generate() -> StoreKey {
        StoreKey(rand::random())
    }

    /// Reads the key file at `path`, or, if there is none, creates it (mode 0600, exclusively) with a
    /// new random key. Returns the key and whether it was created. A file of the wrong length is an
    /// error, never silently replaced.
    pub fn load_or_create(path: &Path) -> io::Result<(StoreKey, bool)> {
        match std::fs::File::open(path) {
            Ok(mut f) => {
                super::disk::warn_if_readable_by_others(path);
                let mut b = Vec::with_capacity(STORE_KEY_LEN + 1);
                Read::by_ref(&mut f)
                    .take(STORE_KEY_LEN as u64 + 1)
                    .read_to_end(&mut b)?;
                let b: [u8; STORE_KEY_LEN] = b.try_into().map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "not a store key: a store key file holds exactly {STORE_KEY_LEN} bytes"
                        ),
                    )
                })?;
                Ok((StoreKey(b), false))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let key = StoreKey::generate();
                let mut f = super::disk::create_private(path)?;
                f.write_all(&key.0)?;
                f.sync_all()?;
                if let Some(dir) = path.parent() {
                    if let Ok(d) = std::fs::File::open(dir) {
                        let _ = d.sync_all();
                    }
                }
                Ok((key, true))
            }
            Err(e) => Err(e),
        }
    }
}

/// HKDF output of a given length.
struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// Keys of one store incarnation, and its nonce counter.
pub(crate) struct Sealer {
    records: LessSafeKey,
    snapshot: LessSafeKey,
    check: [u8; 16],
    /// The first 4 bytes of every nonce of this open.
    nonce_hi: [u8; 4],
    /// The last 8 bytes of the next nonce.
    next: AtomicU64,
}

const SALT: &[u8] = b"ditto chunk store v2";

fn derive(prk: &hkdf::Prk, what: &[u8], id: StoreId, out: &mut [u8]) {
    let id = id.0.to_le_bytes();
    let info = [what, &id[..]];
    // Lengths here are far below HKDF's limit.
    if let Ok(okm) = prk.expand(&info, Len(out.len())) {
        let _ = okm.fill(out);
    }
}

fn aead_key(prk: &hkdf::Prk, what: &[u8], id: StoreId) -> LessSafeKey {
    let mut k = [0u8; 32];
    derive(prk, what, id, &mut k);
    // AES-256 takes any 32 bytes.
    let key = UnboundKey::new(&AES_256_GCM, &k).unwrap_or_else(|_| unreachable!("32-byte key"));
    LessSafeKey::new(key)
}

impl Sealer {
    pub(crate) fn new(key: &StoreKey, id: StoreId) -> Sealer {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, SALT).extract(&key.0);
        let mut check = [0u8; 16];
        derive(&prk, b"key check", id, &mut check);
        Sealer {
            records: aead_key(&prk, b"records", id),
            snapshot: aead_key(&prk, b"snapshot", id),
            check,
            nonce_hi: rand::random(),
            next: AtomicU64::new(rand::random()),
        }
    }

    /// The key check kept in the meta file.
    pub(crate) fn key_check(&self) -> [u8; 16] {
        self.check
    }

    /// A nonce never used before with this incarnation's keys.
    pub(crate) fn fresh_nonce(&self) -> [u8; NONCE_LEN] {
        let lo = self.next.fetch_add(1, Ordering::Relaxed);
        let mut n = [0u8; NONCE_LEN];
        n[..4].copy_from_slice(&self.nonce_hi);
        n[4..].copy_from_slice(&lo.to_le_bytes());
        n
    }

    /// Seals `body` in place (encrypts it) and returns its tag. `head` and the record's place are
    /// the associated data.
    pub(crate) fn seal_record(
        &self,
        nonce: [u8; NONCE_LEN],
        head: &[u8],
        seq: u32,
        off: u64,
        body: &mut [u8],
    ) -> [u8; TAG_LEN] {
        let ad = record_ad(head, seq, off);
        let tag = self
            .records
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&ad[..]),
                body,
            )
            .unwrap_or_else(|_| unreachable!("a record is far below AES-GCM's message limit"));
        let mut t = [0u8; TAG_LEN];
        t.copy_from_slice(tag.as_ref());
        t
    }

    /// Opens `body_and_tag` in place; on success its first `len - TAG_LEN` bytes are the plaintext.
    /// False if it was not sealed by this store incarnation at this place with this header.
    pub(crate) fn open_record(
        &self,
        nonce: [u8; NONCE_LEN],
        head: &[u8],
        seq: u32,
        off: u64,
        body_and_tag: &mut [u8],
    ) -> bool {
        let ad = record_ad(head, seq, off);
        self.records
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&ad[..]),
                body_and_tag,
            )
            .is_ok()
    }

    /// Opens the sealed message at `rec[from..]` (ciphertext and tag) and moves its plain text to the
    /// start of `rec`; returns the plain text, or `None` if it does not open.
    pub(crate) fn open_record_within<'a>(
        &self,
        nonce: [u8; NONCE_LEN],
        head: &[u8],
        seq: u32,
        off: u64,
        rec: &'a mut [u8],
        from: usize,
    ) -> Option<&'a mut [u8]> {
        let ad = record_ad(head, seq, off);
        self.records
            .open_within(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&ad[..]),
                rec,
                from..,
            )
            .ok()
    }

    /// Seals a whole snapshot: returns nonce ++ ciphertext ++ tag.
    pub(crate) fn seal_snapshot(&self, ad: &[u8], mut plain: Vec<u8>) -> Vec<u8> {
        let nonce: [u8; NONCE_LEN] = rand::random();
        let tag = self
            .snapshot
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(ad),
                &mut plain,
            )
            .unwrap_or_else(|_| unreachable!("a snapshot is far below AES-GCM's message limit"));
        let mut out = Vec::with_capacity(NONCE_LEN + plain.len() + TAG_LEN);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&plain);
        out.extend_from_slice(tag.as_ref());
        out
    }

    /// Opens what [`Sealer::seal_snapshot`] returned; `None` if it does not open.
    pub(crate) fn open_snapshot(&self, ad: &[u8], mut sealed: Vec<u8>) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return None;
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&sealed[..NONCE_LEN]);
        let n = self
            .snapshot
            .open_within(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(ad),
                &mut sealed,
                NONCE_LEN..,
            )
            .ok()?
            .len();
        sealed.truncate(n);
        Some(sealed)
    }
}

/// Associated data of a record: its plaintext header fields and its place.
fn record_ad(head: &[u8], seq: u32, off: u64) -> [u8; 20] {
    let mut ad = [0u8; 20];
    ad[..8].copy_from_slice(&head[..8]);
    ad[8..12].copy_from_slice(&seq.to_le_bytes());
    ad[12..20].copy_from_slice(&off.to_le_bytes());
    ad
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_open_only_at_their_place_with_their_key() {
        let key = StoreKey::generate();
        let s = Sealer::new(&key, StoreId(7));
        let head = *b"dTC\x02\x05\0\0\0";
        let mut body = b"hello".to_vec();
        let n = s.fresh_nonce();
        let tag = s.seal_record(n, &head, 1, 100, &mut body);
        assert_ne!(&body[..], b"hello");
        let sealed: Vec<u8> = body.iter().chain(tag.iter()).copied().collect();
        let try_open = |s: &Sealer, seq, off| {
            let mut b = sealed.clone();
            s.open_record(n, &head, seq, off, &mut b)
                .then(|| b[..5].to_vec())
        };
        assert_eq!(try_open(&s, 1, 100).as_deref(), Some(&b"hello"[..]));
        assert_eq!(try_open(&s, 2, 100), None);
        assert_eq!(try_open(&s, 1, 101), None);
        assert_eq!(try_open(&Sealer::new(&key, StoreId(8)), 1, 100), None);
        assert_eq!(
            try_open(&Sealer::new(&StoreKey::generate(), StoreId(7)), 1, 100),
            None
        );
        assert_ne!(s.fresh_nonce(), n);
        assert_eq!(
            Sealer::new(&key, StoreId(7)).key_check(),
            s.key_check(),
            "the key check depends on key and id only"
        );
    }

    #[test]
    fn snapshot_round_trip() {
        let s = Sealer::new(&StoreKey::generate(), StoreId(1));
        let sealed = s.seal_snapshot(b"ad", b"index".to_vec());
        assert_eq!(
            s.open_snapshot(b"ad", sealed.clone()).as_deref(),
            Some(&b"index"[..])
        );
        assert_eq!(s.open_snapshot(b"xx", sealed.clone()), None);
        let mut bad = sealed;
        bad[NONCE_LEN] ^= 1;
        assert_eq!(s.open_snapshot(b"ad", bad), None);
    }
}
