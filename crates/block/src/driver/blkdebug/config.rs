//! blkdebug's rule sources: the `config` file (QEMU's ini-like config syntax) and the
//! `inject-error` / `set-state` lists of `blockdev-add`, both turned into [`InjectRule`]s
//! and [`SetStateRule`]s with QEMU's parsing and messages.
//!
//! The file holds `[inject-error]` and `[set-state]` groups (optionally with an id:
//! `[inject-error "id"]`) of `key = "value"` lines; `#` starts a comment line. Values are
//! parsed as QEMU's option parser does: numbers in C syntax (decimal, `0x` hex, leading-0
//! octal, a minus sign wraps), booleans `on`/`off` (also yes/no, true/false, y/n).

use std::collections::HashSet;

use super::rules::{InjectRule, SetStateRule};
use crate::debug::{DebugEvent, IoType};
use crate::error::{Error, Result};
use crate::options::{InjectErrorOptions, SetStateOptions};

/// Longest line QEMU's parser reads at once (its buffer, minus the terminating NUL).
const LINE_MAX: usize = 1023;

const INJECT_KEYS: &[&str] = &[
    "event",
    "state",
    "iotype",
    "errno",
    "sector",
    "once",
    "immediately",
];
const SET_STATE_KEYS: &[&str] = &["event", "state", "new_state"];

fn fail(message: impl Into<String>) -> Error {
    Error::FormatOption(message.into())
}

/// One group of the file: which list, and its `key = value` pairs in file order.
#[derive(Debug, Default)]
struct Group {
    inject: bool,
    values: Vec<(String, String)>,
}

impl Group {
    /// The last value given for `key` (QEMU's options keep the last one).
    fn get(&self, key: &str) -> Option<&str> {
        self.values
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// An id QEMU accepts for an option group: a letter, then letters, digits, `-`, `.`, `_`.
fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// Parses the text of a config file into rules, inject rules first.
pub fn parse_file(text: &[u8]) -> Result<(Vec<InjectRule>, Vec<SetStateRule>)> {
    let groups = parse_groups(text)?;
    let mut inject = Vec::new();
    let mut set_state = Vec::new();
    for group in groups.iter().filter(|g| g.inject) {
        inject.push(inject_from_group(group)?);
    }
    for group in groups.iter().filter(|g| !g.inject) {
        set_state.push(set_state_from_group(group)?);
    }
    Ok((inject, set_state))
}

fn parse_groups(text: &[u8]) -> Result<Vec<Group>> {
    let mut groups: Vec<Group> = Vec::new();
    let mut ids: HashSet<(bool, String)> = HashSet::new();
    // Index of the group that `key = value` lines go to (None before any, or after a
    // group QEMU failed to create).
    let mut current: Option<usize> = None;
    let mut rest = text;
    while !rest.is_empty() {
        let end = rest.iter().position(|&b| b == b'\n');
        let (line, newline) = match end {
            Some(i) => (&rest[..i], true),
            None => (rest, false),
        };
        rest = match end {
            Some(i) => &rest[i + 1..],
            None => &[],
        };
        // QEMU's line reader stops at a NUL byte; a line that starts with one is a
        // parse error.
        let line = match line.iter().position(|&b| b == 0) {
            Some(0) => return Err(fail("parse error")),
            Some(nul) => &line[..nul],
            None => line,
        };
        if line.len() >= LINE_MAX && (newline || line.len() > LINE_MAX) {
            return Err(fail("line too long"));
        }
        let line = String::from_utf8_lossy(line);
        if line.is_empty() && newline {
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        if let Some(header) = line.strip_prefix('[') {
            let (name, id) = group_header(header, newline)?;
            let inject = match name.as_str() {
                "inject-error" => true,
                "set-state" => false,
                other => return Err(fail(format!("There is no option group '{other}'"))),
            };
            current = match id {
                Some(id) if !id_wellformed(&id) || !ids.insert((inject, id.clone())) => None,
                _ => {
                    groups.push(Group {
                        inject,
                        values: Vec::new(),
                    });
                    Some(groups.len() - 1)
                }
            };
            continue;
        }
        let Some((key, value)) = key_value(&line) else {
            return Err(fail("parse error"));
        };
        let group = current
            .and_then(|i| groups.get_mut(i))
            .ok_or_else(|| fail("no group defined"))?;
        let keys = if group.inject {
            INJECT_KEYS
        } else {
            SET_STATE_KEYS
        };
        if !keys.contains(&key.as_str()) {
            return Err(fail(format!("Invalid parameter '{key}'")));
        }
        check_value(&key, &value)?;
        group.values.push((key, value));
    }
    Ok(groups)
}

/// `name` and optional id of a `[name "id"]` or `[name]` line (after the `[`).
fn group_header(header: &str, newline: bool) -> Result<(String, Option<String>)> {
    let token_end = header.find(char::is_whitespace).unwrap_or(header.len());
    let (token, after) = header.split_at(token_end);
    if !token.is_empty() {
        if let Some(quoted) = after.trim_start().strip_prefix('"') {
            let id_end = quoted.find('"').unwrap_or(quoted.len());
            if id_end > 0 {
                return Ok((token.to_string(), Some(quoted[..id_end].to_string())));
            }
        }
    }
    // `[name]`: everything up to the first `]` (the newline too when there is none).
    let name = match header.find(']') {
        Some(close) => header[..close].to_string(),
        None if newline => format!("{header}\n"),
        None => header.to_string(),
    };
    if name.is_empty() {
        return Err(fail("parse error"));
    }
    Ok((name, None))
}

/// `key = "value"`; a line with any first word counts as that key with an empty value
/// (QEMU's scanner accepts it so).
fn key_value(line: &str) -> Option<(String, String)> {
    let trimmed = line.trim_start();
    let key_end = trimmed.find(char::is_whitespace).unwrap_or(trimmed.len());
    if key_end == 0 {
        return None;
    }
    let (key, after) = trimmed.split_at(key_end);
    let value = after
        .trim_start()
        .strip_prefix('=')
        .map(str::trim_start)
        .and_then(|v| v.strip_prefix('"'))
        .map(|v| v.split('"').next().unwrap_or_default().to_string())
        .unwrap_or_default();
    Some((key.to_string(), value))
}

fn check_value(key: &str, value: &str) -> Result<()> {
    match key {
        "state" | "errno" | "sector" | "new_state" => parse_number(key, value).map(|_| ()),
        "once" | "immediately" => parse_bool(key, value).map(|_| ()),
        _ => Ok(()),
    }
}

/// A number as QEMU's `qemu_strtou64` with base 0 reads it (a minus sign wraps).
fn parse_number(key: &str, value: &str) -> Result<u64> {
    let bad = || fail(format!("Parameter '{key}' expects a number"));
    let text = value.trim_start();
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let (radix, digits) = if let Some(hex) = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        (16, hex)
    } else if digits.len() > 1 && digits.starts_with('0') {
        (8, &digits[1..])
    } else {
        (10, digits)
    };
    if digits.is_empty() {
        return Err(bad());
    }
    let magnitude = u64::from_str_radix(digits, radix).map_err(|_| bad())?;
    Ok(if negative {
        magnitude.wrapping_neg()
    } else {
        magnitude
    })
}

fn parse_bool(key: &str, value: &str) -> Result<bool> {
    match value {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(fail(format!("Parameter '{key}' expects 'on' or 'off'"))),
    }
}

fn event_of(group: &Group) -> Result<DebugEvent> {
    let name = group
        .get("event")
        .ok_or_else(|| fail("Missing event name for rule"))?;
    DebugEvent::parse(name).ok_or_else(|| fail(format!("invalid parameter value: {name}")))
}

/// A number option as QEMU stores it in a C `int` (the low 32 bits).
fn int_of(group: &Group, key: &str, default: i32) -> Result<i32> {
    match group.get(key) {
        Some(value) => Ok(parse_number(key, value)? as i32),
        None => Ok(default),
    }
}

fn inject_from_group(group: &Group) -> Result<InjectRule> {
    let mut rule = InjectRule::new(event_of(group)?);
    rule.state = int_of(group, "state", 0)?;
    rule.errno = int_of(group, "errno", libc::EIO)?;
    if let Some(sector) = group.get("sector") {
        rule.set_sector(parse_number("sector", sector)? as i64);
    }
    if let Some(once) = group.get("once") {
        rule.once = parse_bool("once", once)?;
    }
    if let Some(immediately) = group.get("immediately") {
        rule.immediately = parse_bool("immediately", immediately)?;
    }
    if let Some(name) = group.get("iotype") {
        let iotype =
            IoType::parse(name).ok_or_else(|| fail(format!("invalid parameter value: {name}")))?;
        rule.iotype_mask = iotype.bit();
    }
    Ok(rule)
}

fn set_state_from_group(group: &Group) -> Result<SetStateRule> {
    Ok(SetStateRule {
        event: event_of(group)?,
        state: int_of(group, "state", 0)?,
        new_state: int_of(group, "new_state", 0)?,
    })
}

/// An `inject-error` element of `blockdev-add` (already checked by the schema).
pub fn inject_from_options(opts: &InjectErrorOptions) -> InjectRule {
    let mut rule = InjectRule::new(opts.event);
    // QEMU passes these numbers through its option parser into C ints.
    rule.state = opts.state.map_or(0, |s| s as i32);
    rule.errno = opts.errno.map_or(libc::EIO, |e| e as i32);
    if let Some(sector) = opts.sector {
        rule.set_sector(sector);
    }
    rule.once = opts.once.unwrap_or(false);
    rule.immediately = opts.immediately.unwrap_or(false);
    if let Some(iotype) = opts.iotype {
        rule.iotype_mask = iotype.bit();
    }
    rule
}

/// A `set-state` element of `blockdev-add`.
pub fn set_state_from_options(opts: &SetStateOptions) -> SetStateRule {
    SetStateRule {
        event: opts.event,
        state: opts.state.map_or(0, |s| s as i32),
        new_state: opts.new_state as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_rules_parse_with_qemus_syntax() {
        let text = b"# faults\n[inject-error]\nevent = \"write_aio\"\nerrno = \"28\"\nonce = \"on\"\n\n[set-state \"s1\"]\nevent = \"flush_to_disk\"\nnew_state = \"0x2\"\n";
        let (inject, set_state) = parse_file(text).unwrap();
        assert_eq!(inject.len(), 1);
        assert_eq!(inject[0].event, DebugEvent::WriteAio);
        assert_eq!(inject[0].errno, 28);
        assert!(inject[0].once);
        assert_eq!(set_state[0].new_state, 2);
    }

    #[test]
    fn config_file_errors_read_like_qemus() {
        let err = |text: &[u8]| parse_file(text).unwrap_err().to_string();
        assert_eq!(err(b"\0\0\0"), "parse error");
        assert_eq!(err(b"errno = \"5\"\n"), "no group defined");
        assert_eq!(err(b"[drive]\n"), "There is no option group 'drive'");
        assert_eq!(
            err(b"[inject-error]\nfoo = \"1\"\n"),
            "Invalid parameter 'foo'"
        );
        assert_eq!(
            err(b"[inject-error]\nerrno = \"x\"\n"),
            "Parameter 'errno' expects a number"
        );
        assert_eq!(
            err(b"[inject-error]\nerrno = \"5\"\n"),
            "Missing event name for rule"
        );
        assert_eq!(
            err(b"[inject-error]\nevent = \"preadv\"\n"),
            "invalid parameter value: preadv"
        );
    }

    #[test]
    fn numbers_wrap_like_c() {
        assert_eq!(parse_number("n", "-1").unwrap(), u64::MAX);
        assert_eq!(parse_number("n", "010").unwrap(), 8);
        assert!(parse_number("n", "").is_err());
    }
}
