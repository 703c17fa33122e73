use clap::Parser;
use sales_server::cli::{Cli, Command, UserCommand};
use sales_server::config::Config;
use sales_server::{db, logging, maintain, say, seed, users, Server};
use std::process::ExitCode;

/// jemalloc rather than glibc's malloc: its size classes keep each
/// connection's long-lived state packed apart from the buffers a request or
/// an upgrade frees again, so idle WebSocket connections hold less memory
/// through fragmentation, and allocation costs less per cache miss (README,
/// "The allocator").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Freed pages go back to the system about a second after they are freed,
/// from jemalloc's own background thread rather than inside a request.
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8] =
    b"background_thread:true,max_background_threads:1,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    logging::init(&config);
    config.warn_ignored();
    match run(cli.command.unwrap_or(Command::Serve), config).await {
        Ok(()) => ExitCode::SUCCESS,
        // A setting found wrong only when used (JWT_SECRET for `serve`) is
        // a configuration error as well: the same message and exit code.
        Err(e) => {
            if let Some(c) = e
                .chain()
                .find_map(|c| c.downcast_ref::<sales_server::config::ConfigError>())
            {
                eprintln!("configuration error: {c}");
                return ExitCode::from(2);
            }
            eprintln!("error: {}", error_text(&e));
            if e.downcast_ref::<sales_server::cli::Interrupted>().is_some() {
                ExitCode::from(130)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// An error and its causes, `: `-joined, leaving out a cause whose text
/// the message before it already holds (sqlx's errors print their source
/// in their own text, so `{:#}` said each twice).
fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown requested; finishing requests in flight");
}

async fn run(command: Command, mut config: Config) -> anyhow::Result<()> {
    // A command's long statements are its work, not slow requests.
    config.log_slow_statements = matches!(command, Command::Serve);
    // Commands that end jobs (maintain) send live messages as servers do.
    if let Some(secret) = &config.jwt_secret {
        sales_server::events::sealed::init(secret);
    }
    match command {
        Command::Serve => {
            config.require_jwt_secret()?;
            let server = Server::bind(config).await?;
            tracing::info!(addr = %server.addr, version = sales_server::VERSION, "listening");
            say!("listening on http://{}", server.addr);
            server.run(shutdown_signal()).await
        }
        Command::Migrate => {
            let pool = db::connect(&config).await?;
            db::migrate(&pool).await?;
            let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
                .fetch_one(&pool)
                .await?;
            say!("migrations applied: {applied}");
            Ok(())
        }
        Command::Seed(args) => {
            seed::check(&args)?;
            let pool = db::connect(&config).await?;
            db::prepare_for_command(&pool).await?;
            let started = std::time::Instant::now();
            let s = seed::seed(&pool, &args).await?;
            if s.skipped {
                say!("database already has stores; nothing seeded (drop --if-empty to add anyway)");
            } else {
                say!(
                    "seeded {} stores, {} store-months ({} new, {} updated) in {:.1}s",
                    s.stores,
                    s.records,
                    s.inserted,
                    s.updated,
                    started.elapsed().as_secs_f64()
                );
            }
            Ok(())
        }
        Command::Import(args) => {
            sales_server::jobs::cli::check(&args)?;
            let pool = db::connect(&config).await?;
            db::prepare_for_command(&pool).await?;
            let end = sales_server::jobs::cli::import(&pool, &config, &args).await?;
            if end == "failed" {
                anyhow::bail!("the import failed");
            }
            // Ended before every line was read and merged: what it wrote
            // is the part before the cancel.
            if end == "cancelled" {
                anyhow::bail!("the import was cancelled before it finished");
            }
            if end == "gone" {
                anyhow::bail!("the import's job was deleted before it finished");
            }
            if end == sales_server::jobs::cli::ALL_REJECTED {
                anyhow::bail!(
                    "the import wrote nothing: every line was rejected (is --format right for this file?)"
                );
            }
            if end.starts_with("interrupted") {
                return Err(sales_server::cli::Interrupted(format!("the import was {end}")).into());
            }
            Ok(())
        }
        Command::User(UserCommand::Add(args)) => {
            // Everything that needs no password is checked before one is asked for.
            let email = users::check_cli_email(&args.email)?;
            users::check_cli_role(&args.role, &args.stores)?;
            // A password given or piped in is checked before connecting,
            // as every argument is; one to be typed at a prompt (twice) is
            // asked for only once the stores are known to exist.
            let prompted = {
                use std::io::IsTerminal;
                args.password.is_none() && std::io::stdin().is_terminal()
            };
            let password = if prompted {
                None
            } else {
                let p = users::read_password(args.password.clone())?;
                users::check_cli_password(&email, &p)?;
                Some(p)
            };
            let pool = db::connect(&config).await?;
            db::prepare_for_command(&pool).await?;
            users::check_cli_stores(&pool, &args.role, &args.stores).await?;
            let password = match password {
                Some(p) => p,
                None => {
                    let p = users::read_password(args.password)?;
                    users::check_cli_password(&email, &p)?;
                    p
                }
            };
            let (id, created) =
                users::upsert_user(&pool, &email, &args.role, &args.stores, &password).await?;
            let email = stored_email_of(&pool, id, email).await;
            say!(
                "{} user {email} ({}) with id {id}",
                if created { "created" } else { "updated" },
                args.role
            );
            Ok(())
        }
        Command::User(UserCommand::List) => {
            let pool = db::connect(&config).await?;
            db::prepare_for_command(&pool).await?;
            say!(
                "{:>6}  {:<32} {:<8} {:<8} {:<16} identity",
                "id",
                "email",
                "role",
                "state",
                "stores"
            );
            for u in users::list(&pool, None, i64::MAX, 0).await? {
                let stores = u
                    .stores
                    .iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(",");
                let identity = u
                    .identity
                    .map(|i| format!("{} {}", i.issuer, i.subject))
                    .unwrap_or_default();
                say!(
                    "{:>6}  {:<32} {:<8} {:<8} {:<16} {identity}",
                    u.id,
                    u.email,
                    u.role.as_str(),
                    if u.disabled { "disabled" } else { "enabled" },
                    stores,
                );
            }
            Ok(())
        }
        Command::User(UserCommand::Disable(r)) => {
            let email = users::stored_email(&r.email);
            let pool = db::connect(&config).await?;
            db::prepare_for_command(&pool).await?;
            let id = users::set_disabled(&pool, &email, true).await?;
            let email = stored_email_of(&pool, id, email).await;
            say!("disabled user {email} (id {id})");
            Ok(())
        }
        Command::User(UserCommand::Enable(r)) => {
            let email = users::stored_email(&r.email);
            let pool = db::connect(&config).await?;
            db::prepare_for_command(&pool).await?;
            let id = users::set_disabled(&pool, &email, false).await?;
            let email = stored_email_of(&pool, id, email).await;
            say!("enabled user {email} (id {id})");
            Ok(())
        }
        Command::User(UserCommand::Link(args)) => {
            let email = users::stored_email(&args.email);
            users::check_cli_identity(&args.issuer, &args.subject, config.jwt_issuer.as_deref())?;
            let pool = db::connect(&config).await?;
            db::prepare_for_command(&pool).await?;
            let (id, _) = users::set_identity(
                &pool,
                &email,
                Some((args.issuer.as_str(), args.subject.as_str())),
                config.jwt_issuer.as_deref(),
            )
            .await?;
            let email = stored_email_of(&pool, id, email).await;
            say!(
                "linked user {email} (id {id}) to issuer {} subject {}",
                args.issuer,
                args.subject
            );
            Ok(())
        }
        Command::User(UserCommand::Unlink(r)) => {
            let email = users::stored_email(&r.email);
            let pool = db::connect(&config).await?;
            db::prepare_for_command(&pool).await?;
            let (id, had) = users::set_identity(&pool, &email, None, None).await?;
            let email = stored_email_of(&pool, id, email).await;
            if had {
                say!("unlinked the outside identity of user {email} (id {id})");
            } else {
                say!("user {email} (id {id}) had no linked identity");
            }
            Ok(())
        }
        Command::User(UserCommand::SetPassword(args)) => {
            let email = users::check_cli_email(&args.email)?;
            let password = users::read_password(args.password)?;
            users::check_cli_password(&email, &password)?;
            let pool = db::connect(&config).await?;
            db::prepare_for_command(&pool).await?;
            let id = users::set_password(&pool, &email, &password).await?;
            let email = stored_email_of(&pool, id, email).await;
            say!("password of user {email} (id {id}) changed; their sessions ended");
            Ok(())
        }
        Command::Maintain(args) => {
            // Maintenance is not a request: the report over the catalogs
            // and the prune of a large log may take longer than
            // DB_QUERY_TIMEOUT allows one (0: no statement timeout).
            let config = Config {
                db_query_timeout: std::time::Duration::ZERO,
                ..config.clone()
            };
            let pool = db::connect(&config).await?;
            // Maintenance does not migrate (a newer binary run by a
            // schedule before its deploy would), not even a new database:
            // it refuses one that lacks this binary's migrations or
            // extension version, before changing anything.
            db::require_migrated(&pool).await?;
            let lock = if args.dry_run {
                None
            } else {
                Some(
                    maintain::RunLock::take(&config.database_url)
                        .await?
                        .map_err(anyhow::Error::msg)?,
                )
            };
            let mut findings = maintain::report(&pool).await?;
            for (index, pid) in maintain::skip_building(&pool, &mut findings).await? {
                say!("building  {index}: being built by Postgres pid {pid}; left alone");
            }
            if findings.is_empty() {
                say!("index report: nothing to fix");
            }
            for f in &findings {
                say!(
                    "{:<9} {} on {} ({} bytes): {}",
                    f.reason,
                    f.index_name,
                    f.table_name,
                    f.size_bytes,
                    f.detail
                );
            }
            let statements = maintain::plan(&findings, args.drop_unused);
            if args.dry_run {
                for s in &statements {
                    say!("would run: {s}");
                }
                return Ok(());
            }
            let mut failed = 0;
            for a in maintain::apply(&config.database_url, &statements).await? {
                match &a.outcome {
                    Ok(()) => say!(
                        "ran: {} ({:.0} ms)",
                        a.statement,
                        a.elapsed.as_secs_f64() * 1000.0
                    ),
                    Err(e) => {
                        failed += 1;
                        say!("failed: {}: {e}", a.statement)
                    }
                }
            }
            let pruned =
                maintain::prune_events(&pool, config.event_retention, config.history_retention)
                    .await?;
            say!(
                "pruned {pruned} events older than {}s",
                config.event_retention.as_secs()
            );
            let gone = maintain::prune_sessions(&pool, config.jwt_expiry, config.refresh_token_ttl)
                .await?;
            say!(
                "pruned {} ended sessions and {} refresh tokens used more than {}s ago",
                gone.sessions,
                gone.used_tokens,
                config.refresh_token_ttl.as_secs()
            );
            if let Some(lock) = lock {
                lock.release().await;
            }
            if failed > 0 {
                anyhow::bail!("{failed} maintenance statement(s) failed");
            }
            Ok(())
        }
        Command::Openapi => {
            // The spec needs no live connections: a lazy pool never connects.
            let state = sales_server::state::AppState::offline(config)?;
            say!("{}", sales_server::http::openapi_json(state));
            Ok(())
        }
    }
}

/// The address of user `id` as stored (lookups ignore case, so what was
/// typed may differ from it); `typed` when it cannot be read.
async fn stored_email_of(pool: &sqlx::PgPool, id: i64, typed: String) -> String {
    sqlx::query_scalar("SELECT email FROM sales.users WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
        .ok()
        .flatten()
        .unwrap_or(typed)
}
