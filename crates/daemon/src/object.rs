//! User-creatable objects (`--object`, `object-add`, `object-del`): TLS
//! credentials, secrets and authorization lists, kept by id in the registry the
//! control task owns.
//!
//! Creation follows QEMU's `user_creatable_add_qapi`: the schema checks the
//! properties, then the id must be an identifier, the type must exist, the id
//! must be free, and only then is the object loaded (files read, keys checked),
//! so the same mistakes fail with the same message, in the same order.
//!
//! QEMU deletes these types even while an NBD server uses them (none of them
//! has a `can_be_deleted` hook): a server keeps its own handle ([`Arc`]), and
//! `object-del` only removes the id.

use indexmap::IndexMap;
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;
use tls::{Authorizer, Authz, Endpoint, Secret, TlsCreds};

/// A created object.
#[derive(Debug, Clone)]
pub enum Object {
    Secret(Secret),
    TlsCreds(Arc<TlsCreds>),
    Authz(Arc<Authz>),
}

/// The objects of the daemon by id (QEMU's `/objects` container).
#[derive(Debug, Default)]
pub struct Objects {
    by_id: IndexMap<String, Object>,
}

/// `ObjectOptions`' base, as the schema visitor left it.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Base {
    qom_type: String,
    id: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
struct TlsProps {
    verify_peer: Option<bool>,
    dir: Option<String>,
    endpoint: Option<String>,
    sanity_check: Option<bool>,
    passwordid: Option<String>,
    username: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
struct SecretProps {
    format: Option<String>,
    keyid: Option<String>,
    iv: Option<String>,
    data: Option<String>,
    file: Option<String>,
}

#[derive(Deserialize)]
struct RuleProps {
    #[serde(rename = "match")]
    pattern: String,
    policy: String,
    format: Option<String>,
}

#[derive(Deserialize)]
struct AuthzProps {
    identity: Option<String>,
    policy: Option<String>,
    rules: Option<Vec<RuleProps>>,
}

/// The types `--object help` lists, with the properties `--object TYPE,help`
/// prints (QEMU's QOM property names and types, sorted as QEMU sorts them).
const TYPES: &[(&str, &[&str])] = &[
    (
        "authz-list",
        &["policy=<QAuthZListPolicy>", "rules=<QAuthZListRule>"],
    ),
    ("authz-simple", &["identity=<string>"]),
    (
        "secret",
        &[
            "data=<string>",
            "file=<string>",
            "format=<QCryptoSecretFormat>",
            "iv=<string>",
            "keyid=<string>",
        ],
    ),
    (
        "tls-creds-psk",
        &[
            "dir=<string>",
            "endpoint=<QCryptoTLSCredsEndpoint>",
            "priority=<string>",
            "username=<string>",
            "verify-peer=<bool>",
        ],
    ),
    (
        "tls-creds-x509",
        &[
            "dir=<string>",
            "endpoint=<QCryptoTLSCredsEndpoint>",
            "passwordid=<string>",
            "priority=<string>",
            "sanity-check=<bool>",
            "verify-peer=<bool>",
        ],
    ),
];

/// `--object help` and `--object TYPE,help`: the type list, or one type's
/// properties (an unknown type gets the list, as with QSD).
pub fn help(qom_type: Option<&str>) -> String {
    let props = qom_type.and_then(|ty| TYPES.iter().find(|(name, _)| *name == ty));
    match props {
        Some((name, props)) => {
            let mut text = format!("{name} options:\n");
            props
                .iter()
                .for_each(|p| text.push_str(&format!("  {p}\n")));
            text
        }
        None => {
            let mut text = "List of user creatable objects:\n".to_string();
            TYPES
                .iter()
                .for_each(|(name, _)| text.push_str(&format!("  {name}\n")));
            text
        }
    }
}

/// The hint QEMU appends to a bad id (printed on the command line only).
pub const ID_HINT: &str =
    "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.";

/// Why `object-add` failed; `hint` goes on a line of its own on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddError {
    pub message: String,
    pub hint: Option<&'static str>,
}

impl From<String> for AddError {
    fn from(message: String) -> Self {
        AddError {
            message,
            hint: None,
        }
    }
}

impl From<tls::Error> for AddError {
    fn from(err: tls::Error) -> Self {
        AddError::from(err.to_string())
    }
}

fn parse<T: serde::de::DeserializeOwned>(value: &Value) -> Result<T, String> {
    serde_json::from_value(value.clone())
        .map_err(|e| format!("internal error: properties do not fit their type: {e}"))
}

impl Objects {
    /// Creates an object from a checked `ObjectOptions` value.
    pub fn add(&mut self, options: &Value) -> Result<(), AddError> {
        let base: Base = parse(options)?;
        if !crate::chardev::id_wellformed(&base.id) {
            return Err(AddError {
                message: "Parameter 'id' expects an identifier".into(),
                hint: Some(ID_HINT),
            });
        }
        if base.qom_type == "authz-listfile" {
            // QEMU's QAPI name has no QOM type behind it (the class is
            // "authz-list-file"), so qemu-storage-daemon can never create one.
            return Err(format!("invalid object type: {}", base.qom_type).into());
        }
        if self.by_id.contains_key(&base.id) {
            return Err(format!(
                "attempt to add duplicate property '{}' to object (type 'container')",
                base.id
            )
            .into());
        }
        let object = match base.qom_type.as_str() {
            "secret" => Object::Secret(self.load_secret(&base.id, &parse(options)?)?),
            "tls-creds-x509" => Object::TlsCreds(Arc::new(self.load_x509(&parse(options)?)?)),
            "tls-creds-psk" => Object::TlsCreds(Arc::new(load_psk(&parse(options)?)?)),
            "authz-simple" | "authz-list" => {
                Object::Authz(Arc::new(load_authz(&base.qom_type, &parse(options)?)?))
            }
            other => return Err(format!("invalid object type: {other}").into()),
        };
        self.by_id.insert(base.id, object);
        Ok(())
    }

    /// `object-del`.
    pub fn del(&mut self, id: &str) -> Result<(), String> {
        match self.by_id.shift_remove(id) {
            Some(_) => Ok(()),
            None => Err(format!("object '{id}' not found")),
        }
    }

    /// The TLS credentials named by `tls-creds` (for `nbd-server-start`).
    pub fn tls_creds(&self, id: &str) -> Result<Arc<TlsCreds>, String> {
        match self.by_id.get(id) {
            Some(Object::TlsCreds(creds)) => Ok(creds.clone()),
            Some(_) => Err(format!("Object with id '{id}' is not TLS credentials")),
            None => Err(format!("No TLS credentials with id '{id}'")),
        }
    }

    /// The authorization object named by `tls-authz`.
    #[allow(dead_code)] // called by nbd-server-start once it serves TLS (`tls-authz`)
    pub fn authz(&self, id: &str) -> Result<Arc<dyn Authorizer>, String> {
        match self.by_id.get(id) {
            Some(Object::Authz(authz)) => Ok(authz.clone()),
            Some(_) => Err(format!("Object '{id}' is not a QAuthZ subclass")),
            None => Err(format!("No authorization object with ID '{id}'")),
        }
    }

    /// `qcrypto_secret_lookup`: the plaintext of the secret `id`.
    fn secret(&self, id: &str) -> Result<Vec<u8>, tls::Error> {
        match self.by_id.get(id) {
            Some(Object::Secret(secret)) => Ok(secret.as_bytes().to_vec()),
            Some(_) => Err(tls::Error::Secret(format!(
                "Object with id '{id}' is not a secret"
            ))),
            None => Err(tls::Error::Secret(format!("No secret with id '{id}'"))),
        }
    }

    fn load_secret(&self, id: &str, props: &SecretProps) -> Result<Secret, tls::Error> {
        let opts = tls::SecretOptions {
            data: props.data.clone(),
            file: props.file.clone(),
            format: match props.format.as_deref() {
                Some("base64") => tls::SecretFormat::Base64,
                _ => tls::SecretFormat::Raw,
            },
            keyid: props.keyid.clone(),
            iv: props.iv.clone(),
        };
        Secret::load(&opts, |keyid| {
            if keyid == id {
                // QEMU has already added the object under its id, without data.
                return Err(tls::Error::Secret(format!(
                    "Secret with id '{id}' has no data"
                )));
            }
            self.secret(keyid)
        })
    }

    fn load_x509(&self, props: &TlsProps) -> Result<TlsCreds, tls::Error> {
        let endpoint = endpoint(props);
        let opts = tls::X509Options {
            dir: props.dir.clone(),
            endpoint,
            verify_peer: props.verify_peer.unwrap_or(true),
            sanity_check: props.sanity_check.unwrap_or(true),
            password: None,
        };
        let password = || match &props.passwordid {
            Some(id) => {
                let bytes = self.secret(id)?;
                String::from_utf8(bytes).map(Some).map_err(|_| {
                    tls::Error::Secret(format!("Data from secret {id} is not valid UTF-8"))
                })
            }
            None => Ok(None),
        };
        tls::X509Creds::load_with(&opts, password).map(TlsCreds::X509)
    }
}

fn endpoint(props: &TlsProps) -> Endpoint {
    match props.endpoint.as_deref() {
        Some("server") => Endpoint::Server,
        _ => Endpoint::Client,
    }
}

fn load_psk(props: &TlsProps) -> Result<TlsCreds, tls::Error> {
    tls::PskCreds::load(&tls::PskOptions {
        dir: props.dir.clone(),
        endpoint: endpoint(props),
        username: props.username.clone(),
    })
    .map(TlsCreds::Psk)
}

fn policy(text: Option<&str>) -> tls::Policy {
    match text {
        Some("allow") => tls::Policy::Allow,
        _ => tls::Policy::Deny,
    }
}

fn load_authz(qom_type: &str, props: &AuthzProps) -> Result<Authz, String> {
    if qom_type == "authz-simple" {
        let identity = props
            .identity
            .clone()
            .ok_or_else(|| "Parameter 'identity' is missing".to_string())?;
        return Ok(Authz::Simple { identity });
    }
    let rules = props
        .rules
        .iter()
        .flatten()
        .map(|r| tls::Rule {
            pattern: r.pattern.clone(),
            policy: policy(Some(&r.policy)),
            format: match r.format.as_deref() {
                Some("glob") => tls::Format::Glob,
                _ => tls::Format::Exact,
            },
        })
        .collect();
    Ok(Authz::List {
        policy: policy(props.policy.as_deref()),
        rules,
    })
}
