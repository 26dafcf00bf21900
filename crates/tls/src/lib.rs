//! TLS credentials, secrets and authorization for blockd's user-creatable
//! objects: `tls-creds-x509`, `tls-creds-psk`, `secret`, `authz-simple` and
//! `authz-list`, loaded and checked as QEMU loads and checks them, and turned
//! into what a TLS server needs: an OpenSSL [`SslAcceptor`](openssl::ssl::SslAcceptor)
//! and a check of the peer after the handshake.
//!
//! This crate knows nothing of QMP, the object registry or NBD: the daemon
//! loads objects through it, and the NBD server is handed a [`TlsCreds`] and an
//! optional [`Authorizer`].
//!
//! ```no_run
//! use tls::{Endpoint, TlsCreds, X509Creds, X509Options};
//! let creds = TlsCreds::X509(X509Creds::load(&X509Options {
//!     dir: Some("/etc/pki/qemu".into()),
//!     endpoint: Endpoint::Server,
//!     verify_peer: true,
//!     sanity_check: true,
//!     password: None,
//! })?);
//! let acceptor = creds.acceptor()?;
//! // accept a connection, run the handshake with `acceptor`, then:
//! // let identity = creds.check_peer(stream.ssl(), authz)?;
//! # let _ = acceptor;
//! # Ok::<(), tls::Error>(())
//! ```

mod authz;
mod creds;
mod der;
mod error;
mod psk;
mod secret;
mod x509;

pub use authz::{fnmatch, Authorizer, Authz, Format, Policy, Rule};
pub use creds::{distinguished_name, TlsCreds};
pub use error::Error;
pub use psk::{PskCreds, PskOptions, MAX_KEY_BYTES};
pub use secret::{base64, Secret, SecretFormat, SecretOptions};
pub use x509::{X509Creds, X509Options};

/// Which side of a TLS connection credentials are for (QEMU's
/// `QCryptoTLSCredsEndpoint`; its default is `client`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Endpoint {
    #[default]
    Client,
    Server,
}
