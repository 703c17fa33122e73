//! JSON text to jsonb, written straight in jsonb's binary form.
//!
//! `text::jsonb` (jsonb_in) builds an in-memory tree of every value, calls
//! `numeric_in` for every number and serialises the tree: for the 0.9 MB of
//! a 1,000-record batch that took about 50 ms, more than half of what
//! writing the records then cost. [`jsonb_from_text`] parses the text once
//! into a light tree that borrows the text, and writes the document in the
//! layout `convertToJsonb` writes ([`document`], which also writes
//! `sales.daily_merge`'s months), the numbers encoded as `numeric_in`
//! encodes them.
//!
//! It takes only what it is sure to read exactly as jsonb_in does: anything
//! else (a syntax error, an exponent, a `\u` escape, a number too large for
//! numeric's short form, very deep nesting) returns `None`, and the caller
//! hands the text to jsonb_in, which gives the same value or its own error.

use crate::jsonb::{
    JsonbDatum, JB_OFFSET_STRIDE, JENTRY_CONTAINER, JENTRY_FALSE, JENTRY_HAS_OFF, JENTRY_NULL,
    JENTRY_NUMERIC, JENTRY_OFFLEN, JENTRY_STRING, JENTRY_TRUE,
};
use pgrx::prelude::*;
use std::borrow::Cow;

const JB_FSCALAR: u32 = 0x1000_0000;
const JB_FOBJECT: u32 = 0x2000_0000;
const JB_FARRAY: u32 = 0x4000_0000;
/// Deeper documents go to jsonb_in (which only bounds the stack).
const MAX_DEPTH: usize = 100;

/// A value to write: parsed from text, or copied as stored in another
/// jsonb document.
pub(crate) enum Node<'a> {
    Null,
    Bool(bool),
    /// A JSON number without exponent, as written.
    Num(&'a [u8]),
    /// An integer, encoded as `int8_numeric` encodes it.
    Int(i64),
    Str(Cow<'a, [u8]>),
    Arr(Vec<Node<'a>>),
    Obj(Vec<(Cow<'a, [u8]>, Node<'a>)>),
    /// A value as another document stores it: its JEntry type and its data
    /// (numbers and containers from their 4-byte boundary).
    Stored(u32, &'a [u8]),
}

/// The complete jsonb varlena (its 4-byte header left for the caller to
/// set) for `text`, or `None` when jsonb_in must read it.
pub fn jsonb_from_text(text: &[u8]) -> Option<Vec<u8>> {
    let mut p = Parser { s: text, i: 0 };
    let root = p.value(0)?;
    p.ws();
    if p.i != text.len() {
        return None;
    }
    document(root)
}

/// `root` as a complete jsonb varlena (its 4-byte header left for the
/// caller to set), laid out as `convertToJsonb` lays it out: a container's
/// header, its JEntries (an object's keys', then its values'), then their
/// data, numbers and containers each at a 4-byte boundary counted from the
/// start of the datum. `None` past what a JEntry can hold (256 MB).
pub(crate) fn document(root: Node<'_>) -> Option<Vec<u8>> {
    let mut buf = Vec::with_capacity(1024);
    buf.extend_from_slice(&[0; 4]);
    match root {
        Node::Arr(_) | Node::Obj(_) => container(&mut buf, &root, false)?,
        // A scalar document is a one-element array marked as a scalar.
        scalar => container(&mut buf, &Node::Arr(vec![scalar]), true)?,
    };
    Some(buf)
}

/// `root` as a jsonb datum in the current memory context; `what` names the
/// document in the error past jsonb's size limit.
pub(crate) fn document_datum(root: Node<'_>, what: &str) -> JsonbDatum {
    match document(root) {
        Some(bytes) => JsonbDatum::from_bytes(&bytes),
        None => crate::error::raise(
            PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!("pg_sales: {what} is larger than jsonb allows"),
        ),
    }
}

/// `doc::jsonb`: the same value, the same bytes, the same errors, several
/// times faster for documents of plain numbers and strings (see the module
/// header). The API hands batches of records to `batch_upsert` this way.
#[pg_extern(immutable, strict, parallel_safe)]
fn parse_json(doc: crate::jsonb::TextBytes) -> JsonbDatum {
    let doc = doc.bytes();
    // The tree is built with Rust's allocator, whose failure aborts the
    // process (and so restarts every session of the cluster), not with
    // palloc's, which raises an error: a document of short values takes
    // up to about 32 bytes of tree per byte of text. Past FAST_PATH_MAX
    // (the server's largest batch body) jsonb_in reads it, failing cleanly
    // where memory runs out; below, the tree's vectors grow fallibly and a
    // refusal hands the text to jsonb_in too. Another server encoding:
    // jsonb_in reads it (the text is in that encoding, which Postgres
    // checked on the way in).
    if crate::jsonb::server_is_utf8() && doc.len() <= FAST_PATH_MAX {
        if let Some(bytes) = jsonb_from_text(doc) {
            return JsonbDatum::from_bytes(&bytes);
        }
    }
    let text = std::ffi::CString::new(doc).expect("text holds no NUL");
    // SAFETY: jsonb_in takes a cstring and returns a jsonb datum (or raises).
    let d = unsafe {
        pgrx::direct_function_call_as_datum(
            pgrx::pg_sys::jsonb_in,
            &[Some(pgrx::pg_sys::Datum::from(text.as_ptr()))],
        )
    };
    JsonbDatum::from_datum(d.expect("jsonb_in never returns NULL"))
}

/// The longest text `parse_json` parses itself (16 MiB, `BODY_LIMIT`'s
/// default); longer goes to jsonb_in.
const FAST_PATH_MAX: usize = 16 << 20;

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Parser<'a> {
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.s.get(self.i) {
            self.i += 1;
        }
    }

    fn eat(&mut self, b: u8) -> bool {
        self.ws();
        if self.s.get(self.i) == Some(&b) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn literal(&mut self, word: &[u8], node: Node<'a>) -> Option<Node<'a>> {
        if self.s[self.i..].starts_with(word) {
            self.i += word.len();
            Some(node)
        } else {
            None
        }
    }

    fn value(&mut self, depth: usize) -> Option<Node<'a>> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.ws();
        match *self.s.get(self.i)? {
            b'{' => {
                self.i += 1;
                let mut pairs = Vec::new();
                if !self.eat(b'}') {
                    loop {
                        self.ws();
                        let key = self.string()?;
                        if !self.eat(b':') {
                            return None;
                        }
                        let value = self.value(depth + 1)?;
                        pairs.try_reserve(1).ok()?;
                        pairs.push((key, value));
                        if self.eat(b'}') {
                            break;
                        }
                        if !self.eat(b',') {
                            return None;
                        }
                    }
                }
                Some(Node::Obj(pairs))
            }
            b'[' => {
                self.i += 1;
                let mut elems = Vec::new();
                if !self.eat(b']') {
                    loop {
                        let value = self.value(depth + 1)?;
                        elems.try_reserve(1).ok()?;
                        elems.push(value);
                        if self.eat(b']') {
                            break;
                        }
                        if !self.eat(b',') {
                            return None;
                        }
                    }
                }
                Some(Node::Arr(elems))
            }
            b'"' => self.string().map(Node::Str),
            b't' => self.literal(b"true", Node::Bool(true)),
            b'f' => self.literal(b"false", Node::Bool(false)),
            b'n' => self.literal(b"null", Node::Null),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    /// A string at the cursor, unescaped. `\u` escapes (and control
    /// characters, which JSON forbids) are left to jsonb_in.
    fn string(&mut self) -> Option<Cow<'a, [u8]>> {
        if self.s.get(self.i) != Some(&b'"') {
            return None;
        }
        self.i += 1;
        let start = self.i;
        let mut owned: Option<Vec<u8>> = None;
        let mut run = start;
        loop {
            let b = *self.s.get(self.i)?;
            match b {
                b'"' => {
                    let out = match owned {
                        None => Cow::Borrowed(&self.s[start..self.i]),
                        Some(mut v) => {
                            v.extend_from_slice(&self.s[run..self.i]);
                            Cow::Owned(v)
                        }
                    };
                    self.i += 1;
                    return Some(out);
                }
                b'\\' => {
                    let v = owned.get_or_insert_with(Vec::new);
                    v.extend_from_slice(&self.s[run..self.i]);
                    let c = match *self.s.get(self.i + 1)? {
                        b'"' => b'"',
                        b'\\' => b'\\',
                        b'/' => b'/',
                        b'b' => 0x08,
                        b'f' => 0x0c,
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        _ => return None,
                    };
                    v.push(c);
                    self.i += 2;
                    run = self.i;
                }
                0..=0x1f => return None,
                _ => self.i += 1,
            }
        }
    }

    /// A number in JSON's grammar without exponent: `-?(0|[1-9][0-9]*)(\.[0-9]+)?`.
    fn number(&mut self) -> Option<Node<'a>> {
        let start = self.i;
        let digits = |p: &mut Self| {
            let from = p.i;
            while let Some(b'0'..=b'9') = p.s.get(p.i) {
                p.i += 1;
            }
            p.i - from
        };
        if self.s.get(self.i) == Some(&b'-') {
            self.i += 1;
        }
        let lead = self.i;
        let n = digits(self);
        if n == 0 || (n > 1 && self.s[lead] == b'0') {
            return None;
        }
        if self.s.get(self.i) == Some(&b'.') {
            self.i += 1;
            if digits(self) == 0 {
                return None;
            }
        }
        match self.s.get(self.i) {
            // An exponent, or a number running into a letter: jsonb_in decides.
            Some(b'e' | b'E' | b'a'..=b'z' | b'A'..=b'Z' | b'_') => None,
            _ => Some(Node::Num(&self.s[start..self.i])),
        }
    }
}

/// Pads `buf` to a 4-byte boundary (counted from the datum's start, as
/// Postgres' padBufferToInt).
fn pad(buf: &mut Vec<u8>) {
    let to = (buf.len() + 3) & !3;
    buf.resize(to, 0);
}

/// Writes `node` (an array or object) as a container at the end of `buf`;
/// returns its JEntry (padding counted in its length).
fn container(buf: &mut Vec<u8>, node: &Node<'_>, raw_scalar: bool) -> Option<u32> {
    let base = buf.len();
    pad(buf);
    match node {
        Node::Arr(elems) => {
            let n = elems.len();
            let mut head = n as u32 | JB_FARRAY;
            if raw_scalar {
                head |= JB_FSCALAR;
            }
            buf.extend_from_slice(&head.to_ne_bytes());
            let entries = buf.len();
            buf.resize(entries + 4 * n, 0);
            let data = buf.len();
            for (i, e) in elems.iter().enumerate() {
                let start = buf.len();
                let kind = value(buf, e)?;
                let length = buf.len() - start;
                set_entry(buf, entries, data, i, kind, length)?;
            }
        }
        Node::Obj(pairs) => {
            // Keys in storage order (by length, then bytes); of equal keys
            // the last given wins, as in jsonb_in.
            let mut order: Vec<usize> = (0..pairs.len()).collect();
            order.sort_by(|&a, &b| {
                let (ka, kb) = (&pairs[a].0, &pairs[b].0);
                (ka.len(), &ka[..])
                    .cmp(&(kb.len(), &kb[..]))
                    .then(b.cmp(&a))
            });
            order.dedup_by(|later, kept| pairs[*later].0 == pairs[*kept].0);
            let n = order.len();
            buf.extend_from_slice(&(n as u32 | JB_FOBJECT).to_ne_bytes());
            let entries = buf.len();
            buf.resize(entries + 8 * n, 0);
            let data = buf.len();
            for (i, &p) in order.iter().enumerate() {
                let key = &pairs[p].0;
                buf.extend_from_slice(key);
                set_entry(buf, entries, data, i, JENTRY_STRING, key.len())?;
            }
            for (i, &p) in order.iter().enumerate() {
                let start = buf.len();
                let kind = value(buf, &pairs[p].1)?;
                let length = buf.len() - start;
                set_entry(buf, entries, data, n + i, kind, length)?;
            }
        }
        _ => return None,
    }
    let length = buf.len() - base;
    (length <= JENTRY_OFFLEN as usize).then_some(JENTRY_CONTAINER | length as u32)
}

/// Writes a value's data at the end of `buf`; returns its JEntry type (for
/// a container, [`container`]'s whole JEntry, whose length is replaced).
fn value(buf: &mut Vec<u8>, node: &Node<'_>) -> Option<u32> {
    Some(match node {
        Node::Null => JENTRY_NULL,
        Node::Bool(false) => JENTRY_FALSE,
        Node::Bool(true) => JENTRY_TRUE,
        Node::Str(s) => {
            buf.extend_from_slice(s);
            JENTRY_STRING
        }
        Node::Num(t) => {
            pad(buf);
            numeric(buf, t)?;
            JENTRY_NUMERIC
        }
        Node::Int(n) => {
            pad(buf);
            // numeric_in of an integer's digits gives the same numeric as
            // int8_numeric: scale 0, short form.
            let mut text = [0u8; 20];
            numeric(buf, int_text(*n, &mut text))?;
            JENTRY_NUMERIC
        }
        Node::Arr(_) | Node::Obj(_) => {
            container(buf, node, false)?;
            JENTRY_CONTAINER
        }
        Node::Stored(kind, data) => {
            if *kind == JENTRY_NUMERIC || *kind == JENTRY_CONTAINER {
                pad(buf);
            }
            buf.extend_from_slice(data);
            *kind
        }
    })
}

/// `n` in decimal, written at the end of `buf` (an i64 takes at most 20
/// bytes with its sign), without an allocation per number.
fn int_text(n: i64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    let mut v = n.unsigned_abs();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if n < 0 {
        i -= 1;
        buf[i] = b'-';
    }
    &buf[i..]
}

/// Sets JEntry `index` of the container whose JEntries start at `entries`
/// and data at `data`: its length, or every 32nd its end offset.
fn set_entry(
    buf: &mut [u8],
    entries: usize,
    data: usize,
    index: usize,
    kind: u32,
    length: usize,
) -> Option<()> {
    let end = buf.len() - data;
    if end > JENTRY_OFFLEN as usize {
        return None;
    }
    let e = if index.is_multiple_of(JB_OFFSET_STRIDE) {
        kind | JENTRY_HAS_OFF | end as u32
    } else {
        kind | length as u32
    };
    buf[entries + 4 * index..entries + 4 * index + 4].copy_from_slice(&e.to_ne_bytes());
    Some(())
}

/// Appends the numeric `numeric_in` makes of `text` (a JSON number without
/// exponent): 4-byte varlena header, short-form header, base-10000 digits
/// without leading or trailing zero digits. `None` for what needs the long
/// form (more than 63 digits after the point, or a weight outside -64..63).
fn numeric(buf: &mut Vec<u8>, text: &[u8]) -> Option<()> {
    const DEC_DIGITS: i64 = 4;
    let (neg, t) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, text),
    };
    let (int, frac) = match t.iter().position(|&b| b == b'.') {
        Some(p) => (&t[..p], &t[p + 1..]),
        None => (t, &t[t.len()..]),
    };
    let dscale = frac.len() as i64;
    let dweight = int.len() as i64 - 1;
    // As set_var_from_str: the first NBASE digit is aligned so that the
    // decimal point falls between NBASE digits.
    let weight = if dweight >= 0 {
        (dweight + DEC_DIGITS) / DEC_DIGITS - 1
    } else {
        -((-dweight - 1) / DEC_DIGITS + 1)
    };
    let offset = (weight + 1) * DEC_DIGITS - (dweight + 1);
    let ddigits = int.len() as i64 + frac.len() as i64;
    let ndigits = (ddigits + offset + DEC_DIGITS - 1) / DEC_DIGITS;
    let digit_at = |k: i64| -> i64 {
        // k counts decimal digits from the first given one.
        if k < 0 || k >= ddigits {
            0
        } else if (k as usize) < int.len() {
            (int[k as usize] - b'0') as i64
        } else {
            (frac[k as usize - int.len()] - b'0') as i64
        }
    };
    let mut digits: Vec<u16> = (0..ndigits)
        .map(|j| {
            let k = j * DEC_DIGITS - offset;
            (((digit_at(k) * 10 + digit_at(k + 1)) * 10 + digit_at(k + 2)) * 10 + digit_at(k + 3))
                as u16
        })
        .collect();
    // strip_var: leading zero digits lower the weight; trailing ones go.
    let lead = digits.iter().take_while(|&&d| d == 0).count();
    let mut weight = weight - lead as i64;
    digits.drain(..lead);
    while digits.last() == Some(&0) {
        digits.pop();
    }
    let neg = neg && !digits.is_empty();
    if digits.is_empty() {
        weight = 0;
    }
    if dscale > 63 || !(-64..=63).contains(&weight) {
        return None;
    }
    let header: u16 = 0x8000
        | if neg { 0x2000 } else { 0 }
        | ((dscale as u16) << 7)
        | if weight < 0 { 0x0040 } else { 0 }
        | (weight as u16 & 0x003F);
    let len = 6 + 2 * digits.len();
    // The 4-byte varlena header of a little- or big-endian build, as
    // SET_VARSIZE writes it.
    let varlena: u32 = if cfg!(target_endian = "little") {
        (len as u32) << 2
    } else {
        len as u32 & 0x3FFF_FFFF
    };
    buf.extend_from_slice(&varlena.to_ne_bytes());
    buf.extend_from_slice(&header.to_ne_bytes());
    for d in digits {
        buf.extend_from_slice(&d.to_ne_bytes());
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn num(t: &str) -> Option<Vec<u8>> {
        let mut b = Vec::new();
        numeric(&mut b, t.as_bytes()).map(|_| b)
    }

    fn digits_of(b: &[u8]) -> (u16, Vec<u16>) {
        let h = u16::from_ne_bytes([b[4], b[5]]);
        let d = b[6..]
            .chunks(2)
            .map(|c| u16::from_ne_bytes([c[0], c[1]]))
            .collect();
        (h, d)
    }

    #[test]
    fn integers_in_decimal() {
        for n in [0, 7, -7, 10, 2024, -100_000, i64::MAX, i64::MIN] {
            let mut buf = [0u8; 20];
            assert_eq!(int_text(n, &mut buf), n.to_string().as_bytes());
        }
    }

    #[test]
    fn numbers_as_numeric_in_encodes_them() {
        // 12345.678: weight 1, digits 1 2345 6780, dscale 3.
        let (h, d) = digits_of(&num("12345.678").unwrap());
        assert_eq!(d, vec![1, 2345, 6780]);
        assert_eq!(h, 0x8000 | (3 << 7) | 1);
        // Zero, negative zero and 0.00: no digits, weight 0, positive.
        assert_eq!(digits_of(&num("0").unwrap()), (0x8000, vec![]));
        assert_eq!(digits_of(&num("-0").unwrap()), (0x8000, vec![]));
        assert_eq!(
            digits_of(&num("0.00").unwrap()),
            (0x8000 | (2 << 7), vec![])
        );
        // 0.0001: weight -1, one digit 1.
        let (h, d) = digits_of(&num("0.0001").unwrap());
        assert_eq!(d, vec![1]);
        assert_eq!(h, 0x8000 | (4 << 7) | 0x0040 | (-1i64 as u16 & 0x3F));
        // -10000: weight 1, trailing zero digit stripped.
        let (h, d) = digits_of(&num("-10000").unwrap());
        assert_eq!(d, vec![1]);
        assert_eq!(h, 0x8000 | 0x2000 | 1);
        // Too many fraction digits for the short form.
        assert!(num(&format!("0.{}", "1".repeat(64))).is_none());
    }

    #[test]
    fn what_jsonb_in_must_read() {
        for t in [
            "{\"a\": 1e5}",
            "[\"\\u00e9\"]",
            "[01]",
            "[1.]",
            "{\"a\" 1}",
            "[1,]",
            "[tru]",
            "\"a\u{1}\"",
            "[1] x",
        ] {
            assert!(jsonb_from_text(t.as_bytes()).is_none(), "{t}");
        }
        assert!(jsonb_from_text(&[b'['; 200]).is_none());
        assert!(jsonb_from_text(b" {\"b\": [1, \"x\\n\", true, null], \"a\": {}} ").is_some());
    }
}
