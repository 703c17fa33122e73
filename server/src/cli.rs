//! Command line: `sales-server [serve|migrate|seed|import|user add|list|disable|enable|set-password|link|unlink|maintain|openapi]`.

use clap::{Args, Parser, Subcommand};

/// Prints a line of a command's output on stdout. A reader that has gone
/// (`sales-server maintain | head`) does not end the command: what it does
/// (a maintenance run) goes on, and the rest of its output is dropped.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let _ = ::std::writeln!(::std::io::stdout(), $($arg)*);
    }};
}

/// A command stopped by the operator (Ctrl-C) before it finished: it exits
/// 130, as a shell reports a command ended by SIGINT.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Interrupted(pub String);

#[derive(Debug, Parser)]
#[command(
    name = "sales-server",
    version,
    about = "pg_sales: REST, WebSocket and cache server for store sales"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run migrations, then serve HTTP and WebSocket (the default).
    Serve,
    /// Apply database migrations (installs the extension on first run).
    Migrate,
    /// Load demo data: stores in regions with months of daily sales.
    Seed(SeedArgs),
    /// Import a file of sales (export CSV, POS daily CSV or NDJSON) with a progress bar.
    Import(crate::jobs::cli::ImportArgs),
    /// Manage users.
    #[command(subcommand)]
    User(UserCommand),
    /// Fix index problems found by sales.index_report(), ANALYZE, and prune old events.
    Maintain(MaintainArgs),
    /// Print the OpenAPI document.
    Openapi,
}

#[derive(Debug, Args, Clone)]
pub struct SeedArgs {
    /// Number of stores.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub stores: u32,
    /// Number of regions the stores are spread over (at most 12).
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(1..=12))]
    pub regions: u32,
    /// Months of history per store, ending with the current month.
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u32).range(1..=1200))]
    pub months: u32,
    /// Last month to generate, as YYYY-MM (default: the current month, up to today).
    #[arg(long)]
    pub end: Option<String>,
    /// Random seed, for repeatable data.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Records per batch_upsert call.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=5000))]
    pub batch: u32,
    /// Do nothing when the database already has stores.
    #[arg(long)]
    pub if_empty: bool,
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user, or update the one with this email.
    Add(UserAddArgs),
    /// List users (id, email, role, state, stores, linked identity).
    List,
    /// Disable a user: no login, and their tokens and WebSockets are
    /// refused on every running server within a second.
    Disable(UserRef),
    /// Enable a disabled user again.
    Enable(UserRef),
    /// Set a user's password (ends every session of the user).
    SetPassword(UserSetPasswordArgs),
    /// Link an identity provider's identity (its tokens' iss and sub) to a
    /// user: such tokens then stand for this user, and for nobody else.
    Link(UserLinkArgs),
    /// Unlink a user's identity provider identity: its tokens are refused.
    Unlink(UserRef),
}

#[derive(Debug, Args)]
pub struct UserLinkArgs {
    /// The user's email.
    #[arg(long)]
    pub email: String,
    /// The provider's tokens' `iss`, exactly.
    #[arg(long)]
    pub issuer: String,
    /// The user's `sub` in the provider's tokens, exactly.
    #[arg(long)]
    pub subject: String,
}

#[derive(Debug, Args)]
pub struct UserRef {
    /// The user's email.
    #[arg(long)]
    pub email: String,
}

#[derive(Debug, Args)]
pub struct UserSetPasswordArgs {
    /// The user's email.
    #[arg(long)]
    pub email: String,
    /// The password; prompted for (or read from stdin) when absent.
    #[arg(long)]
    pub password: Option<String>,
}

#[derive(Debug, Args)]
pub struct UserAddArgs {
    #[arg(long)]
    pub email: String,
    /// admin, manager or staff.
    #[arg(long, value_parser = ["admin", "manager", "staff"])]
    pub role: String,
    /// A store the user may see (repeat for several; ignored for admins).
    #[arg(long = "store")]
    pub stores: Vec<i64>,
    /// The password; prompted for (or read from stdin) when absent.
    #[arg(long)]
    pub password: Option<String>,
}

#[derive(Debug, Args)]
pub struct MaintainArgs {
    /// Print the report and the statements without running them.
    #[arg(long)]
    pub dry_run: bool,
    /// Also drop indexes reported as unused.
    #[arg(long)]
    pub drop_unused: bool,
}
