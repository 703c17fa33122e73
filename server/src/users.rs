//! Users: argon2 password hashes, roles and store scope.

pub use crate::access::Identity;
use crate::access::{Change, Revoked};
use crate::auth::Role;
use anyhow::{bail, Context};
use argon2::password_hash::{
    rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::Argon2;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::{PgConnection, PgExecutor};

pub const MIN_PASSWORD_LEN: usize = 8;

/// A password as it is hashed: in Unicode normal form C, as emails are
/// kept, so the same password typed on keyboards that compose an accent
/// differently (`é` as one code point, or `e` and a combining accent) is
/// the same password.
fn normal_password(password: &str) -> std::borrow::Cow<'_, str> {
    use unicode_normalization::UnicodeNormalization;
    if unicode_normalization::is_nfc(password) {
        std::borrow::Cow::Borrowed(password)
    } else {
        std::borrow::Cow::Owned(password.nfc().collect())
    }
}

pub fn hash_password(password: &str) -> anyhow::Result<String> {
    let salt = SaltString::generate(&mut OsRng);
    Ok(Argon2::default()
        .hash_password(normal_password(password).as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("hashing failed: {e}"))?
        .to_string())
}

/// Checks a password against its hash, in normal form C; a password that
/// is not in that form is also checked as it came, for a hash made before
/// passwords were normalised.
pub fn verify_password(password: &str, hash: &str) -> bool {
    let Ok(h) = PasswordHash::new(hash) else {
        return false;
    };
    let check = |p: &str| Argon2::default().verify_password(p.as_bytes(), &h).is_ok();
    let normal = normal_password(password);
    check(&normal) || (*normal != *password && check(password))
}

/// Creates the user or, when the email exists, updates role, stores and
/// password (an unchanged user is left alone and emits nothing).
/// Returns (id, created).
pub async fn upsert_user(
    pool: &PgPool,
    email: &str,
    role: &str,
    stores: &[i64],
    password: &str,
) -> anyhow::Result<(i64, bool)> {
    let email = check_email(email).map_err(cli_error)?;
    let role = cli_role(role)?;
    check_password(password, &email).map_err(cli_error)?;
    let mut tx = pool.begin().await?;
    lock(&mut tx).await?;
    let existing: Option<(i64, String)> =
        sqlx::query_as("SELECT id, password_hash FROM sales.users WHERE lower(email) = lower($1)")
            .bind(&email)
            .fetch_optional(&mut *tx)
            .await?;
    let (id, created, change) = match existing {
        None => {
            let hash = hash_password(password)?;
            let (user, change) = create(
                &mut tx,
                NewUser {
                    email: email.clone(),
                    role,
                    stores: stores.to_vec(),
                    password_hash: hash,
                    disabled: false,
                    by_manager: false,
                },
            )
            .await
            .map_err(cli_error)?;
            (user.id, true, Some(change))
        }
        Some((id, old_hash)) => {
            let password_hash = (!verify_password(password, &old_hash))
                .then(|| hash_password(password))
                .transpose()?;
            let (user, change) = update(
                &mut tx,
                id,
                UserPatch {
                    role: Some(role),
                    stores: Some(stores.to_vec()),
                    password_hash,
                    ..Default::default()
                },
            )
            .await
            .map_err(cli_error)?;
            (user.id, false, change)
        }
    };
    tx.commit().await.context("saving the user")?;
    // Running servers apply the change from its event (the relay).
    drop(change);
    Ok((id, created))
}

/// `user disable` / `user enable`: returns the user's id.
pub async fn set_disabled(pool: &PgPool, email: &str, disabled: bool) -> anyhow::Result<i64> {
    cli_patch(
        pool,
        email,
        UserPatch {
            disabled: Some(disabled),
            ..Default::default()
        },
    )
    .await
}

/// `user set-password`: returns the user's id.
pub async fn set_password(pool: &PgPool, email: &str, password: &str) -> anyhow::Result<i64> {
    check_password(password, email).map_err(cli_error)?;
    let hash = hash_password(password)?;
    cli_patch(
        pool,
        email,
        UserPatch {
            password_hash: Some(hash),
            ..Default::default()
        },
    )
    .await
}

/// `user link` / `user unlink`: returns the user's id and whether the
/// identity changed.
pub async fn set_identity(
    pool: &PgPool,
    email: &str,
    identity: Option<(&str, &str)>,
    required_issuer: Option<&str>,
) -> anyhow::Result<(i64, bool)> {
    let identity = identity
        .map(|(iss, sub)| Identity::new(iss, sub, required_issuer))
        .transpose()
        .map_err(cli_error)?;
    let patch = UserPatch {
        identity: Some(identity),
        ..Default::default()
    };
    cli_change(pool, email, patch).await
}

async fn cli_patch(pool: &PgPool, email: &str, patch: UserPatch) -> anyhow::Result<i64> {
    Ok(cli_change(pool, email, patch).await?.0)
}

/// Changes the user with `email`: (their id, whether anything changed).
async fn cli_change(pool: &PgPool, email: &str, patch: UserPatch) -> anyhow::Result<(i64, bool)> {
    let mut tx = pool.begin().await?;
    lock(&mut tx).await?;
    let user = get_by_email(&mut *tx, email)
        .await?
        .ok_or_else(|| anyhow::anyhow!("--email: no user {email}"))?;
    let (_, change) = update(&mut tx, user.id, patch).await.map_err(cli_error)?;
    tx.commit().await?;
    Ok((user.id, change.is_some()))
}

fn cli_error(e: UserError) -> anyhow::Error {
    anyhow::anyhow!("{}", e.cli_message())
}

/// A user as stored (`sales.users` with its `auth.user_state`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: i64,
    pub email: String,
    pub role: Role,
    /// Empty for admins (who see every store).
    pub stores: Vec<i64>,
    pub disabled: bool,
    /// Moves with every change; access tokens of older generations are refused.
    pub generation: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The outside identity linked to the user, if any.
    pub identity: Option<Identity>,
}

/// Why a user change was refused.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("stores: no store with id {0:?}")]
    UnknownStores(Vec<i64>),
    #[error("a user with email {0} already exists")]
    Duplicate(String),
    #[error("{0}")]
    LastAdmin(String),
    #[error("no user {0}")]
    NotFound(i64),
    #[error("identity: this issuer and subject are already linked to user {0}")]
    IdentityTaken(i64),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

impl UserError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        UserError::Invalid {
            field,
            reason: reason.into(),
        }
    }

    /// For the command line, whose flags are spelled `--email`, `--store`...
    pub fn cli_message(&self) -> String {
        match self {
            UserError::Invalid { field, reason } => {
                let flag = match *field {
                    "stores" => "store",
                    "password" | "newPassword" => "password",
                    f => f,
                };
                format!("--{flag}: {reason}")
            }
            UserError::UnknownStores(s) => format!("--store: no store with id {s:?}"),
            UserError::IdentityTaken(other) => format!(
                "--issuer, --subject: this issuer and subject are already linked to user {other}"
            ),
            e => e.to_string(),
        }
    }
}

/// Trims and checks an email address; returns it as stored: composed
/// (see [`normal_email`]), its case kept.
///
/// An address is a local part, `@` and a domain. The domain is labels
/// separated by dots, none empty; the local part is dot-separated parts,
/// none empty, without the characters RFC 5322 allows only in a quoted
/// local part (`"..."`), which is not supported. Letters of any script are
/// allowed in both; blanks, control and invisible characters in neither.
pub fn check_email(email: &str) -> Result<String, UserError> {
    let email = normal_email(email);
    let not_an_address = |why: &str| {
        UserError::invalid("email", format!("{email:?} is not an email address: {why}"))
    };
    let Some((local, domain)) = email.split_once('@') else {
        return Err(not_an_address("it has no @"));
    };
    let chars = email.chars().count();
    if chars > MAX_EMAIL_CHARS {
        return Err(UserError::invalid(
            "email",
            format!("{chars} characters; at most {MAX_EMAIL_CHARS}"),
        ));
    }
    if let Some(c) = email
        .chars()
        .find(|&c| c.is_whitespace() || c.is_control() || invisible(c))
    {
        return Err(not_an_address(&format!(
            "it holds {}, a blank, control or invisible character",
            c.escape_unicode()
        )));
    }
    if local.is_empty() {
        return Err(not_an_address("nothing before the @"));
    }
    if domain.is_empty() {
        return Err(not_an_address("nothing after the @"));
    }
    if domain.contains('@') {
        return Err(not_an_address(
            "it has more than one @ (quoted local parts are not supported)",
        ));
    }
    if let Some(c) = local.chars().find(|c| QUOTED_ONLY.contains(c)) {
        return Err(not_an_address(&format!(
            "the part before the @ holds {c:?}, allowed only in a quoted local part \
             (\"...\"@), and those are not supported"
        )));
    }
    if local.split('.').any(str::is_empty) {
        return Err(not_an_address(
            "the part before the @ starts or ends with a dot, or has two dots in a row",
        ));
    }
    if let Some(c) = domain.chars().find(|c| QUOTED_ONLY.contains(c)) {
        return Err(not_an_address(&format!(
            "the domain holds {c:?}; a domain is names separated by dots \
             (address literals such as [192.0.2.1] are not supported)"
        )));
    }
    if domain.split('.').any(str::is_empty) {
        return Err(not_an_address(
            "the domain starts or ends with a dot, or has two dots in a row",
        ));
    }
    Ok(email)
}

/// Characters an address holds only in a quoted local part (RFC 5322's
/// specials other than `@` and `.`, and the backslash that escapes them).
const QUOTED_ONLY: &[char] = &['(', ')', '<', '>', '[', ']', ',', ';', ':', '\\', '"'];

/// The longest email address, in characters (as the API's schema counts).
pub const MAX_EMAIL_CHARS: usize = 320;

/// An email address as it is stored and looked up: without surrounding
/// blanks, in Unicode normalization form C. The same address typed with a
/// precomposed `ü` or with `u` and a combining diaeresis looks the same and
/// is the same account. A lookup also finds an address stored decomposed
/// before, which migration 0023 left so because its composed form was
/// taken: typed exactly as stored, it names that account.
pub fn normal_email(email: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    email.trim().nfc().collect()
}

/// Characters that show as nothing: Unicode's Default_Ignorable_Code_Point
/// set (zero-width spaces and joiners, direction marks, the soft hyphen,
/// the byte order mark, the shorthand format controls...), the other
/// format controls that draw nothing by themselves (interlinear
/// annotation marks, Egyptian hieroglyph format controls), and the blank
/// Hangul fillers and Braille pattern: an address holding one looks like
/// another user's.
pub(crate) fn invisible(c: char) -> bool {
    sales_core::names::invisible(c)
}

pub const MAX_PASSWORD_LEN: usize = 1024;

/// Passwords refused whatever their length: the most common ones in
/// published breach lists (NIST SP 800-63B asks to refuse such values).
const COMMON_PASSWORDS: &[&str] = &[
    "password",
    "password1",
    "password12",
    "password123",
    "password1234",
    "12345678",
    "123456789",
    "1234567890",
    "11111111",
    "00000000",
    "qwertyui",
    "qwerty123",
    "qwertyuiop",
    "iloveyou",
    "sunshine",
    "princess",
    "football",
    "baseball",
    "welcome1",
    "welcome123",
    "letmein1",
    "abc12345",
    "abcd1234",
    "admin123",
    "administrator",
    "passw0rd",
    "p@ssw0rd",
    "changeme",
    "trustno1",
    "1q2w3e4r",
    "zaq12wsx",
    "superman",
    "starwars",
    "whatever",
];

/// Why a password is too weak, if it is: at least MIN_PASSWORD_LEN
/// characters, at most MAX_PASSWORD_LEN bytes, at least 4 different
/// characters, not a common password, not the email or its name part.
pub fn password_weakness(password: &str, email: &str) -> Option<String> {
    let password = &*normal_password(password);
    let chars = password.chars().count();
    if chars < MIN_PASSWORD_LEN {
        return Some(format!("must be at least {MIN_PASSWORD_LEN} characters"));
    }
    if password.len() > MAX_PASSWORD_LEN {
        return Some(format!("must be at most {MAX_PASSWORD_LEN} bytes"));
    }
    let distinct: std::collections::HashSet<char> = password.chars().collect();
    if distinct.len() < 4 {
        return Some("must use at least 4 different characters".into());
    }
    let lower = password.to_lowercase();
    if COMMON_PASSWORDS.contains(&lower.as_str()) {
        return Some("is one of the most common passwords".into());
    }
    let email = email.trim().to_lowercase();
    let name = email.split('@').next().unwrap_or("");
    if lower == email || (name.len() >= 4 && lower == name) {
        return Some("must not be the email address".into());
    }
    None
}

pub fn check_password(password: &str, email: &str) -> Result<(), UserError> {
    check_password_field("password", password, email)
}

pub fn check_password_field(
    field: &'static str,
    password: &str,
    email: &str,
) -> Result<(), UserError> {
    match password_weakness(password, email) {
        Some(why) => Err(UserError::invalid(field, why)),
        None => Ok(()),
    }
}

/// A user to create; the password is already hashed.
pub struct NewUser {
    pub email: String,
    pub role: Role,
    pub stores: Vec<i64>,
    pub password_hash: String,
    pub disabled: bool,
    /// A manager creates the user: if they create them disabled, they (or
    /// another manager of their stores) may enable them (see
    /// [`manager_may_enable`]).
    pub by_manager: bool,
}

/// What to change; `None` leaves a field as it is.
#[derive(Default)]
pub struct UserPatch {
    pub email: Option<String>,
    pub role: Option<Role>,
    pub stores: Option<Vec<i64>>,
    pub disabled: Option<bool>,
    pub password_hash: Option<String>,
    /// `Some(None)` unlinks the user's outside identity.
    pub identity: Option<Option<Identity>>,
    /// A manager makes the change: a user they disable they may enable
    /// again; a user an admin disabled they may not (see
    /// [`manager_may_enable`]).
    pub by_manager: bool,
}

/// Whether a manager may enable user `id` again: a manager disabled them
/// (an admin's or the command line's disable is an admin's to undo).
pub async fn manager_may_enable(conn: &mut PgConnection, id: i64) -> Result<bool, sqlx::Error> {
    Ok(sqlx::query_scalar::<_, bool>(
        "SELECT manager_may_enable FROM auth.user_state WHERE user_id = $1",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?
    .unwrap_or(false))
}

impl Identity {
    /// Both parts present, without surrounding blanks or control
    /// characters, at most 1,000 characters each; the issuer `JWT_ISSUER`
    /// when that is set (no other issuer's token is accepted).
    pub fn new(issuer: &str, subject: &str, required: Option<&str>) -> Result<Self, UserError> {
        for (field, v) in [("issuer", issuer), ("subject", subject)] {
            if v.is_empty() {
                return Err(UserError::invalid(field, "must not be empty"));
            }
            if v.trim() != v {
                return Err(UserError::invalid(
                    field,
                    "must not start or end with blanks (tokens are matched exactly)",
                ));
            }
            if v.chars().count() > 1000 {
                return Err(UserError::invalid(field, "longer than 1000 characters"));
            }
            if v.chars().any(char::is_control) {
                return Err(UserError::invalid(
                    field,
                    "must not contain control characters",
                ));
            }
        }
        if let Some(required) = required.filter(|r| *r != issuer) {
            return Err(UserError::invalid(
                "issuer",
                format!("tokens are accepted only from JWT_ISSUER {required:?}"),
            ));
        }
        Ok(Self {
            issuer: issuer.to_string(),
            subject: subject.to_string(),
        })
    }
}

/// Serialises user changes (the last-admin rule reads every admin).
pub async fn lock(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('pg_sales.users'))")
        .execute(conn)
        .await?;
    Ok(())
}

/// Marks the rest of the transaction's user changes as the server's own:
/// they move the generation and write their event themselves, so the
/// trigger for changes made outside the server (migration 0014) leaves
/// them alone.
async fn managed(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT set_config('sales_server.users_managed', 'on', true)")
        .execute(conn)
        .await?;
    Ok(())
}

const SELECT_USER: &str =
    "SELECT u.id, u.email, u.role, u.store_ids, coalesce(s.disabled, false), \
     coalesce(s.generation, 0), u.created_at, u.updated_at, i.issuer, i.subject \
     FROM sales.users u LEFT JOIN auth.user_state s ON s.user_id = u.id \
     LEFT JOIN auth.identities i ON i.user_id = u.id";

type UserRow = (
    i64,
    String,
    String,
    Vec<i64>,
    bool,
    i64,
    DateTime<Utc>,
    DateTime<Utc>,
    Option<String>,
    Option<String>,
);

fn from_row(r: UserRow) -> User {
    let role = Role::parse(&r.2).unwrap_or(Role::Staff);
    User {
        id: r.0,
        email: r.1,
        role,
        stores: if role == Role::Admin { vec![] } else { r.3 },
        disabled: r.4,
        generation: r.5,
        created_at: r.6,
        updated_at: r.7,
        identity: match (r.8, r.9) {
            (Some(issuer), Some(subject)) => Some(Identity { issuer, subject }),
            _ => None,
        },
    }
}

pub async fn get<'e>(exec: impl PgExecutor<'e>, id: i64) -> Result<Option<User>, sqlx::Error> {
    let row: Option<UserRow> = sqlx::query_as(&format!("{SELECT_USER} WHERE u.id = $1"))
        .bind(id)
        .fetch_optional(exec)
        .await?;
    Ok(row.map(from_row))
}

/// The id of the user an email names, with `$1` the address composed
/// ([`normal_email`]) and `$2` as typed: the composed address, or one
/// stored decomposed before that is typed exactly so (see
/// [`normal_email`]).
pub const USER_BY_EMAIL: &str = "SELECT id FROM sales.users \
     WHERE lower(email) IN (lower($1), lower($2)) \
     ORDER BY lower(email) = lower($2) DESC LIMIT 1";

pub async fn get_by_email<'e>(
    exec: impl PgExecutor<'e>,
    email: &str,
) -> Result<Option<User>, sqlx::Error> {
    let row: Option<UserRow> =
        sqlx::query_as(&format!("{SELECT_USER} WHERE u.id = ({USER_BY_EMAIL})"))
            .bind(normal_email(email))
            .bind(email.trim())
            .fetch_optional(exec)
            .await?;
    Ok(row.map(from_row))
}

/// Users by id; `staff_of` keeps only staff with a store among those.
pub async fn list<'e>(
    exec: impl PgExecutor<'e>,
    staff_of: Option<&[i64]>,
    limit: i64,
    offset: i64,
) -> Result<Vec<User>, sqlx::Error> {
    let rows: Vec<UserRow> = sqlx::query_as(&format!(
        "{SELECT_USER} WHERE $1::bigint[] IS NULL OR (u.role = 'staff' AND u.store_ids && $1)
         ORDER BY u.id LIMIT $2 OFFSET $3"
    ))
    .bind(staff_of)
    .bind(limit)
    .bind(offset)
    .fetch_all(exec)
    .await?;
    Ok(rows.into_iter().map(from_row).collect())
}

/// The stores of a non-admin: at least one, each existing.
async fn check_stores(
    conn: &mut PgConnection,
    role: Role,
    stores: &[i64],
) -> Result<Vec<i64>, UserError> {
    if role == Role::Admin {
        return Ok(vec![]);
    }
    let mut stores = stores.to_vec();
    stores.sort_unstable();
    stores.dedup();
    if stores.is_empty() {
        return Err(no_store(role));
    }
    let missing: Vec<i64> = sqlx::query_scalar(
        "SELECT s FROM unnest($1::bigint[]) s WHERE NOT EXISTS (SELECT 1 FROM sales.stores WHERE id = s) ORDER BY s",
    )
    .bind(&stores)
    .fetch_all(&mut *conn)
    .await?;
    if !missing.is_empty() {
        return Err(UserError::UnknownStores(missing));
    }
    Ok(stores)
}

/// A unique violation of the email index is a taken address; any other
/// (an id sequence behind rows inserted by hand, say) is not the caller's
/// doing and stays a database error.
fn duplicate(e: sqlx::Error, email: &str) -> UserError {
    let taken = e.as_database_error().is_some_and(|d| {
        d.code().as_deref() == Some("23505") && d.constraint() == Some("users_email_key")
    });
    if taken {
        UserError::Duplicate(email.to_string())
    } else {
        UserError::Db(e)
    }
}

/// Enabled admins left.
async fn admins_left(conn: &mut PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM sales.users u LEFT JOIN auth.user_state s ON s.user_id = u.id
         WHERE u.role = 'admin' AND NOT coalesce(s.disabled, false)",
    )
    .fetch_one(conn)
    .await
}

/// The event a change writes (`sales.emit`, admin channel) in the
/// transaction that makes it.
/// The event also goes into the user's history (`auth.user_events`) unless
/// the user is being deleted.
pub(crate) async fn emit(
    conn: &mut PgConnection,
    kind: &str,
    payload: serde_json::Value,
) -> Result<(), sqlx::Error> {
    let user = payload.get("userId").and_then(serde_json::Value::as_i64);
    let id: i64 = sqlx::query_scalar("SELECT sales.emit($1, $2)")
        .bind(kind)
        .bind(payload)
        .fetch_one(&mut *conn)
        .await?;
    if let Some(user) = user.filter(|_| kind != "user-deleted") {
        sqlx::query("INSERT INTO auth.user_events (user_id, event_id) VALUES ($1, $2)")
            .bind(user)
            .bind(id)
            .execute(conn)
            .await?;
    }
    Ok(())
}

/// A user's history, newest first: the events about them still retained
/// in `sales.events`, with who made each change (`actorId`).
pub async fn history<'e>(
    exec: impl PgExecutor<'e>,
    user: i64,
    limit: i64,
) -> Result<Vec<serde_json::Value>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT jsonb_build_object('id', e.id, 'event', e.kind, 'actorId', e.actor_id,
                                   'data', e.payload, 'ts', e.created_at)
         FROM auth.user_events h JOIN sales.events e ON e.id = h.event_id
         WHERE h.user_id = $1 ORDER BY h.event_id DESC LIMIT $2",
    )
    .bind(user)
    .bind(limit)
    .fetch_all(exec)
    .await
}

fn doc(u: &User) -> serde_json::Value {
    serde_json::json!({
        "userId": u.id, "email": u.email, "role": u.role.as_str(), "stores": u.stores,
        "disabled": u.disabled, "generation": u.generation,
        "identity": u.identity.as_ref().map(|i| serde_json::json!({
            "issuer": i.issuer, "subject": i.subject,
        })),
    })
}

/// Creates a user in the caller's transaction (which must hold [`lock`]);
/// writes `user-created`.
pub async fn create(conn: &mut PgConnection, new: NewUser) -> Result<(User, Change), UserError> {
    let email = check_email(&new.email)?;
    let stores = check_stores(conn, new.role, &new.stores).await?;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO sales.users (email, password_hash, role, store_ids) VALUES ($1, $2, $3, $4) RETURNING id",
    )
    .bind(&email)
    .bind(&new.password_hash)
    .bind(new.role.as_str())
    .bind(&stores)
    .fetch_one(&mut *conn)
    .await
    .map_err(|e| duplicate(e, &email))?;
    sqlx::query(
        "INSERT INTO auth.user_state (user_id, disabled, manager_may_enable) VALUES ($1, $2, $3)",
    )
    .bind(id)
    .bind(new.disabled)
    .bind(new.disabled && new.by_manager)
    .execute(&mut *conn)
    .await?;
    let user = get(&mut *conn, id).await?.ok_or(UserError::NotFound(id))?;
    let mut payload = doc(&user);
    payload["revoke"] = "access".into();
    emit(conn, "user-created", payload).await?;
    let change = change_of(&user, Revoked::AccessChanged);
    Ok((user, change))
}

fn change_of(u: &User, why: Revoked) -> Change {
    Change::User {
        id: u.id,
        email: u.email.to_lowercase(),
        generation: u.generation,
        disabled: u.disabled,
        why,
        identity: Some(u.identity.clone()),
    }
}

/// Changes a user in the caller's transaction (which must hold [`lock`]):
/// moves the generation (revoking the user's access tokens) and writes
/// `user-updated`, unless nothing changes. Refuses to leave no enabled admin.
pub async fn update(
    conn: &mut PgConnection,
    id: i64,
    patch: UserPatch,
) -> Result<(User, Option<Change>), UserError> {
    let old = get(&mut *conn, id).await?.ok_or(UserError::NotFound(id))?;
    let email = match &patch.email {
        Some(e) => check_email(e)?,
        None => old.email.clone(),
    };
    let role = patch.role.unwrap_or(old.role);
    let stores = match (&patch.stores, patch.role) {
        (Some(s), _) => check_stores(conn, role, s).await?,
        // A role change keeps the stores (an admin becoming a manager must be given some).
        (None, Some(_)) => check_stores(conn, role, &old.stores).await?,
        (None, None) => old.stores.clone(),
    };
    let disabled = patch.disabled.unwrap_or(old.disabled);
    let mut changed = Vec::new();
    if email != old.email {
        changed.push("email");
    }
    if role != old.role {
        changed.push("role");
    }
    if stores != old.stores {
        changed.push("stores");
    }
    if disabled != old.disabled {
        changed.push("disabled");
    }
    if patch.password_hash.is_some() {
        changed.push("password");
    }
    let identity = patch
        .identity
        .clone()
        .unwrap_or_else(|| old.identity.clone());
    if identity != old.identity {
        changed.push("identity");
    }
    // Who may enable the user again is decided when they are disabled: a
    // manager's disable is a manager's to undo, an admin's an admin's; an
    // admin disabling a user a manager had disabled makes it theirs.
    let was_managers = old.disabled && manager_may_enable(conn, id).await?;
    let managers = match (old.disabled, disabled) {
        (_, false) => false,
        (false, true) => patch.by_manager,
        // An admin's explicit disable takes it over; anything else keeps it.
        (true, true) => was_managers && (patch.by_manager || patch.disabled != Some(true)),
    };
    if changed.is_empty() {
        if managers != was_managers {
            // The user's access does not change: nothing is revoked and no
            // event is written.
            sqlx::query(
                "UPDATE auth.user_state SET manager_may_enable = $2, updated_at = now()
                 WHERE user_id = $1",
            )
            .bind(id)
            .bind(managers)
            .execute(&mut *conn)
            .await?;
        }
        return Ok((old, None));
    }
    managed(conn).await?;
    sqlx::query(
        "UPDATE sales.users SET email = $2, role = $3, store_ids = $4,
                password_hash = coalesce($5, password_hash), updated_at = now()
         WHERE id = $1",
    )
    .bind(id)
    .bind(&email)
    .bind(role.as_str())
    .bind(&stores)
    .bind(&patch.password_hash)
    .execute(&mut *conn)
    .await
    .map_err(|e| duplicate(e, &email))?;
    sqlx::query(
        "INSERT INTO auth.user_state (user_id, generation, disabled, manager_may_enable)
         VALUES ($1, 1, $2, $3)
         ON CONFLICT (user_id) DO UPDATE
             SET generation = auth.user_state.generation + 1, disabled = EXCLUDED.disabled,
                 manager_may_enable = EXCLUDED.manager_may_enable, updated_at = now()",
    )
    .bind(id)
    .bind(disabled)
    .bind(managers)
    .execute(&mut *conn)
    .await?;
    if identity != old.identity {
        link(conn, id, identity.as_ref()).await?;
    }
    if old.role == Role::Admin
        && !old.disabled
        && (role != Role::Admin || disabled)
        && admins_left(conn).await? == 0
    {
        return Err(UserError::LastAdmin(format!(
            "user {id} is the last enabled admin; make another admin first"
        )));
    }
    if patch.password_hash.is_some() || (disabled && !old.disabled) {
        // Every session of the user ends with a password change or when the
        // user is disabled (enabling them again does not bring one back).
        sqlx::query(
            "UPDATE auth.sessions SET revoked_at = now(), revoked_reason = $2
             WHERE user_id = $1 AND revoked_at IS NULL",
        )
        .bind(id)
        .bind(if patch.password_hash.is_some() {
            "password"
        } else {
            "admin"
        })
        .execute(&mut *conn)
        .await?;
    }
    let user = get(&mut *conn, id).await?.ok_or(UserError::NotFound(id))?;
    let why = if disabled {
        Revoked::Disabled
    } else if changed.contains(&"password") {
        Revoked::PasswordChanged
    } else if changed.contains(&"disabled") {
        // Enabled again: the disable ended every session, so a token from
        // before it cannot be refreshed; its holder logs in again.
        Revoked::SessionEnded
    } else {
        Revoked::AccessChanged
    };
    let mut payload = doc(&user);
    payload["changed"] = serde_json::json!(changed);
    payload["revoke"] = match why {
        Revoked::Disabled => "disabled",
        Revoked::PasswordChanged => "password",
        Revoked::SessionEnded => "session",
        _ => "access",
    }
    .into();
    emit(conn, "user-updated", payload).await?;
    Ok((user.clone(), Some(change_of(&user, why))))
}

/// Sets (or with `None` removes) the outside identity of user `id`; an
/// identity linked to another user is refused, naming that user.
async fn link(
    conn: &mut PgConnection,
    id: i64,
    identity: Option<&Identity>,
) -> Result<(), UserError> {
    sqlx::query("DELETE FROM auth.identities WHERE user_id = $1")
        .bind(id)
        .execute(&mut *conn)
        .await?;
    let Some(i) = identity else {
        return Ok(());
    };
    let inserted = sqlx::query(
        "INSERT INTO auth.identities (user_id, issuer, subject) VALUES ($1, $2, $3)
         ON CONFLICT (issuer, subject) DO NOTHING",
    )
    .bind(id)
    .bind(&i.issuer)
    .bind(&i.subject)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if inserted == 0 {
        let other: i64 = sqlx::query_scalar(
            "SELECT user_id FROM auth.identities WHERE issuer = $1 AND subject = $2",
        )
        .bind(&i.issuer)
        .bind(&i.subject)
        .fetch_one(&mut *conn)
        .await?;
        return Err(UserError::IdentityTaken(other));
    }
    Ok(())
}

/// Deletes a user in the caller's transaction (which must hold [`lock`]):
/// their sessions and state go with them (foreign keys), a tombstone
/// keeps their tokens refused, `user-deleted` is written.
pub async fn delete(
    conn: &mut PgConnection,
    id: i64,
    token_lifetime: i64,
) -> Result<(User, Change), UserError> {
    let old = get(&mut *conn, id).await?.ok_or(UserError::NotFound(id))?;
    managed(conn).await?;
    sqlx::query("DELETE FROM sales.users WHERE id = $1")
        .bind(id)
        .execute(&mut *conn)
        .await?;
    if old.role == Role::Admin && !old.disabled && admins_left(conn).await? == 0 {
        return Err(UserError::LastAdmin(format!(
            "user {id} is the last enabled admin; make another admin first"
        )));
    }
    sqlx::query(
        "INSERT INTO auth.deleted_users (user_id) VALUES ($1)
         ON CONFLICT (user_id) DO UPDATE SET deleted_at = now()",
    )
    .bind(id)
    .execute(&mut *conn)
    .await?;
    emit(
        conn,
        "user-deleted",
        serde_json::json!({"userId": id, "email": old.email, "role": old.role.as_str()}),
    )
    .await?;
    let until = Utc::now().timestamp() + crate::access::tombstone_keep(token_lifetime);
    Ok((old, Change::Deleted { id, until }))
}

/// The password for `user add`: the flag, else a prompt on a terminal, else one line of stdin.
pub fn read_password(flag: Option<String>) -> anyhow::Result<String> {
    use std::io::IsTerminal;
    if let Some(p) = flag {
        return Ok(p);
    }
    if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("Password: ")?;
        let second = rpassword::prompt_password("Repeat password: ")?;
        if first != second {
            bail!("passwords do not match");
        }
        Ok(first)
    } else {
        read_password_line(std::io::stdin().lock(), stdin_ready)
    }
}

/// The password line of `input` (a line ending, CR LF or LF, may follow
/// it, and blank lines after it), read no further than a password can be
/// long: a longer line, or more lines (a file piped in by mistake, whose
/// first line would become the password), is refused. What follows the
/// line is what the reader already holds and, when `ready` says more input
/// waits, one read of at most 4 kB: a pipe left open after the line (a
/// password typed over `ssh host sales-server ...`, a program that writes
/// the line and waits) is not waited on.
fn read_password_line(
    input: impl std::io::Read,
    ready: impl Fn() -> bool,
) -> anyhow::Result<String> {
    use std::io::{BufRead, Read};
    // What may follow the line and still be taken for its end: blank lines.
    const TAIL: usize = 4096;
    let mut reader = std::io::BufReader::new(input.take((MAX_PASSWORD_LEN + 2 + TAIL) as u64));
    let mut line = Vec::new();
    (&mut reader)
        .take(MAX_PASSWORD_LEN as u64 + 2)
        .read_until(b'\n', &mut line)?;
    let ended = line.last() == Some(&b'\n');
    if ended {
        line.pop();
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    if line.len() > MAX_PASSWORD_LEN {
        bail!("password: must be at most {MAX_PASSWORD_LEN} bytes");
    }
    let mut rest = reader.buffer().to_vec();
    if ended && rest.is_empty() && ready() {
        let mut more = vec![0; TAIL];
        let n = reader.read(&mut more)?;
        rest.extend_from_slice(&more[..n]);
    }
    if !rest.iter().all(|b| b.is_ascii_whitespace()) || rest.len() >= TAIL {
        bail!(
            "password: standard input holds more than one line (a file piped in by mistake?); \
             give the password alone on one line"
        );
    }
    String::from_utf8(line).map_err(|_| anyhow::anyhow!("password: must be UTF-8 text"))
}

/// Whether standard input has something to read now (data or its end),
/// without waiting.
fn stdin_ready() -> bool {
    let mut fd = libc::pollfd {
        fd: 0,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, a zero timeout.
    unsafe { libc::poll(&mut fd, 1, 0) > 0 }
}

/// The command line's role and stores, as far as they can be checked
/// without the database (whether the stores exist is checked in it): a
/// command refuses them before it connects or migrates.
pub fn check_cli_role(role: &str, stores: &[i64]) -> anyhow::Result<()> {
    let role = cli_role(role)?;
    if role != Role::Admin && stores.is_empty() {
        return Err(cli_error(no_store(role)));
    }
    Ok(())
}

/// The stores of `user add` that do not exist, refused before a password is
/// asked for at a terminal prompt.
pub async fn check_cli_stores(pool: &PgPool, role: &str, stores: &[i64]) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await?;
    check_stores(&mut conn, cli_role(role)?, stores)
        .await
        .map(|_| ())
        .map_err(cli_error)
}

/// `--role` read.
fn cli_role(role: &str) -> anyhow::Result<Role> {
    Role::parse(role).ok_or_else(|| {
        anyhow::anyhow!("--role: must be one of admin, manager, staff (got {role:?})")
    })
}

/// A manager or staff given no store.
fn no_store(role: Role) -> UserError {
    UserError::invalid(
        "stores",
        format!("a {} needs at least one store", role.as_str()),
    )
}

/// Checks a command's `--email` before it asks for a password or touches
/// the database: the address as it is stored (trimmed, in its one form).
pub fn check_cli_email(email: &str) -> anyhow::Result<String> {
    check_email(email).map_err(cli_error)
}

/// How a command that only names an existing user (`disable`, `enable`,
/// `link`, `unlink`) looks it up and shows it: the stored form when the address
/// passes today's rules, else as given (trimmed), so that a user stored
/// before a rule was added can still be named.
pub fn stored_email(email: &str) -> String {
    check_email(email).unwrap_or_else(|_| email.trim().to_string())
}

/// Checks the password a `user add` or `user set-password` command was
/// given for the (checked) `email`, before it touches the database.
pub fn check_cli_password(email: &str, password: &str) -> anyhow::Result<()> {
    check_password(password, email).map_err(cli_error)
}

/// Checks `user link`'s issuer and subject before it touches the database
/// (whether the issuer is the one `JWT_ISSUER` requires included).
pub fn check_cli_identity(
    issuer: &str,
    subject: &str,
    required_issuer: Option<&str>,
) -> anyhow::Result<()> {
    Identity::new(issuer, subject, required_issuer)
        .map(drop)
        .map_err(cli_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_piped_password_is_read_up_to_its_bound() {
        let read = |s: &[u8]| read_password_line(s, || true).map_err(|e| e.to_string());
        assert_eq!(read(b"secret-one\n").unwrap(), "secret-one");
        assert_eq!(read(b"secret-one\r\n\r\n\n").unwrap(), "secret-one");
        // A file's first line is not taken for a password.
        for file in [
            &b"# pg_sales\nsecond line\n"[..],
            b"secret-one\r\nmore",
            b"a\n\n  x",
        ] {
            let err = read(file).unwrap_err();
            assert!(err.contains("more than one line"), "{err}");
        }
        assert_eq!(read(b"no-newline").unwrap(), "no-newline");
        let longest = "p".repeat(MAX_PASSWORD_LEN);
        assert_eq!(read(format!("{longest}\r\n").as_bytes()).unwrap(), longest);
        assert_eq!(read(longest.as_bytes()).unwrap(), longest);
        let err = read(format!("{longest}x\n").as_bytes()).unwrap_err();
        assert!(err.starts_with("password: must be at most"), "{err}");
        // A long input is not read past the bound.
        let mut big = std::io::Cursor::new(vec![b'a'; 10 << 20]);
        assert!(read_password_line(&mut big, || true).is_err());
        assert!(big.position() <= MAX_PASSWORD_LEN as u64 + 2 + 4096);
        assert!(read(b"\xff\xfe\n").unwrap_err().contains("UTF-8"));
    }

    #[test]
    fn identities_are_checked() {
        let field = |r: Result<Identity, UserError>| match r {
            Err(UserError::Invalid { field, reason }) => format!("{field}: {reason}"),
            other => format!("{other:?}"),
        };
        assert!(Identity::new("https://idp", "u-1", None).is_ok());
        assert!(Identity::new("https://idp", "u-1", Some("https://idp")).is_ok());
        assert_eq!(
            field(Identity::new("https://other", "u-1", Some("https://idp"))),
            "issuer: tokens are accepted only from JWT_ISSUER \"https://idp\""
        );
        assert_eq!(
            field(Identity::new("https://idp", "", None)),
            "subject: must not be empty"
        );
        assert!(field(Identity::new("https://idp", "a\tb", None))
            .starts_with("subject: must not contain control"));
        assert!(field(Identity::new(" https://idp", "u", None))
            .starts_with("issuer: must not start or end"));
        assert!(
            field(Identity::new(&"i".repeat(1001), "u", None)).starts_with("issuer: longer than")
        );
    }

    #[test]
    fn hash_round_trip() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2"));
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("wrong horse", &h));
        assert!(!verify_password("x", "not a hash"));
    }

    /// A password is the same password however its accents are composed;
    /// a hash made from a password as it came (before normalising) still
    /// takes it as it came.
    #[test]
    fn passwords_are_compared_in_normal_form_c() {
        let (composed, decomposed) = ("Caf\u{e9}-2024!", "Cafe\u{301}-2024!");
        let h = hash_password(composed).unwrap();
        assert!(verify_password(decomposed, &h));
        assert!(verify_password(composed, &h));
        let h = hash_password(decomposed).unwrap();
        assert!(verify_password(composed, &h));
        let raw = Argon2::default()
            .hash_password(decomposed.as_bytes(), &SaltString::generate(&mut OsRng))
            .unwrap()
            .to_string();
        assert!(verify_password(decomposed, &raw));
        assert!(!verify_password("Cafe-2024!", &raw));
        // Combining marks do not make up the length.
        assert!(
            password_weakness("e\u{301}e\u{301}e\u{301}e\u{301}", "a@b.io")
                .unwrap()
                .contains("at least 8")
        );
    }

    #[test]
    fn weak_passwords_say_why() {
        let w = |p: &str| password_weakness(p, "jane.doe@example.com");
        assert!(w("short1").unwrap().contains("at least 8"));
        assert!(w("aaaaaaaaaaaa").unwrap().contains("different"));
        assert!(w("Password123").unwrap().contains("common"));
        assert!(w("jane.doe@example.com").unwrap().contains("email"));
        assert!(w(&"ab1!".repeat(300)).unwrap().contains("at most"));
        assert_eq!(w("password-123"), None);
        assert_eq!(w("correct horse battery"), None);
    }

    #[test]
    fn emails() {
        assert_eq!(check_email(" a@b.io ").unwrap(), "a@b.io");
        for bad in ["", "a", "@b", "a@", "a@b@c", "a b@c.io", "a@b\n.io"] {
            assert!(check_email(bad).is_err(), "{bad}");
        }
    }

    /// The reason an address is refused, as the API and the command line say it.
    fn email_refusal(email: &str) -> String {
        match check_email(email) {
            Err(UserError::Invalid { field, reason }) => format!("{field}: {reason}"),
            other => panic!("{email:?} was not refused: {other:?}"),
        }
    }

    #[test]
    fn addresses_of_every_kind_are_accepted() {
        for good in [
            "a@b",
            "a@b.io",
            "first.last+tag@mail.example.co.uk",
            "o'brien@x.test",
            "a_b-c!#$%&*/=?^`{|}~@x-y.test",
            "j\u{fc}rgen@x.test",
            "zo\u{eb}@b\u{fc}cher.de",
            "\u{7528}\u{6237}@\u{4f8b}\u{5b50}.\u{5e7f}\u{544a}",
            "\u{43f}\u{440}\u{438}\u{43c}\u{435}\u{440}@\u{43f}\u{440}\u{438}\u{43c}\u{435}\u{440}.\u{440}\u{444}",
        ] {
            assert_eq!(check_email(good).ok().as_deref(), Some(good), "{good}");
        }
        // Stored composed, its case kept.
        assert_eq!(
            check_email("Ju\u{308}rgen@X.test").unwrap(),
            "J\u{fc}rgen@X.test"
        );
    }

    #[test]
    fn a_refused_address_says_what_is_wrong() {
        for (bad, why) in [
            ("not-an-email", "it has no @"),
            ("@x.test", "nothing before the @"),
            ("a@", "nothing after the @"),
            ("a@b@x.test", "more than one @"),
            ("\"a@b\"@x.test", "quoted local parts are not supported"),
            (
                "admin\u{200b}@x.test",
                "\\u{200b}, a blank, control or invisible",
            ),
            // The domain: labels separated by dots, none empty.
            ("dot@..", "the domain starts or ends with a dot"),
            ("a@.x.test", "the domain starts or ends with a dot"),
            ("a@x.test.", "the domain starts or ends with a dot"),
            ("a@x..test", "two dots in a row"),
            ("a@<x>.test", "the domain holds '<'"),
            (
                "a@[192.0.2.1]",
                "address literals such as [192.0.2.1] are not supported",
            ),
            // The local part: dot-separated parts, none empty.
            (
                ".a@x.test",
                "the part before the @ starts or ends with a dot",
            ),
            (
                "a.@x.test",
                "the part before the @ starts or ends with a dot",
            ),
            (
                "a..b@x.test",
                "the part before the @ starts or ends with a dot, or has two dots",
            ),
        ] {
            let said = email_refusal(bad);
            assert!(said.starts_with("email: "), "{bad:?}: {said}");
            assert!(said.contains(why), "{bad:?}: {said}");
        }
        // Every character allowed only in a quoted local part.
        for c in ['(', ')', '<', '>', '[', ']', ',', ';', ':', '\\', '"'] {
            let bad = format!("a{c}b@x.test");
            let said = email_refusal(&bad);
            assert!(
                said.contains(&format!("the part before the @ holds {c:?}"))
                    && said.contains("quoted local part")
                    && said.contains("not supported"),
                "{bad:?}: {said}"
            );
        }
        assert!(email_refusal("a,b@probe2.local").contains("','"));
        assert!(email_refusal("<script>@probe2.local").contains("'<'"));
    }
}
