//! Users: argon2 password hashes, roles and store scope.

use anyhow::{bail, Context};
use argon2::password_hash::{
    rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::Argon2;
use sqlx::PgPool;

pub const ROLES: &[&str] = &["admin", "manager", "staff"];
pub const MIN_PASSWORD_LEN: usize = 8;

pub fn hash_password(password: &str) -> anyhow::Result<String> {
    let salt = SaltString::generate(&mut OsRng);
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("hashing failed: {e}"))?
        .to_string())
}

pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// Creates the user or, when the email exists, updates role, stores and password.
/// Returns (id, created).
pub async fn upsert_user(
    pool: &PgPool,
    email: &str,
    role: &str,
    stores: &[i64],
    password: &str,
) -> anyhow::Result<(i64, bool)> {
    let email = email.trim();
    if !email.contains('@')
        || email.starts_with('@')
        || email.ends_with('@')
        || email.contains(char::is_whitespace)
    {
        bail!("--email: {email:?} is not an email address");
    }
    if !ROLES.contains(&role) {
        bail!("--role: must be one of admin, manager, staff (got {role:?})");
    }
    if password.chars().count() < MIN_PASSWORD_LEN {
        bail!("password: must be at least {MIN_PASSWORD_LEN} characters");
    }
    let stores: Vec<i64> = if role == "admin" {
        vec![]
    } else {
        stores.to_vec()
    };
    if role != "admin" && stores.is_empty() {
        bail!("--store: a {role} needs at least one store");
    }
    if !stores.is_empty() {
        let missing: Vec<i64> = sqlx::query_scalar(
            "SELECT s FROM unnest($1::bigint[]) s WHERE NOT EXISTS (SELECT 1 FROM sales.stores WHERE id = s)",
        )
        .bind(&stores)
        .fetch_all(pool)
        .await?;
        if !missing.is_empty() {
            bail!("--store: no store with id {missing:?}");
        }
    }
    let hash = hash_password(password)?;
    let row: (i64, bool) = sqlx::query_as(
        "INSERT INTO sales.users (email, password_hash, role, store_ids) VALUES ($1, $2, $3, $4)
         ON CONFLICT ((lower(email))) DO UPDATE
             SET password_hash = EXCLUDED.password_hash, role = EXCLUDED.role,
                 store_ids = EXCLUDED.store_ids, updated_at = now()
         RETURNING id, (xmax = 0)",
    )
    .bind(email)
    .bind(&hash)
    .bind(role)
    .bind(&stores)
    .fetch_one(pool)
    .await
    .context("saving the user")?;
    Ok(row)
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
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_round_trip() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2"));
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("wrong horse", &h));
        assert!(!verify_password("x", "not a hash"));
    }
}
