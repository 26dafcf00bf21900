//! `tls-creds-x509`: a CA list, a certificate and its key read from a directory
//! when the object is created, checked as QEMU checks them
//! (`crypto/tlscredsx509.c`), so that the same directory fails or loads the same
//! way in blockd and in qemu-storage-daemon.
//!
//! Files (QEMU's names): `ca-cert.pem` (always required), `ca-crl.pem`
//! (optional), `server-cert.pem` and `server-key.pem` (required for
//! `endpoint=server`), `client-cert.pem` and `client-key.pem` (optional for
//! `endpoint=client`). `dh-params.pem` is accepted and not read: OpenSSL picks
//! its own Diffie-Hellman groups.

use crate::der;
use crate::error::{glib_read_error, strerror, Error};
use crate::Endpoint;
use openssl::asn1::Asn1Time;
use openssl::pkey::{PKey, Private};
use openssl::stack::Stack;
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::{X509Crl, X509StoreContext, X509VerifyResult, X509};
use std::io;
use std::path::Path;

/// The properties of a `tls-creds-x509` object that loading depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509Options {
    /// `dir` (QEMU requires it at load time, not at parse time).
    pub dir: Option<String>,
    pub endpoint: Endpoint,
    /// `verify-peer` (default on): a server requires and checks a client certificate.
    pub verify_peer: bool,
    /// `sanity-check` (default on): QEMU's checks of the certificates' fields.
    pub sanity_check: bool,
    /// The key's passphrase, from the `secret` named by `passwordid`.
    pub password: Option<String>,
}

/// Loaded x509 credentials.
#[derive(Clone)]
pub struct X509Creds {
    pub(crate) endpoint: Endpoint,
    pub(crate) verify_peer: bool,
    pub(crate) ca: Vec<X509>,
    pub(crate) crl: Option<String>,
    pub(crate) cert: Option<X509>,
    pub(crate) key: Option<PKey<Private>>,
}

impl std::fmt::Debug for X509Creds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X509Creds")
            .field("endpoint", &self.endpoint)
            .field("verify_peer", &self.verify_peer)
            .field("ca", &self.ca.len())
            .field("crl", &self.crl)
            .field("cert", &self.cert.is_some())
            .finish_non_exhaustive()
    }
}

/// GnuTLS's message for PEM input without the expected header.
const BAD_HEADER: &str = "Base64 unexpected header error.";
/// GnuTLS's message for a certificate that does not decode.
const BAD_BASE64: &str = "Base64 decoding error.";
/// GnuTLS's message for a key it cannot find in the file.
const NO_DATA: &str = "The requested data were not available.";
/// GnuTLS's message for a key that does not decrypt with the password.
const DECRYPT_FAILED: &str = "Decryption has failed.";
/// GnuTLS's message for a certificate whose public key is not the key's.
const MISMATCH: &str = "The certificate and the given key do not match.";

/// QEMU's `qcrypto_tls_creds_get_path`: `dir/name`, checked for access.
/// A missing file that is not `required` is `None`.
fn path(dir: &str, name: &str, required: bool) -> Result<Option<String>, Error> {
    let path = format!("{dir}/{name}");
    match std::fs::File::open(&path) {
        Ok(_) => Ok(Some(path)),
        Err(err) if err.kind() == io::ErrorKind::NotFound && !required => Ok(None),
        Err(err) => Err(Error::Access {
            reason: strerror(&err),
            path,
        }),
    }
}

fn read(path: &str) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|err| Error::ReadCert {
        path: path.to_string(),
        reason: glib_read_error(Path::new(path), &err),
    })
}

impl X509Creds {
    /// Loads and checks the credentials, as QEMU does when the object is created.
    pub fn load(opts: &X509Options) -> Result<X509Creds, Error> {
        Self::load_with(opts, || Ok(opts.password.clone()))
    }

    /// [`load`](Self::load), asking `password` for the key's passphrase only
    /// when a key is about to be read, as QEMU looks its `passwordid` up then.
    pub fn load_with(
        opts: &X509Options,
        password: impl FnOnce() -> Result<Option<String>, Error>,
    ) -> Result<X509Creds, Error> {
        let dir = opts.dir.as_deref().ok_or(Error::MissingDir)?;
        let server = opts.endpoint == Endpoint::Server;
        let cacert = path(dir, "ca-cert.pem", true)?.ok_or(Error::MissingDir)?;
        let (crl, cert, key) = if server {
            let crl = path(dir, "ca-crl.pem", false)?;
            let cert = path(dir, "server-cert.pem", true)?;
            let key = path(dir, "server-key.pem", true)?;
            path(dir, "dh-params.pem", false)?;
            (crl, cert, key)
        } else {
            let cert = path(dir, "client-cert.pem", false)?;
            let key = path(dir, "client-key.pem", false)?;
            (None, cert, key)
        };
        if opts.sanity_check {
            sanity_check(server, &cacert, cert.as_deref())?;
        }
        let ca = X509::stack_from_pem(&read(&cacert)?).unwrap_or_default();
        if ca.is_empty() {
            return Err(Error::Setup(format!(
                "Cannot load CA certificate '{cacert}': {NO_DATA}"
            )));
        }
        let (cert, key) = match (cert, key) {
            (Some(cert), Some(key)) => {
                let pair = load_pair(&cert, &key, password()?.as_deref())?;
                (Some(pair.0), Some(pair.1))
            }
            _ => (None, None),
        };
        if let Some(crl) = &crl {
            let text = read(crl)?;
            X509Crl::from_pem(&text)
                .map_err(|_| Error::Setup(format!("Cannot load CRL '{crl}': {BAD_HEADER}")))?;
        }
        Ok(X509Creds {
            endpoint: opts.endpoint,
            verify_peer: opts.verify_peer,
            ca,
            crl,
            cert,
            key,
        })
    }

    /// The certificate presented to peers, if any.
    pub fn certificate(&self) -> Option<&X509> {
        self.cert.as_ref()
    }
}

/// `gnutls_certificate_set_x509_key_file2`: the certificate, the key
/// (decrypted with `password`) and that they belong together.
fn load_pair(
    cert_path: &str,
    key_path: &str,
    password: Option<&str>,
) -> Result<(X509, PKey<Private>), Error> {
    let fail = |reason| Error::KeyPair {
        cert: cert_path.to_string(),
        key: key_path.to_string(),
        reason,
    };
    let cert = X509::from_pem(&read(cert_path)?).map_err(|_| fail(BAD_BASE64))?;
    let key_pem = read(key_path)?;
    let key = match password {
        Some(pw) => PKey::private_key_from_pem_passphrase(&key_pem, pw.as_bytes())
            .map_err(|_| fail(DECRYPT_FAILED))?,
        None => PKey::private_key_from_pem(&key_pem).map_err(|_| fail(NO_DATA))?,
    };
    let public = cert.public_key().map_err(|_| fail(BAD_BASE64))?;
    if !public.public_eq(&key) {
        return Err(fail(MISMATCH));
    }
    Ok((cert, key))
}

/// QEMU's `qcrypto_tls_creds_x509_sanity_check`.
fn sanity_check(server: bool, cacert_path: &str, cert_path: Option<&str>) -> Result<(), Error> {
    let role = if server { "server" } else { "client" };
    let cert = match cert_path {
        Some(p) => Some(X509::from_pem(&read(p)?).map_err(|_| Error::ImportCert {
            role,
            path: p.to_string(),
            reason: BAD_HEADER,
        })?),
        None => None,
    };
    let cacerts = X509::stack_from_pem(&read(cacert_path)?)
        .ok()
        .filter(|list| !list.is_empty())
        .ok_or_else(|| Error::CaList(cacert_path.to_string()))?;
    if let (Some(cert), Some(p)) = (&cert, cert_path) {
        check_cert(cert, p, server, false)?;
    }
    for ca in &cacerts {
        check_cert(ca, cacert_path, server, true)?;
    }
    if let (Some(cert), Some(p)) = (&cert, cert_path) {
        check_pair(cert, p, &cacerts, cacert_path, server)?;
    }
    Ok(())
}

/// `qcrypto_tls_creds_check_cert`: times, basic constraints, key usage, purpose.
fn check_cert(cert: &X509, file: &str, server: bool, ca: bool) -> Result<(), Error> {
    let what = if ca {
        "CA"
    } else if server {
        "server"
    } else {
        "client"
    };
    let now = Asn1Time::days_from_now(0).map_err(|e| Error::Setup(e.to_string()))?;
    if cert.not_after() < now {
        return Err(Error::Sanity(format!(
            "The {what} certificate {file} has expired"
        )));
    }
    if cert.not_before() > now {
        return Err(Error::Sanity(format!(
            "The {what} certificate {file} is not yet active"
        )));
    }
    let der_bytes = cert.to_der().map_err(|e| Error::Setup(e.to_string()))?;
    let exts = der::extensions(&der_bytes);
    let find = |oid: &[u8]| exts.iter().find(|e| e.oid == oid);
    let peer = if server { "server" } else { "client" };
    match find(der::BASIC_CONSTRAINTS).map(|e| der::is_ca(e.value)) {
        Some(true) if !ca => {
            return Err(Error::Sanity(format!(
                "The certificate {file} basic constraints show a CA, but we need one for a {peer}"
            )))
        }
        Some(false) if ca => {
            return Err(Error::Sanity(format!(
                "The certificate {file} basic constraints do not show a CA"
            )))
        }
        None if ca => {
            return Err(Error::Sanity(format!(
                "The certificate {file} is missing basic constraints for a CA"
            )))
        }
        _ => {}
    }
    if let Some(ext) = find(der::KEY_USAGE).filter(|e| e.critical) {
        let usage = der::key_usage(ext.value);
        let problem = if ca {
            (usage & 0x04 == 0).then_some("certificate signing")
        } else if usage & 0x80 == 0 {
            Some("digital signature")
        } else {
            (usage & 0x20 == 0).then_some("key encipherment")
        };
        if let Some(what) = problem {
            return Err(Error::Sanity(format!(
                "Certificate {file} usage does not permit {what}"
            )));
        }
    }
    if !ca {
        if let Some(ext) = find(der::EXT_KEY_USAGE).filter(|e| e.critical) {
            let purposes = der::purposes(ext.value);
            let has = |oid: &[u8]| purposes.contains(&oid);
            let any = has(der::ANY_EXT_KEY_USAGE);
            let allowed = any
                || has(if server {
                    der::SERVER_AUTH
                } else {
                    der::CLIENT_AUTH
                });
            if !allowed {
                return Err(Error::Sanity(format!(
                    "Certificate {file} purpose does not allow use with a TLS {peer}"
                )));
            }
        }
    }
    Ok(())
}

/// `qcrypto_tls_creds_check_cert_pair`: our own certificate verifies against the CA list.
fn check_pair(
    cert: &X509,
    file: &str,
    cacerts: &[X509],
    cacert_file: &str,
    server: bool,
) -> Result<(), Error> {
    let role = if server { "server" } else { "client" };
    let unverifiable = || {
        Error::Sanity(format!(
            "Unable to verify {role} certificate {file} against CA certificate {cacert_file}"
        ))
    };
    let mut store = X509StoreBuilder::new().map_err(|_| unverifiable())?;
    for ca in cacerts {
        store.add_cert(ca.clone()).map_err(|_| unverifiable())?;
    }
    let store = store.build();
    let chain = Stack::new().map_err(|_| unverifiable())?;
    let mut ctx = X509StoreContext::new().map_err(|_| unverifiable())?;
    let result = ctx
        .init(&store, cert, &chain, |c| {
            c.verify_cert()?;
            Ok(c.error())
        })
        .map_err(|_| unverifiable())?;
    if result == X509VerifyResult::OK {
        return Ok(());
    }
    let reason = match result.as_raw() {
        // X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT(_LOCALLY), X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE
        2 | 20 | 21 => "The certificate hasn't got a known issuer",
        // X509_V_ERR_CERT_REVOKED
        23 => "The certificate has been revoked",
        _ => "The certificate is not trusted",
    };
    Err(Error::Sanity(format!(
        "Our own certificate {file} failed validation against {cacert_file}: {reason}"
    )))
}
