//! QEMU's keyval syntax for command-line options (`--blockdev`, `--export`,
//! `--monitor`, `--nbd-server`, `--object`), and the scalar conversions the
//! schema visitor applies to keyval strings.
//!
//! `key=value` items are separated by `,`, and `,,` in a value is a literal
//! comma. Dotted keys build nested objects; key fragments made of digits turn
//! their object into an array, whose indexes must then be dense. The last of
//! repeated keys wins. The first item may leave out `key=` to bind the
//! option's implied key. An item that is just `help` or `?` asks for help.
//! Every leaf is a string: the visitor converts it once it knows the type.

use serde_json::{Map, Value};

/// Longest key fragment plus one, as QEMU sizes its buffer.
const KEY_FRAGMENT_BUF: usize = 128;

/// A keyval syntax error, displayed as QEMU's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyvalError {
    /// A key that is not a dotted sequence of names and indexes.
    #[error("Invalid parameter '{0}'")]
    InvalidParameter(String),
    /// A key, or one fragment of a dotted key, of 128 characters or more.
    #[error("Parameter{} '{name}' is too long", if *.fragment { " fragment" } else { "" })]
    TooLong { name: String, fragment: bool },
    #[error("Expected '=' after parameter '{0}'")]
    ExpectedEquals(String),
    /// A key used both as a leaf and as an object, or with both names and
    /// indexes under it; holds the prefix with its trailing dot.
    #[error("Parameters '{0}*' used inconsistently")]
    Inconsistent(String),
    /// An array index below the largest one given is absent.
    #[error("Parameter '{0}' missing")]
    Missing(String),
    /// `help` or `?` given where [`parse`] was used; see [`parse_with_help`].
    #[error("Help is not available for this option")]
    HelpRequested,
}

/// Result of [`parse_with_help`].
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    /// The option as a JSON object whose leaves are all strings.
    pub value: Value,
    /// Whether a `help` or `?` item was present.
    pub help: bool,
}

/// Parses `input` into a JSON object tree; `help` is an error here.
pub fn parse(input: &str, implied_key: Option<&str>) -> Result<Value, KeyvalError> {
    let (mut root, help) = parse_items(input, implied_key)?;
    // QEMU refuses help before it looks at array indexes.
    if help {
        return Err(KeyvalError::HelpRequested);
    }
    listify_members(&mut root, &mut Vec::new())?;
    Ok(Value::Object(root))
}

/// Parses `input`, reporting a `help` or `?` item instead of failing on it.
pub fn parse_with_help(input: &str, implied_key: Option<&str>) -> Result<Parsed, KeyvalError> {
    let (mut root, help) = parse_items(input, implied_key)?;
    listify_members(&mut root, &mut Vec::new())?;
    Ok(Parsed {
        value: Value::Object(root),
        help,
    })
}

/// Reads every item into nested objects; arrays are made afterwards.
fn parse_items(
    input: &str,
    implied_key: Option<&str>,
) -> Result<(Map<String, Value>, bool), KeyvalError> {
    let bytes = input.as_bytes();
    let mut root = Map::new();
    let mut help = false;
    let mut at = 0;
    let mut implied_key = implied_key;
    while at < bytes.len() {
        at = parse_item(&mut root, bytes, at, implied_key, &mut help)?;
        implied_key = None;
    }
    Ok((root, help))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Length of the QAPI name at the start of `s` (downstream `__RFQDN_`
/// prefix allowed), or 0 if there is none.
fn qapi_name_len(s: &[u8]) -> usize {
    let at = |i: usize| s.get(i).copied().unwrap_or(0);
    let mut p = 0;
    if at(0) == b'_' {
        if at(1) != b'_' {
            return 0;
        }
        p = 2;
        while at(p).is_ascii_alphanumeric() || at(p) == b'-' || at(p) == b'.' {
            p += 1;
        }
        if at(p) != b'_' {
            return 0;
        }
        p += 1;
    }
    if !at(p).is_ascii_alphabetic() {
        return 0;
    }
    while at(p).is_ascii_alphanumeric() || at(p) == b'-' || at(p) == b'_' {
        p += 1;
    }
    p
}

/// Length of the leading digit run of `s`.
fn digits_len(s: &[u8]) -> usize {
    s.iter().take_while(|b| b.is_ascii_digit()).count()
}

/// The array index a whole key fragment stands for, saturating like QEMU.
fn key_index(key: &str) -> Option<u64> {
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(
        key.parse::<u64>()
            .map_or(i32::MAX as u64, |i| i.min(i32::MAX as u64)),
    )
}

/// Parses one item starting at `start`; returns where the next one starts.
fn parse_item(
    root: &mut Map<String, Value>,
    input: &[u8],
    start: usize,
    implied_key: Option<&str>,
    help: &mut bool,
) -> Result<usize, KeyvalError> {
    let params = &input[start..];
    let item_len = params
        .iter()
        .position(|&b| b == b'=' || b == b',')
        .unwrap_or(params.len());
    let mut implied_value = None;
    let mut key: &[u8] = &params[..item_len];
    if item_len > 0 && params.get(item_len) != Some(&b'=') {
        let item = &params[..item_len];
        if item == b"?" || item == b"help" {
            *help = true;
            let after = start + item_len;
            return Ok(if input.get(after) == Some(&b',') {
                after + 1
            } else {
                after
            });
        }
        if let Some(implied) = implied_key {
            implied_value = Some(item);
            key = implied.as_bytes();
        }
    }

    // Walk the key fragments. As in QEMU, each fragment is checked before the
    // object named by the one before it is looked up or created.
    let mut cur = root;
    let mut previous: Option<(usize, usize)> = None;
    let mut s = 0;
    loop {
        let rest = key.get(s..).unwrap_or_default();
        let len = if s != 0 && rest.first().is_some_and(u8::is_ascii_digit) {
            digits_len(rest)
        } else {
            qapi_name_len(rest)
        }
        .min(rest.len());
        if len == 0 || key.get(s + len).is_some_and(|&b| b != b'.') {
            return Err(KeyvalError::InvalidParameter(text(key)));
        }
        if len >= KEY_FRAGMENT_BUF {
            let fragment = s != 0 || s + len != key.len();
            return Err(KeyvalError::TooLong {
                name: text(&key[s..s + len]),
                fragment,
            });
        }
        if let Some((from, to)) = previous {
            let slot = cur
                .entry(text(&key[from..to]))
                .or_insert_with(|| Value::Object(Map::new()));
            let Value::Object(inner) = slot else {
                return Err(KeyvalError::Inconsistent(format!("{}.", text(&key[..to]))));
            };
            cur = inner;
        }
        previous = Some((s, s + len));
        s += len;
        if key.get(s) != Some(&b'.') {
            break;
        }
        s += 1;
    }

    let (value, next) = match implied_value {
        Some(item) => {
            let after = start + item.len();
            let next = if input.get(after) == Some(&b',') {
                after + 1
            } else {
                after
            };
            (text(item), next)
        }
        None => {
            let mut at = start + key.len();
            if input.get(at) != Some(&b'=') {
                return Err(KeyvalError::ExpectedEquals(text(key)));
            }
            at += 1;
            let mut value = Vec::new();
            while let Some(&b) = input.get(at) {
                at += 1;
                if b == b',' {
                    if input.get(at) != Some(&b',') {
                        break;
                    }
                    at += 1;
                }
                value.push(b);
            }
            (text(&value), at)
        }
    };

    let (from, to) = previous.unwrap_or((0, 0));
    let name = text(&key[from..to]);
    if matches!(cur.get(&name), Some(Value::Object(_))) {
        return Err(KeyvalError::Inconsistent(format!("{}.", text(key))));
    }
    cur.insert(name, Value::String(value));
    Ok(next)
}

/// Turns every object below `map` whose keys are indexes into an array.
fn listify_members(
    map: &mut Map<String, Value>,
    path: &mut Vec<String>,
) -> Result<(), KeyvalError> {
    for (key, member) in map.iter_mut() {
        let Value::Object(inner) = member else {
            continue;
        };
        path.push(key.clone());
        listify_members(inner, path)?;
        if let Some(list) = as_list(inner, path)? {
            *member = Value::Array(list);
        }
        path.pop();
    }
    Ok(())
}

fn prefix(path: &[String]) -> String {
    path.iter().map(|fragment| format!("{fragment}.")).collect()
}

/// The elements of `map` in index order if its keys are indexes.
fn as_list(
    map: &mut Map<String, Value>,
    path: &[String],
) -> Result<Option<Vec<Value>>, KeyvalError> {
    let has_index = map.keys().any(|key| key_index(key).is_some());
    let has_member = map.keys().any(|key| key_index(key).is_none());
    if has_index && has_member {
        return Err(KeyvalError::Inconsistent(prefix(path)));
    }
    if !has_index {
        return Ok(None);
    }
    // One slot per member plus an empty sentinel: an index beyond the slots
    // means some lower index is absent, and the scan below finds it.
    let slots = map.len() + 1;
    let mut elements: Vec<Option<Value>> = vec![None; slots];
    let mut max_index = 0;
    for (key, member) in std::mem::take(map) {
        let index = key_index(&key).unwrap_or(u64::MAX);
        max_index = max_index.max(index);
        if let Some(slot) = usize::try_from(index)
            .ok()
            .and_then(|i| elements.get_mut(i))
        {
            if index < (slots - 1) as u64 {
                *slot = Some(member);
            }
        }
    }
    let len = (max_index.saturating_add(1)).min(slots as u64) as usize;
    let mut list = Vec::with_capacity(len);
    for (i, element) in elements.into_iter().take(len).enumerate() {
        match element {
            Some(element) => list.push(element),
            None => return Err(KeyvalError::Missing(format!("{}{i}", prefix(path)))),
        }
    }
    Ok(Some(list))
}

/// A keyval boolean: `on`/`yes`/`true`/`y` or `off`/`no`/`false`/`n`.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

/// Splits C's `strtol` prefix: leading white space, sign, then the base
/// (`0x` hex, `0` octal, else decimal) and the digits, which must end the string.
fn split_c_integer(s: &str) -> Option<(bool, u32, &str)> {
    let s = s.trim_start_matches([' ', '\t', '\n', '\u{b}', '\u{c}', '\r']);
    let (negative, s) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let hex = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X"));
    let (radix, digits) = match hex {
        Some(rest) if rest.starts_with(|c: char| c.is_ascii_hexdigit()) => (16, rest),
        _ if s.len() > 1 && s.starts_with('0') => (8, &s[1..]),
        _ => (10, s),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    Some((negative, radix, digits))
}

/// A signed integer as `qemu_strtoi64(s, NULL, 0)` takes it.
pub fn parse_int(s: &str) -> Option<i64> {
    let (negative, radix, digits) = split_c_integer(s)?;
    let magnitude = u64::from_str_radix(digits, radix).ok()?;
    if negative {
        0i64.checked_sub_unsigned(magnitude)
    } else {
        i64::try_from(magnitude).ok()
    }
}

/// An unsigned integer as `qemu_strtou64(s, NULL, 0)` takes it: a leading
/// minus sign negates modulo 2^64, as C's `strtoull` does.
pub fn parse_uint(s: &str) -> Option<u64> {
    let (negative, radix, digits) = split_c_integer(s)?;
    let magnitude = u64::from_str_radix(digits, radix).ok()?;
    Some(if negative {
        magnitude.wrapping_neg()
    } else {
        magnitude
    })
}

/// Why a size failed to parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SizeError {
    #[error("invalid size")]
    Invalid,
    #[error("size out of range")]
    OutOfRange,
}

fn suffix_multiplier(suffix: Option<u8>) -> Option<u64> {
    let power = match suffix?.to_ascii_uppercase() {
        b'B' => 0,
        b'K' => 1,
        b'M' => 2,
        b'G' => 3,
        b'T' => 4,
        b'P' => 5,
        b'E' => 6,
        _ => return None,
    };
    Some(1024u64.pow(power))
}

/// Leading white space as C's `isspace` sees it.
fn skip_c_space(s: &[u8]) -> usize {
    s.iter()
        .take_while(|b| matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r'))
        .count()
}

/// A size as `qemu_strtosz` takes it: decimal with an optional fraction and
/// an optional `B`/`K`/`M`/`G`/`T`/`P`/`E` suffix (powers of 1024, any case),
/// or plain hexadecimal; a fraction needs a suffix above bytes; negative
/// values, octal and exponents are not sizes.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let bytes = s.as_bytes();
    // QEMU reports any failure as invalid when text is left after the number.
    let fail_at = |end: usize, err: SizeError| {
        Err(if end == bytes.len() {
            err
        } else {
            SizeError::Invalid
        })
    };
    let at = |i: usize| bytes.get(i).copied();
    let lead = skip_c_space(bytes);
    let sign_len = usize::from(matches!(at(lead), Some(b'+' | b'-')));
    let digits_start = lead + sign_len;
    let int_digits = digits_len(&bytes[digits_start..]);
    let mut end = digits_start + int_digits;
    let mut val: u64 = 0;
    let mut fraction_bits: u64 = 0;
    let integral_ok = int_digits > 0;
    if integral_ok {
        if at(lead) == Some(b'-') {
            return fail_at(end, SizeError::OutOfRange);
        }
        match s[digits_start..end].parse() {
            Ok(n) => val = n,
            Err(_) => return fail_at(end, SizeError::OutOfRange),
        }
    }

    if integral_ok && val == 0 && matches!(at(end), Some(b'x' | b'X')) {
        // Hexadecimal: no fraction, no suffix.
        let hex_start = end + 1;
        let hex_len = bytes[hex_start..]
            .iter()
            .take_while(|b| b.is_ascii_hexdigit())
            .count();
        if hex_len > 0 {
            end = hex_start + hex_len;
            match u64::from_str_radix(&s[hex_start..end], 16) {
                Ok(n) => val = n,
                Err(_) => return fail_at(end, SizeError::OutOfRange),
            }
        }
        if at(end) == Some(b'.') || suffix_multiplier(at(end)).is_some() {
            return Err(SizeError::Invalid);
        }
    } else if at(end) == Some(b'.') || (!integral_ok && s.contains('.')) {
        let mut fraction = 0.0f64;
        if integral_ok && !at(end + 1).is_some_and(|b| b.is_ascii_digit()) {
            end += 1;
        } else {
            // The fraction is read without any exponent, which is a suffix here.
            let from = if integral_ok { end } else { 0 };
            let tail = &s[from..];
            let cut = tail.find(['e', 'E']).unwrap_or(tail.len());
            let (value, used) = c_strtod_prefix(&tail[..cut]).ok_or(SizeError::Invalid)?;
            end = from + used;
            if value.is_sign_negative() {
                return fail_at(end, SizeError::OutOfRange);
            }
            fraction = value;
            // A fraction too small for a double still counts as non-zero.
            let underflow = value == 0.0 && tail[..used].bytes().any(|b| matches!(b, b'1'..=b'9'));
            if underflow {
                fraction_bits = 1;
            }
        }
        if fraction == 1.0 {
            match val.checked_add(1) {
                Some(n) => val = n,
                None => return fail_at(end, SizeError::OutOfRange),
            }
        } else if fraction_bits == 0 {
            fraction_bits = (fraction * 18446744073709551616.0) as u64;
            if fraction_bits == 0 && fraction > 0.0 {
                fraction_bits = 1;
            }
        }
    } else if !integral_ok {
        return Err(SizeError::Invalid);
    }

    let multiplier = match suffix_multiplier(at(end)) {
        Some(m) => {
            end += 1;
            m
        }
        None => 1,
    };
    if end != bytes.len() {
        return Err(SizeError::Invalid);
    }
    if multiplier == 1 {
        if fraction_bits != 0 {
            return Err(SizeError::Invalid);
        }
        return Ok(val);
    }
    let fraction_product = u128::from(fraction_bits) * u128::from(multiplier);
    let round_up = (fraction_product as u64) >> 63;
    let total =
        u128::from(val) * u128::from(multiplier) + (fraction_product >> 64) + u128::from(round_up);
    u64::try_from(total).map_err(|_| SizeError::OutOfRange)
}

/// The longest decimal floating-point prefix of `s` (white space, sign,
/// digits, point, digits), as `strtod` reads it when no exponent, hex or
/// `inf`/`nan` is possible; `None` if there is no number.
fn c_strtod_prefix(s: &str) -> Option<(f64, usize)> {
    let bytes = s.as_bytes();
    let mut end = skip_c_space(bytes);
    let number_start = end;
    if matches!(bytes.get(end), Some(b'+' | b'-')) {
        end += 1;
    }
    let int_len = digits_len(&bytes[end..]);
    end += int_len;
    let mut frac_len = 0;
    if bytes.get(end) == Some(&b'.') {
        frac_len = digits_len(&bytes[end + 1..]);
        if int_len + frac_len > 0 {
            end += 1 + frac_len;
        }
    }
    if int_len + frac_len == 0 {
        return None;
    }
    let mut number = s[number_start..end].to_owned();
    if number.ends_with('.') {
        number.push('0');
    }
    let value = number.parse::<f64>().ok()?;
    value.is_finite().then_some((value, end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(input: &str, implied: Option<&str>) -> String {
        match parse(input, implied) {
            Ok(value) => format!("ok {value}"),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn flat_items_become_strings() {
        let value = parse("driver=null-co,node-name=n0,size=1k", None);
        assert_eq!(
            value,
            Ok(json!({"driver": "null-co", "node-name": "n0", "size": "1k"}))
        );
    }

    #[test]
    fn dotted_keys_nest() {
        let value = parse("file.driver=file,file.filename=/tmp/x,file.aio.x=1", None);
        assert_eq!(
            value,
            Ok(json!({"file": {"driver": "file", "filename": "/tmp/x", "aio": {"x": "1"}}}))
        );
    }

    #[test]
    fn double_comma_is_a_literal_comma() {
        assert_eq!(
            parse("a=x,,y,b=,,", None),
            Ok(json!({"a": "x,y", "b": ","}))
        );
        assert_eq!(
            parse("driver=null-co,,", None),
            Ok(json!({"driver": "null-co,"}))
        );
    }

    #[test]
    fn empty_input_and_trailing_comma() {
        assert_eq!(parse("", Some("driver")), Ok(json!({})));
        assert_eq!(parse("a=1,", None), Ok(json!({"a": "1"})));
        assert_eq!(parse("a=", None), Ok(json!({"a": ""})));
    }

    #[test]
    fn implied_key_binds_the_first_bare_item_only() {
        assert_eq!(
            parse("qcow2,node-name=n,file=f", Some("driver")),
            Ok(json!({"driver": "qcow2", "node-name": "n", "file": "f"}))
        );
        assert_eq!(parse("x..y", Some("driver")), Ok(json!({"driver": "x..y"})));
        assert_eq!(
            err("a=1,b", Some("driver")),
            "Expected '=' after parameter 'b'"
        );
        assert_eq!(err("foo", None), "Expected '=' after parameter 'foo'");
    }

    #[test]
    fn implied_value_stops_at_the_first_comma() {
        assert_eq!(err("null-co,,x", Some("driver")), "Invalid parameter ''");
    }

    #[test]
    fn invalid_keys_are_quoted_whole() {
        assert_eq!(err(",x", Some("driver")), "Invalid parameter ''");
        assert_eq!(err("=x", None), "Invalid parameter ''");
        assert_eq!(err("x..y=1", None), "Invalid parameter 'x..y'");
        assert_eq!(err("0=x", None), "Invalid parameter '0'");
        assert_eq!(err("a.0x=1", None), "Invalid parameter 'a.0x'");
        assert_eq!(err("a.-1=1", None), "Invalid parameter 'a.-1'");
        assert_eq!(err("_a=1", None), "Invalid parameter '_a'");
        assert_eq!(err("a b=1", None), "Invalid parameter 'a b'");
        assert_eq!(err("a.=1", None), "Invalid parameter 'a.'");
        assert_eq!(err("?=1", None), "Invalid parameter '?'");
    }

    #[test]
    fn downstream_names_may_contain_dots() {
        assert_eq!(
            parse("__com.redhat_x=1", None),
            Ok(json!({"__com.redhat_x": "1"}))
        );
        assert_eq!(
            parse("__com.redhat_x.y=1", None),
            Ok(json!({"__com.redhat_x": {"y": "1"}}))
        );
        assert_eq!(parse("a_b=1", None), Ok(json!({"a_b": "1"})));
    }

    #[test]
    fn long_keys_and_fragments() {
        let name127 = "a".repeat(127);
        let name128 = "a".repeat(128);
        assert_eq!(
            parse(&format!("{name127}=1"), None),
            Ok(json!({name127.clone(): "1"}))
        );
        assert_eq!(
            err(&format!("{name128}=1"), None),
            format!("Parameter '{name128}' is too long")
        );
        assert_eq!(
            err(&format!("x.{name128}=1"), None),
            format!("Parameter fragment '{name128}' is too long")
        );
        assert_eq!(
            err(&format!("{name128}.x=1"), None),
            format!("Parameter fragment '{name128}' is too long")
        );
    }

    #[test]
    fn last_duplicate_wins() {
        assert_eq!(parse("a=1,b=2,a=3", None), Ok(json!({"a": "3", "b": "2"})));
        assert_eq!(parse("a.b=1,a.b=2", None), Ok(json!({"a": {"b": "2"}})));
    }

    #[test]
    fn conflicting_shapes_are_inconsistent() {
        assert_eq!(
            err("a=1,a.b=2", None),
            "Parameters 'a.*' used inconsistently"
        );
        assert_eq!(
            err("a.b=2,a=1", None),
            "Parameters 'a.*' used inconsistently"
        );
        assert_eq!(
            err("a.b=1,a.b.c=2", None),
            "Parameters 'a.b.*' used inconsistently"
        );
        assert_eq!(
            err("a.b.c=1,a=2", None),
            "Parameters 'a.*' used inconsistently"
        );
        assert_eq!(
            err("a.b=1,a.b=2,a.c=3,a.c.d=4", None),
            "Parameters 'a.c.*' used inconsistently"
        );
        assert_eq!(
            err("a.0=x,a.b=y", None),
            "Parameters 'a.*' used inconsistently"
        );
    }

    #[test]
    fn numeric_fragments_build_dense_arrays_in_any_order() {
        assert_eq!(
            parse("bitmaps.1=b,bitmaps.0=a,bitmaps.2=c", None),
            Ok(json!({"bitmaps": ["a", "b", "c"]}))
        );
        assert_eq!(
            parse("l.0.x=1,l.1.x=2,l.0.y=3", None),
            Ok(json!({"l": [{"x": "1", "y": "3"}, {"x": "2"}]}))
        );
        assert_eq!(
            parse("m.0.0=a,m.0.1=b", None),
            Ok(json!({"m": [["a", "b"]]}))
        );
    }

    #[test]
    fn missing_indexes_are_reported() {
        assert_eq!(err("a.1=x", None), "Parameter 'a.0' missing");
        assert_eq!(err("a.0=x,a.2=y", None), "Parameter 'a.1' missing");
        assert_eq!(err("a.1=x,a.01=y", None), "Parameter 'a.0' missing");
        assert_eq!(err("a.b.1=x", None), "Parameter 'a.b.0' missing");
        assert_eq!(
            err("a.99999999999999999999=1", None),
            "Parameter 'a.0' missing"
        );
    }

    #[test]
    fn shape_conflict_is_found_before_a_missing_equals() {
        assert_eq!(err("a=1,a.b", None), "Parameters 'a.*' used inconsistently");
        assert_eq!(
            err("a=1,a.b..c=2", None),
            "Parameters 'a.*' used inconsistently"
        );
        assert_eq!(err("a=1,a..b=2", None), "Invalid parameter 'a..b'");
    }

    #[test]
    fn leading_zero_index_is_the_same_index() {
        assert_eq!(parse("a.00=x", None), Ok(json!({"a": ["x"]})));
    }

    #[test]
    fn help_is_reported_or_refused() {
        for input in ["help", "?", "null-co,help", "help,driver=x"] {
            assert_eq!(
                err(input, Some("driver")),
                "Help is not available for this option"
            );
        }
        assert_eq!(
            parse_with_help("iothread,help", Some("qom-type")),
            Ok(Parsed {
                value: json!({"qom-type": "iothread"}),
                help: true
            })
        );
        assert_eq!(
            parse_with_help("help", Some("qom-type")),
            Ok(Parsed {
                value: json!({}),
                help: true
            })
        );
        assert_eq!(
            parse("null-co,help=1", Some("driver")),
            Ok(json!({"driver": "null-co", "help": "1"}))
        );
        assert_eq!(
            err("help,x", Some("driver")),
            "Expected '=' after parameter 'x'"
        );
        assert_eq!(err("helpx", None), "Expected '=' after parameter 'helpx'");
    }

    #[test]
    fn help_is_checked_before_arrays() {
        assert_eq!(
            err("help,a.1=x", None),
            "Help is not available for this option"
        );
        assert_eq!(err("a.1=x", None), "Parameter 'a.0' missing");
        assert_eq!(
            parse_with_help("help,a.1=x", None),
            Err(KeyvalError::Missing("a.0".into()))
        );
    }

    #[test]
    fn non_ascii_values_pass_through() {
        assert_eq!(
            parse("a=\u{e9}\u{1f600}", None),
            Ok(json!({"a": "\u{e9}\u{1f600}"}))
        );
        assert_eq!(err("\u{e9}=1", None), "Invalid parameter '\u{e9}'");
    }

    #[test]
    fn round_trip_through_reescaped_keyval() {
        let cases = [
            json!({"driver": "qcow2", "file": {"driver": "file", "filename": "a,b"}}),
            json!({"bitmaps": ["b0", "b1"], "x": {"y": {"z": ""}}}),
            json!({"l": [{"a": "1"}, {"a": "2,,"}]}),
        ];
        fn flatten(prefix: &str, value: &Value, out: &mut Vec<String>) {
            match value {
                Value::Object(map) => {
                    for (key, member) in map {
                        flatten(&format!("{prefix}{key}."), member, out);
                    }
                }
                Value::Array(list) => {
                    for (i, member) in list.iter().enumerate() {
                        flatten(&format!("{prefix}{i}."), member, out);
                    }
                }
                Value::String(s) => {
                    let key = prefix.trim_end_matches('.');
                    out.push(format!("{key}={}", s.replace(',', ",,")));
                }
                _ => unreachable!("keyval leaves are strings"),
            }
        }
        for case in cases {
            let mut items = Vec::new();
            flatten("", &case, &mut items);
            assert_eq!(parse(&items.join(","), None), Ok(case.clone()), "{items:?}");
        }
    }

    #[test]
    fn garbage_never_panics() {
        let alphabet: Vec<char> = "a.0,=_-?help1xXkK \u{e9}+e".chars().collect();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..3000 {
            let mut input = String::new();
            for _ in 0..(seed % 24) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                input.push(alphabet[(seed % alphabet.len() as u64) as usize]);
            }
            let _ = parse_with_help(&input, Some("driver"));
            let _ = parse(&input, None);
            let _ = (
                parse_int(&input),
                parse_uint(&input),
                parse_size(&input),
                parse_bool(&input),
            );
        }
    }

    #[test]
    fn bools_take_qemu_spellings_case_sensitively() {
        for s in ["on", "yes", "true", "y"] {
            assert_eq!(parse_bool(s), Some(true));
        }
        for s in ["off", "no", "false", "n"] {
            assert_eq!(parse_bool(s), Some(false));
        }
        for s in ["ON", "1", "", "t", "On"] {
            assert_eq!(parse_bool(s), None);
        }
    }

    #[test]
    fn signed_integers_take_c_bases() {
        assert_eq!(parse_int("0x10"), Some(16));
        assert_eq!(parse_int("0X1f"), Some(31));
        assert_eq!(parse_int("-0x10"), Some(-16));
        assert_eq!(parse_int("010"), Some(8));
        assert_eq!(parse_int(" 10"), Some(10));
        assert_eq!(parse_int("+5"), Some(5));
        assert_eq!(parse_int("-0"), Some(0));
        assert_eq!(parse_int("0"), Some(0));
        assert_eq!(parse_int("9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_int("-9223372036854775808"), Some(i64::MIN));
        for bad in [
            "08",
            "10 ",
            "0x",
            "",
            " ",
            "1k",
            "9223372036854775808",
            "-9223372036854775809",
            "--1",
            "0x-1",
        ] {
            assert_eq!(parse_int(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn unsigned_integers_wrap_negative_input_like_strtoull() {
        assert_eq!(parse_uint("18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_uint("-1"), Some(u64::MAX));
        assert_eq!(parse_uint("-18446744073709551615"), Some(1));
        assert_eq!(parse_uint("-0"), Some(0));
        assert_eq!(parse_uint("0X1f"), Some(31));
        assert_eq!(parse_uint("\t+7"), Some(7));
        for bad in [
            "18446744073709551616",
            "-18446744073709551616",
            "08",
            "0x",
            "",
            "1k",
            "10 ",
        ] {
            assert_eq!(parse_uint(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn sizes_take_binary_suffixes_and_fractions() {
        let cases = [
            ("0", 0),
            ("12345", 12345),
            ("1b", 1),
            ("1B", 1),
            ("64k", 64 << 10),
            ("1K", 1024),
            ("1M", 1 << 20),
            ("1g", 1 << 30),
            ("1T", 1 << 40),
            ("1P", 1 << 50),
            ("1E", 1 << 60),
            ("15E", 15 << 60),
            ("1.5k", 1536),
            ("1.k", 1024),
            (".5k", 512),
            ("0.5M", 512 << 10),
            ("1.5E", 3 << 59),
            ("0x10", 16),
            ("0x1b", 27),
            (" 1k", 1024),
            ("+1k", 1024),
            ("18446744073709551615", u64::MAX),
            ("0.0001k", 0),
            ("0.0005k", 1),
            ("08", 8),
        ];
        for (input, want) in cases {
            assert_eq!(parse_size(input), Ok(want), "{input:?}");
        }
    }

    #[test]
    fn sizes_refuse_what_qemu_refuses() {
        let invalid = [
            "", "k", "1.5", "1.5b", "0x20M", "0x1.8", "1e3", "inf", "nan", "1x", "1k ", ".k", "1kk", "0x",
            "-1k", "-.5k", "-0x10", "16Ex", "18446744073709551616k", "1..5k", "1.0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000001",
        ];
        for input in invalid {
            assert_eq!(parse_size(input), Err(SizeError::Invalid), "{input:?}");
        }
        let out_of_range = [
            "-1",
            "-0",
            "16E",
            "18446744073709551616",
            "-.5",
            "0x1ffffffffffffffff",
        ];
        for input in out_of_range {
            assert_eq!(parse_size(input), Err(SizeError::OutOfRange), "{input:?}");
        }
    }
}
