//! JWT: issuing (HS256 with JWT_SECRET) and verifying (HS256, or RS256 /
//! ES256 with the PEM key in JWT_PUBLIC_KEY_FILE for tokens from an outside
//! identity provider). The verified claims become a [`Principal`] that every
//! query is scoped by; HTTP and WebSocket share this code.

use crate::access::Revocations;
use crate::config::Config;
use crate::jwks::{self, Jwks};
use anyhow::Context;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Manager,
    Staff,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Manager => "manager",
            Role::Staff => "staff",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "admin" => Some(Role::Admin),
            "manager" => Some(Role::Manager),
            "staff" => Some(Role::Staff),
            _ => None,
        }
    }
}

/// What a token carries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user id. `sub` and `exp` are required by the validation (see
    /// `Auth::validation`), which reports a missing one by name; a default
    /// here lets the claims parse far enough for it to. So decode claims
    /// only through `Auth::verify*`: parsed any other way, a token without
    /// them would read as `sub = ""`, `exp = 0`.
    #[serde(default)]
    pub sub: String,
    #[serde(default)]
    pub email: Option<String>,
    pub role: Role,
    /// Stores a non-admin may see.
    #[serde(default)]
    pub stores: Vec<i64>,
    #[serde(default)]
    pub exp: i64,
    #[serde(default)]
    pub iat: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    /// The user's access generation when the token was issued (see `access`).
    #[serde(default)]
    pub gen: i64,
    /// The session (refresh-token family) the token belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
}

/// The caller, as established by a verified token.
#[derive(Debug, Clone)]
pub struct Principal {
    pub user_id: i64,
    pub email: Option<String>,
    pub role: Role,
    /// Empty for admins (who see everything).
    pub stores: HashSet<i64>,
    /// When the token stops being valid (seconds since the epoch), when it says.
    pub exp: Option<i64>,
    /// The user's access generation the token was issued at (0 when it says none).
    pub generation: i64,
    /// The session the token belongs to, when it was issued for one.
    pub session: Option<String>,
    /// Issued by an outside identity provider (no generation, no session):
    /// only the account (deleted, disabled) and its link are checked for
    /// revocation.
    pub outside: bool,
    /// An outside token's identity, through which it stands for
    /// `user_id`: once that link is gone, so is its access.
    pub identity: Option<Arc<crate::access::Identity>>,
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// Whether this caller may read or write sales of `store`.
    pub fn can_access_store(&self, store: i64) -> bool {
        self.is_admin() || self.stores.contains(&store)
    }

    /// Managers and admins export; staff do not.
    pub fn can_export(&self) -> bool {
        matches!(self.role, Role::Admin | Role::Manager)
    }

    /// Managers (for their stores) and admins change store status.
    pub fn can_manage_store(&self, store: i64) -> bool {
        self.is_admin() || (self.role == Role::Manager && self.stores.contains(&store))
    }

    /// `None` means unrestricted; otherwise the sorted store ids.
    pub fn scope(&self) -> Option<Vec<i64>> {
        if self.is_admin() {
            None
        } else {
            let mut v: Vec<i64> = self.stores.iter().copied().collect();
            v.sort_unstable();
            Some(v)
        }
    }

    /// A stable string for cache keys: two callers with different scopes never share one.
    pub fn scope_key(&self) -> String {
        match self.scope() {
            None => "all".into(),
            Some(v) => format!(
                "{}:{}",
                self.role.as_str(),
                v.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
            ),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// `outside`: the token came from an identity provider (which alone
    /// gives a new one), not from this server's login.
    #[error("token expired")]
    Expired { outside: bool },
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("token revoked: {}", .0.message())]
    Revoked(crate::access::Revoked),
}

impl AuthError {
    /// What a client is told (the REST 401 and the WebSocket upgrade's):
    /// for an expired token, how to get another one.
    pub fn client_message(&self) -> String {
        match self {
            // The session's refresh token may well outlive its access
            // tokens: a refresh is the first thing to try.
            AuthError::Expired { outside: false } => {
                "token expired; refresh it (POST /api/v2/auth/refresh) or log in again".into()
            }
            // Refresh tokens are of this server's sessions only.
            AuthError::Expired { outside: true } => {
                "token expired; get a new one from the identity provider that issued it".into()
            }
            AuthError::Invalid(why) => format!("invalid token: {why}"),
            AuthError::Revoked(why) => format!("token revoked: {}", why.message()),
        }
    }
}

/// Whether a token's protected header has a `crit` member (which
/// jsonwebtoken's `Header` does not read). The header was decoded once
/// already; a header that does not decode here is judged by that.
fn names_critical_extensions(token: &str) -> bool {
    use base64::Engine;
    let Some(first) = token.split('.').next() else {
        return false;
    };
    let Ok(bytes) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(first) else {
        return false;
    };
    serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&bytes)
        .is_ok_and(|h| h.contains_key("crit"))
}

/// What a client is told of a token the library refused: the kind of
/// fault, not the parser's own text (which named its offsets, the serde
/// type it expected and every algorithm it knows).
fn token_error(e: &jsonwebtoken::errors::Error, outside: bool) -> AuthError {
    use jsonwebtoken::errors::ErrorKind as K;
    let why = match e.kind() {
        K::ExpiredSignature => return AuthError::Expired { outside },
        K::ImmatureSignature => "not valid yet (nbf)".to_string(),
        K::InvalidSignature => "bad signature".to_string(),
        K::InvalidIssuer => "wrong issuer".to_string(),
        K::InvalidAudience => "wrong audience".to_string(),
        K::MissingRequiredClaim(c) => format!("missing claim {c}"),
        K::InvalidAlgorithm | K::InvalidAlgorithmName => "algorithm not accepted".to_string(),
        K::Json(_) => "claims or header not as expected".to_string(),
        _ => "malformed".to_string(),
    };
    AuthError::Invalid(why)
}

/// Clock skew allowed when checking `exp`.
pub const LEEWAY_SECS: u64 = 5;

/// The longest `JWT_EXPIRY` allows (30 days): no access token issued by
/// any instance lives longer.
pub const LONGEST_TOKEN_SECS: i64 = 86_400 * 30;

pub struct Auth {
    encoding: EncodingKey,
    hs_decoding: Arc<DecodingKey>,
    /// (algorithm, key) for tokens from an outside identity provider.
    external: Option<(Algorithm, Arc<DecodingKey>)>,
    /// The provider's key set, for tokens that name their key (`kid`).
    jwks: Option<Arc<Jwks>>,
    issuer: Option<String>,
    audience: Option<String>,
    expiry_secs: i64,
    /// Users, sessions and their revocation, checked on every verify.
    revocations: Arc<Revocations>,
    /// Tokens issued here that verified, by the SHA-256 of the token (raw
    /// tokens are not kept in memory): a request with one of them skips the
    /// signature and the claims' parsing, never the expiry and revocation
    /// checks.
    verified: moka::sync::Cache<TokenDigest, Arc<Principal>>,
}

/// The SHA-256 of a bearer token.
pub type TokenDigest = [u8; 32];

/// Verified tokens remembered per instance (a few hundred bytes each).
const VERIFIED_TOKENS: u64 = 10_000;
/// How long a verified token is remembered without being used.
const VERIFIED_IDLE: std::time::Duration = std::time::Duration::from_secs(300);

impl Auth {
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        let secret = config.require_jwt_secret()?;
        let external = match &config.jwt_public_key_file {
            None => None,
            Some(path) => {
                let pem = std::fs::read(path)
                    .with_context(|| format!("JWT_PUBLIC_KEY_FILE: reading {path}"))?;
                if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
                    Some((Algorithm::RS256, Arc::new(k)))
                } else if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
                    Some((Algorithm::ES256, Arc::new(k)))
                } else {
                    anyhow::bail!(
                        "JWT_PUBLIC_KEY_FILE: {path} is not an RSA or EC public key in PEM form"
                    );
                }
            }
        };
        let jwks = match (&config.jwt_jwks_url, &config.jwt_jwks_file) {
            (Some(url), _) => Some(jwks::Source::Url(url.clone())),
            (None, Some(path)) => Some(jwks::Source::File(path.clone())),
            (None, None) => None,
        }
        .map(|source| Arc::new(Jwks::new(source, config.jwt_jwks_refresh)));
        if external.is_some() && jwks.is_some() && config.jwt_issuer.is_none() {
            // Either key's holder could then sign any `iss`, and the issuer
            // half of a linked identity would tell the two apart no more.
            tracing::warn!(
                "JWT_PUBLIC_KEY_FILE and a JWKS are both set without JWT_ISSUER: \
                 either key's tokens may name any issuer"
            );
        }
        Ok(Self {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            hs_decoding: Arc::new(DecodingKey::from_secret(secret.as_bytes())),
            external,
            jwks,
            issuer: config.jwt_issuer.clone(),
            audience: config.jwt_audience.clone(),
            expiry_secs: config.jwt_expiry.as_secs() as i64,
            revocations: Arc::new(Revocations::default()),
            verified: moka::sync::Cache::builder()
                .max_capacity(VERIFIED_TOKENS)
                .time_to_idle(VERIFIED_IDLE)
                .build(),
        })
    }

    pub fn expiry_secs(&self) -> i64 {
        self.expiry_secs
    }

    pub fn revocations(&self) -> &Arc<Revocations> {
        &self.revocations
    }

    /// The outside provider's key set, when JWT_JWKS_URL or JWT_JWKS_FILE is set.
    pub fn jwks(&self) -> Option<&Arc<Jwks>> {
        self.jwks.as_ref()
    }

    /// Issues an HS256 token for a user.
    pub fn issue(
        &self,
        user_id: i64,
        email: &str,
        role: Role,
        stores: Vec<i64>,
    ) -> anyhow::Result<(String, Claims)> {
        self.issue_session(user_id, email, role, stores, 0, None)
    }

    /// Issues an HS256 token for a user's session at their access generation.
    pub fn issue_session(
        &self,
        user_id: i64,
        email: &str,
        role: Role,
        stores: Vec<i64>,
        gen: i64,
        sid: Option<String>,
    ) -> anyhow::Result<(String, Claims)> {
        let now = chrono::Utc::now().timestamp();
        let claims = Claims {
            sub: user_id.to_string(),
            email: Some(email.to_string()),
            role,
            stores: if role == Role::Admin { vec![] } else { stores },
            exp: now + self.expiry_secs,
            iat: now,
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            gen,
            sid,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)?;
        Ok((token, claims))
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.leeway = LEEWAY_SECS;
        // A token is not accepted before its `nbf` (RFC 7519 4.1.5): an
        // identity provider may issue one for later.
        v.validate_nbf = true;
        // A configured issuer or audience must be present, not just match when present.
        let mut required = vec!["exp", "sub"];
        if self.issuer.is_some() {
            required.push("iss");
        }
        if self.audience.is_some() {
            required.push("aud");
        }
        v.set_required_spec_claims(&required);
        match &self.issuer {
            Some(iss) => v.set_issuer(&[iss]),
            None => v.iss = None,
        }
        match &self.audience {
            Some(aud) => v.set_audience(&[aud]),
            None => v.validate_aud = false,
        }
        v
    }

    /// Verifies a token and returns the caller. Only HS256 and the outside
    /// provider's algorithms (a JWKS key the token names by `kid`, or the
    /// JWT_PUBLIC_KEY_FILE key) are accepted, never `none`.
    ///
    /// An outside token's user is the one an admin linked its (`iss`,
    /// `sub`) to (an unlinked token is refused); that user's disabling or
    /// deletion applies to it. Tokens issued here are also
    /// refused once the user's access generation or session is revoked.
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        self.verify_digested(token, &Self::digest(token))
    }

    /// The digest a verified token is remembered by (and rate limited by).
    pub fn digest(token: &str) -> TokenDigest {
        use sha2::Digest;
        sha2::Sha256::digest(token.as_bytes()).into()
    }

    /// [`Auth::verify`] for a token used once, such as a WebSocket upgrade's:
    /// a remembered token is found as usual, but a new one is not
    /// remembered (an idle connection would keep a cache entry alive for
    /// nothing: about 1 kB each).
    pub fn verify_once(&self, token: &str) -> Result<Principal, AuthError> {
        self.verify_with(token, &Self::digest(token), false)
    }

    /// [`Auth::verify`] for a token whose digest the caller has already taken.
    pub fn verify_digested(
        &self,
        token: &str,
        digest: &TokenDigest,
    ) -> Result<Principal, AuthError> {
        self.verify_with(token, digest, true)
    }

    fn verify_with(
        &self,
        token: &str,
        digest: &TokenDigest,
        remember: bool,
    ) -> Result<Principal, AuthError> {
        if let Some(p) = self.verified.get(digest) {
            // As jsonwebtoken checks `exp`, with the same leeway.
            let now = chrono::Utc::now().timestamp();
            if p.exp.is_some_and(|exp| exp < now - LEEWAY_SECS as i64) {
                self.verified.invalidate(digest);
                return Err(AuthError::Expired { outside: p.outside });
            }
            self.revocations
                .check_token(&p)
                .map_err(AuthError::Revoked)?;
            return Ok(Principal::clone(&p));
        }
        let p = self.verify_token(token)?;
        // Only tokens issued here: an outside token's user depends on the
        // users table (its linked identity) and its key on the provider's key set.
        if remember && !p.outside {
            self.verified.insert(*digest, Arc::new(p.clone()));
        }
        Ok(p)
    }

    fn verify_token(&self, token: &str) -> Result<Principal, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| token_error(&e, false))?;
        if names_critical_extensions(token) {
            // RFC 7515 4.1.11: extensions a token says must be understood,
            // and this server understands none.
            return Err(AuthError::Invalid(
                "the token's crit header names extensions this server does not understand".into(),
            ));
        }
        let outside = header.alg != Algorithm::HS256;
        let key: Arc<DecodingKey> = match (header.alg, &header.kid, &self.jwks, &self.external) {
            (Algorithm::HS256, ..) => self.hs_decoding.clone(),
            (alg @ (Algorithm::RS256 | Algorithm::ES256), Some(kid), Some(jwks), _) => {
                match jwks.key(kid) {
                    Some((a, k)) if a == alg => k,
                    Some((a, _)) => {
                        return Err(AuthError::Invalid(format!(
                            "key {kid} is for {a:?}, not {alg:?}"
                        )))
                    }
                    None => return Err(AuthError::Invalid(format!("unknown key id {kid}"))),
                }
            }
            (alg, _, _, Some((ext, key))) if alg == *ext => key.clone(),
            (alg, ..) => {
                return Err(AuthError::Invalid(format!(
                    "algorithm {alg:?} is not accepted"
                )))
            }
        };
        let data = jsonwebtoken::decode::<Claims>(token, &key, &self.validation(header.alg))
            .map_err(|e| token_error(&e, outside))?;
        let c = data.claims;
        if c.iat > chrono::Utc::now().timestamp() + LEEWAY_SECS as i64 {
            // Issued in the future: a clock far off, or a forged token.
            return Err(AuthError::Invalid("issued in the future (iat)".into()));
        }
        // An outside token stands for the user its (iss, sub) is linked to,
        // and for nobody else: not the user with its email (anyone who may
        // create users could take that address), not the user whose id its
        // sub happens to spell.
        let mut identity = None;
        let user_id: i64 = if outside {
            let issuer = c.iss.as_deref().unwrap_or_default();
            if issuer.is_empty() {
                return Err(AuthError::Invalid(
                    "an identity provider's token needs an iss claim to name a user here".into(),
                ));
            }
            identity = Some(Arc::new(crate::access::Identity {
                issuer: issuer.to_string(),
                subject: c.sub.clone(),
            }));
            self.revocations
                .user_by_identity(issuer, &c.sub)
                .ok_or_else(|| {
                    AuthError::Invalid(format!(
                        "the token's identity (iss {issuer:?}, sub {:?}) is not linked to a user \
                         here; an admin links it with PUT /api/v2/users/{{id}}/identity",
                        c.sub
                    ))
                })?
        } else {
            c.sub
                .parse()
                .map_err(|_| AuthError::Invalid("sub must be a numeric user id".into()))?
        };
        let p = Principal {
            user_id,
            email: c.email,
            role: c.role,
            stores: if c.role == Role::Admin {
                HashSet::new()
            } else {
                c.stores.into_iter().collect()
            },
            exp: Some(c.exp),
            generation: c.gen,
            session: c.sid,
            outside,
            identity,
        };
        self.revocations
            .check_token(&p)
            .map_err(AuthError::Revoked)?;
        Ok(p)
    }
}

/// Strips `Bearer ` from an Authorization header value.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn auth(extra: &[(&str, &str)]) -> Auth {
        let mut vars: HashMap<String, String> = [(
            "JWT_SECRET".to_string(),
            "0123456789abcdef0123456789abcdef".to_string(),
        )]
        .into_iter()
        .collect();
        for (k, v) in extra {
            vars.insert(k.to_string(), v.to_string());
        }
        Auth::from_config(&Config::from_map(&vars).unwrap()).unwrap()
    }

    /// A token whose signature holds but that lacks `exp` or `sub` is
    /// refused naming the claim.
    #[test]
    fn a_missing_required_claim_is_named() {
        let a = auth(&[]);
        let key = EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef");
        let exp = chrono::Utc::now().timestamp() + 600;
        for (claims, why) in [
            (
                serde_json::json!({"sub": "7", "role": "staff"}),
                "missing claim exp",
            ),
            (
                serde_json::json!({"role": "staff", "exp": exp}),
                "missing claim sub",
            ),
        ] {
            let t = jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap();
            assert_eq!(
                a.verify(&t).err(),
                Some(AuthError::Invalid(why.into())),
                "{claims}"
            );
        }
    }

    #[test]
    fn round_trip_and_scope() {
        let a = auth(&[]);
        let (t, _) = a.issue(7, "s@x.io", Role::Staff, vec![3, 1]).unwrap();
        let p = a.verify(&t).unwrap();
        assert_eq!(p.user_id, 7);
        assert!(p.can_access_store(3) && !p.can_access_store(2));
        assert_eq!(p.scope(), Some(vec![1, 3]));
        assert_eq!(p.scope_key(), "staff:1,3");
        assert!(!p.can_export());
    }

    /// A token verified once is remembered by its digest; a later request
    /// with it is still refused once its session is revoked or it expires.
    #[test]
    fn a_remembered_token_is_still_checked_for_revocation_and_expiry() {
        let a = auth(&[]);
        let (t, _) = a
            .issue_session(9, "m@x.io", Role::Manager, vec![2], 0, Some("s1".into()))
            .unwrap();
        let digest = Auth::digest(&t);
        assert_eq!(a.verify(&t).unwrap().user_id, 9);
        assert!(
            a.verified.get(&digest).is_some(),
            "remembered after verifying"
        );
        assert_eq!(a.verify(&t).unwrap().scope(), Some(vec![2]));
        a.revocations.apply(&crate::access::Change::Session {
            user: 9,
            session: "s1".into(),
            until: chrono::Utc::now().timestamp() + 3600,
        });
        assert!(matches!(a.verify(&t), Err(AuthError::Revoked(_))));

        let (t2, _) = a.issue(10, "e@x.io", Role::Staff, vec![1]).unwrap();
        let mut p = a.verify(&t2).unwrap();
        p.exp = Some(chrono::Utc::now().timestamp() - LEEWAY_SECS as i64 - 1);
        let d2 = Auth::digest(&t2);
        a.verified.insert(d2, Arc::new(p));
        assert!(matches!(
            a.verify(&t2),
            Err(AuthError::Expired { outside: false })
        ));
        assert!(
            a.verified.get(&d2).is_none(),
            "an expired token is forgotten"
        );
        // Forgotten, it is verified from its signature again.
        assert_eq!(a.verify(&t2).unwrap().user_id, 10);
    }

    /// A WebSocket upgrade's token is verified but not remembered; a
    /// remembered one is still found (and checked) that way.
    #[test]
    fn a_token_used_once_is_not_remembered() {
        let a = auth(&[]);
        let (t, _) = a
            .issue_session(9, "m@x.io", Role::Manager, vec![2], 0, Some("s1".into()))
            .unwrap();
        let digest = Auth::digest(&t);
        assert_eq!(a.verify_once(&t).unwrap().user_id, 9);
        assert!(a.verified.get(&digest).is_none());
        a.verify(&t).unwrap();
        assert!(a.verified.get(&digest).is_some());
        a.revocations.apply(&crate::access::Change::Session {
            user: 9,
            session: "s1".into(),
            until: chrono::Utc::now().timestamp() + 3600,
        });
        assert!(matches!(a.verify_once(&t), Err(AuthError::Revoked(_))));
        assert!(matches!(
            a.verify_once("garbage"),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn refuses_bad_tokens() {
        let a = auth(&[]);
        assert!(matches!(a.verify("garbage"), Err(AuthError::Invalid(_))));
        // alg: none
        let none = format!(
            "{}.{}.",
            base64::Engine::encode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                r#"{"alg":"none","typ":"JWT"}"#
            ),
            base64::Engine::encode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                r#"{"sub":"1","role":"admin","exp":9999999999}"#
            )
        );
        assert!(a.verify(&none).is_err());
        // Wrong secret.
        let other = Auth::from_config(
            &Config::from_map(
                &[(
                    "JWT_SECRET".to_string(),
                    "another-secret-another-secret-xx".to_string(),
                )]
                .into_iter()
                .collect(),
            )
            .unwrap(),
        )
        .unwrap();
        let (t, _) = other.issue(1, "a@x.io", Role::Admin, vec![]).unwrap();
        assert!(matches!(a.verify(&t), Err(AuthError::Invalid(_))));
    }

    /// A token with `nbf` or `iat` in the future is refused; what a client
    /// reads of a refused token is the kind of fault, not the parser's text.
    #[test]
    fn tokens_for_later_are_refused_and_refusals_say_little() {
        let a = auth(&[]);
        let key = EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef");
        let now = chrono::Utc::now().timestamp();
        let sign = |extra: serde_json::Value| {
            let mut c = serde_json::json!({"sub": "1", "role": "admin", "exp": now + 600});
            c.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &c, &key).unwrap()
        };
        assert!(a.verify(&sign(serde_json::json!({}))).is_ok());
        assert!(a
            .verify(&sign(serde_json::json!({"nbf": now - 60})))
            .is_ok());
        for (extra, why) in [
            (serde_json::json!({"nbf": now + 1_000_000}), "nbf"),
            (serde_json::json!({"iat": now + 1_000_000}), "iat"),
        ] {
            match a.verify(&sign(extra.clone())) {
                Err(AuthError::Invalid(m)) => assert!(m.contains(why), "{extra}: {m}"),
                other => panic!("{extra}: {other:?}"),
            }
        }
        let none = format!(
            "{}.{}.",
            base64::Engine::encode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                r#"{"alg":"none","typ":"JWT"}"#
            ),
            base64::Engine::encode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                r#"{"sub":"1","role":"admin","exp":9999999999}"#
            )
        );
        let missing_exp = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": "1", "role": "admin"}),
            &key,
        )
        .unwrap();
        // A header naming extensions that must be understood (RFC 7515
        // 4.1.11), however well signed.
        let crit = {
            let h = base64::Engine::encode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                r#"{"alg":"HS256","typ":"JWT","crit":["foo"],"foo":1}"#,
            );
            let c = base64::Engine::encode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                serde_json::json!({"sub": "1", "role": "admin", "exp": now + 600}).to_string(),
            );
            let sig =
                jsonwebtoken::crypto::sign(format!("{h}.{c}").as_bytes(), &key, Algorithm::HS256)
                    .unwrap();
            format!("{h}.{c}.{sig}")
        };
        match a.verify(&crit) {
            Err(AuthError::Invalid(m)) => assert!(m.contains("crit"), "{m}"),
            other => panic!("crit accepted: {other:?}"),
        }
        for t in ["a.b.c", "garbage", none.as_str(), missing_exp.as_str()] {
            let Err(e) = a.verify(t) else {
                panic!("{t} accepted")
            };
            let m = e.to_string();
            for leak in ["JSON", "Base64", "column", "variant", "HS384", "offset"] {
                assert!(!m.contains(leak), "{t}: {m}");
            }
        }
    }

    #[test]
    fn expired() {
        let a = auth(&[]);
        let claims = Claims {
            sub: "1".into(),
            email: None,
            role: Role::Admin,
            stores: vec![],
            exp: 1000,
            iat: 0,
            iss: None,
            aud: None,
            gen: 0,
            sid: None,
        };
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &a.encoding).unwrap();
        let e = a.verify(&t).unwrap_err();
        assert_eq!(e, AuthError::Expired { outside: false });
        assert!(e.client_message().contains("POST /api/v2/auth/refresh"));
    }

    #[test]
    fn issuer_and_audience_checked_when_set() {
        let a = auth(&[("JWT_ISSUER", "pg-sales"), ("JWT_AUDIENCE", "api")]);
        let (t, _) = a.issue(1, "a@x.io", Role::Admin, vec![]).unwrap();
        assert!(a.verify(&t).is_ok());
        let plain = auth(&[]);
        let (t2, _) = plain.issue(1, "a@x.io", Role::Admin, vec![]).unwrap();
        assert!(
            a.verify(&t2).is_err(),
            "token without iss/aud refused when they are required"
        );
    }

    /// Tokens from an outside identity provider: RS256 and ES256 verified with
    /// the PEM public key in JWT_PUBLIC_KEY_FILE (keys made with openssl).
    #[test]
    fn external_rs256_and_es256() {
        let dir = std::env::temp_dir().join(format!("pgs_jwt_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sh = |cmd: &str| {
            let ok = std::process::Command::new("sh")
                .arg("-c")
                .arg(cmd)
                .current_dir(&dir)
                .status()
                .unwrap()
                .success();
            assert!(ok, "{cmd}");
        };
        sh("openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out rsa.pem 2>/dev/null && openssl pkey -in rsa.pem -pubout -out rsa.pub");
        sh("openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ec.pem 2>/dev/null && openssl pkey -in ec.pem -pubout -out ec.pub");
        let now = chrono::Utc::now().timestamp();
        let claims = Claims {
            sub: "provider-user-1".into(),
            email: None,
            role: Role::Manager,
            stores: vec![4],
            exp: now + 600,
            iat: now,
            iss: Some("https://idp.test".into()),
            aud: None,
            gen: 0,
            sid: None,
        };
        for (alg, private, public, key) in [
            (
                Algorithm::RS256,
                "rsa.pem",
                "rsa.pub",
                EncodingKey::from_rsa_pem as fn(&[u8]) -> _,
            ),
            (
                Algorithm::ES256,
                "ec.pem",
                "ec.pub",
                EncodingKey::from_ec_pem as fn(&[u8]) -> _,
            ),
        ] {
            let a = auth(&[("JWT_PUBLIC_KEY_FILE", dir.join(public).to_str().unwrap())]);
            let enc: jsonwebtoken::errors::Result<EncodingKey> =
                key(&std::fs::read(dir.join(private)).unwrap());
            let enc = enc.unwrap();
            let token = jsonwebtoken::encode(&Header::new(alg), &claims, &enc).unwrap();
            // Not linked to a user here: refused, saying so.
            match a.verify(&token) {
                Err(AuthError::Invalid(why)) => assert!(why.contains("not linked"), "{why}"),
                other => panic!("{alg:?}: an unlinked identity gave {other:?}"),
            }
            let link = |id: i64, sub: &str| crate::access::Change::User {
                id,
                email: format!("u{id}@x.test"),
                generation: 1,
                disabled: false,
                why: crate::access::Revoked::AccessChanged,
                identity: Some(Some(crate::access::Identity {
                    issuer: "https://idp.test".into(),
                    subject: sub.into(),
                })),
            };
            a.revocations().apply(&link(9, "provider-user-1"));
            let p = a.verify(&token).unwrap_or_else(|e| panic!("{alg:?}: {e}"));
            assert_eq!((p.user_id, p.role), (9, Role::Manager));
            assert!(p.outside);
            // The same subject from another issuer, or with no issuer, is nobody.
            for iss in [Some("https://other.test"), None] {
                let other = Claims {
                    iss: iss.map(str::to_string),
                    ..claims.clone()
                };
                let t = jsonwebtoken::encode(&Header::new(alg), &other, &enc).unwrap();
                assert!(a.verify(&t).is_err(), "{alg:?} {iss:?}");
            }
            assert!(p.can_access_store(4) && !p.can_access_store(5));
            // Expired: the provider gives the next one (refresh tokens are
            // of this server's sessions only).
            let old = Claims {
                exp: now - 600,
                iat: now - 1200,
                ..claims.clone()
            };
            let t = jsonwebtoken::encode(&Header::new(alg), &old, &enc).unwrap();
            let e = a.verify(&t).unwrap_err();
            assert_eq!(e, AuthError::Expired { outside: true }, "{alg:?}");
            let m = e.client_message();
            assert!(
                m.contains("identity provider") && !m.contains("refresh"),
                "{m}"
            );
            // Without the key configured, the same token is refused.
            assert!(auth(&[]).verify(&token).is_err());
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bearer_header() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
    }
}
