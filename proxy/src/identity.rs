//! Node identity: an Ed25519 key, the self-signed certificate made from it, and its fingerprint.
//!
//! Peers are authenticated by pinning: each side's config lists the peer's *key fingerprint*, the
//! SHA-256 of the DER SubjectPublicKeyInfo, in lowercase hex. Pinning the key rather than a
//! certificate means the certificate can be regenerated at every start (it is, from the key file), and
//! an operator can compute the same fingerprint with standard tools:
//! `openssl pkey -in site.key -pubout -outform der | sha256sum`.

use rcgen::{CertificateParams, KeyPair, PKCS_ED25519};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::fmt;
use std::path::Path;

/// Errors loading or creating an identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("reading key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("key file {path} is not a PKCS#8 PEM private key: {source}")]
    Parse { path: String, source: rcgen::Error },
    #[error("generating key or certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("{0} already exists; refusing to overwrite a key")]
    Exists(String),
}

/// A key fingerprint: SHA-256 of the SubjectPublicKeyInfo DER.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER SubjectPublicKeyInfo.
    pub fn of_spki(spki_der: &[u8]) -> Fingerprint {
        let d = ring::digest::digest(&ring::digest::SHA256, spki_der);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Fingerprint(out)
    }

    /// The fingerprint of the key in an X.509 certificate; `None` if the certificate does not parse.
    pub fn of_cert(cert: &CertificateDer<'_>) -> Option<Fingerprint> {
        let ee = webpki::EndEntityCert::try_from(cert).ok()?;
        Some(Fingerprint::of_spki(ee.subject_public_key_info().as_ref()))
    }

    /// Parses 64 hex digits (case-insensitive; ':' separators allowed).
    pub fn parse(s: &str) -> Option<Fingerprint> {
        let digits: Vec<u8> = s.bytes().filter(|b| *b != b':').collect();
        if digits.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in digits.chunks(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Some(Fingerprint(out))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// A loaded identity, ready for TLS.
pub struct Identity {
    pub fingerprint: Fingerprint,
    pub cert: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            fingerprint: self.fingerprint,
            cert: self.cert.clone(),
            key_der: self.key_der.clone(),
        }
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// A fresh random identity (tests, the demo).
    pub fn generate() -> Result<Identity, IdentityError> {
        let key = KeyPair::generate_for(&PKCS_ED25519)?;
        Identity::from_key_pair(&key)
    }

    /// The identity from a PKCS#8 PEM private key.
    pub fn from_pem(pem: &str) -> Result<Identity, rcgen::Error> {
        let key = KeyPair::from_pem(pem)?;
        Identity::from_key_pair(&key).map_err(|e| match e {
            IdentityError::Generate(e) => e,
            _ => rcgen::Error::CouldNotParseKeyPair,
        })
    }

    /// Loads a key file written by [`write_key_files`] (or any PKCS#8 PEM key rustls can sign with).
    pub fn load(path: &Path) -> Result<Identity, IdentityError> {
        let pem = std::fs::read_to_string(path).map_err(|source| IdentityError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Identity::from_pem(&pem).map_err(|source| IdentityError::Parse {
            path: path.display().to_string(),
            source,
        })
    }

    fn from_key_pair(key: &KeyPair) -> Result<Identity, IdentityError> {
        // The certificate is only a carrier for the public key: peers pin the key and ignore names and
        // validity, so a fixed name and rcgen's default validity are fine.
        let params = CertificateParams::new(vec!["ditto".to_owned()])?;
        let cert = params.self_signed(key)?;
        Ok(Identity {
            fingerprint: Fingerprint::of_spki(&key.public_key_der()),
            cert: cert.der().clone(),
            key_der: key.serialize_der(),
        })
    }

    /// The private key for rustls.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

/// What `ditto keygen` wrote.
#[derive(Debug)]
pub struct KeyFiles {
    pub key_path: std::path::PathBuf,
    pub pub_path: std::path::PathBuf,
    pub fingerprint: Fingerprint,
}

/// Generates a key and writes `PREFIX.key` (PKCS#8 PEM, mode 0600, created exclusively) and
/// `PREFIX.pub` (public key PEM plus the fingerprint as a comment line).
pub fn write_key_files(prefix: &Path) -> Result<KeyFiles, IdentityError> {
    use std::io::Write;
    let key = KeyPair::generate_for(&PKCS_ED25519)?;
    let fingerprint = Fingerprint::of_spki(&key.public_key_der());
    let key_path = with_suffix(prefix, "key");
    let pub_path = with_suffix(prefix, "pub");
    for p in [&key_path, &pub_path] {
        if p.exists() {
            return Err(IdentityError::Exists(p.display().to_string()));
        }
    }
    let werr = |path: &Path| {
        let path = path.display().to_string();
        move |source| IdentityError::Write { path, source }
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Created 0600 from the start: the key is never readable by others, not even briefly.
        opts.mode(0o600);
    }
    let mut f = opts.open(&key_path).map_err(werr(&key_path))?;
    f.write_all(key.serialize_pem().as_bytes())
        .map_err(werr(&key_path))?;
    f.sync_all().map_err(werr(&key_path))?;
    let public = format!(
        "# ditto key fingerprint: {fingerprint}\n{}",
        key.public_key_pem()
    );
    std::fs::write(&pub_path, public).map_err(werr(&pub_path))?;
    Ok(KeyFiles {
        key_path,
        pub_path,
        fingerprint,
    })
}

fn with_suffix(prefix: &Path, ext: &str) -> std::path::PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    s.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_matches_certificate_and_files() {
        let id = Identity::generate().expect("generate");
        assert_eq!(Fingerprint::of_cert(&id.cert), Some(id.fingerprint));
        let s = id.fingerprint.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(Fingerprint::parse(&s), Some(id.fingerprint));
        assert_eq!(Fingerprint::parse(&s.to_uppercase()), Some(id.fingerprint));
        assert_eq!(Fingerprint::parse(&s[1..]), None);
        assert_eq!(Fingerprint::parse(&format!("{}g", &s[1..])), None);

        let dir = tempfile::tempdir().expect("tempdir");
        let files = write_key_files(&dir.path().join("site")).expect("keygen");
        let loaded = Identity::load(&files.key_path).expect("load");
        assert_eq!(loaded.fingerprint, files.fingerprint);
        assert!(matches!(
            write_key_files(&dir.path().join("site")),
            Err(IdentityError::Exists(_))
        ));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&files.key_path)
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(Identity::load(&files.pub_path).is_err());
    }
}
