//! Authorization of a TLS peer's identity: `authz-simple` (one identity) and
//! `authz-list` (ordered rules, first match wins, else the list's policy), as
//! QEMU's `authz/simple.c` and `authz/list.c` decide.
//!
//! The identity is what QEMU passes: the client certificate's distinguished
//! name in RFC 4514 form, most specific part first (`CN=client,O=Example,C=GB`).

/// What the NBD server asks of `tls-authz`.
pub trait Authorizer: Send + Sync + std::fmt::Debug {
    /// Whether a client with this identity may go on.
    fn is_allowed(&self, identity: &str) -> bool;
}

/// `allow` or `deny`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    Allow,
    #[default]
    Deny,
}

/// How a rule's `match` is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    #[default]
    Exact,
    /// `fnmatch(3)` with no flags: `*`, `?`, `[...]` and backslash escapes.
    Glob,
}

/// One `authz-list` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub pattern: String,
    pub policy: Policy,
    pub format: Format,
}

/// An authorization object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authz {
    /// `authz-simple`: exactly this identity.
    Simple { identity: String },
    /// `authz-list`.
    List { policy: Policy, rules: Vec<Rule> },
}

impl Authorizer for Authz {
    fn is_allowed(&self, identity: &str) -> bool {
        match self {
            Authz::Simple { identity: allowed } => allowed == identity,
            Authz::List { policy, rules } => {
                let hit = rules.iter().find(|rule| match rule.format {
                    Format::Exact => rule.pattern == identity,
                    Format::Glob => fnmatch(rule.pattern.as_bytes(), identity.as_bytes()),
                });
                hit.map_or(*policy, |rule| rule.policy) == Policy::Allow
            }
        }
    }
}

/// `fnmatch(pattern, text, 0)`.
pub fn fnmatch(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|skip| fnmatch(rest, &text[skip..])),
        Some((b'?', rest)) => !text.is_empty() && fnmatch(rest, &text[1..]),
        Some((b'[', rest)) => match (bracket(rest, text.first().copied()), text.split_first()) {
            (Some((true, after)), Some((_, tail))) => fnmatch(after, tail),
            (Some(_), _) => false,
            // An unterminated bracket is an ordinary character.
            (None, Some((b'[', tail))) => fnmatch(rest, tail),
            (None, _) => false,
        },
        Some((b'\\', rest)) if !rest.is_empty() => {
            text.first() == rest.first() && fnmatch(&rest[1..], &text[1..])
        }
        Some((&c, rest)) => text.first() == Some(&c) && fnmatch(rest, &text[1..]),
    }
}

/// A bracket expression after its `[`: whether `c` matches, and the pattern
/// after the closing `]`; `None` when there is no closing `]`.
fn bracket(pattern: &[u8], c: Option<u8>) -> Option<(bool, &[u8])> {
    let (negate, mut p) = match pattern.first() {
        Some(b'!' | b'^') => (true, &pattern[1..]),
        _ => (false, pattern),
    };
    let mut matched = false;
    let mut first = true;
    loop {
        let (&start, rest) = p.split_first()?;
        if start == b']' && !first {
            return Some((c.is_some() && matched != negate, rest));
        }
        first = false;
        let (start, rest) = match (start, rest.split_first()) {
            (b'\\', Some((&escaped, after))) => (escaped, after),
            _ => (start, rest),
        };
        p = rest;
        if let (Some(b'-'), Some(&end)) = (p.first(), p.get(1)) {
            if end != b']' {
                p = &p[2..];
                matched |= c.is_some_and(|c| (start..=end).contains(&c));
                continue;
            }
        }
        matched |= c == Some(start);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(policy: Policy, rules: &[(&str, Policy, Format)]) -> Authz {
        Authz::List {
            policy,
            rules: rules
                .iter()
                .map(|(p, policy, format)| Rule {
                    pattern: p.to_string(),
                    policy: *policy,
                    format: *format,
                })
                .collect(),
        }
    }

    #[test]
    fn simple_allows_only_its_identity() {
        let authz = Authz::Simple {
            identity: "CN=client".into(),
        };
        assert!(authz.is_allowed("CN=client") && !authz.is_allowed("CN=other"));
    }

    #[test]
    fn empty_list_applies_its_policy() {
        assert!(!list(Policy::Deny, &[]).is_allowed("CN=a"));
    }

    #[test]
    fn first_matching_rule_wins() {
        let authz = list(
            Policy::Allow,
            &[
                ("CN=bad,*", Policy::Deny, Format::Glob),
                ("CN=*", Policy::Allow, Format::Glob),
            ],
        );
        assert!(!authz.is_allowed("CN=bad,O=x"));
    }

    #[test]
    fn exact_rule_does_not_glob() {
        let authz = list(Policy::Deny, &[("CN=*", Policy::Allow, Format::Exact)]);
        assert!(!authz.is_allowed("CN=a"));
    }

    #[test]
    fn glob_star_crosses_commas_and_slashes() {
        assert!(fnmatch(b"CN=*,C=GB", b"CN=a/b,O=x,C=GB"));
    }

    #[test]
    fn glob_question_mark_needs_one_character() {
        assert!(!fnmatch(b"a?", b"a"));
    }

    #[test]
    fn glob_bracket_range_and_negation() {
        assert!(fnmatch(b"[a-c][!x]", b"by") && !fnmatch(b"[a-c]", b"d"));
    }

    #[test]
    fn glob_escape_matches_a_literal_star() {
        assert!(fnmatch(b"a\\*", b"a*") && !fnmatch(b"a\\*", b"ab"));
    }

    #[test]
    fn glob_unterminated_bracket_is_literal() {
        assert!(fnmatch(b"[ab", b"[ab"));
    }
}
