//! The tunnel hello, exchanged by both sides right after the TLS handshake, before any frame.
//!
//! ```text
//! hello   = magic "DITTO" (5 bytes) | version u16 | body_len u16 | body
//! body    = versions_len u8 | versions (u16 each)            -- from version 3 on
//!         | store_id u128 | session_id u128 | window u32 | max_streams u32
//!         | codec_len u8 | codec | chunking_len u8 | chunking | name_len u8 | name
//!         | (bytes later versions append; ignored)
//! ```
//! All integers are big-endian. `version` is the highest version the sender speaks, and the body
//! lists every version it speaks; both sides use the highest version in common. The magic and
//! version keep their position in every version, so two builds that disagree can always tell
//! *that* they disagree. A version 2 peer (body without the list) speaks only version 2.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The tunnel protocol versions this build speaks, highest last.
pub const VERSIONS: &[u16] = &[3, 4, 5, 6];
/// The highest of them.
pub const PROTOCOL_VERSION: u16 = 6;
/// The first version whose dedup decoders know the TDELTA op (docs/protocol.md).
pub const TRIMMED_DELTAS: u16 = 5;
/// The first version whose dedup decoders know the ERUN op (docs/protocol.md).
pub const EDITED_RUNS: u16 = 6;
const MAGIC: &[u8; 5] = b"DITTO";
const MAX_BODY: usize = 1024;
/// Smallest per-stream window a peer may advertise.
pub const MIN_WINDOW: u32 = 64 * 1024;
/// Largest per-stream window a peer may advertise.
pub const MAX_WINDOW: u32 = 1 << 30;

/// One side's hello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Versions the sender speaks.
    pub versions: Vec<u16>,
    /// Identity of the sender's chunk store; a new one means the peer lost its store.
    pub store_id: u128,
    /// Identity of the sender's process: a new one means the peer restarted, and every stream of
    /// the session with its previous process is gone.
    pub session_id: u128,
    /// DATA bytes the sender accepts per stream beyond what it consumed.
    pub window: u32,
    /// Streams the sender accepts from the receiver at once.
    pub max_streams: u32,
    /// Stream codec ("dedup/1", "raw"): must match.
    pub codec: String,
    /// Chunking parameters id: informational (different chunking still interoperates, dedups less).
    pub chunking: String,
    /// The sender's node name (for logs; identity is the key).
    pub name: String,
}

/// Why a hello exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error("hello I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("the peer did not send a ditto hello (bad magic)")]
    BadMagic,
    #[error("no tunnel protocol version in common: the peer speaks {theirs:?}, this build speaks {ours:?}; upgrade one end")]
    Version { ours: Vec<u16>, theirs: Vec<u16> },
    #[error("malformed hello: {0}")]
    Malformed(&'static str),
    #[error("peer runs stream codec {theirs:?}, this node runs {ours:?}: both ends must run the same engine")]
    Codec { ours: String, theirs: String },
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Fields are ours (codec, chunking id, node name); longer than 255 bytes is cut, on a character
    // boundary, rather than refused.
    let mut end = s.len().min(255);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.push(end as u8);
    out.extend_from_slice(&s.as_bytes()[..end]);
}

/// Reads fields off the front of a hello body.
struct Body<'a>(&'a [u8]);

impl<'a> Body<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], HelloError> {
        if self.0.len() < n {
            return Err(HelloError::Malformed("truncated body"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], HelloError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn string(&mut self) -> Result<String, HelloError> {
        let n = self.take(1)?[0] as usize;
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| HelloError::Malformed("text field is not UTF-8"))
    }
}

impl Hello {
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(160);
        let versions = &self.versions[..self.versions.len().min(255)];
        body.push(versions.len() as u8);
        for v in versions {
            body.extend_from_slice(&v.to_be_bytes());
        }
        body.extend_from_slice(&self.store_id.to_be_bytes());
        body.extend_from_slice(&self.session_id.to_be_bytes());
        body.extend_from_slice(&self.window.to_be_bytes());
        body.extend_from_slice(&self.max_streams.to_be_bytes());
        put_str(&mut body, &self.codec);
        put_str(&mut body, &self.chunking);
        put_str(&mut body, &self.name);
        let top = versions.iter().copied().max().unwrap_or(0);
        let mut out = Vec::with_capacity(9 + body.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&top.to_be_bytes());
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Parses a hello (header and body). A peer with no version in common is an error that names
    /// both sides' versions.
    pub fn decode(head: &[u8; 9], body: &[u8]) -> Result<Hello, HelloError> {
        if &head[..5] != MAGIC {
            return Err(HelloError::BadMagic);
        }
        let top = u16::from_be_bytes([head[5], head[6]]);
        if top < 3 {
            // Version 1 and 2 bodies have no version list: such a peer speaks only `top`.
            return Err(HelloError::Version {
                ours: VERSIONS.to_vec(),
                theirs: vec![top],
            });
        }
        let mut b = Body(body);
        let n = b.take(1)?[0] as usize;
        let mut versions = Vec::with_capacity(n);
        for _ in 0..n {
            versions.push(u16::from_be_bytes(b.array()?));
        }
        if !versions.iter().any(|v| VERSIONS.contains(v)) {
            return Err(HelloError::Version {
                ours: VERSIONS.to_vec(),
                theirs: versions,
            });
        }
        let store_id = u128::from_be_bytes(b.array()?);
        let session_id = u128::from_be_bytes(b.array()?);
        let window = u32::from_be_bytes(b.array()?);
        let max_streams = u32::from_be_bytes(b.array()?);
        let codec = b.string()?;
        let chunking = b.string()?;
        let name = b.string()?;
        if !(MIN_WINDOW..=MAX_WINDOW).contains(&window) {
            return Err(HelloError::Malformed("window out of range"));
        }
        if max_streams == 0 {
            return Err(HelloError::Malformed("max_streams is zero"));
        }
        Ok(Hello {
            versions,
            store_id,
            session_id,
            window,
            max_streams,
            codec,
            chunking,
            name,
        })
    }

    /// The version both sides use: the highest both speak.
    pub fn common_version(&self, theirs: &Hello) -> Option<u16> {
        highest_common(&self.versions, &theirs.versions)
    }
}

/// The version this build uses with the peer that sent `theirs` (see [`Hello::common_version`]).
pub fn version_with(theirs: &Hello) -> Option<u16> {
    highest_common(VERSIONS, &theirs.versions)
}

fn highest_common(ours: &[u16], theirs: &[u16]) -> Option<u16> {
    ours.iter().copied().filter(|v| theirs.contains(v)).max()
}

/// Sends our hello and reads the peer's. The caller bounds the whole exchange with a timeout.
pub async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    ours: &Hello,
) -> Result<Hello, HelloError> {
    io.write_all(&ours.encode()).await?;
    io.flush().await?;
    let mut head = [0u8; 9];
    io.read_exact(&mut head).await?;
    if &head[..5] != MAGIC {
        return Err(HelloError::BadMagic);
    }
    let len = u16::from_be_bytes([head[7], head[8]]) as usize;
    if len > MAX_BODY {
        return Err(HelloError::Malformed("body too long"));
    }
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await?;
    let theirs = Hello::decode(&head, &body)?;
    if theirs.codec != ours.codec {
        return Err(HelloError::Codec {
            ours: ours.codec.clone(),
            theirs: theirs.codec,
        });
    }
    Ok(theirs)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Hello {
        Hello {
            versions: VERSIONS.to_vec(),
            store_id: 0x0123_4567_89ab_cdef_0011_2233_4455_6677,
            session_id: 42,
            window: 1 << 20,
            max_streams: 256,
            codec: "raw".into(),
            chunking: "none".into(),
            name: "site-a".into(),
        }
    }

    fn split(bytes: &[u8]) -> ([u8; 9], Vec<u8>) {
        let mut head = [0u8; 9];
        head.copy_from_slice(&bytes[..9]);
        (head, bytes[9..].to_vec())
    }

    #[tokio::test]
    async fn exchange_roundtrip_and_errors() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let ha = sample();
        let mut hb = sample();
        hb.name = "site-b".into();
        let hb2 = hb.clone();
        let t = tokio::spawn(async move { exchange(&mut b, &hb2).await });
        let got = exchange(&mut a, &ha).await.expect("a side");
        assert_eq!(got, hb);
        assert_eq!(t.await.expect("join").expect("b side"), ha);

        // Not a hello at all.
        let (mut a, mut b) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            let _ = b.write_all(b"GET / HTTP/1.1\r\n\r\n").await;
            let mut sink = [0u8; 256];
            let _ = b.read(&mut sink).await;
        });
        assert!(matches!(
            exchange(&mut a, &sample()).await,
            Err(HelloError::BadMagic)
        ));

        // Codec mismatch.
        let (mut a, mut b) = tokio::io::duplex(4096);
        let mut other = sample();
        other.codec = "dedup/1".into();
        tokio::spawn(async move { exchange(&mut b, &other).await });
        assert!(matches!(
            exchange(&mut a, &sample()).await,
            Err(HelloError::Codec { .. })
        ));
    }

    #[test]
    fn versions_are_negotiated() {
        // A later build that also speaks 3 to 6 and appends fields we do not know: we use 6.
        let mut later = sample();
        later.versions = vec![3, 4, 5, 6, 7];
        let mut bytes = later.encode();
        bytes.extend_from_slice(b"future fields");
        let body_len = (bytes.len() - 9) as u16;
        bytes[7..9].copy_from_slice(&body_len.to_be_bytes());
        let (head, body) = split(&bytes);
        let theirs = Hello::decode(&head, &body).expect("decodes");
        assert_eq!(u16::from_be_bytes([head[5], head[6]]), 7);
        assert_eq!(sample().common_version(&theirs), Some(6));
        // A version 5 build (no ERUN ops): we use 5.
        let mut v5 = sample();
        v5.versions = vec![3, 4, 5];
        assert_eq!(sample().common_version(&v5), Some(5));
        // A version 4 build (no TDELTA ops): we use 4.
        let mut v4 = sample();
        v4.versions = vec![3, 4];
        assert_eq!(sample().common_version(&v4), Some(4));
        // A version 3 build (no summaries): we use 3.
        let mut v3 = sample();
        v3.versions = vec![3];
        assert_eq!(sample().common_version(&v3), Some(3));

        // A build that speaks only a later version: named in the error.
        let mut only7 = sample();
        only7.versions = vec![7];
        let (head, body) = split(&only7.encode());
        let err = Hello::decode(&head, &body).expect_err("no common version");
        assert!(err.to_string().contains("[7]"), "{err}");

        // A version 2 peer: its body has no version list.
        let mut v2 = sample().encode();
        v2[5..7].copy_from_slice(&2u16.to_be_bytes());
        let (head, body) = split(&v2);
        assert!(matches!(
            Hello::decode(&head, &body),
            Err(HelloError::Version { theirs, .. }) if theirs == vec![2]
        ));

        // Truncated and out-of-range bodies.
        let good = sample().encode();
        let (head, body) = split(&good);
        assert!(Hello::decode(&head, &body[..body.len() - 1]).is_err());
        let mut zero = sample();
        zero.window = 1;
        let (head, body) = split(&zero.encode());
        assert!(Hello::decode(&head, &body).is_err());
    }
}
