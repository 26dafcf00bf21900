//! QEMU's JSON output form, byte for byte as a QMP monitor writes it.
//!
//! Compact form separates members with `", "` and keys with `": "`. The pretty
//! form (`--monitor ...,pretty=on`) puts every member and element on its own
//! line, indented four spaces per level, and writes an empty object as `{`,
//! newline, `}`. Both are pure ASCII: anything outside printable ASCII is a
//! `\uXXXX` escape with upper-case hex, and doubles print as C's `%.17g`.
//! Every line ends in `\r\n`, the last one included.

use std::fmt::Write as _;

use serde_json::{Number, Value};

use crate::json::is_valid_codepoint;

/// Renders one message as QEMU writes it on the wire, trailing `\r\n` included.
pub fn to_wire(value: &Value, pretty: bool) -> String {
    let mut out = String::new();
    write_value(&mut out, value, pretty, 0);
    out.push_str("\r\n");
    out
}

fn newline(out: &mut String, pretty: bool, indent: usize) {
    if pretty {
        out.push_str("\r\n");
        out.extend(std::iter::repeat_n(' ', indent * 4));
    }
}

fn write_value(out: &mut String, value: &Value, pretty: bool, indent: usize) {
    let comma = if pretty { "," } else { ", " };
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_string(out, s),
        Value::Array(list) => {
            out.push('[');
            for (i, element) in list.iter().enumerate() {
                if i > 0 {
                    out.push_str(comma);
                }
                newline(out, pretty, indent + 1);
                write_value(out, element, pretty, indent + 1);
            }
            newline(out, pretty, indent);
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (key, member)) in qdict_order(map).into_iter().enumerate() {
                if i > 0 {
                    out.push_str(comma);
                }
                newline(out, pretty, indent + 1);
                write_string(out, key);
                out.push_str(": ");
                write_value(out, member, pretty, indent + 1);
            }
            newline(out, pretty, indent);
            out.push('}');
        }
    }
}

/// The number of hash buckets of a QEMU dictionary.
const QDICT_BUCKETS: u32 = 512;

/// The bucket QEMU's dictionary files `key` under (the TDB string hash, reduced
/// modulo the bucket count).
fn qdict_bucket(key: &str) -> u32 {
    let bytes = key.as_bytes();
    // Only the low 32 bits of the length take part, as in C's unsigned arithmetic.
    let mut value = 0x238F_13AFu32.wrapping_mul(bytes.len() as u32);
    for (i, &b) in bytes.iter().enumerate() {
        let shift = (i * 5 % 24) as u32;
        value = value.wrapping_add(u32::from(b) << shift);
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345) % QDICT_BUCKETS
}

/// Members in the order QEMU prints a dictionary: by hash bucket, and within a
/// bucket the most recently inserted first. Clients must not depend on member
/// order, but byte-for-byte equal output costs nothing and spares the ones that do.
fn qdict_order(map: &serde_json::Map<String, Value>) -> Vec<(&String, &Value)> {
    let mut members: Vec<(u32, usize, &String, &Value)> = map
        .iter()
        .enumerate()
        .map(|(i, (k, v))| (qdict_bucket(k), i, k, v))
        .collect();
    members.sort_by_key(|&(bucket, i, _, _)| (bucket, std::cmp::Reverse(i)));
    members.into_iter().map(|(_, _, k, v)| (k, v)).collect()
}

fn write_number(out: &mut String, n: &Number) {
    if let Some(i) = n.as_i64() {
        let _ = write!(out, "{i}");
    } else if let Some(u) = n.as_u64() {
        let _ = write!(out, "{u}");
    } else {
        out.push_str(&format_double(n.as_f64().unwrap_or_default()));
    }
}

/// Formats a double as C's `printf("%.17g")` does.
pub fn format_double(x: f64) -> String {
    const PRECISION: i32 = 17;
    if x.is_nan() {
        return if x.is_sign_negative() { "-nan" } else { "nan" }.to_owned();
    }
    if x.is_infinite() {
        return if x < 0.0 { "-inf" } else { "inf" }.to_owned();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0" } else { "0" }.to_owned();
    }
    // Seventeen significant digits, correctly rounded: "d.dddddddddddddddde±x".
    let sci = format!("{:.*e}", (PRECISION - 1) as usize, x);
    let (mantissa, exponent) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let negative = mantissa.starts_with('-');
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();

    let mut out = String::new();
    if negative {
        out.push('-');
    }
    if !(-4..PRECISION).contains(&exponent) {
        let (first, rest) = digits.split_at(1);
        out.push_str(first);
        let rest = rest.trim_end_matches('0');
        if !rest.is_empty() {
            out.push('.');
            out.push_str(rest);
        }
        let sign = if exponent < 0 { '-' } else { '+' };
        let _ = write!(out, "e{sign}{:02}", exponent.unsigned_abs());
    } else if exponent >= 0 {
        let (int, frac) = digits.split_at((exponent + 1) as usize);
        out.push_str(int);
        let frac = frac.trim_end_matches('0');
        if !frac.is_empty() {
            out.push('.');
            out.push_str(frac);
        }
    } else {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', (-exponent - 1) as usize));
        out.push_str(digits.trim_end_matches('0'));
    }
    out
}

fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(ch),
            _ => {
                let cp = u32::from(ch);
                // QEMU cannot print noncharacters and replaces them.
                let cp = if is_valid_codepoint(cp) { cp } else { 0xfffd };
                if cp > 0xffff {
                    let offset = cp - 0x10000;
                    let high = 0xd800 + (offset >> 10);
                    let low = 0xdc00 + (offset & 0x3ff);
                    let _ = write!(out, "\\u{high:04X}\\u{low:04X}");
                } else {
                    let _ = write!(out, "\\u{cp:04X}");
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::{parse_value, Parser};
    use serde_json::json;

    #[test]
    fn compact_form_uses_spaced_separators_and_crlf() {
        let value = json!({"return": {"a": [1, 2], "b": {}, "c": [], "d": null, "e": false}});
        assert_eq!(
            to_wire(&value, false),
            "{\"return\": {\"d\": null, \"e\": false, \"a\": [1, 2], \"b\": {}, \"c\": []}}\r\n"
        );
    }

    #[test]
    fn pretty_form_matches_qsd() {
        let value = json!({
            "id": {"a": [], "f": null, "b": {}, "g": true, "c": [1, {"d": "e"}]},
            "error": {"class": "CommandNotFound", "desc": "The command x has not been found"}
        });
        let want = "{\r\n    \"id\": {\r\n        \"a\": [\r\n        ],\r\n        \"f\": null,\r\n        \
                    \"b\": {\r\n        },\r\n        \"g\": true,\r\n        \"c\": [\r\n            1,\r\n            \
                    {\r\n                \"d\": \"e\"\r\n            }\r\n        ]\r\n    },\r\n    \
                    \"error\": {\r\n        \"class\": \"CommandNotFound\",\r\n        \
                    \"desc\": \"The command x has not been found\"\r\n    }\r\n}\r\n";
        assert_eq!(to_wire(&value, true), want);
    }

    #[test]
    fn pretty_empty_object_at_top_level() {
        assert_eq!(to_wire(&json!({}), true), "{\r\n}\r\n");
        assert_eq!(
            to_wire(&json!({"return": {}}), true),
            "{\r\n    \"return\": {\r\n    }\r\n}\r\n"
        );
    }

    #[test]
    fn strings_are_escaped_to_ascii_with_uppercase_hex() {
        let value = json!("\u{fc}\u{1f600}/\u{7f}\u{1}\u{0}\u{8}\u{c}\t\n\r\"\\'");
        assert_eq!(
            to_wire(&value, false),
            "\"\\u00FC\\uD83D\\uDE00/\\u007F\\u0001\\u0000\\b\\f\\t\\n\\r\\\"\\\\'\"\r\n"
        );
    }

    #[test]
    fn noncharacters_print_as_replacement_character() {
        assert_eq!(
            to_wire(&json!("\u{fdd0}\u{fffe}\u{1ffff}"), false),
            "\"\\uFFFD\\uFFFD\\uFFFD\"\r\n"
        );
    }

    #[test]
    fn keys_are_escaped_like_strings() {
        assert_eq!(
            to_wire(&json!({"\u{e9}": 1}), false),
            "{\"\\u00E9\": 1}\r\n"
        );
    }

    #[test]
    fn integers_print_exactly() {
        let value = json!([0, -1, i64::MIN, u64::MAX]);
        assert_eq!(
            to_wire(&value, false),
            "[0, -1, -9223372036854775808, 18446744073709551615]\r\n"
        );
    }

    #[test]
    fn doubles_print_as_percent_17g() {
        let cases = [
            (1.5, "1.5"),
            (0.1, "0.10000000000000001"),
            (1e300, "1.0000000000000001e+300"),
            (-0.0, "-0"),
            (0.0, "0"),
            (1.0, "1"),
            (2.5, "2.5"),
            (1500.0, "1500"),
            (-0.0005, "-0.00050000000000000001"),
            (1e-7, "9.9999999999999995e-08"),
            (1.2345678901234568e29, "1.2345678901234568e+29"),
            (1e16, "10000000000000000"),
            (1e17, "1e+17"),
            (1e15, "1000000000000000"),
            (0.0001, "0.0001"),
            (0.00001, "1.0000000000000001e-05"),
            (1e20, "1e+20"),
            (f64::MAX, "1.7976931348623157e+308"),
            (5e-324, "4.9406564584124654e-324"),
            (18446744073709551616.0, "1.8446744073709552e+19"),
            (-9223372036854775809.0, "-9.2233720368547758e+18"),
            (f64::INFINITY, "inf"),
            (f64::NEG_INFINITY, "-inf"),
        ];
        for (x, want) in cases {
            assert_eq!(format_double(x), want, "{x:e}");
        }
    }

    #[test]
    fn parsed_input_round_trips_through_output() {
        let inputs: [&[u8]; 5] = [
            br#"{"execute": "x", "id": [1.5, 0.1, 1e300, -0, 18446744073709551615]}"#,
            br#"{"a": {"b": [[], {}, [null, true, false]]}, "c": "\u00fc\ud83d\ude00"}"#,
            br#"{'single': 'q\'"', "esc": "\b\f\n\r\t\/\\"}"#,
            b"{\"raw\": \"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\"}",
            br#"[1e17, 5e-324, -2.5e-3, 0.5]"#,
        ];
        for input in inputs {
            let mut parser = Parser::new();
            let out = parser.feed(input);
            let [Ok(value)] = &out[..] else {
                panic!("{out:?}")
            };
            for pretty in [false, true] {
                let wire = to_wire(value, pretty);
                assert!(wire.is_ascii());
                assert!(wire.ends_with("\r\n"));
                let again = parse_value(&wire);
                assert_eq!(again.as_ref(), Ok(value), "{wire}");
                assert_eq!(to_wire(&again.unwrap_or_default(), pretty), wire);
            }
        }
    }

    #[test]
    fn deepest_accepted_nesting_prints_in_both_forms() {
        let mut input = b"{\"id\":".to_vec();
        input.extend([b'['; 1023]);
        input.extend([b']'; 1023]);
        input.push(b'}');
        let out = Parser::new().feed(&input);
        let [Ok(value)] = &out[..] else {
            panic!("{out:?}")
        };
        let compact = to_wire(value, false);
        assert_eq!(compact.len(), "{\"id\": }\r\n".len() + 2 * 1023);
        assert!(to_wire(value, true).ends_with("]\r\n}\r\n"));
    }

    #[test]
    fn qemu_replies_for_observed_ids() {
        let mut parser = Parser::new();
        let out = parser.feed(br#"{"id":1.5}{"id":0.1}{"id":1e300}{"id":-0.0}"#);
        let wires: Vec<String> = out.iter().flatten().map(|v| to_wire(v, false)).collect();
        assert_eq!(
            wires,
            [
                "{\"id\": 1.5}\r\n",
                "{\"id\": 0.10000000000000001}\r\n",
                "{\"id\": 1.0000000000000001e+300}\r\n",
                "{\"id\": -0}\r\n"
            ]
        );
    }

    #[test]
    fn objects_print_in_qemus_dictionary_order() {
        let v: Value = serde_json::from_str(
            r#"{"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": ""}"#,
        )
        .unwrap();
        assert_eq!(
            to_wire(&v, false),
            "{\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \"package\": \"\"}\r\n"
        );
        let keys = [
            "file",
            "node-name",
            "ro",
            "drv",
            "backing_file_depth",
            "active",
            "encrypted",
        ];
        let map: serde_json::Map<String, Value> =
            keys.iter().map(|k| (k.to_string(), Value::Null)).collect();
        let order: Vec<&str> = qdict_order(&map)
            .into_iter()
            .map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(
            order,
            [
                "active",
                "ro",
                "node-name",
                "backing_file_depth",
                "drv",
                "encrypted",
                "file"
            ]
        );
    }
}
