//! QEMU's node filenames: a plain name when the node has one, otherwise a
//! `json:{...}` pseudo-filename built from the node's "strong" options.
//!
//! QEMU prints those options from a QDict, whose iteration order is its hash-bucket
//! order, not insertion order; management tools compare these strings, so we reproduce
//! that order (bucket = a tdb-style string hash modulo 512).

use serde_json::{Map, Value};

const QDICT_BUCKETS: u32 = 512;

/// The QDict bucket of `key`.
pub(crate) fn bucket(key: &str) -> u32 {
    let bytes = key.as_bytes();
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    let mut value = 0x238F_13AFu32.wrapping_mul(len);
    for (i, &b) in bytes.iter().enumerate() {
        let shift = (i * 5 % 24) as u32;
        value = value.wrapping_add(u32::from(b) << shift);
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345) % QDICT_BUCKETS
}

/// Serializes `value` as QEMU's JSON writer does: `", "` and `": "` separators and
/// object members in QDict order.
pub fn qemu_json(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value);
    out
}

fn write_value(out: &mut String, value: &Value) {
    match value {
        Value::Object(map) => write_object(out, map),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_value(out, item);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

fn write_object(out: &mut String, map: &Map<String, Value>) {
    // Within one bucket QDict puts the newest entry first.
    let mut entries: Vec<(usize, &String, &Value)> = map
        .iter()
        .enumerate()
        .map(|(i, (k, v))| (i, k, v))
        .collect();
    entries.sort_by_key(|&(i, k, _)| (bucket(k), std::cmp::Reverse(i)));
    out.push('{');
    for (n, (_, key, value)) in entries.into_iter().enumerate() {
        if n > 0 {
            out.push_str(", ");
        }
        out.push_str(&Value::String(key.clone()).to_string());
        out.push_str(": ");
        write_value(out, value);
    }
    out.push('}');
}

/// What a driver says about its node's name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Filename {
    /// The plain filename, when the node has one (`a.img`, `null-co://`).
    pub exact: Option<String>,
    /// The node's strong options (`driver` included), nested for children.
    pub options: Map<String, Value>,
}

impl Filename {
    /// The string QEMU shows as `file` / `image.filename`.
    pub fn display(&self) -> String {
        match &self.exact {
            Some(name) => name.clone(),
            None => format!("json:{}", qemu_json(&Value::Object(self.options.clone()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn raw_with_offset_matches_qsd_order() {
        let value = json!({"driver": "raw", "offset": 4096, "size": 4096,
            "file": {"driver": "file", "filename": "a.img"}});
        assert_eq!(
            qemu_json(&value),
            r#"{"offset": 4096, "driver": "raw", "size": 4096, "file": {"driver": "file", "filename": "a.img"}}"#
        );
    }

    #[test]
    fn null_co_matches_qsd_order() {
        let value = json!({"driver": "null-co", "size": 4096, "read-zeroes": false});
        assert_eq!(
            qemu_json(&value),
            r#"{"read-zeroes": false, "driver": "null-co", "size": 4096}"#
        );
    }
}
