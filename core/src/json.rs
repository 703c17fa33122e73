//! Read-only access to JSON values, so the same rules judge `serde_json`
//! values (in the server and in tests) and Postgres' binary `jsonb` (in the
//! extension, which reads it in place instead of printing it to text and
//! parsing it back: that round trip was most of the cost of a CHECK
//! constraint call and of `batch_upsert`'s input handling).

use serde_json::Value;

/// The JSON type of a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Null,
    Bool,
    Number,
    String,
    Array,
    Object,
}

/// What the metric rules ask of a number (README, "The data model"): a
/// value, not NaN or an infinity; its sign; whether it is above 1e12; whether
/// it has digits after the point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NumberClass {
    pub special: bool,
    pub negative: bool,
    pub above_max: bool,
    pub fractional: bool,
}

impl NumberClass {
    /// NaN or an infinity.
    pub const SPECIAL: NumberClass = NumberClass {
        special: true,
        negative: false,
        above_max: false,
        fractional: false,
    };

    /// As far as an `f64` can tell (a reader without the number's digits).
    pub fn of_f64(n: f64) -> NumberClass {
        if !n.is_finite() {
            return NumberClass::SPECIAL;
        }
        NumberClass {
            special: false,
            negative: n < 0.0,
            above_max: n > crate::daily::MAX_METRIC,
            fractional: n.fract() != 0.0,
        }
    }
}

/// A JSON value that can be read without being converted. `'a` is the life
/// of the underlying document (strings and members borrow from it).
pub trait JsonRead<'a>: Copy {
    fn kind(self) -> Kind;
    /// A number as `f64`; `None` for anything that is not a number.
    fn as_f64(self) -> Option<f64>;
    /// A number written as a whole number that fits `i64` (like
    /// `serde_json::Value::as_i64`: `2024` is one, `2024.0` and `2024.5` are not).
    fn as_i64(self) -> Option<i64>;
    fn as_str(self) -> Option<&'a str>;
    /// Members of an object or elements of an array; 0 for anything else.
    fn len(self) -> usize;
    /// Calls `f` with each member of an object, in the document's order;
    /// does nothing for anything else.
    fn each_member(self, f: impl FnMut(&'a str, Self));

    /// A number's [`NumberClass`]; None for anything else. The default reads
    /// [`JsonRead::as_f64`]; a reader that holds the digits (the extension's
    /// jsonb) decides exactly.
    fn number_class(self) -> Option<NumberClass> {
        self.as_f64().map(NumberClass::of_f64)
    }

    fn is_empty(self) -> bool {
        self.len() == 0
    }
}

impl<'a> JsonRead<'a> for &'a Value {
    fn kind(self) -> Kind {
        match self {
            Value::Null => Kind::Null,
            Value::Bool(_) => Kind::Bool,
            Value::Number(_) => Kind::Number,
            Value::String(_) => Kind::String,
            Value::Array(_) => Kind::Array,
            Value::Object(_) => Kind::Object,
        }
    }

    fn as_f64(self) -> Option<f64> {
        Value::as_f64(self)
    }

    fn as_i64(self) -> Option<i64> {
        Value::as_i64(self)
    }

    fn as_str(self) -> Option<&'a str> {
        Value::as_str(self)
    }

    fn len(self) -> usize {
        match self {
            Value::Array(a) => a.len(),
            Value::Object(o) => o.len(),
            _ => 0,
        }
    }

    fn each_member(self, mut f: impl FnMut(&'a str, Self)) {
        if let Value::Object(o) = self {
            for (k, v) in o {
                f(k, v);
            }
        }
    }
}

/// A JSON document parsed into flat vectors, read through [`JsonRead`]:
/// no map per object and no copy of strings without escapes. The batch
/// endpoint validates its records this way and sends their text on as
/// received. Reads as `serde_json::Value` does, for the rules' purposes:
/// members in document order, and a key given twice counted once, in its
/// first place with its last value (as `Value`'s ordered map keeps it, and
/// as `jsonb` keeps the last).
///
/// The first key given twice is remembered ([`Tape::repeated`]), so a
/// caller that refuses such documents can say where.
#[derive(Debug)]
pub struct Tape<'de> {
    nodes: Vec<Node<'de>>,
    members: Vec<(std::borrow::Cow<'de, str>, u32)>,
    /// The keys of the objects being built, outermost first.
    open: Vec<std::borrow::Cow<'de, str>>,
    repeated: Option<String>,
}

#[derive(Debug)]
enum Node<'de> {
    Null,
    Bool,
    /// An integer literal that fits `i64`.
    Int(i64),
    /// An integer literal above `i64::MAX`.
    Uint(u64),
    /// Any other number.
    Float(f64),
    Str(std::borrow::Cow<'de, str>),
    /// Its length: the rules read no array's items through [`JsonRead`].
    Array(u32),
    /// Its members' range in `members`.
    Object(u32, u32),
}

impl<'de> Tape<'de> {
    /// Parses `text` (one JSON value, as `serde_json::from_str` would).
    pub fn parse(text: &'de str) -> Result<Self, serde_json::Error> {
        use serde::de::DeserializeSeed;
        let mut tape = Tape {
            nodes: Vec::new(),
            members: Vec::new(),
            open: Vec::new(),
            repeated: None,
        };
        let mut de = serde_json::Deserializer::from_str(text);
        Build(&mut tape).deserialize(&mut de)?;
        de.end()?;
        Ok(tape)
    }

    /// The dotted path (`dailyData.5`) of the first key the document gives
    /// twice in one object, if any; paths do not name array positions.
    pub fn repeated(&self) -> Option<&str> {
        self.repeated.as_deref()
    }

    /// The document's root value.
    pub fn root(&self) -> TapeRef<'_, 'de> {
        TapeRef {
            tape: self,
            at: (self.nodes.len() - 1) as u32,
        }
    }
}

/// A value inside a [`Tape`].
#[derive(Debug, Clone, Copy)]
pub struct TapeRef<'t, 'de> {
    tape: &'t Tape<'de>,
    at: u32,
}

impl<'t, 'de> TapeRef<'t, 'de> {
    fn node(self) -> &'t Node<'de> {
        &self.tape.nodes[self.at as usize]
    }
}

impl<'t, 'de> JsonRead<'t> for TapeRef<'t, 'de> {
    fn kind(self) -> Kind {
        match self.node() {
            Node::Null => Kind::Null,
            Node::Bool => Kind::Bool,
            Node::Int(_) | Node::Uint(_) | Node::Float(_) => Kind::Number,
            Node::Str(_) => Kind::String,
            Node::Array(_) => Kind::Array,
            Node::Object(..) => Kind::Object,
        }
    }

    fn as_f64(self) -> Option<f64> {
        match *self.node() {
            Node::Int(n) => Some(n as f64),
            Node::Uint(n) => Some(n as f64),
            Node::Float(f) => Some(f),
            _ => None,
        }
    }

    fn as_i64(self) -> Option<i64> {
        match *self.node() {
            Node::Int(n) => Some(n),
            _ => None,
        }
    }

    fn as_str(self) -> Option<&'t str> {
        match self.node() {
            Node::Str(s) => Some(s.as_ref()),
            _ => None,
        }
    }

    fn len(self) -> usize {
        match *self.node() {
            Node::Array(n) => n as usize,
            Node::Object(a, b) => (b - a) as usize,
            _ => 0,
        }
    }

    fn each_member(self, mut f: impl FnMut(&'t str, Self)) {
        if let Node::Object(a, b) = *self.node() {
            for (k, v) in &self.tape.members[a as usize..b as usize] {
                f(
                    k.as_ref(),
                    TapeRef {
                        tape: self.tape,
                        at: *v,
                    },
                );
            }
        }
    }
}

/// Appends one value (after its children) to the tape.
struct Build<'b, 'de>(&'b mut Tape<'de>);

impl<'de> serde::de::DeserializeSeed<'de> for Build<'_, 'de> {
    type Value = u32;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<u32, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Build<'_, 'de> {
    type Value = u32;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<u32, E> {
        Ok(add(self.0, Node::Null))
    }

    fn visit_none<E>(self) -> Result<u32, E> {
        Ok(add(self.0, Node::Null))
    }

    fn visit_bool<E>(self, _: bool) -> Result<u32, E> {
        Ok(add(self.0, Node::Bool))
    }

    fn visit_i64<E>(self, v: i64) -> Result<u32, E> {
        Ok(add(self.0, Node::Int(v)))
    }

    fn visit_u64<E>(self, v: u64) -> Result<u32, E> {
        let node = i64::try_from(v).map_or(Node::Uint(v), Node::Int);
        Ok(add(self.0, node))
    }

    fn visit_f64<E>(self, v: f64) -> Result<u32, E> {
        Ok(add(self.0, Node::Float(v)))
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<u32, E> {
        Ok(add(self.0, Node::Str(std::borrow::Cow::Borrowed(v))))
    }

    fn visit_str<E>(self, v: &str) -> Result<u32, E> {
        Ok(add(
            self.0,
            Node::Str(std::borrow::Cow::Owned(v.to_string())),
        ))
    }

    fn visit_string<E>(self, v: String) -> Result<u32, E> {
        Ok(add(self.0, Node::Str(std::borrow::Cow::Owned(v))))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<u32, A::Error> {
        let mut n = 0;
        while seq.next_element_seed(Build(&mut *self.0))?.is_some() {
            n += 1;
        }
        Ok(add(self.0, Node::Array(n)))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<u32, A::Error> {
        let mut members: Vec<(std::borrow::Cow<'de, str>, u32)> = Vec::new();
        // Past a few members, keys are found through an index (an object of
        // many members must not cost a comparison with every other).
        let mut index: Option<std::collections::HashMap<std::borrow::Cow<'de, str>, usize>> = None;
        while let Some(k) = map.next_key_seed(Key)? {
            self.0.open.push(k.clone());
            let v = map.next_value_seed(Build(&mut *self.0));
            self.0.open.pop();
            let v = v?;
            if index.is_none() && members.len() >= 32 {
                index = Some(
                    members
                        .iter()
                        .enumerate()
                        .map(|(i, (key, _))| (key.clone(), i))
                        .collect(),
                );
            }
            // A key given again keeps its first place and takes the new value.
            let seen = match &index {
                Some(ix) => ix.get(&k).copied(),
                None => members.iter().position(|(key, _)| *key == k),
            };
            match seen {
                Some(i) => {
                    members[i].1 = v;
                    if self.0.repeated.is_none() {
                        let mut path: Vec<&str> = self.0.open.iter().map(|k| k.as_ref()).collect();
                        path.push(&k);
                        self.0.repeated = Some(path.join("."));
                    }
                }
                None => {
                    if let Some(ix) = &mut index {
                        ix.insert(k.clone(), members.len());
                    }
                    members.push((k, v));
                }
            }
        }
        let a = self.0.members.len() as u32;
        self.0.members.extend(members);
        let b = self.0.members.len() as u32;
        Ok(add(self.0, Node::Object(a, b)))
    }
}

/// An object's key, borrowed from the text unless it has escapes.
struct Key;

impl<'de> serde::de::DeserializeSeed<'de> for Key {
    type Value = std::borrow::Cow<'de, str>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Key {
    type Value = std::borrow::Cow<'de, str>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a string key")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(std::borrow::Cow::Borrowed(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(std::borrow::Cow::Owned(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(std::borrow::Cow::Owned(v))
    }
}

fn add<'de>(tape: &mut Tape<'de>, node: Node<'de>) -> u32 {
    tape.nodes.push(node);
    (tape.nodes.len() - 1) as u32
}

/// Why a document with a key twice in one object is refused, where it is.
pub const REPEATED: &str = "appears more than once in the same object";

/// The path of the first key that appears twice in one object of `text`
/// (`salesDataArray[3].storeId`), if any. JSON leaves such a document's
/// meaning open (a parser may keep either value, or refuse it); `jsonb` and
/// `serde_json` keep the last. None for valid JSON without one, and for text
/// that is not JSON before any repeat (its parse reports that).
pub fn repeated_key(text: &[u8]) -> Option<String> {
    use serde::de::DeserializeSeed;
    let mut walk = Walk {
        at: Vec::new(),
        found: None,
    };
    let mut de = serde_json::Deserializer::from_slice(text);
    // The walk stops at the first repeat (an error that carries nothing).
    let _ = (&mut walk).deserialize(&mut de);
    walk.found
}

/// One step of a path into a document.
enum Step<'de> {
    Key(std::borrow::Cow<'de, str>),
    Index(usize),
}

/// Walks a JSON value without keeping it, remembering the path of the
/// first repeated key. The path is written out only when one is found.
struct Walk<'de> {
    at: Vec<Step<'de>>,
    found: Option<String>,
}

impl Walk<'_> {
    fn path(&self) -> String {
        let mut out = String::new();
        for step in &self.at {
            match step {
                Step::Key(k) => {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push_str(k);
                }
                Step::Index(i) => out.push_str(&format!("[{i}]")),
            }
        }
        out
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for &mut Walk<'de> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for &mut Walk<'de> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.at.push(Step::Index(0));
        let mut i = 0;
        loop {
            if let Some(last) = self.at.last_mut() {
                *last = Step::Index(i);
            }
            if seq.next_element_seed(&mut *self)?.is_none() {
                break;
            }
            i += 1;
        }
        self.at.pop();
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        // Few members are compared with each other; many through a set.
        let mut keys: Vec<std::borrow::Cow<'de, str>> = Vec::new();
        let mut set: Option<std::collections::HashSet<std::borrow::Cow<'de, str>>> = None;
        while let Some(key) = map.next_key_seed(Key)? {
            if set.is_none() && keys.len() >= 32 {
                set = Some(keys.drain(..).collect());
            }
            let again = match &mut set {
                Some(set) => !set.insert(key.clone()),
                None => {
                    let again = keys.contains(&key);
                    keys.push(key.clone());
                    again
                }
            };
            self.at.push(Step::Key(key));
            if again {
                self.found = Some(self.path());
                return Err(serde::de::Error::custom("repeated key"));
            }
            let value = map.next_value_seed(&mut *self);
            self.at.pop();
            value?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Everything the rules can read of a value, through the trait.
    fn dump<'a, J: JsonRead<'a>>(v: J, out: &mut String) {
        use std::fmt::Write;
        let _ = write!(
            out,
            "({:?} {:?} {:?} {:?} {}",
            v.kind(),
            v.as_i64(),
            v.as_f64(),
            v.as_str(),
            v.len()
        );
        v.each_member(|k, m| {
            let _ = write!(out, " {k:?}:");
            dump(m, out);
        });
        out.push(')');
    }

    #[test]
    fn duplicate_keys_are_found_by_path() {
        assert_eq!(repeated_key(br#"{"a":1,"b":2}"#), None);
        assert_eq!(repeated_key(br#"{"a":1,"a":2}"#).as_deref(), Some("a"));
        assert_eq!(
            repeated_key(br#"{"rows":[{"x":1},{"x":1,"y":{"d":1,"d":2}}]}"#).as_deref(),
            Some("rows[1].y.d")
        );
        // The same key in two objects, or escaped differently but equal.
        assert_eq!(repeated_key(br#"[{"a":1},{"a":1}]"#), None);
        assert_eq!(repeated_key(br#"{"a":1,"\u0061":2}"#).as_deref(), Some("a"));
        // The first repeat is the one named.
        assert_eq!(
            repeated_key(br#"{"a":{"b":1,"b":1},"a":2}"#).as_deref(),
            Some("a.b")
        );
        let mut many = String::from("{\"d\": {");
        for i in 0..40 {
            many.push_str(&format!("\"{i}\": [{i}], "));
        }
        many.push_str("\"33\": 1}}");
        assert_eq!(repeated_key(many.as_bytes()).as_deref(), Some("d.33"));
        assert_eq!(
            repeated_key(br#"{"ids": [1, 2], "x": [[{"a": 1, "a": 2}]]}"#).as_deref(),
            Some("x[0][0].a")
        );
        assert_eq!(repeated_key(b"not json"), None);
        assert_eq!(repeated_key(br#"{"a":1,"b":[}"#), None);
        assert_eq!(repeated_key(b"7"), None);
    }

    #[test]
    fn a_tape_reads_as_a_serde_value() {
        let texts = [
            r#"{"storeId": 7, "year": 2024, "month": 2, "dailyData": {"1": {"sales": 10.5, "customers": 3}}}"#,
            r#"{"a": 1, "b": 2, "a": 3}"#,
            r#"{"k\u00e9y": "v\"al", "x": "plain", "n": null, "t": true, "f": false}"#,
            r#"[1, -2, 2.5, 1e3, 18446744073709551615, 9223372036854775807, -9223372036854775808, 2024.0]"#,
            r#"{"deep": {"er": {"est": [[], {}, [{"a": [1]}]]}}}"#,
            r#""just a string""#,
            r#"12"#,
        ];
        for text in texts {
            let value: Value = serde_json::from_str(text).unwrap();
            let tape = Tape::parse(text).unwrap();
            let (mut a, mut b) = (String::new(), String::new());
            dump(&value, &mut a);
            dump(tape.root(), &mut b);
            assert_eq!(a, b, "{text}");
        }
        // Many members, one given twice: the index path keeps the same rule.
        let mut text = String::from("{");
        for i in 0..100 {
            text.push_str(&format!("\"k{i}\": {i}, "));
        }
        text.push_str("\"k5\": \"last\"}");
        let value: Value = serde_json::from_str(&text).unwrap();
        let tape = Tape::parse(&text).unwrap();
        let (mut a, mut b) = (String::new(), String::new());
        dump(&value, &mut a);
        dump(tape.root(), &mut b);
        assert_eq!(a, b);
        assert_eq!(tape.root().len(), 100);
        assert_eq!(tape.repeated(), Some("k5"));
        for (text, repeated) in [
            (r#"{"a": 1, "b": 2}"#, None),
            (r#"{"a": 1, "b": 2, "a": 3}"#, Some("a")),
            (r#"[{"a": 1}, {"a": 2}]"#, None),
            (
                r#"{"dailyData": {"1": {"sales": 1}, "2": {"sales": 1, "sales": 2}}, "dailyData": {}}"#,
                Some("dailyData.2.sales"),
            ),
            (r#"{"d": {"1": 1, "1": 2}}"#, Some("d.1")),
        ] {
            assert_eq!(Tape::parse(text).unwrap().repeated(), repeated, "{text}");
        }
        for bad in ["", "{", "[1,]", "{\"a\" 1}", "1 2", "nul"] {
            assert!(Tape::parse(bad).is_err(), "{bad:?}");
            assert!(serde_json::from_str::<Value>(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn serde_values() {
        let v = json!({"a": 1, "b": [1, 2], "c": 2.5, "d": "x", "e": null, "f": true, "g": 2024.0});
        // Through the trait, as the validation code calls it.
        fn read<'a>(v: &'a Value) -> impl JsonRead<'a> {
            v
        }
        assert_eq!(read(&v).kind(), Kind::Object);
        assert_eq!(read(&v).len(), 7);
        let mut seen = Vec::new();
        read(&v).each_member(|k, m| seen.push((k, m.kind())));
        assert_eq!(seen[1], ("b", Kind::Array));
        assert_eq!(seen[4], ("e", Kind::Null));
        assert_eq!(read(&v["a"]).as_i64(), Some(1));
        assert_eq!(read(&v["c"]).as_i64(), None);
        assert_eq!(
            read(&v["g"]).as_i64(),
            None,
            "2024.0 is not written as a whole number"
        );
        assert_eq!(read(&v["c"]).as_f64(), Some(2.5));
        assert_eq!(read(&v["d"]).as_f64(), None);
        assert_eq!(read(&v["d"]).as_str(), Some("x"));
        assert_eq!(read(&v["b"]).len(), 2);
        assert!(read(&v["a"]).is_empty());
    }
}
