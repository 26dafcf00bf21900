//! Just enough DER to read a certificate's v3 extensions with their critical
//! flags, which QEMU's sanity checks depend on and the openssl crate does not
//! expose: basic constraints, key usage and extended key usage.
//!
//! Every length is checked against what is left; a malformed encoding reads as
//! "no such extension", since OpenSSL has already parsed the certificate.

/// One extension: its OID (content bytes), whether it is critical, its value.
pub(crate) struct Extension<'a> {
    pub oid: &'a [u8],
    pub critical: bool,
    pub value: &'a [u8],
}

/// 2.5.29.19
pub(crate) const BASIC_CONSTRAINTS: &[u8] = &[0x55, 0x1d, 0x13];
/// 2.5.29.15
pub(crate) const KEY_USAGE: &[u8] = &[0x55, 0x1d, 0x0f];
/// 2.5.29.37
pub(crate) const EXT_KEY_USAGE: &[u8] = &[0x55, 0x1d, 0x25];
/// 1.3.6.1.5.5.7.3.1
pub(crate) const SERVER_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01];
/// 1.3.6.1.5.5.7.3.2
pub(crate) const CLIENT_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02];
/// 2.5.29.37.0
pub(crate) const ANY_EXT_KEY_USAGE: &[u8] = &[0x55, 0x1d, 0x25, 0x00];

const SEQUENCE: u8 = 0x30;
const BOOLEAN: u8 = 0x01;
const OID: u8 = 0x06;
const OCTET_STRING: u8 = 0x04;
const BIT_STRING: u8 = 0x03;
/// `[3] EXPLICIT Extensions` in a TBSCertificate.
const EXTENSIONS_TAG: u8 = 0xa3;

/// Splits one TLV off `input`: (tag, content, rest).
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let (bytes, after) = rest.split_at(count);
        rest = after;
        bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
    };
    if rest.len() < len {
        return None;
    }
    let (content, rest) = rest.split_at(len);
    Some((tag, content, rest))
}

/// The content of `input` if it is one TLV with `tag`.
fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (t, content, rest) = tlv(input)?;
    (t == tag).then_some((content, rest))
}

/// The extensions of a DER certificate, in order.
pub(crate) fn extensions(cert_der: &[u8]) -> Vec<Extension<'_>> {
    let mut out = Vec::new();
    let Some((cert, _)) = expect(cert_der, SEQUENCE) else {
        return out;
    };
    let Some((mut tbs, _)) = expect(cert, SEQUENCE) else {
        return out;
    };
    let mut exts = None;
    while let Some((tag, content, rest)) = tlv(tbs) {
        if tag == EXTENSIONS_TAG {
            exts = expect(content, SEQUENCE).map(|(c, _)| c);
        }
        tbs = rest;
    }
    let Some(mut list) = exts else {
        return out;
    };
    while let Some((ext, rest)) = expect(list, SEQUENCE) {
        list = rest;
        let Some((oid, after)) = expect(ext, OID) else {
            continue;
        };
        let (critical, after) = match expect(after, BOOLEAN) {
            Some((b, after)) => (b.first().is_some_and(|&v| v != 0), after),
            None => (false, after),
        };
        if let Some((value, _)) = expect(after, OCTET_STRING) {
            out.push(Extension {
                oid,
                critical,
                value,
            });
        }
    }
    out
}

/// basicConstraints' `cA` flag.
pub(crate) fn is_ca(value: &[u8]) -> bool {
    let Some((seq, _)) = expect(value, SEQUENCE) else {
        return false;
    };
    expect(seq, BOOLEAN).is_some_and(|(b, _)| b.first().is_some_and(|&v| v != 0))
}

/// keyUsage as GnuTLS reports it: the first byte of the bit string
/// (digitalSignature 0x80, keyEncipherment 0x20, keyCertSign 0x04).
pub(crate) fn key_usage(value: &[u8]) -> u8 {
    match expect(value, BIT_STRING) {
        Some((bits, _)) => bits.get(1).copied().unwrap_or(0),
        None => 0,
    }
}

/// The purpose OIDs of an extKeyUsage value.
pub(crate) fn purposes(value: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let Some((mut seq, _)) = expect(value, SEQUENCE) else {
        return out;
    };
    while let Some((oid, rest)) = expect(seq, OID) {
        out.push(oid);
        seq = rest;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tlv_rejects_a_length_past_the_end() {
        assert!(tlv(&[0x30, 0x05, 0x00]).is_none());
    }

    #[test]
    fn tlv_reads_a_long_form_length() {
        let mut input = vec![0x04, 0x81, 0x80];
        input.extend([7u8; 0x80]);
        let (tag, content, rest) = tlv(&input).unwrap();
        assert_eq!((tag, content.len(), rest.len()), (0x04, 0x80, 0));
    }

    #[test]
    fn basic_constraints_with_ca_true_is_a_ca() {
        assert!(is_ca(&[0x30, 0x03, 0x01, 0x01, 0xff]));
    }

    #[test]
    fn empty_basic_constraints_is_not_a_ca() {
        assert!(!is_ca(&[0x30, 0x00]));
    }

    #[test]
    fn key_usage_reads_the_first_bit_byte() {
        assert_eq!(key_usage(&[0x03, 0x02, 0x05, 0xa0]), 0xa0);
    }

    #[test]
    fn extensions_of_garbage_are_none() {
        assert!(extensions(b"not der").is_empty());
    }
}
