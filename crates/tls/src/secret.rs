//! `secret`: bytes given inline (`data`) or read from a file (`file`), raw or
//! base64, optionally AES-256-CBC encrypted with another secret as the key
//! (`keyid`, `iv`), as QEMU's `crypto/secret.c` and `crypto/secret_common.c`
//! load them. Other objects (a `tls-creds-x509` key's `passwordid`) look the
//! plaintext up by id.

use crate::error::{glib_read_error, Error};
use openssl::symm::{Cipher, Crypter, Mode};
use std::path::Path;

/// `raw` or `base64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SecretFormat {
    #[default]
    Raw,
    Base64,
}

/// The properties of a `secret` object.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SecretOptions {
    pub data: Option<String>,
    pub file: Option<String>,
    pub format: SecretFormat,
    pub keyid: Option<String>,
    pub iv: Option<String>,
}

/// A loaded secret: its plaintext.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    bytes: Vec<u8>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.bytes.len())
    }
}

impl Secret {
    /// Loads a secret; `lookup` finds the plaintext of the secret `keyid` names.
    pub fn load(
        opts: &SecretOptions,
        lookup: impl Fn(&str) -> Result<Vec<u8>, Error>,
    ) -> Result<Secret, Error> {
        let input = match (&opts.data, &opts.file) {
            (Some(_), Some(_)) => {
                return Err(Error::Secret(
                    "'file' and 'data' are mutually exclusive".into(),
                ))
            }
            (Some(data), None) => data.as_bytes().to_vec(),
            (None, Some(file)) => std::fs::read(file).map_err(|err| {
                Error::Secret(format!(
                    "Unable to read {file}: {}",
                    glib_read_error(Path::new(file), &err)
                ))
            })?,
            (None, None) => {
                return Err(Error::Secret(
                    "Either 'file' or 'data' must be provided".into(),
                ))
            }
        };
        let bytes = match &opts.keyid {
            Some(keyid) => decrypt(opts, &lookup(keyid)?, &input)?,
            None if opts.format == SecretFormat::Base64 => base64(&input)?,
            None => input,
        };
        Ok(Secret { bytes })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The plaintext as text, for a password (`qcrypto_secret_lookup_as_utf8`).
    pub fn to_utf8(&self, id: &str) -> Result<String, Error> {
        String::from_utf8(self.bytes.clone())
            .map_err(|_| Error::Secret(format!("Data from secret {id} is not valid UTF-8")))
    }
}

/// `qcrypto_secret_decrypt`.
fn decrypt(opts: &SecretOptions, key: &[u8], input: &[u8]) -> Result<Vec<u8>, Error> {
    if key.len() != 32 {
        return Err(Error::Secret("Key should be 32 bytes in length".into()));
    }
    let iv = opts
        .iv
        .as_deref()
        .ok_or_else(|| Error::Secret("IV is required to decrypt secret".into()))?;
    let iv = base64(iv.as_bytes())?;
    if iv.len() != 16 {
        return Err(Error::Secret(format!(
            "IV should be 16 bytes in length not {}",
            iv.len()
        )));
    }
    let ciphertext = match opts.format {
        SecretFormat::Base64 => base64(input)?,
        SecretFormat::Raw => input.to_vec(),
    };
    let cipher_error = |e: openssl::error::ErrorStack| Error::Secret(e.to_string());
    let mut crypter =
        Crypter::new(Cipher::aes_256_cbc(), Mode::Decrypt, key, Some(&iv)).map_err(cipher_error)?;
    crypter.pad(false);
    if !ciphertext.len().is_multiple_of(16) {
        return Err(Error::Secret(
            "Plaintext length must be a multiple of the block size".into(),
        ));
    }
    let mut plain = vec![0u8; ciphertext.len() + 16];
    let mut len = crypter
        .update(&ciphertext, &mut plain)
        .map_err(cipher_error)?;
    len += crypter.finalize(&mut plain[len..]).map_err(cipher_error)?;
    plain.truncate(len);
    let pad = plain.last().copied().unwrap_or(0);
    if plain.is_empty() || usize::from(pad) > 16 || usize::from(pad) > plain.len() {
        return Err(Error::Secret(format!(
            "Incorrect number of padding bytes ({pad}) found on decrypted data"
        )));
    }
    plain.truncate(plain.len() - usize::from(pad));
    Ok(plain)
}

/// `qbase64_decode`: only the base64 alphabet (with `=`) is allowed; GLib
/// then decodes whole groups of four, dropping a trailing partial group.
pub fn base64(input: &[u8]) -> Result<Vec<u8>, Error> {
    if input.contains(&0) {
        return Err(Error::Secret(
            "Base64 data contains embedded NUL characters".into(),
        ));
    }
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    if input.iter().any(|&c| c != b'=' && value(c).is_none()) {
        return Err(Error::Secret(
            "Base64 data contains invalid characters".into(),
        ));
    }
    let mut out = Vec::with_capacity(input.len() / 4 * 3);
    for group in input.chunks_exact(4) {
        let pad = group
            .iter()
            .rev()
            .take_while(|&&c| c == b'=')
            .count()
            .min(2);
        let acc = group.iter().fold(0u32, |acc, &c| {
            (acc << 6) | u32::from(value(c).unwrap_or(0))
        });
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..4 - pad]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none(_: &str) -> Result<Vec<u8>, Error> {
        Err(Error::Secret("No secret with id 'k'".into()))
    }

    fn load(opts: SecretOptions) -> Result<Vec<u8>, Error> {
        Secret::load(&opts, none).map(|s| s.as_bytes().to_vec())
    }

    #[test]
    fn raw_data_is_taken_as_is() {
        let opts = SecretOptions {
            data: Some("abc".into()),
            ..Default::default()
        };
        assert_eq!(load(opts).unwrap(), b"abc");
    }

    #[test]
    fn base64_data_is_decoded() {
        let opts = SecretOptions {
            data: Some("YWJj".into()),
            format: SecretFormat::Base64,
            ..Default::default()
        };
        assert_eq!(load(opts).unwrap(), b"abc");
    }

    #[test]
    fn neither_data_nor_file_is_refused() {
        let err = load(SecretOptions::default()).unwrap_err();
        assert_eq!(err.to_string(), "Either 'file' or 'data' must be provided");
    }

    #[test]
    fn bad_base64_is_refused() {
        let opts = SecretOptions {
            data: Some("!!!".into()),
            format: SecretFormat::Base64,
            ..Default::default()
        };
        assert_eq!(
            load(opts).unwrap_err().to_string(),
            "Base64 data contains invalid characters"
        );
    }

    #[test]
    fn missing_file_is_glib_worded() {
        let opts = SecretOptions {
            file: Some("nosuch".into()),
            ..Default::default()
        };
        assert_eq!(
            load(opts).unwrap_err().to_string(),
            "Unable to read nosuch: Failed to open file \u{201c}nosuch\u{201d}: No such file or directory"
        );
    }

    #[test]
    fn encrypted_secret_decrypts_with_its_key() {
        // QEMU's tests/unit/test-crypto-secret.c vector.
        let key = base64(b"9miloPQCzGy+TL6aonfzVcptibCmCIhKzrnlfwiWivk=").unwrap();
        let opts = SecretOptions {
            data: Some("zL/3CUYZC1IqOrRrzXqwsA==".into()),
            format: SecretFormat::Base64,
            keyid: Some("master".into()),
            iv: Some("0I7Gw/TKuA+Old2W2apQ3g==".into()),
            ..Default::default()
        };
        let secret = Secret::load(&opts, |_| Ok(key.clone())).unwrap();
        assert_eq!(secret.as_bytes(), b"123456");
    }

    #[test]
    fn short_iv_is_refused() {
        let opts = SecretOptions {
            data: Some("zL/3CUYZC1IqOrRrzXqwsA==".into()),
            keyid: Some("master".into()),
            iv: Some("0I7Gw/TKuA+Old2W2a".into()),
            ..Default::default()
        };
        let err = Secret::load(&opts, |_| Ok(vec![0; 32])).unwrap_err();
        assert_eq!(err.to_string(), "IV should be 16 bytes in length not 12");
    }
}
