//! The errors of credential loading and of the peer check, worded as QEMU words
//! them (`crypto/tlscreds*.c`, `crypto/tlssession.c`, `crypto/secret_common.c`),
//! since management tools match these texts.

use std::io;
use std::path::Path;

/// Why credentials, a secret or a peer were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    #[error("Missing 'dir' property value")]
    MissingDir,
    /// A credentials file that must be there is not, or cannot be read.
    #[error("Unable to access credentials {path}: {reason}")]
    Access { path: String, reason: String },
    #[error("Cannot load CA cert list {path}: {reason}")]
    ReadCert { path: String, reason: String },
    #[error("Unable to import CA certificate list {0}")]
    CaList(String),
    #[error("Unable to import {role} certificate {path}: {reason}")]
    ImportCert {
        role: &'static str,
        path: String,
        reason: &'static str,
    },
    /// A certificate failed one of QEMU's sanity checks (the whole message).
    #[error("{0}")]
    Sanity(String),
    #[error("Cannot load certificate '{cert}' & key '{key}': {reason}")]
    KeyPair {
        cert: String,
        key: String,
        reason: &'static str,
    },
    #[error("username should not be set when endpoint=server")]
    UsernameOnServer,
    #[error("Cannot read PSK file {path}: {reason}")]
    ReadPsk { path: String, reason: String },
    #[error("Username {user} not found in PSK file {path}")]
    UnknownUser { user: String, path: String },
    /// Secrets (`crypto/secret_common.c`, `util/base64.c`): the whole message.
    #[error("{0}")]
    Secret(String),
    /// OpenSSL refused to build a context from credentials that loaded.
    #[error("cannot set up TLS: {0}")]
    Setup(String),
    #[error("No certificate peers")]
    NoPeerCertificate,
    #[error("TLS x509 authz check for {0} is denied")]
    Denied(String),
}

/// `strerror(errno)` for an I/O error: its text without Rust's "(os error N)".
pub(crate) fn strerror(err: &io::Error) -> String {
    let text = err.to_string();
    match text.find(" (os error ") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

/// GLib's `g_file_get_contents` message for a file that cannot be read.
pub(crate) fn glib_read_error(path: &Path, err: &io::Error) -> String {
    format!(
        "Failed to open file \u{201c}{}\u{201d}: {}",
        path.display(),
        strerror(err)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strerror_drops_the_os_error_number() {
        let err = io::Error::from_raw_os_error(libc_enoent());
        assert_eq!(strerror(&err), "No such file or directory");
    }

    fn libc_enoent() -> i32 {
        2
    }
}
