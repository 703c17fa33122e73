//! Pure logic shared by the `pg_sales` extension and `sales-server`.
//!
//! Nothing here touches Postgres, so it is unit-tested with plain `cargo test`
//! and the server can reject bad input (an unknown `fields` entry, a day 31 in
//! April) before it ever reaches the database, with the very same rules the
//! extension enforces.

pub mod daily;
pub mod decimal;
pub mod json;
pub mod names;
pub mod pgnumeric;
pub mod projection;
pub mod record;
pub mod sql;
pub mod summary;

/// One problem with one input value: where it is and why it is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path of the offending value, e.g. `dailyData.31` or `month`.
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}
