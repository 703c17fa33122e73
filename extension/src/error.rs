//! Errors raised to SQL callers, each with the SQLSTATE a client can act on.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

#[derive(Debug, thiserror::Error)]
pub enum SalesError {
    /// A parameter (field list, option) is not acceptable: SQLSTATE 22023.
    #[error("{0}")]
    InvalidParameter(String),
    /// A query the extension runs failed.
    #[error("internal query failed: {0}")]
    Spi(#[from] pgrx::spi::Error),
}

impl SalesError {
    fn code(&self) -> PgSqlErrorCode {
        match self {
            SalesError::InvalidParameter(_) => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            SalesError::Spi(_) => PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
        }
    }

    /// Raises the error in Postgres; does not return.
    pub fn raise(self) -> ! {
        ErrorReport::new(self.code(), self.to_string(), "pg_sales").report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }
}

/// Raises an error with SQLSTATE `code`; does not return.
pub fn raise(code: PgSqlErrorCode, message: impl Into<String>) -> ! {
    ErrorReport::new(code, message.into(), "pg_sales").report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}

/// Unwraps or raises.
pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T, E: Into<SalesError>> OrRaise<T> for Result<T, E> {
    fn or_raise(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => e.into().raise(),
        }
    }
}
