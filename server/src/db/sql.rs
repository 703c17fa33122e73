//! Bind parameters for the SQL that `sales_core::sql` renders.

use sales_core::sql::{SqlValue, SqlWriter};
use sqlx::{Postgres, QueryBuilder};

/// Renders values as bind parameters of a query being built.
pub struct Binds<'b, 'q>(pub &'b mut QueryBuilder<'q, Postgres>);

impl SqlWriter for Binds<'_, '_> {
    fn sql(&mut self, sql: &str) {
        self.0.push(sql);
    }

    fn value(&mut self, v: SqlValue<'_>) {
        // The casts match the literal forms, so both writers yield one type.
        match v {
            SqlValue::Ids(ids) => self.0.push_bind(ids.to_vec()),
            SqlValue::Id(n) => self.0.push_bind(n).push("::bigint"),
            SqlValue::Int(n) => self.0.push_bind(n).push("::int"),
            // As the text the literal writer puts in a query, every digit
            // as the client wrote it: a float8 bound and cast would keep
            // only 15 significant digits.
            SqlValue::Numeric(n) => self.0.push_bind(n.as_str().to_string()).push("::numeric"),
            SqlValue::Text(t) => self.0.push_bind(t.to_string()),
            SqlValue::Texts(t) => self.0.push_bind(t.to_vec()).push("::text[]"),
        };
    }
}
