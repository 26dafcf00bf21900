//! Feeds arbitrary bytes to the QMP JSON parser in arbitrary chunks and prints
//! everything it produces, as a monitor would.
//!
//! The first bytes of the input choose the chunk sizes; the rest is the
//! stream. Besides "no panic", it checks that chunking never changes the
//! outcome and that printed replies read back to the same text.

#![no_main]

use libfuzzer_sys::fuzz_target;
use qapi::json::{parse_value, JsonError, Parser};
use qapi::output::to_wire;
use serde_json::{json, Value};

/// How many leading bytes pick chunk sizes.
const HEADER_BYTES: usize = 4;

fn run<'a>(chunks: impl Iterator<Item = &'a [u8]>) -> Vec<Result<Value, JsonError>> {
    let mut parser = Parser::new();
    let mut out = Vec::new();
    for chunk in chunks {
        out.extend(parser.feed(chunk));
    }
    out.extend(parser.finish());
    out
}

/// Cuts `data` into pieces whose sizes cycle through `sizes` (each byte + 1).
fn chunked<'a>(data: &'a [u8], sizes: &'a [u8]) -> impl Iterator<Item = &'a [u8]> {
    let mut rest = data;
    let mut turn = 0;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let size = match sizes {
            [] => rest.len(),
            _ => usize::from(sizes[turn % sizes.len()]) + 1,
        };
        turn += 1;
        let (chunk, tail) = rest.split_at(size.min(rest.len()));
        rest = tail;
        Some(chunk)
    })
}

fuzz_target!(|data: &[u8]| {
    let (sizes, stream) = data.split_at(HEADER_BYTES.min(data.len()));

    let whole = run(std::iter::once(stream));
    let pieces = run(chunked(stream, sizes));
    assert_eq!(whole, pieces, "chunking changed the outcome");

    for item in &whole {
        let reply = match item {
            Ok(value) => json!({"return": value}),
            Err(err) => json!({"error": {"class": "GenericError", "desc": err.to_string()}}),
        };
        for pretty in [false, true] {
            let wire = to_wire(&reply, pretty);
            assert!(wire.is_ascii() && wire.ends_with("\r\n"));
            let again = parse_value(&wire).expect("printed output parses");
            assert_eq!(
                to_wire(&again, pretty),
                wire,
                "printed output reads back differently"
            );
        }
    }
});
