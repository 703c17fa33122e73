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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
