//! `tls-creds-psk`: pre-shared keys from `keys.psk` in the credentials
//! directory, one `username:hexkey` line per client (GnuTLS's `psktool` format).
//!
//! QEMU checks only that the file is readable when a server object is created
//! and GnuTLS looks a client's key up at each handshake, so a malformed line
//! does not fail the object: it fails the handshake of that user. blockd reads
//! the file once, at creation, and keeps each line's outcome the same way.

use crate::error::{glib_read_error, strerror, Error};
use crate::Endpoint;
use std::io;
use std::path::Path;

/// The properties of a `tls-creds-psk` object that loading depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PskOptions {
    pub dir: Option<String>,
    pub endpoint: Endpoint,
    /// Only for `endpoint=client` (QEMU's default there is `qemu`).
    pub username: Option<String>,
}

/// One `keys.psk` line: a user and the key, if its hex is valid.
#[derive(Clone, PartialEq, Eq)]
struct Entry {
    user: String,
    key: Option<Vec<u8>>,
}

/// Loaded PSK credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct PskCreds {
    pub(crate) endpoint: Endpoint,
    entries: Vec<Entry>,
    /// The client side's own user.
    username: Option<String>,
}

impl std::fmt::Debug for PskCreds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let users: Vec<&str> = self.entries.iter().map(|e| e.user.as_str()).collect();
        f.debug_struct("PskCreds")
            .field("endpoint", &self.endpoint)
            .field("users", &users)
            .finish_non_exhaustive()
    }
}

/// The longest key GnuTLS accepts from a key file, in bytes.
pub const MAX_KEY_BYTES: usize = 64;

impl PskCreds {
    /// Loads `keys.psk`, as QEMU's `qcrypto_tls_creds_psk_load` does.
    pub fn load(opts: &PskOptions) -> Result<PskCreds, Error> {
        let server = opts.endpoint == Endpoint::Server;
        if server && opts.username.is_some() {
            return Err(Error::UsernameOnServer);
        }
        let dir = opts.dir.as_deref().ok_or(Error::MissingDir)?;
        if server {
            let dh = format!("{dir}/dh-params.pem");
            access(&dh, false)?;
        }
        let path = format!("{dir}/keys.psk");
        access(&path, true)?;
        let text = std::fs::read(&path).map_err(|err| Error::ReadPsk {
            reason: glib_read_error(Path::new(&path), &err),
            path: path.clone(),
        })?;
        let entries = parse(&text);
        let username = if server {
            None
        } else {
            let user = opts.username.clone().unwrap_or_else(|| "qemu".to_string());
            if !entries.iter().any(|e| e.user == user) {
                return Err(Error::UnknownUser { user, path });
            }
            Some(user)
        };
        Ok(PskCreds {
            endpoint: opts.endpoint,
            entries,
            username,
        })
    }

    /// The key of `user`: `None` for an unknown user or a malformed key, which
    /// fails that client's handshake.
    pub fn key(&self, user: &str) -> Option<&[u8]> {
        self.entries
            .iter()
            .find(|e| e.user == user)
            .and_then(|e| e.key.as_deref())
    }

    /// The user a client-side object authenticates as.
    pub fn username(&self) -> Option<&str> {
        self.username.as_deref()
    }
}

fn access(path: &str, required: bool) -> Result<(), Error> {
    match std::fs::File::open(path) {
        Ok(_) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound && !required => Ok(()),
        Err(err) => Err(Error::Access {
            path: path.to_string(),
            reason: strerror(&err),
        }),
    }
}

/// Every `user:hexkey` line; other lines are ignored, as GnuTLS ignores them.
fn parse(text: &[u8]) -> Vec<Entry> {
    text.split(|&b| b == b'\n')
        .filter_map(|line| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let colon = line.iter().position(|&b| b == b':')?;
            let user = std::str::from_utf8(&line[..colon]).ok()?.to_string();
            let key = hex(&line[colon + 1..]).filter(|k| !k.is_empty() && k.len() <= MAX_KEY_BYTES);
            Some(Entry { user, key })
        })
        .collect()
}

fn hex(text: &[u8]) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| char::from(c).to_digit(16);
    text.chunks(2)
        .map(|pair| {
            let hi = digit(pair[0])?;
            let lo = digit(pair[1])?;
            u8::try_from(hi * 16 + lo).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(keys: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("keys.psk"), keys).unwrap();
        dir
    }

    fn server(dir: &tempfile::TempDir) -> Result<PskCreds, Error> {
        PskCreds::load(&PskOptions {
            dir: Some(dir.path().to_str().unwrap().to_string()),
            endpoint: Endpoint::Server,
            username: None,
        })
    }

    #[test]
    fn server_finds_a_listed_key() {
        let dir = dir_with("alice:0a0b\nbob:ff\n");
        assert_eq!(server(&dir).unwrap().key("bob"), Some(&[0xff][..]));
    }

    #[test]
    fn malformed_key_fails_only_its_user() {
        let dir = dir_with("alice:zz\nbob:01\n");
        let creds = server(&dir).unwrap();
        assert_eq!(creds.key("alice"), None);
    }

    #[test]
    fn lines_without_a_colon_are_ignored() {
        let dir = dir_with("garbage\r\nbob:01\r\n");
        assert_eq!(server(&dir).unwrap().key("bob"), Some(&[1][..]));
    }

    #[test]
    fn server_refuses_a_username() {
        let dir = dir_with("alice:01\n");
        let err = PskCreds::load(&PskOptions {
            dir: Some(dir.path().to_str().unwrap().to_string()),
            endpoint: Endpoint::Server,
            username: Some("alice".into()),
        });
        assert_eq!(err.unwrap_err(), Error::UsernameOnServer);
    }

    #[test]
    fn client_defaults_to_user_qemu() {
        let dir = dir_with("alice:01\n");
        let path = dir.path().to_str().unwrap().to_string();
        let err = PskCreds::load(&PskOptions {
            dir: Some(path.clone()),
            endpoint: Endpoint::Client,
            username: None,
        });
        assert_eq!(
            err.unwrap_err().to_string(),
            format!("Username qemu not found in PSK file {path}/keys.psk")
        );
    }

    #[test]
    fn missing_file_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_str().unwrap().to_string();
        assert_eq!(
            server(&dir).unwrap_err().to_string(),
            format!("Unable to access credentials {path}/keys.psk: No such file or directory")
        );
    }
}
