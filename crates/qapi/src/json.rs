//! QEMU's JSON input dialect, as the QMP monitor and the command line parse it.
//!
//! The input is split in three stages, exactly where QEMU splits it, because the
//! stages decide what a client sees after bad input:
//!
//! * a byte lexer that cuts tokens and, after a bad byte, skips input until a
//!   structural character, a control character or an impossible UTF-8 byte;
//! * a streamer that counts brackets and hands a token run to the parser as soon
//!   as the brackets balance (or go negative), enforcing the size limits;
//! * a recursive parser that builds the value and reports the first error.
//!
//! Beyond RFC 8259 the dialect takes single-quoted strings and the `\'` escape,
//! rejects repeated keys, keeps integers that fit `i64` or `u64` exact and turns
//! every other number into a double.

use serde_json::{Map, Number, Value};

/// Largest token, and largest sum of token lengths in one value.
const MAX_TOKEN_BYTES: usize = 64 << 20;
/// Most tokens one value may have.
const MAX_TOKEN_COUNT: usize = 2 << 20;
/// Deepest nesting of objects and arrays together.
const MAX_NESTING: i64 = 1024;

/// A parse failure, displayed as QEMU's `desc` text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JsonError {
    /// The lexer met a byte no token can contain; holds the token so far.
    #[error("JSON parse error, stray '{0}'")]
    Stray(String),
    #[error("JSON parse error, expecting value")]
    ExpectingValue,
    #[error("JSON parse error, premature EOI")]
    PrematureEnd,
    #[error("JSON parse error, expected separator in dict")]
    DictSeparator,
    #[error("JSON parse error, expected separator in list")]
    ListSeparator,
    #[error("JSON parse error, missing : in object pair")]
    MissingColon,
    #[error("JSON parse error, key is not a string in object")]
    KeyNotString,
    #[error("JSON parse error, duplicate key")]
    DuplicateKey,
    #[error("JSON parse error, invalid keyword '{0}'")]
    InvalidKeyword(String),
    #[error("JSON parse error, invalid escape sequence in string")]
    InvalidEscape,
    /// A `\u` escape naming a surrogate, a noncharacter or fewer than four digits.
    #[error("JSON parse error, {0} is not a valid Unicode character")]
    InvalidCodepoint(String),
    #[error("JSON parse error, invalid UTF-8 sequence in string")]
    InvalidUtf8,
    #[error("JSON token size limit exceeded")]
    TokenSizeLimit,
    #[error("JSON token count limit exceeded")]
    TokenCountLimit,
    #[error("JSON nesting depth limit exceeded")]
    NestingLimit,
    /// [`parse_value`] found nothing but whitespace.
    #[error("Expecting a JSON value")]
    NoValue,
    /// [`parse_value`] found more than one value.
    #[error("Expecting at most one JSON value")]
    TrailingValue,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Colon,
    Comma,
    Integer,
    Float,
    Keyword,
    String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Start,
    Recovery,
    DqString,
    DqEscape,
    SqString,
    SqEscape,
    Zero,
    NegNonzero,
    Nonzero,
    Mantissa,
    MantissaDigits,
    ExpE,
    ExpSign,
    ExpDigits,
    Keyword,
}

/// What the lexer does with one byte in one state.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Take the byte and move to the state.
    Go(State),
    /// Take the byte; it ends a token.
    Emit(Kind),
    /// The token ended before this byte; look at the byte again from `Start`.
    EmitBefore(Kind),
    /// Leave recovery; look at the byte again from `Start`.
    Restart,
    /// Take the byte; the token so far is garbage.
    Error,
}

fn step(state: State, byte: u8) -> Step {
    use State::*;
    match state {
        Start => match byte {
            b'"' => Step::Go(DqString),
            b'\'' => Step::Go(SqString),
            b'0' => Step::Go(Zero),
            b'1'..=b'9' => Step::Go(Nonzero),
            b'-' => Step::Go(NegNonzero),
            b'{' => Step::Emit(Kind::LCurly),
            b'}' => Step::Emit(Kind::RCurly),
            b'[' => Step::Emit(Kind::LSquare),
            b']' => Step::Emit(Kind::RSquare),
            b',' => Step::Emit(Kind::Comma),
            b':' => Step::Emit(Kind::Colon),
            b'a'..=b'z' => Step::Go(Keyword),
            b' ' | b'\t' | b'\r' | b'\n' => Step::Go(Start),
            _ => Step::Error,
        },
        Recovery => match byte {
            b'\t' => Step::Go(Recovery),
            0..=0x1f | 0xfe | 0xff => Step::Restart,
            b'[' | b']' | b'{' | b'}' | b',' | b':' => Step::Restart,
            _ => Step::Go(Recovery),
        },
        DqString | SqString => {
            let quote = if state == DqString { b'"' } else { b'\'' };
            match byte {
                b'\\' => Step::Go(if state == DqString {
                    DqEscape
                } else {
                    SqEscape
                }),
                b if b == quote => Step::Emit(Kind::String),
                0x20..=0xfd => Step::Go(state),
                _ => Step::Error,
            }
        }
        DqEscape | SqEscape => match byte {
            0x20..=0xfd => Step::Go(if state == DqEscape {
                DqString
            } else {
                SqString
            }),
            _ => Step::Error,
        },
        Zero => match byte {
            b'0'..=b'9' => Step::Error,
            b'.' => Step::Go(Mantissa),
            _ => Step::EmitBefore(Kind::Integer),
        },
        NegNonzero => match byte {
            b'0' => Step::Go(Zero),
            b'1'..=b'9' => Step::Go(Nonzero),
            _ => Step::Error,
        },
        Nonzero => match byte {
            b'0'..=b'9' => Step::Go(Nonzero),
            b'e' | b'E' => Step::Go(ExpE),
            b'.' => Step::Go(Mantissa),
            _ => Step::EmitBefore(Kind::Integer),
        },
        Mantissa => match byte {
            b'0'..=b'9' => Step::Go(MantissaDigits),
            _ => Step::Error,
        },
        MantissaDigits => match byte {
            b'0'..=b'9' => Step::Go(MantissaDigits),
            b'e' | b'E' => Step::Go(ExpE),
            _ => Step::EmitBefore(Kind::Float),
        },
        ExpE => match byte {
            b'+' | b'-' => Step::Go(ExpSign),
            b'0'..=b'9' => Step::Go(ExpDigits),
            _ => Step::Error,
        },
        ExpSign => match byte {
            b'0'..=b'9' => Step::Go(ExpDigits),
            _ => Step::Error,
        },
        ExpDigits => match byte {
            b'0'..=b'9' => Step::Go(ExpDigits),
            _ => Step::EmitBefore(Kind::Float),
        },
        Keyword => match byte {
            b'a'..=b'z' => Step::Go(Keyword),
            _ => Step::EmitBefore(Kind::Keyword),
        },
    }
}

#[derive(Debug, Clone, Copy)]
struct Tok {
    kind: Kind,
    start: usize,
    end: usize,
}

/// Collects tokens until brackets balance, then parses them.
#[derive(Debug, Default)]
struct Streamer {
    toks: Vec<Tok>,
    text: Vec<u8>,
    braces: i64,
    brackets: i64,
    out: Vec<Result<Value, JsonError>>,
}

impl Streamer {
    fn reset(&mut self) {
        self.toks.clear();
        self.text.clear();
        self.braces = 0;
        self.brackets = 0;
    }

    fn emit(&mut self, item: Result<Value, JsonError>) {
        self.reset();
        self.out.push(item);
    }

    fn token(&mut self, kind: Kind, bytes: &[u8]) {
        match kind {
            Kind::LCurly => self.braces += 1,
            Kind::RCurly => self.braces -= 1,
            Kind::LSquare => self.brackets += 1,
            Kind::RSquare => self.brackets -= 1,
            _ => {}
        }
        if self.text.len() + bytes.len() + 1 > MAX_TOKEN_BYTES {
            return self.emit(Err(JsonError::TokenSizeLimit));
        }
        if self.toks.len() + 1 > MAX_TOKEN_COUNT {
            return self.emit(Err(JsonError::TokenCountLimit));
        }
        if self.braces + self.brackets > MAX_NESTING {
            return self.emit(Err(JsonError::NestingLimit));
        }
        let start = self.text.len();
        self.text.extend_from_slice(bytes);
        self.toks.push(Tok {
            kind,
            start,
            end: self.text.len(),
        });
        if (self.braces > 0 || self.brackets > 0) && self.braces >= 0 && self.brackets >= 0 {
            return;
        }
        let item = self.parse();
        self.emit(item);
    }

    fn end_of_input(&mut self) {
        if !self.toks.is_empty() {
            let item = self.parse();
            self.emit(item);
        }
    }

    fn parse(&self) -> Result<Value, JsonError> {
        TokenParser {
            toks: &self.toks,
            text: &self.text,
            pos: 0,
        }
        .value()
    }
}

/// A streaming parser for one QMP connection (or one command-line value).
///
/// Bytes go in with [`Parser::feed`]; every top-level value (or error) they
/// complete comes out at once, in input order, whatever its type.
#[derive(Debug)]
pub struct Parser {
    state: State,
    token: Vec<u8>,
    streamer: Streamer,
}

impl Default for Parser {
    fn default() -> Self {
        Self::new()
    }
}

impl Parser {
    pub fn new() -> Self {
        Parser {
            state: State::Start,
            token: Vec::new(),
            streamer: Streamer::default(),
        }
    }

    /// Feeds bytes; returns every value or error they complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Result<Value, JsonError>> {
        for &byte in bytes {
            self.lex(byte, false);
        }
        std::mem::take(&mut self.streamer.out)
    }

    /// Ends the input: finishes a pending number or keyword, reports an open
    /// string as stray, and parses whatever tokens are still waiting.
    pub fn finish(&mut self) -> Vec<Result<Value, JsonError>> {
        self.lex(0, true);
        self.streamer.end_of_input();
        std::mem::take(&mut self.streamer.out)
    }

    fn lex(&mut self, byte: u8, flush: bool) {
        loop {
            if flush && self.state == State::Start {
                break;
            }
            let step = step(self.state, if flush { 0 } else { byte });
            let consumed = !flush && matches!(step, Step::Go(_) | Step::Emit(_) | Step::Error);
            if consumed {
                self.token.push(byte);
            }
            match step {
                Step::Go(state) => {
                    if flush {
                        // No state keeps going on the end-of-input byte; stop rather than spin.
                        self.token.clear();
                        self.state = State::Start;
                        break;
                    }
                    self.state = state;
                    if matches!(state, State::Start | State::Recovery) {
                        self.token.clear();
                    }
                }
                Step::Emit(kind) | Step::EmitBefore(kind) => {
                    self.streamer.token(kind, &self.token);
                    self.token.clear();
                    self.state = State::Start;
                }
                Step::Restart => {
                    self.token.clear();
                    self.state = State::Start;
                }
                Step::Error => {
                    let stray = decode_lossy(&self.token);
                    self.streamer.emit(Err(JsonError::Stray(stray)));
                    self.token.clear();
                    self.state = State::Recovery;
                }
            }
            if consumed {
                break;
            }
        }
        if self.token.len() > MAX_TOKEN_BYTES {
            // QEMU hands the partial token on, which trips the size limit, and
            // lexes the rest of it afresh.
            self.streamer.emit(Err(JsonError::TokenSizeLimit));
            self.token.clear();
            self.state = State::Start;
        }
    }
}

/// Parses one complete document, as `--blockdev '{...}'` does: the first value
/// or error wins, anything after a value is an error.
pub fn parse_value(text: &str) -> Result<Value, JsonError> {
    let mut parser = Parser::new();
    let mut items = parser.feed(text.as_bytes());
    items.extend(parser.finish());
    let mut items = items.into_iter();
    match items.next() {
        None => Err(JsonError::NoValue),
        Some(Err(err)) => Err(err),
        Some(Ok(value)) => match items.next() {
            None => Ok(value),
            Some(_) => Err(JsonError::TrailingValue),
        },
    }
}

struct TokenParser<'a> {
    toks: &'a [Tok],
    text: &'a [u8],
    pos: usize,
}

/// An object or array whose closing token has not been reached yet.
enum Open {
    Array(Vec<Value>),
    /// The key is `Some` once it and its colon have been read.
    Object(Map<String, Value>, Option<String>),
}

enum Begun {
    Value(Value),
    Open(Open),
}

impl TokenParser<'_> {
    fn peek(&self) -> Result<Tok, JsonError> {
        self.toks
            .get(self.pos)
            .copied()
            .ok_or(JsonError::PrematureEnd)
    }

    fn pop(&mut self) -> Result<Tok, JsonError> {
        let tok = self.peek()?;
        self.pos += 1;
        Ok(tok)
    }

    fn bytes(&self, tok: Tok) -> &[u8] {
        self.text.get(tok.start..tok.end).unwrap_or_default()
    }

    /// Parses one value. Iterative, so nesting costs heap rather than stack;
    /// errors come out in the order a recursive descent would meet them.
    fn value(&mut self) -> Result<Value, JsonError> {
        let mut open: Vec<Open> = Vec::new();
        loop {
            let mut done = match self.start_value()? {
                Begun::Value(value) => value,
                Begun::Open(container) => {
                    open.push(container);
                    continue;
                }
            };
            // Hand the finished value to its container, closing containers
            // for as long as their closing token follows.
            loop {
                match open.last_mut() {
                    None => return Ok(done),
                    Some(Open::Array(list)) => {
                        list.push(done);
                        match self.pop()?.kind {
                            Kind::Comma => break,
                            Kind::RSquare => {
                                let Some(Open::Array(list)) = open.pop() else {
                                    break;
                                };
                                done = Value::Array(list);
                            }
                            _ => return Err(JsonError::ListSeparator),
                        }
                    }
                    Some(Open::Object(map, key)) => match key.take() {
                        None => {
                            let Value::String(name) = done else {
                                return Err(JsonError::KeyNotString);
                            };
                            if self.pop()?.kind != Kind::Colon {
                                return Err(JsonError::MissingColon);
                            }
                            *key = Some(name);
                            break;
                        }
                        Some(name) => {
                            if map.contains_key(&name) {
                                return Err(JsonError::DuplicateKey);
                            }
                            map.insert(name, done);
                            match self.pop()?.kind {
                                Kind::Comma => break,
                                Kind::RCurly => {
                                    let Some(Open::Object(map, _)) = open.pop() else {
                                        break;
                                    };
                                    done = Value::Object(map);
                                }
                                _ => return Err(JsonError::DictSeparator),
                            }
                        }
                    },
                }
            }
        }
    }

    /// Reads the start of a value: a whole scalar or empty container, or the
    /// opening token of a non-empty container.
    fn start_value(&mut self) -> Result<Begun, JsonError> {
        let tok = self.pop()?;
        let value = match tok.kind {
            Kind::LCurly => {
                if self.peek()?.kind != Kind::RCurly {
                    return Ok(Begun::Open(Open::Object(Map::new(), None)));
                }
                self.pos += 1;
                Value::Object(Map::new())
            }
            Kind::LSquare => {
                if self.peek()?.kind != Kind::RSquare {
                    return Ok(Begun::Open(Open::Array(Vec::new())));
                }
                self.pos += 1;
                Value::Array(Vec::new())
            }
            Kind::Integer | Kind::Float => number(tok.kind, self.bytes(tok)),
            Kind::String => Value::String(parse_string(self.bytes(tok))?),
            Kind::Keyword => match self.bytes(tok) {
                b"true" => Value::Bool(true),
                b"false" => Value::Bool(false),
                b"null" => Value::Null,
                other => return Err(JsonError::InvalidKeyword(decode_lossy(other))),
            },
            _ => return Err(JsonError::ExpectingValue),
        };
        Ok(Begun::Value(value))
    }
}

/// Integers that fit `i64`, else `u64`, stay exact; the rest become doubles.
fn number(kind: Kind, bytes: &[u8]) -> Value {
    let text = std::str::from_utf8(bytes).unwrap_or_default();
    if kind == Kind::Integer {
        if let Ok(n) = text.parse::<i64>() {
            return Value::Number(n.into());
        }
        if !text.starts_with('-') {
            if let Ok(n) = text.parse::<u64>() {
                return Value::Number(n.into());
            }
        }
    }
    let double = text.parse::<f64>().unwrap_or_default();
    // QEMU keeps an overflowing literal as infinity; the nearest value a
    // `serde_json::Number` can hold is the largest finite double.
    let finite = if double.is_finite() {
        double
    } else {
        f64::MAX.copysign(double)
    };
    Number::from_f64(finite).map_or(Value::Null, Value::Number)
}

/// Four hex digits at `at`, or `None` if any is missing.
fn hex4(bytes: &[u8], at: usize) -> Option<u32> {
    let mut cp = 0;
    for i in 0..4 {
        let digit = char::from(*bytes.get(at + i)?).to_digit(16)?;
        cp = cp << 4 | digit;
    }
    Some(cp)
}

/// Whether QEMU accepts `cp` as a character: not a surrogate, not a noncharacter.
pub(crate) fn is_valid_codepoint(cp: u32) -> bool {
    cp <= 0x10ffff
        && (cp & 0xffff_f800) != 0xd800
        && !(0xfdd0..=0xfdef).contains(&cp)
        && (cp & 0xfffe) != 0xfffe
}

/// Decodes one character of QEMU's modified UTF-8 at `at`: `(None, next)` for
/// a bad sequence, where `next` is where decoding resumes. `\xC0\x80` is NUL.
fn decode_char(bytes: &[u8], at: usize) -> (Option<u32>, usize) {
    const MIN_CP: [u32; 5] = [0x80, 0x800, 0x10000, 0x20_0000, 0x400_0000];
    let lead = bytes.get(at).copied().unwrap_or(0);
    match lead {
        0 => return (None, at),
        0x01..=0x7f => return (Some(u32::from(lead)), at + 1),
        0xfe | 0xff => return (None, at + 1),
        _ if lead & 0x40 == 0 => return (None, at + 1),
        _ => {}
    }
    let len = lead.leading_ones() as usize;
    let mut cp = u32::from(lead & ((0x80u8 >> len).wrapping_sub(1)));
    let mut next = at + 1;
    for _ in 1..len {
        let byte = bytes.get(next).copied().unwrap_or(0);
        if byte & 0xc0 != 0x80 {
            return (None, next);
        }
        next += 1;
        cp = cp << 6 | u32::from(byte & 0x3f);
    }
    let overlong = cp < MIN_CP[len - 2] && !(cp == 0 && len == 2);
    if !is_valid_codepoint(cp) || overlong {
        return (None, next);
    }
    (Some(cp), next)
}

/// Text of raw input bytes as QEMU would print them: stops at NUL, bad
/// sequences become U+FFFD.
fn decode_lossy(bytes: &[u8]) -> String {
    let mut out = String::new();
    let mut at = 0;
    while bytes.get(at).is_some_and(|&b| b != 0) {
        let (cp, next) = decode_char(bytes, at);
        out.push(cp.and_then(char::from_u32).unwrap_or('\u{fffd}'));
        at = next;
    }
    out
}

/// Decodes a string token, quotes included.
fn parse_string(token: &[u8]) -> Result<String, JsonError> {
    let quote = token.first().copied().unwrap_or(b'"');
    let mut out = String::new();
    let mut at = 1;
    loop {
        let Some(&byte) = token.get(at) else {
            return Ok(out);
        };
        if byte == quote {
            return Ok(out);
        }
        if byte != b'\\' {
            let (cp, next) = decode_char(token, at);
            let ch = cp.and_then(char::from_u32).ok_or(JsonError::InvalidUtf8)?;
            out.push(ch);
            at = next;
            continue;
        }
        let escape_start = at;
        let letter = token.get(at + 1).copied().unwrap_or(0);
        at += 2;
        let ch = match letter {
            b'"' => '"',
            b'\'' => '\'',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let mut cp = hex4(token, at);
                at += 4;
                if let Some(high @ 0xd800..=0xdbff) = cp {
                    if token.get(at) == Some(&b'\\') && token.get(at + 1) == Some(&b'u') {
                        cp = match hex4(token, at + 2) {
                            Some(low @ 0xdc00..=0xdfff) => {
                                at += 6;
                                Some(0x10000 + ((high & 0x3ff) << 10) + (low & 0x3ff))
                            }
                            _ => None,
                        };
                    }
                }
                match cp
                    .filter(|&cp| is_valid_codepoint(cp))
                    .and_then(char::from_u32)
                {
                    Some(ch) => ch,
                    None => {
                        let end = at.min(token.len());
                        let text = token.get(escape_start..end).unwrap_or_default();
                        return Err(JsonError::InvalidCodepoint(decode_lossy(text)));
                    }
                }
            }
            _ => return Err(JsonError::InvalidEscape),
        };
        out.push(ch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn feed_all(input: &[u8]) -> Vec<Result<Value, JsonError>> {
        Parser::new().feed(input)
    }

    fn descs(input: &[u8]) -> Vec<String> {
        feed_all(input)
            .into_iter()
            .map(|item| match item {
                Ok(value) => format!("ok {value}"),
                Err(err) => err.to_string(),
            })
            .collect()
    }

    #[test]
    fn object_is_emitted_as_soon_as_it_closes() {
        let mut parser = Parser::new();
        assert!(parser.feed(b"{\"execute\":").is_empty());
        assert!(parser.feed(b" \"x\"\n, \"id\"").is_empty());
        let out = parser.feed(b": 1}{\"a\"");
        assert_eq!(out, vec![Ok(json!({"execute": "x", "id": 1}))]);
        assert_eq!(parser.feed(b":2}"), vec![Ok(json!({"a": 2}))]);
    }

    #[test]
    fn several_objects_on_one_line_come_out_in_order() {
        let out = feed_all(b"{\"a\":1}{\"b\":2} {\"c\":3}\n");
        assert_eq!(
            out,
            vec![
                Ok(json!({"a": 1})),
                Ok(json!({"b": 2})),
                Ok(json!({"c": 3}))
            ]
        );
    }

    #[test]
    fn byte_at_a_time_feeding_gives_the_same_result() {
        let input = br#"{"execute": "x", "arguments": {"l": [1, -2.5e3, 'q\'s', null]}}"#;
        let mut parser = Parser::new();
        let mut out = Vec::new();
        for byte in input {
            out.extend(parser.feed(&[*byte]));
        }
        assert_eq!(out, feed_all(input));
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn member_order_is_preserved() {
        let out = feed_all(br#"{"z":1,"a":2,"m":3}"#);
        let Ok(Value::Object(map)) = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(map.keys().collect::<Vec<_>>(), ["z", "a", "m"]);
    }

    #[test]
    fn scalars_and_arrays_at_top_level_are_emitted_immediately() {
        assert_eq!(feed_all(b"[1,2]"), vec![Ok(json!([1, 2]))]);
        assert_eq!(feed_all(b"\"str\""), vec![Ok(json!("str"))]);
        assert_eq!(
            feed_all(b"123 true null"),
            vec![Ok(json!(123)), Ok(json!(true))]
        );
    }

    #[test]
    fn number_or_keyword_waits_for_its_end() {
        let mut parser = Parser::new();
        assert!(parser.feed(b"nul").is_empty());
        assert_eq!(parser.feed(b"l "), vec![Ok(Value::Null)]);
        assert!(parser.feed(b"12").is_empty());
        assert_eq!(parser.finish(), vec![Ok(json!(12))]);
    }

    #[test]
    fn single_quoted_strings_and_quote_escapes() {
        assert_eq!(
            feed_all(br#"['s"q\'', "a\'b\"c"]"#),
            vec![Ok(json!(["s\"q'", "a'b\"c"]))]
        );
    }

    #[test]
    fn escapes_decode_like_qemu() {
        let out = feed_all(br#"["\u00fc\ud83d\ude00/\/\u007f\u0001\u0000\b\f\t\n\r\\\u0041"]"#);
        assert_eq!(
            out,
            vec![Ok(json!([
                "\u{fc}\u{1f600}//\u{7f}\u{1}\u{0}\u{8}\u{c}\t\n\r\\A"
            ]))]
        );
    }

    #[test]
    fn raw_utf8_and_modified_utf8_nul_are_accepted() {
        assert_eq!(
            feed_all(b"[\"\xc3\xbc\xf0\x9f\x98\x80\"]"),
            vec![Ok(json!(["\u{fc}\u{1f600}"]))]
        );
        assert_eq!(feed_all(b"[\"\xc0\x80\"]"), vec![Ok(json!(["\u{0}"]))]);
    }

    #[test]
    fn percent_is_plain_text_inside_strings() {
        assert_eq!(feed_all(br#"["%s%%d"]"#), vec![Ok(json!(["%s%%d"]))]);
    }

    #[test]
    fn integers_stay_exact_while_they_fit_64_bits() {
        let out = feed_all(
            b"[-0, 9223372036854775807, -9223372036854775808, 18446744073709551615, \
              18446744073709551616, -9223372036854775809, 1.5, -0.0, 1E3]",
        );
        let Ok(Value::Array(list)) = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(list[0].as_i64(), Some(0));
        assert_eq!(list[1].as_i64(), Some(i64::MAX));
        assert_eq!(list[2].as_i64(), Some(i64::MIN));
        assert_eq!(list[3].as_u64(), Some(u64::MAX));
        assert!(list[4].is_f64());
        assert_eq!(list[4].as_f64(), Some(18446744073709551616.0));
        assert_eq!(list[5].as_f64(), Some(-9223372036854775809.0));
        assert_eq!(list[6].as_f64(), Some(1.5));
        assert!(list[7]
            .as_f64()
            .is_some_and(|f| f == 0.0 && f.is_sign_negative()));
        assert_eq!(list[8].as_f64(), Some(1000.0));
    }

    #[test]
    fn overflowing_double_becomes_the_largest_finite_one() {
        let out = feed_all(b"[1e400, -1e400]");
        assert_eq!(out, vec![Ok(json!([f64::MAX, -f64::MAX]))]);
    }

    #[test]
    fn duplicate_key_is_rejected() {
        assert_eq!(
            descs(br#"{"a":1,"a":2}"#),
            ["JSON parse error, duplicate key"]
        );
    }

    #[test]
    fn syntax_errors_use_qemu_texts() {
        assert_eq!(
            descs(br#"{"a" 1}"#),
            ["JSON parse error, missing : in object pair"]
        );
        assert_eq!(
            descs(b"{1:2}"),
            ["JSON parse error, key is not a string in object"]
        );
        assert_eq!(
            descs(b"{{}:2}"),
            ["JSON parse error, key is not a string in object"]
        );
        assert_eq!(descs(br#"{"a":}"#), ["JSON parse error, expecting value"]);
        assert_eq!(
            descs(b"[1 2]"),
            ["JSON parse error, expected separator in list"]
        );
        assert_eq!(
            descs(br#"{"a":1 "b":2}"#),
            ["JSON parse error, expected separator in dict"]
        );
        assert_eq!(descs(br#"{"a":1,}"#), ["JSON parse error, expecting value"]);
        assert_eq!(descs(b"[1,]"), ["JSON parse error, expecting value"]);
        assert_eq!(descs(b"]"), ["JSON parse error, expecting value"]);
        assert_eq!(descs(b"}"), ["JSON parse error, expecting value"]);
        assert_eq!(descs(b":"), ["JSON parse error, expecting value"]);
        assert_eq!(
            descs(b"{\"a\":tru e}"),
            ["JSON parse error, invalid keyword 'tru'"]
        );
        assert_eq!(descs(br#"{"x":[}]"#), ["JSON parse error, expecting value"]);
    }

    #[test]
    fn zero_then_exponent_is_two_tokens() {
        assert_eq!(
            descs(br#"{"id":0e5}"#),
            ["JSON parse error, expected separator in dict"]
        );
    }

    #[test]
    fn bad_number_is_stray_including_the_byte_that_broke_it() {
        assert_eq!(descs(br#"{"id":1.}"#), ["JSON parse error, stray '1.}'"]);
        assert_eq!(descs(br#"{"id":-}"#), ["JSON parse error, stray '-}'"]);
        assert_eq!(descs(br#"{"id":1e+}"#), ["JSON parse error, stray '1e+}'"]);
        assert_eq!(
            descs(br#"{"id":01}"#),
            [
                "JSON parse error, stray '01'",
                "JSON parse error, expecting value"
            ]
        );
        assert_eq!(
            descs(br#"{"id":.5}"#),
            [
                "JSON parse error, stray '.'",
                "JSON parse error, expecting value"
            ]
        );
    }

    #[test]
    fn uppercase_keyword_and_percent_are_stray() {
        assert_eq!(descs(b"True"), ["JSON parse error, stray 'T'"]);
        assert_eq!(
            descs(br#"{"id": 5 %d} {"id":4}"#),
            [
                "JSON parse error, stray '%'",
                "JSON parse error, expecting value",
                "ok {\"id\":4}"
            ]
        );
    }

    #[test]
    fn control_bytes_show_as_characters_and_nul_truncates() {
        assert_eq!(descs(b"\x01"), ["JSON parse error, stray '\u{1}'"]);
        assert_eq!(descs(b"\x00"), ["JSON parse error, stray ''"]);
        assert_eq!(
            descs(b"{\"id\": \"abc\x00def\"}"),
            [
                "JSON parse error, stray '\"abc'",
                "JSON parse error, expecting value"
            ]
        );
    }

    #[test]
    fn recovery_skips_to_the_next_structural_character() {
        assert_eq!(
            descs(b"{\"a\":\"a\x01b\"}\n{\"id\":2}"),
            [
                "JSON parse error, stray '\"a\u{1}'",
                "JSON parse error, expecting value",
                "ok {\"id\":2}"
            ]
        );
        assert_eq!(
            descs(br#"{"x":"y", "id": 5 $, "a": 1} {"id":4}"#),
            [
                "JSON parse error, stray '$'",
                "JSON parse error, expecting value",
                "ok \"a\"",
                "JSON parse error, expecting value",
                "ok 1",
                "JSON parse error, expecting value",
                "ok {\"id\":4}"
            ]
        );
        assert_eq!(
            descs(b"{\"x\":\"abc\x01def\" \"junk\" {\"id\":6}"),
            ["JSON parse error, stray '\"abc\u{1}'", "ok {\"id\":6}"]
        );
    }

    #[test]
    fn control_byte_and_ff_end_recovery_and_are_stray_themselves() {
        assert_eq!(
            descs(b"{\"a\":$\x1b{\"id\":7}"),
            [
                "JSON parse error, stray '$'",
                "JSON parse error, stray '\u{1b}'",
                "ok {\"id\":7}"
            ]
        );
        assert_eq!(
            descs(b"{\"a\":$\t\x7f\xfe{\"id\":7}"),
            [
                "JSON parse error, stray '$'",
                "JSON parse error, stray '\u{fffd}'",
                "ok {\"id\":7}"
            ]
        );
        assert_eq!(
            descs(b"{\"x\":1, \"id\": 5 \xff {\"id\":4}"),
            ["JSON parse error, stray '\u{fffd}'", "ok {\"id\":4}"]
        );
    }

    #[test]
    fn stray_text_decodes_bad_utf8_like_qemu() {
        assert_eq!(
            descs(b"\"\xc3\xa9\xc3\x01"),
            ["JSON parse error, stray '\"\u{e9}\u{fffd}\u{1}'"]
        );
        assert_eq!(
            descs(b"\"\xc3(\x01"),
            ["JSON parse error, stray '\"\u{fffd}(\u{1}'"]
        );
        assert_eq!(
            descs(b"\"\xe2\x82\x01"),
            ["JSON parse error, stray '\"\u{fffd}\u{1}'"]
        );
        assert_eq!(
            descs(b"\"\xc0\x80\x01"),
            ["JSON parse error, stray '\"\u{0}\u{1}'"]
        );
        assert_eq!(
            descs(b"\"\xef\xbf\xbe\x01"),
            ["JSON parse error, stray '\"\u{fffd}\u{1}'"]
        );
        assert_eq!(
            descs(b"\"\x80\x80\x01"),
            ["JSON parse error, stray '\"\u{fffd}\u{fffd}\u{1}'"]
        );
        assert_eq!(
            descs(b"{\"id\":\"\xff\"}"),
            [
                "JSON parse error, stray '\"\u{fffd}'",
                "JSON parse error, expecting value"
            ]
        );
    }

    #[test]
    fn invalid_utf8_inside_strings() {
        for bad in [
            &b"[\"\xef\xb7\x90\"]"[..],
            b"[\"\xc3\"]",
            b"[\"\x80\"]",
            b"[\"\xc3x\"]",
            b"[\"\xf4\x90\x80\x80\"]",
            b"[\"\xed\xa0\x80\"]",
            b"[\"\xe0\x80\x80\"]",
            b"[\"\xef\xbf\xbe\"]",
            b"[\"\xf8\x88\x80\x80\x80\"]",
        ] {
            assert_eq!(
                descs(bad),
                ["JSON parse error, invalid UTF-8 sequence in string"],
                "{bad:?}"
            );
        }
    }

    #[test]
    fn bad_unicode_escapes_quote_the_escape() {
        let cases: [(&[u8], &str); 6] = [
            (br#"["\uFDD0"]"#, r"\uFDD0"),
            (br#"["\uD800x"]"#, r"\uD800"),
            (br#"["\uD800\u0041"]"#, r"\uD800"),
            (br#"["\uDE00"]"#, r"\uDE00"),
            (br#"["\uFFFE\u0000"]"#, r"\uFFFE"),
            (br#"["\u12"]"#, r#"\u12""#),
        ];
        for (input, escape) in cases {
            let want = format!("JSON parse error, {escape} is not a valid Unicode character");
            assert_eq!(descs(input), [want]);
        }
        assert_eq!(
            descs(br#"["\x"]"#),
            ["JSON parse error, invalid escape sequence in string"]
        );
    }

    #[test]
    fn unterminated_object_swallows_the_next_one() {
        let mut parser = Parser::new();
        assert!(parser.feed(b"{\"execute\":\"x\"\n").is_empty());
        assert!(parser.feed(b"{\"execute\":\"x\",\"id\":8}\n").is_empty());
        let out: Vec<_> = parser
            .feed(b"}")
            .into_iter()
            .map(|r| r.unwrap_err().to_string())
            .collect();
        assert_eq!(out, ["JSON parse error, expected separator in dict"]);
    }

    #[test]
    fn mismatched_brackets_wait_until_both_counts_settle() {
        let mut parser = Parser::new();
        assert!(parser.feed(b"{\"a\":[}").is_empty());
        assert_eq!(parser.feed(b"]"), vec![Err(JsonError::ExpectingValue)]);
    }

    #[test]
    fn nesting_limit_counts_objects_and_arrays_together() {
        let mut ok = b"{\"id\":".to_vec();
        ok.extend([b'['; 1023]);
        ok.extend([b']'; 1023]);
        ok.push(b'}');
        assert!(matches!(&feed_all(&ok)[..], [Ok(_)]));

        let mut deep = b"{\"id\":".to_vec();
        deep.extend([b'['; 1024]);
        deep.extend([b']'; 1024]);
        deep.push(b'}');
        let out = feed_all(&deep);
        assert_eq!(out[0], Err(JsonError::NestingLimit));
        assert_eq!(out.len(), 1 + 1024 + 1);
        assert!(out[1..]
            .iter()
            .all(|item| *item == Err(JsonError::ExpectingValue)));
        assert_eq!(
            JsonError::NestingLimit.to_string(),
            "JSON nesting depth limit exceeded"
        );
    }

    #[test]
    fn token_count_limit_drops_the_offending_token() {
        let mut input = b"[".to_vec();
        for _ in 0..1_048_575 {
            input.extend(b"0,");
        }
        let mut fits = input.clone();
        fits.truncate(fits.len() - 1);
        fits.push(b']');
        assert!(matches!(&feed_all(&fits)[..], [Ok(Value::Array(_))]));

        input.extend(b"0,0]");
        let out = feed_all(&input);
        assert_eq!(
            out,
            vec![
                Err(JsonError::TokenCountLimit),
                Ok(json!(0)),
                Err(JsonError::ExpectingValue)
            ]
        );
        assert_eq!(
            JsonError::TokenCountLimit.to_string(),
            "JSON token count limit exceeded"
        );
    }

    #[test]
    fn token_size_limit_cuts_a_huge_string_and_lexes_the_rest_afresh() {
        let mut input = br#"{"execute":"x","id":""#.to_vec();
        input.resize(input.len() + MAX_TOKEN_BYTES + 3, b'a');
        input.extend(br#""}"#);
        let out = Parser::new().feed(&input);
        assert_eq!(
            out,
            vec![
                Err(JsonError::TokenSizeLimit),
                Err(JsonError::InvalidKeyword("aaa".into()))
            ]
        );
        assert_eq!(
            JsonError::TokenSizeLimit.to_string(),
            "JSON token size limit exceeded"
        );
    }

    #[test]
    fn finish_reports_open_string_and_premature_end() {
        let mut parser = Parser::new();
        assert!(parser.feed(b"[\"abc").is_empty());
        let out = parser.finish();
        assert_eq!(out, vec![Err(JsonError::Stray("\"abc".into()))]);

        let mut parser = Parser::new();
        assert!(parser.feed(b"{\"a\":").is_empty());
        assert_eq!(parser.finish(), vec![Err(JsonError::PrematureEnd)]);
        assert_eq!(
            JsonError::PrematureEnd.to_string(),
            "JSON parse error, premature EOI"
        );
    }

    #[test]
    fn parse_value_takes_exactly_one_document() {
        assert_eq!(
            parse_value(r#" {"driver": "null-co"} "#),
            Ok(json!({"driver": "null-co"}))
        );
        assert_eq!(parse_value("{"), Err(JsonError::PrematureEnd));
        assert_eq!(parse_value("{} {}"), Err(JsonError::TrailingValue));
        assert_eq!(parse_value("{} x"), Err(JsonError::TrailingValue));
        assert_eq!(parse_value("{,} {}"), Err(JsonError::ExpectingValue));
        assert_eq!(parse_value("  "), Err(JsonError::NoValue));
        assert_eq!(parse_value("12"), Ok(json!(12)));
        assert_eq!(
            JsonError::TrailingValue.to_string(),
            "Expecting at most one JSON value"
        );
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let alphabet = b"{}[],:\"'\\u0123456789abcdefnulltrue-+.eE \t\n\x01\xff\xc3\xa9%";
        for _ in 0..2000 {
            let mut input = Vec::new();
            for _ in 0..(seed % 40) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                input.push(alphabet[(seed % alphabet.len() as u64) as usize]);
            }
            let mut parser = Parser::new();
            let _ = parser.feed(&input);
            let _ = parser.finish();
        }
    }
}
