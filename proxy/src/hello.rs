//! The tunnel hello, exchanged by both sides right after the TLS handshake, before any frame.
//!
//! ```text
//! hello   = magic "DITTO" (5 bytes) | version u16 | body_len u16 | body
//! body    = store_id u128 | window u32 | max_streams u32
//!         | codec_len u8 | codec | chunking_len u8 | chunking | name_len u8 | name
//! ```
//! All integers are big-endian. The magic and version come first and keep this position in every
//! future version, so two builds that disagree can always tell *that* they disagree and say so.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The tunnel protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 2;
const MAGIC: &[u8; 5] = b"DITTO";
const MAX_BODY: usize = 1024;
/// Smallest per-stream window a peer may advertise (it must hold a full OPEN).
pub const MIN_WINDOW: u32 = 64 * 1024;
/// Largest per-stream window a peer may advertise.
pub const MAX_WINDOW: u32 = 1 << 30;

/// One side's hello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    /// Identity of the sender's chunk store; a new one means the peer lost its store.
    pub store_id: u128,
    /// DATA bytes the sender accepts per stream before it grants more with WINDOW.
    pub window: u32,
    /// Streams the sender accepts on this connection at once.
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
    #[error("peer speaks tunnel protocol version {theirs}, this build speaks version {ours}: upgrade both ends to the same release")]
    Version { ours: u16, theirs: u16 },
    #[error("malformed hello: {0}")]
    Malformed(&'static str),
    #[error("peer runs stream codec {theirs:?}, this node runs {ours:?}: both ends must run the same engine")]
    Codec { ours: String, theirs: String },
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Fields are ours (codec, chunking id, node name); names longer than 255 bytes are cut, on a
    // character boundary, rather than refused.
    let mut end = s.len().min(255);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.push(end as u8);
    out.extend_from_slice(&s.as_bytes()[..end]);
}

impl Hello {
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(128);
        body.extend_from_slice(&self.store_id.to_be_bytes());
        body.extend_from_slice(&self.window.to_be_bytes());
        body.extend_from_slice(&self.max_streams.to_be_bytes());
        put_str(&mut body, &self.codec);
        put_str(&mut body, &self.chunking);
        put_str(&mut body, &self.name);
        let mut out = Vec::with_capacity(9 + body.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    fn decode_body(version: u16, b: &[u8]) -> Result<Hello, HelloError> {
        let mut pos = 0usize;
        let mut take = |n: usize| -> Result<&[u8], HelloError> {
            let s = b
                .get(pos..pos + n)
                .ok_or(HelloError::Malformed("truncated body"))?;
            pos += n;
            Ok(s)
        };
        let mut u128b = [0u8; 16];
        u128b.copy_from_slice(take(16)?);
        let mut u32b = [0u8; 4];
        u32b.copy_from_slice(take(4)?);
        let window = u32::from_be_bytes(u32b);
        u32b.copy_from_slice(take(4)?);
        let max_streams = u32::from_be_bytes(u32b);
        let mut string = || -> Result<String, HelloError> {
            let n = take(1)?[0] as usize;
            let s = take(n)?;
            String::from_utf8(s.to_vec())
                .map_err(|_| HelloError::Malformed("text field is not UTF-8"))
        };
        let codec = string()?;
        let chunking = string()?;
        let name = string()?;
        if !(MIN_WINDOW..=MAX_WINDOW).contains(&window) {
            return Err(HelloError::Malformed("window out of range"));
        }
        if max_streams == 0 {
            return Err(HelloError::Malformed("max_streams is zero"));
        }
        Ok(Hello {
            version,
            store_id: u128::from_be_bytes(u128b),
            window,
            max_streams,
            codec,
            chunking,
            name,
        })
    }
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
    let version = u16::from_be_bytes([head[5], head[6]]);
    if version != PROTOCOL_VERSION {
        return Err(HelloError::Version {
            ours: PROTOCOL_VERSION,
            theirs: version,
        });
    }
    let len = u16::from_be_bytes([head[7], head[8]]) as usize;
    if len > MAX_BODY {
        return Err(HelloError::Malformed("body too long"));
    }
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await?;
    let theirs = Hello::decode_body(version, &body)?;
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

    fn sample() -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            store_id: 0x0123_4567_89ab_cdef_0011_2233_4455_6677,
            window: 1 << 20,
            max_streams: 256,
            codec: "raw".into(),
            chunking: "none".into(),
            name: "site-a".into(),
        }
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

        // A future version is reported as such.
        let (mut a, mut b) = tokio::io::duplex(4096);
        let mut next = sample();
        next.version = PROTOCOL_VERSION + 1;
        let bytes = next.encode();
        tokio::spawn(async move {
            let _ = b.write_all(&bytes).await;
            let mut sink = [0u8; 256];
            let _ = b.read(&mut sink).await;
        });
        let err = exchange(&mut a, &sample()).await.expect_err("version");
        assert!(
            matches!(err, HelloError::Version { ours: PROTOCOL_VERSION, theirs } if theirs == PROTOCOL_VERSION + 1),
            "{err}"
        );
        assert!(err
            .to_string()
            .contains(&format!("version {}", PROTOCOL_VERSION + 1)));

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
}
