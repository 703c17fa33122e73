//! Tracing set-up: pretty lines for people, JSON lines for machines.

use crate::config::{Config, LogFormat};
use tracing_subscriber::EnvFilter;

pub fn init(config: &Config) {
    use std::io::IsTerminal;
    let mut filter =
        EnvFilter::try_new(&config.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    // Postgres' notices (`relation "_sqlx_migrations" already exists,
    // skipping` on every command) are not news at `info`; a LOG_LEVEL that
    // names sqlx decides for itself.
    if !config.log_level.contains("sqlx") {
        if let Ok(d) = "sqlx::postgres::notice=warn".parse() {
            filter = filter.add_directive(d);
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a terminal, not in a log file or a pipe.
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match config.log_format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
}
