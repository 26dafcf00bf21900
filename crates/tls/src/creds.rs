//! TLS credentials as the NBD server uses them: an OpenSSL acceptor built from
//! loaded credentials, and the check of the peer once the handshake is done.

use crate::authz::Authorizer;
use crate::error::Error;
use crate::psk::PskCreds;
use crate::x509::X509Creds;
use crate::Endpoint;
use openssl::ex_data::Index;
use openssl::nid::Nid;
use openssl::ssl::{Ssl, SslAcceptor, SslMethod, SslRef, SslVerifyMode};
use openssl::x509::store::{X509Lookup, X509StoreBuilder};
use openssl::x509::verify::X509VerifyFlags;
use openssl::x509::X509NameRef;
use std::sync::OnceLock;

/// Loaded credentials of a `tls-creds-*` object.
#[derive(Debug, Clone)]
pub enum TlsCreds {
    X509(X509Creds),
    Psk(PskCreds),
}

/// TLS 1.2 cipher suites for PSK: with ECDHE (forward secrecy) first, then
/// plain PSK, which GnuTLS clients (qemu-img, qemu-nbd) also offer.
const PSK_CIPHERS: &str = "kECDHEPSK:kPSK:!eNULL:!3DES:@STRENGTH";

/// The PSK identity a client authenticated as, kept on its connection.
fn psk_identity_index() -> Result<Index<Ssl, String>, Error> {
    static INDEX: OnceLock<Result<Index<Ssl, String>, String>> = OnceLock::new();
    INDEX
        .get_or_init(|| Ssl::new_ex_index().map_err(|e| e.to_string()))
        .clone()
        .map_err(Error::Setup)
}

impl TlsCreds {
    /// Which side of a connection these credentials are for.
    pub fn endpoint(&self) -> Endpoint {
        match self {
            TlsCreds::X509(c) => c.endpoint,
            TlsCreds::Psk(c) => c.endpoint,
        }
    }

    /// An OpenSSL server context for these credentials: the certificate, key
    /// and CA (requiring and verifying a client certificate when `verify-peer`
    /// is on), or the pre-shared keys, for TLS 1.2 and 1.3.
    pub fn acceptor(&self) -> Result<SslAcceptor, Error> {
        let setup = |e: openssl::error::ErrorStack| Error::Setup(e.to_string());
        let mut builder =
            SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).map_err(setup)?;
        builder
            .set_session_id_context(b"blockd-nbd")
            .map_err(setup)?;
        match self {
            TlsCreds::X509(creds) => {
                let (Some(cert), Some(key)) = (&creds.cert, &creds.key) else {
                    return Err(Error::Setup(
                        "credentials without a certificate cannot serve".into(),
                    ));
                };
                builder.set_certificate(cert).map_err(setup)?;
                builder.set_private_key(key).map_err(setup)?;
                builder.check_private_key().map_err(setup)?;
                let mut store = X509StoreBuilder::new().map_err(setup)?;
                for ca in &creds.ca {
                    store.add_cert(ca.clone()).map_err(setup)?;
                    builder.add_client_ca(ca).map_err(setup)?;
                }
                if let Some(crl) = &creds.crl {
                    let lookup = store.add_lookup(X509Lookup::file()).map_err(setup)?;
                    lookup
                        .load_crl_file(crl, openssl::ssl::SslFiletype::PEM)
                        .map_err(setup)?;
                    store
                        .set_flags(X509VerifyFlags::CRL_CHECK | X509VerifyFlags::CRL_CHECK_ALL)
                        .map_err(setup)?;
                }
                builder
                    .set_verify_cert_store(store.build())
                    .map_err(setup)?;
                builder.set_verify(if creds.verify_peer {
                    SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT
                } else {
                    SslVerifyMode::NONE
                });
            }
            TlsCreds::Psk(creds) => {
                let index = psk_identity_index()?;
                let creds = creds.clone();
                builder.set_cipher_list(PSK_CIPHERS).map_err(setup)?;
                builder.set_psk_server_callback(move |ssl, identity, out| {
                    let Some(user) = identity.and_then(|i| std::str::from_utf8(i).ok()) else {
                        return Ok(0);
                    };
                    let Some(key) = creds.key(user).filter(|k| k.len() <= out.len()) else {
                        return Ok(0);
                    };
                    out[..key.len()].copy_from_slice(key);
                    ssl.set_ex_data(index, user.to_string());
                    Ok(key.len())
                });
            }
        }
        Ok(builder.build())
    }

    /// After a successful handshake: the peer's identity, checked as QEMU's
    /// `qcrypto_tls_session_check_credentials` does. With x509 and
    /// `verify-peer`, the client certificate's distinguished name must be
    /// allowed by `authz` when one is given; without `verify-peer` nothing is
    /// checked. With PSK the identity is the username, and QEMU applies no
    /// `tls-authz` to it (the key itself authenticates the user).
    pub fn check_peer(
        &self,
        ssl: &SslRef,
        authz: Option<&dyn Authorizer>,
    ) -> Result<Option<String>, Error> {
        match self {
            TlsCreds::Psk(_) => {
                let index = psk_identity_index()?;
                Ok(ssl.ex_data(index).cloned())
            }
            TlsCreds::X509(creds) if !creds.verify_peer => Ok(None),
            TlsCreds::X509(_) => {
                let cert = ssl.peer_certificate().ok_or(Error::NoPeerCertificate)?;
                let dn = distinguished_name(cert.subject_name());
                if let Some(authz) = authz {
                    if !authz.is_allowed(&dn) {
                        return Err(Error::Denied(dn));
                    }
                }
                Ok(Some(dn))
            }
        }
    }
}

/// A name as GnuTLS's `gnutls_x509_crt_get_dn2` prints it (RFC 4514): the
/// last RDN first, `,` between them, special characters escaped.
pub fn distinguished_name(name: &X509NameRef) -> String {
    let parts: Vec<String> = name
        .entries()
        .map(|entry| {
            let nid = entry.object().nid();
            let key = match nid {
                Nid::PKCS9_EMAILADDRESS => "EMAIL".to_string(),
                Nid::UNDEF => entry.object().to_string(),
                _ => nid.short_name().unwrap_or("UNKNOWN").to_string(),
            };
            let value = entry.data().to_string().unwrap_or_default();
            format!("{key}={}", escape(&value))
        })
        .collect();
    parts.into_iter().rev().collect::<Vec<_>>().join(",")
}

/// RFC 4514 section 2.4 escaping of an attribute value.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_protects_separators_and_edge_spaces() {
        assert_eq!(escape(" a,b+c "), "\\ a\\,b\\+c\\ ");
    }

    #[test]
    fn escape_leaves_plain_text() {
        assert_eq!(escape("client one"), "client one");
    }

    #[test]
    fn dn_lists_the_most_specific_part_first() {
        let mut name = openssl::x509::X509NameBuilder::new().unwrap();
        name.append_entry_by_text("C", "GB").unwrap();
        name.append_entry_by_text("O", "Example, Ltd").unwrap();
        name.append_entry_by_text("CN", "client").unwrap();
        let name = name.build();
        assert_eq!(distinguished_name(&name), "CN=client,O=Example\\, Ltd,C=GB");
    }
}
