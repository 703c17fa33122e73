//! Users, sessions and revocation (issue 17): the permissions matrix of
//! every user endpoint, bad input, `auth/me` and password change, refresh
//! rotation and reuse detection, login throttling, and revocation reaching
//! REST and WebSockets of two server instances.

use futures_util::StreamExt;
use reqwest::Method;
use sales_e2e::{eventually, Api, RunningServer, TestDb};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

const PASSWORD: &str = "password-123";

/// Waits until a session of this database waits as `condition` says (on
/// `pg_stat_activity`), or `attempt` has already been answered (wrongly,
/// which its caller's assertions then report).
async fn until_blocked<T>(
    db: &TestDb,
    attempt: &tokio::task::JoinHandle<T>,
    what: &str,
    condition: &str,
) {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND {condition}"
    );
    eventually(Duration::from_secs(20), what, || {
        let (pool, sql) = (db.pool.clone(), sql.clone());
        let done = attempt.is_finished();
        async move {
            let waiting: i64 = sqlx::query_scalar(&sql).fetch_one(&pool).await.unwrap();
            (done || waiting > 0).then_some(())
        }
    })
    .await;
}

async fn add_user(db: &TestDb, email: &str, role: &str, stores: &[i64]) -> i64 {
    sales_server::users::upsert_user(&db.pool, email, role, stores, PASSWORD)
        .await
        .expect("create user")
        .0
}

/// Logs in; returns the whole answer.
async fn login(server: &RunningServer, email: &str, password: &str) -> (u16, Value) {
    Api::new(server, None)
        .post(
            "/api/v2/auth/login",
            &json!({"email": email, "password": password}),
        )
        .await
}

async fn client(server: &RunningServer, email: &str) -> (Api, Value) {
    let (st, body) = login(server, email, PASSWORD).await;
    assert_eq!(st, 200, "login {email}: {body}");
    (
        Api::new(server, Some(body["token"].as_str().unwrap())),
        body,
    )
}

async fn patch(api: &Api, path: &str, body: Value) -> (u16, Value) {
    api.send_json(Method::PATCH, path, &body).await
}

async fn put(api: &Api, path: &str, body: &Value) -> (u16, Value) {
    api.send_json(Method::PUT, path, body).await
}

async fn api_delete(api: &Api, path: &str) -> (u16, Value) {
    let r = api.req(Method::DELETE, path).send().await.unwrap();
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

async fn delete(api: &Api, path: &str) -> u16 {
    api.req(Method::DELETE, path)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Stores 1..3; admin, a manager of stores A and B, staff of A, staff of C,
/// a manager of C.
struct World {
    db: TestDb,
    server: RunningServer,
    stores: Vec<i64>,
    admin: Api,
    manager: Api,
    staff: Api,
    other_manager: Api,
    manager_id: i64,
    staff_id: i64,
    other_staff_id: i64,
}

async fn world(overrides: &[(&str, &str)]) -> World {
    let db = TestDb::new().await;
    let stores = db.stores(3).await;
    let server = db.server(overrides).await;
    add_user(&db, "admin@x.test", "admin", &[]).await;
    let manager_id = add_user(&db, "manager@x.test", "manager", &stores[..2]).await;
    let staff_id = add_user(&db, "staff@x.test", "staff", &[stores[0]]).await;
    let other_staff_id = add_user(&db, "staff-c@x.test", "staff", &[stores[2]]).await;
    add_user(&db, "manager-c@x.test", "manager", &[stores[2]]).await;
    let (admin, _) = client(&server, "admin@x.test").await;
    let (manager, _) = client(&server, "manager@x.test").await;
    let (staff, _) = client(&server, "staff@x.test").await;
    let (other_manager, _) = client(&server, "manager-c@x.test").await;
    World {
        db,
        server,
        stores,
        admin,
        manager,
        staff,
        other_manager,
        manager_id,
        staff_id,
        other_staff_id,
    }
}

fn ids(body: &Value) -> Vec<i64> {
    body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].as_i64().unwrap())
        .collect()
}

#[tokio::test]
async fn permissions_matrix() {
    let w = world(&[]).await;
    let (a, b, c) = (w.stores[0], w.stores[1], w.stores[2]);

    // List: admins see everyone, managers the staff of their stores, staff nothing.
    let (st, all) = w.admin.get("/api/v2/users").await;
    assert_eq!(st, 200, "{all}");
    assert_eq!(ids(&all).len(), 5);
    assert!(all["data"][0].get("passwordHash").is_none());
    let (st, mine) = w.manager.get("/api/v2/users").await;
    assert_eq!(st, 200);
    assert_eq!(ids(&mine), vec![w.staff_id]);
    let (_, theirs) = w.other_manager.get("/api/v2/users").await;
    assert_eq!(ids(&theirs), vec![w.other_staff_id]);
    assert_eq!(w.staff.get("/api/v2/users").await.0, 403);

    // Get one.
    let staff_path = format!("/api/v2/users/{}", w.staff_id);
    assert_eq!(w.admin.get(&staff_path).await.0, 200);
    assert_eq!(w.manager.get(&staff_path).await.0, 200);
    // Another manager's staff: answered as an id no user has.
    let (st, body) = w.other_manager.get(&staff_path).await;
    assert_eq!(st, 404, "{body}");
    let (_, none) = w.other_manager.get("/api/v2/users/999999").await;
    assert_eq!(
        body["error"]["message"]
            .as_str()
            .map(|m| m.replace(&w.staff_id.to_string(), "N")),
        none["error"]["message"]
            .as_str()
            .map(|m| m.replace("999999", "N")),
        "the same message"
    );
    assert_eq!(w.staff.get(&staff_path).await.0, 200, "oneself");
    let manager_path = format!("/api/v2/users/{}", w.manager_id);
    assert_eq!(w.staff.get(&manager_path).await.0, 403);
    assert_eq!(w.manager.get(&manager_path).await.0, 200, "oneself");
    assert_eq!(w.admin.get("/api/v2/users/999999").await.0, 404);

    // Create.
    let new = |email: &str, role: &str, stores: &[i64]| json!({"email": email, "role": role, "stores": stores, "password": "a-fine-password"});
    let (st, body) = w
        .admin
        .post("/api/v2/users", &new("m2@x.test", "manager", &[c]))
        .await;
    assert_eq!(st, 201, "{body}");
    assert_eq!(body["data"]["stores"], json!([c]));
    let (st, body) = w
        .manager
        .post("/api/v2/users", &new("s2@x.test", "staff", &[b]))
        .await;
    assert_eq!(st, 201, "{body}");
    let s2 = body["data"]["id"].as_i64().unwrap();
    let (st, body) = w
        .manager
        .post("/api/v2/users", &new("s3@x.test", "staff", &[b, c]))
        .await;
    assert_eq!(st, 403, "a store the manager does not manage: {body}");
    assert_eq!(body["error"]["details"]["storeIds"], json!([c]));
    let (st, _) = w
        .manager
        .post("/api/v2/users", &new("m3@x.test", "manager", &[a]))
        .await;
    assert_eq!(st, 403, "a role above staff");
    let (st, _) = w
        .manager
        .post("/api/v2/users", &new("a3@x.test", "admin", &[]))
        .await;
    assert_eq!(st, 403);
    let (st, _) = w
        .staff
        .post("/api/v2/users", &new("s4@x.test", "staff", &[a]))
        .await;
    assert_eq!(st, 403);

    // Patch: a manager changes staff of their stores only, within their stores.
    let s2_path = format!("/api/v2/users/{s2}");
    let (st, body) = patch(&w.manager, &s2_path, json!({"stores": [a, b]})).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["data"]["stores"], json!([a, b]));
    let (st, _) = patch(&w.manager, &s2_path, json!({"stores": [c]})).await;
    assert_eq!(st, 403);
    let (st, _) = patch(&w.manager, &s2_path, json!({"role": "manager"})).await;
    assert_eq!(st, 403);
    let (st, _) = patch(
        &w.manager,
        &s2_path,
        json!({"password": "another-password"}),
    )
    .await;
    assert_eq!(st, 403, "only admins set passwords");
    let (st, _) = patch(&w.other_manager, &s2_path, json!({"disabled": true})).await;
    assert_eq!(st, 404, "not staff of their stores: as if no such user");
    let (st, _) = patch(&w.staff, &s2_path, json!({"disabled": true})).await;
    assert_eq!(st, 403);
    let (st, _) = patch(&w.manager, &manager_path, json!({"stores": [a]})).await;
    assert_eq!(
        st, 403,
        "a manager does not change managers, themselves included"
    );
    // Nor their own email, even given as it is: the refusal says so.
    let (st, body) = patch(
        &w.manager,
        &manager_path,
        json!({"email": "manager@x.test"}),
    )
    .await;
    assert_eq!(st, 403, "{body}");
    assert_eq!(
        body["error"]["message"],
        "managers do not change their own email, role, stores or state"
    );
    // The admin gives s2 store C too; the manager then changes only A/B.
    let (st, _) = patch(&w.admin, &s2_path, json!({"stores": [a, c]})).await;
    assert_eq!(st, 200);
    let (st, body) = patch(&w.manager, &s2_path, json!({"stores": [b]})).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(
        body["data"]["stores"],
        json!([b]),
        "the manager sees their stores"
    );
    let (_, full) = w.admin.get(&s2_path).await;
    assert_eq!(full["data"]["stores"], json!([b, c]), "store C was kept");
    let (st, body) = patch(&w.manager, &s2_path, json!({"disabled": true})).await;
    assert_eq!(st, 200);
    assert_eq!(body["data"]["disabled"], true);

    // Delete: admins only.
    assert_eq!(delete(&w.manager, &s2_path).await, 403);
    assert_eq!(delete(&w.staff, &s2_path).await, 403);
    assert_eq!(delete(&w.admin, &s2_path).await, 204);
    assert_eq!(w.admin.get(&s2_path).await.0, 404);
    assert_eq!(delete(&w.admin, &s2_path).await, 404);
    w.server.stop().await;
}

#[tokio::test]
async fn bad_input_is_refused_with_why() {
    let w = world(&[]).await;
    let post = |body: Value| {
        let api = w.admin.clone();
        async move { api.post("/api/v2/users", &body).await }
    };
    let (st, body) = post(json!({"email": "STAFF@x.test", "role": "staff", "stores": [w.stores[0]], "password": "a-fine-password"})).await;
    assert_eq!(st, 409, "duplicate email, whatever its case: {body}");
    assert_eq!(body["error"]["details"]["field"], "email");
    let (st, body) = post(json!({"email": "n@x.test", "role": "staff", "stores": [w.stores[0], 987654], "password": "a-fine-password"})).await;
    assert_eq!(st, 422, "{body}");
    assert_eq!(body["error"]["details"]["storeIds"], json!([987654]));
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("987654"));
    let (st, body) =
        post(json!({"email": "n@x.test", "role": "staff", "password": "a-fine-password"})).await;
    assert_eq!(st, 422, "staff without stores: {body}");
    assert_eq!(body["error"]["details"]["field"], "stores");
    for (password, why) in [
        ("short", "at least 8"),
        ("aaaaaaaaaaaa", "different"),
        ("Password123", "common"),
        ("n@x.test", "email"),
    ] {
        let (st, body) =
            post(json!({"email": "n@x.test", "role": "admin", "password": password})).await;
        assert_eq!(st, 422, "{password}: {body}");
        assert_eq!(body["error"]["details"]["field"], "password");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(why),
            "{password}: {body}"
        );
    }
    // Not an address, however short; and one holding an invisible
    // character, which would look like another user's address.
    for email in [
        "not-an-email",
        "ab",
        "@",
        "admin\u{200b}@x.test",
        "\u{feff}n@x.test",
        "s1\u{1bca0}@x.test",
        "s1\u{1bca3}@x.test",
        "s1\u{fff9}@x.test",
        "s1\u{13430}@x.test",
    ] {
        let (st, body) =
            post(json!({"email": email, "role": "admin", "password": "a-fine-password"})).await;
        assert_eq!(st, 422, "{email:?}: {body}");
        assert_eq!(body["error"]["details"]["field"], "email", "{email:?}");
    }
    // Nor is a domain with an empty label, nor a local part holding what
    // only a quoted local part may (not supported): the reason says which.
    for (email, why) in [
        ("dot@..", "the domain starts or ends with a dot"),
        ("a,b@probe2.local", "the part before the @ holds ','"),
        ("<script>@probe2.local", "the part before the @ holds '<'"),
    ] {
        let (st, body) =
            post(json!({"email": email, "role": "admin", "password": "a-fine-password"})).await;
        assert_eq!(st, 422, "{email:?}: {body}");
        assert_eq!(body["error"]["details"]["field"], "email", "{email:?}");
        let reason = body["error"]["details"]["reason"].as_str().unwrap();
        assert!(reason.contains(why), "{email:?}: {body}");
        if email.contains(['<', ',']) {
            assert!(
                reason.contains("quoted local part") && reason.contains("not supported"),
                "{email:?}: {body}"
            );
        }
    }
    let (st, _) =
        post(json!({"email": "n@x.test", "role": "owner", "password": "a-fine-password"})).await;
    assert_eq!(st, 400, "unknown role");
    let (st, _) = patch(
        &w.admin,
        &format!("/api/v2/users/{}", w.staff_id),
        json!({}),
    )
    .await;
    assert_eq!(st, 400, "an empty patch");

    // The last enabled admin can be neither demoted, disabled nor deleted.
    let (_, me) = w.admin.get("/api/v2/auth/me").await;
    let admin_path = format!("/api/v2/users/{}", me["id"]);
    let (st, body) = patch(&w.admin, &admin_path, json!({"disabled": true})).await;
    assert_eq!(st, 409, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("last"));
    let (st, _) = patch(
        &w.admin,
        &admin_path,
        json!({"role": "manager", "stores": [w.stores[0]]}),
    )
    .await;
    assert_eq!(st, 409);
    assert_eq!(delete(&w.admin, &admin_path).await, 409);
    let (_, again) = w.admin.get(&admin_path).await;
    assert_eq!(
        (
            again["data"]["role"].as_str(),
            again["data"]["disabled"].as_bool()
        ),
        (Some("admin"), Some(false)),
        "nothing was half-written"
    );
    // With a second admin it can.
    let (st, _) =
        post(json!({"email": "admin2@x.test", "role": "admin", "password": "a-fine-password"}))
            .await;
    assert_eq!(st, 201);
    let (st, _) = patch(
        &w.admin,
        &admin_path,
        json!({"role": "manager", "stores": [w.stores[0]]}),
    )
    .await;
    assert_eq!(st, 200);
    let (st, body) = w.admin.get("/api/v2/users").await;
    assert_eq!(st, 401, "the demoted admin's token is revoked: {body}");
    w.server.stop().await;
}

#[tokio::test]
async fn me_and_password_change() {
    let w = world(&[]).await;
    let (st, me) = w.staff.get("/api/v2/auth/me").await;
    assert_eq!(st, 200, "{me}");
    assert_eq!(me["id"], w.staff_id);
    assert_eq!(me["role"], "staff");
    assert_eq!(me["stores"], json!([w.stores[0]]));
    assert_eq!(me["registered"], true);
    assert!(me["sessionId"].is_string());

    // A second session of the same user.
    let (other, _) = client(&w.server, "staff@x.test").await;
    let change = |current: &str, new: &str| {
        let api = w.staff.clone();
        let body = json!({"currentPassword": current, "newPassword": new});
        async move { api.post("/api/v2/auth/password", &body).await }
    };
    let (st, body) = change("wrong-password", "a-new-password-1").await;
    assert_eq!(st, 403, "{body}");
    assert_eq!(body["error"]["details"]["field"], "currentPassword");
    let (st, body) = change(PASSWORD, "abcabcabc").await;
    assert_eq!(st, 422, "{body}");
    assert_eq!(body["error"]["details"]["field"], "newPassword");
    // The same password again would only end the other sessions.
    let (st, body) = change(PASSWORD, PASSWORD).await;
    assert_eq!(st, 422, "{body}");
    assert_eq!(body["error"]["details"]["field"], "newPassword");
    assert_eq!(other.get("/api/v2/auth/me").await.0, 200, "nothing ended");
    let (st, body) = change(PASSWORD, "a-new-password-1").await;
    assert_eq!(st, 200, "{body}");
    let fresh = Api::new(&w.server, Some(body["token"].as_str().unwrap()));
    assert_eq!(fresh.get("/api/v2/auth/me").await.0, 200);
    // Every earlier session ended: access tokens and refresh tokens.
    for old in [&w.staff, &other] {
        let (st, body) = old.get("/api/v2/auth/me").await;
        assert_eq!(st, 401, "{body}");
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("password"));
    }
    assert_eq!(login(&w.server, "staff@x.test", PASSWORD).await.0, 401);
    assert_eq!(
        login(&w.server, "staff@x.test", "a-new-password-1").await.0,
        200
    );
    // A password is the same whichever way a keyboard composes its accents
    // (Unicode normal form C): set with a precomposed é, it logs in with
    // an e and a combining accent, and is the same password again.
    let (composed, decomposed) = ("caf\u{e9}-password-9", "cafe\u{301}-password-9");
    let body = json!({"currentPassword": "a-new-password-1", "newPassword": composed});
    let (st, body) = fresh.post("/api/v2/auth/password", &body).await;
    assert_eq!(st, 200, "{body}");
    let again = Api::new(&w.server, Some(body["token"].as_str().unwrap()));
    let body = json!({"currentPassword": decomposed, "newPassword": decomposed});
    let (st, body) = again.post("/api/v2/auth/password", &body).await;
    assert_eq!(st, 422, "{body}");
    assert_eq!(body["error"]["details"]["field"], "newPassword");
    let (st, body) = login(&w.server, "staff@x.test", decomposed).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(login(&w.server, "staff@x.test", composed).await.0, 200);
    w.server.stop().await;
}

#[tokio::test]
async fn sessions_end_at_session_max_age_however_often_refreshed() {
    let w = world(&[("SESSION_MAX_AGE", "120")]).await;
    let (_, first) = client(&w.server, "staff@x.test").await;
    // The default idle lifetime is a week; the session's age caps it.
    let left = first["refreshExpiresIn"].as_i64().unwrap();
    assert!(left > 0 && left <= 120, "{first}");
    let anon = Api::new(&w.server, None);
    let (st, second) = anon
        .post(
            "/api/v2/auth/refresh",
            &json!({"refreshToken": first["refreshToken"]}),
        )
        .await;
    assert_eq!(st, 200, "{second}");
    let left = second["refreshExpiresIn"].as_i64().unwrap();
    assert!(
        left > 0 && left <= 120,
        "refreshing never passes the cap: {second}"
    );
    // The session was made 121 s ago. As the cap left it (its expiry the
    // bound, about a second ago: the right side reads the login's
    // created_at, about now), and with an expiry further off (the bound
    // lowered since): either way it is over, and the answer names the
    // bound, not an expiry that refreshing would have moved.
    for expiry in [
        "created_at - interval '1 second'",
        "now() + interval '1 day'",
    ] {
        sqlx::query(&format!(
            "UPDATE auth.sessions SET created_at = now() - interval '121 seconds',
                    expires_at = {expiry}
             WHERE id = $1::uuid"
        ))
        .bind(second["sessionId"].as_str().unwrap())
        .execute(&w.db.pool)
        .await
        .unwrap();
        let (st, body) = anon
            .post(
                "/api/v2/auth/refresh",
                &json!({"refreshToken": second["refreshToken"]}),
            )
            .await;
        assert_eq!(st, 401, "{expiry}: {body}");
        assert_eq!(
            body["error"]["message"], "the session is older than SESSION_MAX_AGE; log in again",
            "{expiry}: {body}"
        );
    }
    // A new login starts a new session.
    let (st, body) = login(&w.server, "staff@x.test", PASSWORD).await;
    assert_eq!(st, 200, "{body}");
    assert_ne!(body["sessionId"], second["sessionId"]);
}

/// Refreshes the session of a login answer with its body refresh token.
async fn refresh_session(server: &RunningServer, login: &Value) -> (u16, Value) {
    Api::new(server, None)
        .post(
            "/api/v2/auth/refresh",
            &json!({"refreshToken": login["refreshToken"]}),
        )
        .await
}

/// A token's answer once it is refused, waiting (bounded) for the event
/// of a change made outside the server to reach it.
async fn refused(api: &Api, what: &str) -> String {
    eventually(Duration::from_secs(10), what, || async {
        let (st, body) = api.get("/api/v2/auth/me").await;
        (st == 401).then(|| body["error"]["message"].as_str().unwrap_or("").to_string())
    })
    .await
}

#[tokio::test]
async fn users_changed_by_plain_sql_are_revoked() {
    let w = world(&[]).await;
    let pool = &w.db.pool;
    let generation = |id: i64| async move {
        sqlx::query_scalar::<_, i64>(
            "SELECT coalesce((SELECT generation FROM auth.user_state WHERE user_id = $1), 0)",
        )
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
    };
    let events = |kind: &'static str, id: i64| async move {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM sales.events WHERE kind = $1 AND (payload->>'userId')::bigint = $2",
        )
        .bind(kind)
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
    };

    // A change through the API moves the generation once and writes one
    // event: the trigger leaves the server's own changes alone.
    let (st, body) = patch(
        &w.admin,
        &format!("/api/v2/users/{}", w.manager_id),
        json!({"stores": [w.stores[0]]}),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(generation(w.manager_id).await, 1);
    assert_eq!(events("user-updated", w.manager_id).await, 1);

    // Role and stores changed in psql: the staff member's token is refused
    // as for a change through the API, and a refresh gives the new scope.
    let (staff, session) = client(&w.server, "staff@x.test").await;
    assert_eq!(staff.get("/api/v2/auth/me").await.0, 200);
    sqlx::query("UPDATE sales.users SET role = 'manager', store_ids = $2 WHERE id = $1")
        .bind(w.staff_id)
        .bind(&w.stores[..2])
        .execute(pool)
        .await
        .unwrap();
    let message = refused(&staff, "the staff token refused after an SQL role change").await;
    assert!(message.contains("access changed"), "{message}");
    assert_eq!(generation(w.staff_id).await, 1);
    assert_eq!(events("user-updated", w.staff_id).await, 1);
    let outside: bool = sqlx::query_scalar(
        "SELECT (payload->>'outside')::boolean FROM sales.events
         WHERE kind = 'user-updated' AND (payload->>'userId')::bigint = $1",
    )
    .bind(w.staff_id)
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(outside);
    let (st, renewed) = refresh_session(&w.server, &session).await;
    assert_eq!(st, 200, "{renewed}");
    let renewed = Api::new(&w.server, Some(renewed["token"].as_str().unwrap()));
    let (st, me) = renewed.get("/api/v2/auth/me").await;
    assert_eq!(st, 200, "{me}");
    assert_eq!(me["role"], "manager");
    assert_eq!(me["stores"], json!(&w.stores[..2]));

    // A statement that changes nothing a token carries moves nothing.
    sqlx::query("UPDATE sales.users SET updated_at = now() WHERE id = $1")
        .bind(w.staff_id)
        .execute(pool)
        .await
        .unwrap();
    assert_eq!(generation(w.staff_id).await, 1);
    assert_eq!(renewed.get("/api/v2/auth/me").await.0, 200);

    // A password hash replaced in psql ends every session of the user.
    let (other, other_session) = client(&w.server, "staff-c@x.test").await;
    sqlx::query(
        "UPDATE sales.users SET password_hash = (SELECT password_hash FROM sales.users
                                                  WHERE lower(email) = 'admin@x.test')
         WHERE id = $1",
    )
    .bind(w.other_staff_id)
    .execute(pool)
    .await
    .unwrap();
    let message = refused(&other, "the token refused after an SQL password change").await;
    assert!(message.contains("password"), "{message}");
    let (st, body) = refresh_session(&w.server, &other_session).await;
    assert_eq!(st, 401, "the session ended with the password: {body}");

    // Deleted in psql: refused as deleted, on this instance and on one
    // started afterwards (from the tombstone); the user's open WebSocket
    // is closed with 4011 (account deleted).
    let mut ws = open_ws(&w.server, renewed.token.as_deref().unwrap()).await;
    sqlx::query("DELETE FROM sales.users WHERE id = $1")
        .bind(w.staff_id)
        .execute(pool)
        .await
        .unwrap();
    assert_eq!(close_code(&mut ws).await, 4011, "closed: account deleted");
    let message = refused(&renewed, "the token refused after an SQL delete").await;
    assert!(message.contains("deleted"), "{message}");
    assert_eq!(events("user-deleted", w.staff_id).await, 1);
    let later = w.db.server(&[]).await;
    let token = renewed.token.clone().expect("a bearer token");
    let (st, body) = Api::new(&later, Some(&token)).get("/api/v2/auth/me").await;
    assert_eq!(st, 401, "{body}");

    // The API's own delete still writes exactly one event.
    assert_eq!(
        delete(&w.admin, &format!("/api/v2/users/{}", w.manager_id)).await,
        204
    );
    assert_eq!(events("user-deleted", w.manager_id).await, 1);

    // TRUNCATE fires no row trigger; a statement trigger deletes everyone
    // the same way.
    let left: Vec<i64> = sqlx::query_scalar("SELECT id FROM sales.users ORDER BY id")
        .fetch_all(pool)
        .await
        .unwrap();
    assert_eq!(left.len(), 3, "{left:?}");
    assert_eq!(w.admin.get("/api/v2/auth/me").await.0, 200);
    sqlx::query("TRUNCATE sales.users CASCADE")
        .execute(pool)
        .await
        .unwrap();
    let message = refused(&w.admin, "the admin token refused after TRUNCATE").await;
    assert!(message.contains("deleted"), "{message}");
    for id in left {
        assert_eq!(events("user-deleted", id).await, 1, "user {id}");
    }

    // pg_dump leaves out triggers on the extension's tables: a restored
    // database lacks them, and the next migrate (every server start) puts
    // them back.
    let present = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_trigger
             WHERE tgname IN ('users_changed_outside', 'users_truncated_outside', 'access_notify')",
        )
        .fetch_one(pool)
        .await
        .unwrap()
    };
    assert_eq!(present().await, 3);
    sqlx::raw_sql(
        "DROP TRIGGER users_changed_outside ON sales.users; DROP TRIGGER users_truncated_outside ON sales.users;
         DROP TRIGGER access_notify ON sales.events",
    )
    .execute(pool)
    .await
    .unwrap();
    assert_eq!(present().await, 0);
    sales_server::db::migrate(pool).await.unwrap();
    assert_eq!(present().await, 3, "migrate created the triggers again");
    assert!(
        !sales_server::db::restore_users_triggers(&mut pool.acquire().await.unwrap())
            .await
            .unwrap()
    );
    later.stop().await;
    w.server.stop().await;
}

/// The `Set-Cookie` of the refresh token a response sets, if any.
fn cookie_of(r: &reqwest::Response) -> Option<String> {
    r.headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .find(|c| c.starts_with("pg_sales_refresh="))
}

/// The token a refresh-token `Set-Cookie` holds.
fn value(set_cookie: &str) -> String {
    set_cookie["pg_sales_refresh=".len()..]
        .split(';')
        .next()
        .unwrap()
        .to_string()
}

/// A browser's tabs share one refresh cookie, which names the session of
/// whoever logged in there last. A logout with `{}` and the tab's access
/// token (`Authorization: Bearer`) ends that token's session: when the cookie
/// holds another session's token, that session and the cookie are left
/// alone (the cookie's session used to be ended, another user's, while the
/// tab's own stayed alive); when it holds the same session's, the cookie is
/// removed as before. A bearer that does not verify is 401, never a logout
/// of the cookie's session.
#[tokio::test]
async fn a_logout_with_an_access_token_ends_that_tokens_session_not_the_cookies() {
    let w = world(&[]).await;
    let http = reqwest::Client::new();
    let url = |p: &str| format!("http://{}{p}", w.server.addr);
    let cookie_login = |email: &'static str| {
        let http = http.clone();
        let url = url("/api/v2/auth/login");
        async move {
            let r = http
                .post(url)
                .json(&json!({"email": email, "password": PASSWORD, "refreshCookie": true}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let cookie = value(&cookie_of(&r).expect("a refresh cookie"));
            let body: Value = r.json().await.unwrap();
            (body["token"].as_str().unwrap().to_string(), cookie)
        }
    };
    let post = |path: &str, bearer: Option<&str>, cookie: Option<&str>| {
        let mut rq = http.post(url(path)).json(&json!({}));
        if let Some(t) = bearer {
            rq = rq.bearer_auth(t);
        }
        if let Some(c) = cookie {
            rq = rq.header("cookie", format!("pg_sales_refresh={c}"));
        }
        rq.send()
    };
    let me = |t: &str| {
        let api = Api::new(&w.server, Some(t));
        async move { api.get("/api/v2/auth/me").await.0 }
    };

    // Tab A logs in as staff, then tab B as the admin: the cookie is B's.
    let (staff_token, _) = cookie_login("staff@x.test").await;
    let (admin_token, admin_cookie) = cookie_login("admin@x.test").await;

    // A's logout ends A's session only: no Set-Cookie, B's session lives.
    let r = post(
        "/api/v2/auth/logout",
        Some(&staff_token),
        Some(&admin_cookie),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 204);
    assert!(cookie_of(&r).is_none(), "the cookie is not A's to remove");
    assert_eq!(me(&staff_token).await, 401, "A's session ended");
    assert_eq!(me(&admin_token).await, 200, "B's session lives");
    let r = post("/api/v2/auth/refresh", None, Some(&admin_cookie))
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "B's refresh token is still good");
    let admin_cookie = value(&cookie_of(&r).expect("rotated"));
    let admin_token = r.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();

    // A's token again (its session ended): 401, and the cookie's session
    // is not ended in its place.
    let r = post(
        "/api/v2/auth/logout",
        Some(&staff_token),
        Some(&admin_cookie),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 401);
    assert!(cookie_of(&r).is_none());
    let r = post(
        "/api/v2/auth/logout",
        Some("not.a.token"),
        Some(&admin_cookie),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 401);
    assert!(cookie_of(&r).is_none());
    assert_eq!(me(&admin_token).await, 200, "B's session still lives");

    // B's logout with its own token and its own cookie: ended, cookie removed.
    let r = post(
        "/api/v2/auth/logout",
        Some(&admin_token),
        Some(&admin_cookie),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 204);
    let removed = cookie_of(&r).expect("a removing cookie");
    assert!(removed.contains("Max-Age=0"), "{removed}");
    assert_eq!(me(&admin_token).await, 401);
    let r = post("/api/v2/auth/refresh", None, Some(&admin_cookie))
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // A stale header does not stop a cookie logout: another scheme (a
    // proxy's Basic) is not the caller's token, and an expired token of
    // the cookie's own session lets the cookie end it (as `{}` with the
    // cookie alone would). An expired token of another session does not.
    let (token, cookie) = cookie_login("manager@x.test").await;
    let r = http
        .post(url("/api/v2/auth/logout"))
        .json(&json!({}))
        .header("authorization", "Basic eDp5")
        .header("cookie", format!("pg_sales_refresh={cookie}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(me(&token).await, 401, "ended through the cookie");
    let expired = |t: &str| {
        use base64::Engine;
        let payload = t.split('.').nth(1).unwrap();
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap();
        let mut claims: Value = serde_json::from_slice(&bytes).unwrap();
        let now = chrono::Utc::now().timestamp();
        claims["exp"] = json!(now - 3600);
        claims["iat"] = json!(now - 7200);
        sales_e2e::fixtures::token::sign_claims(
            &claims,
            sales_e2e::fixtures::token::TEST_JWT_SECRET,
        )
    };
    let (other_token, _) = cookie_login("staff@x.test").await;
    let (token, cookie) = cookie_login("manager@x.test").await;
    let r = post(
        "/api/v2/auth/logout",
        Some(&expired(&other_token)),
        Some(&cookie),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 401, "another session's expired token");
    assert_eq!(me(&token).await, 200, "the cookie's session lives");
    let r = post("/api/v2/auth/logout", Some(&expired(&token)), Some(&cookie))
        .await
        .unwrap();
    assert_eq!(r.status(), 204, "its own session's expired token");
    assert!(cookie_of(&r).is_some_and(|c| c.contains("Max-Age=0")));
    assert_eq!(me(&token).await, 401);
    assert_eq!(me(&other_token).await, 200, "the other session lives");

    // No cookie at all (another tab's logout removed it): the access token
    // alone ends its session.
    let (token, _) = cookie_login("manager@x.test").await;
    let r = post("/api/v2/auth/logout", Some(&token), None)
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert!(cookie_of(&r).is_none());
    assert_eq!(me(&token).await, 401);
    // Neither an access token nor a cookie: 400, as before.
    assert_eq!(
        post("/api/v2/auth/logout", None, None)
            .await
            .unwrap()
            .status(),
        400,
        "neither a token nor a cookie"
    );
    w.server.stop().await;
}

/// `refreshCookie`: the refresh token lives in an HttpOnly, SameSite=Strict
/// cookie scoped to `/api/v2/auth`, never in a body; refresh, password
/// change and logout read and rotate it there; reusing an old one still
/// ends the session.
#[tokio::test]
async fn a_session_can_keep_its_refresh_token_in_an_httponly_cookie() {
    let w = world(&[]).await;
    let http = reqwest::Client::new();
    let url = |p: &str| format!("http://{}{p}", w.server.addr);
    let post = |path: &str, cookie: Option<&str>, body: Value| {
        let mut rq = http.post(url(path)).json(&body);
        if let Some(c) = cookie {
            rq = rq.header("cookie", format!("theme=dark; pg_sales_refresh={c}"));
        }
        rq.send()
    };
    let cookie_login = || {
        post(
            "/api/v2/auth/login",
            None,
            json!({"email": "staff@x.test", "password": PASSWORD, "refreshCookie": true}),
        )
    };

    let r = cookie_login().await.unwrap();
    assert_eq!(r.status(), 200);
    let set = cookie_of(&r).expect("a refresh cookie");
    for attribute in [
        "HttpOnly",
        "SameSite=Strict",
        "Path=/api/v2/auth",
        "Max-Age=604800",
    ] {
        assert!(set.contains(attribute), "{attribute} in {set}");
    }
    assert!(!set.contains("Secure"), "no HSTS, no Secure: {set}");
    let first = value(&set);
    let body: Value = r.json().await.unwrap();
    assert!(
        body.get("refreshToken").is_none(),
        "not in the body: {body}"
    );
    let access = Api::new(&w.server, body["token"].as_str());
    assert_eq!(access.get("/api/v2/auth/me").await.0, 200);

    // Refresh from the cookie: a new access token, the cookie rotated.
    let r = post("/api/v2/auth/refresh", Some(&first), json!({}))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let second = value(&cookie_of(&r).expect("a rotated cookie"));
    assert_ne!(second, first);
    let body: Value = r.json().await.unwrap();
    assert!(body.get("refreshToken").is_none(), "{body}");
    assert!(body["token"].is_string());

    // Neither body nor cookie: 400 naming the field.
    let r = post("/api/v2/auth/refresh", None, json!({})).await.unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["error"]["details"]["parameter"], "refreshToken",
        "{body}"
    );

    // The used cookie presented again ends the session, as a body token would.
    // A refusal removes the cookie that held the refused token.
    let removes = |r: &reqwest::Response| {
        let c = cookie_of(r).expect("a removing cookie");
        assert!(
            c.starts_with("pg_sales_refresh=;")
                && c.contains("Max-Age=0")
                && c.contains("Path=/api/v2/auth"),
            "{c}"
        );
    };
    let r = post("/api/v2/auth/refresh", Some(&first), json!({}))
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    removes(&r);
    let r = post("/api/v2/auth/refresh", Some(&second), json!({}))
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "the whole session ended");
    removes(&r);
    // A token in the body is refused without touching any cookie.
    let r = post(
        "/api/v2/auth/refresh",
        None,
        json!({"refreshToken": second}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 401);
    assert!(cookie_of(&r).is_none());
    // A cookie too long to be a refresh token, and a logout through a
    // cookie holding a token never issued: refused, the cookie removed.
    let r = post("/api/v2/auth/refresh", Some(&"x".repeat(300)), json!({}))
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    removes(&r);
    let r = post("/api/v2/auth/logout", Some("never-issued"), json!({}))
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    removes(&r);
    // Logging out of the ended session is no error, and removes it too.
    let r = post("/api/v2/auth/logout", Some(&second), json!({}))
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    removes(&r);

    // A password change answered in the cookie when the request carried it.
    let r = cookie_login().await.unwrap();
    let cookie = value(&cookie_of(&r).unwrap());
    let token = r.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let r = http
        .post(url("/api/v2/auth/password"))
        .bearer_auth(&token)
        .header("cookie", format!("pg_sales_refresh={cookie}"))
        .json(&json!({"currentPassword": PASSWORD, "newPassword": "a-new-password-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let after_change = value(&cookie_of(&r).expect("the new session's cookie"));
    let body: Value = r.json().await.unwrap();
    assert!(body.get("refreshToken").is_none(), "{body}");

    // Logout from the cookie ends the session and removes the cookie.
    let r = post("/api/v2/auth/logout", Some(&after_change), json!({}))
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let removed = cookie_of(&r).expect("a removing cookie");
    assert!(
        removed.starts_with("pg_sales_refresh=;") && removed.contains("Max-Age=0"),
        "{removed}"
    );
    let r = post("/api/v2/auth/refresh", Some(&after_change), json!({}))
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Without refreshCookie nothing changes: the token is in the body, no cookie.
    let r = post(
        "/api/v2/auth/login",
        None,
        json!({"email": "staff@x.test", "password": "a-new-password-1"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert!(cookie_of(&r).is_none());
    let body: Value = r.json().await.unwrap();
    assert!(body["refreshToken"].is_string(), "{body}");

    // `Secure` when a trusted proxy says the client used HTTPS; the same
    // header from anyone else counts for nothing.
    let proxied =
        w.db.server(&[("TRUSTED_PROXIES", "127.0.0.1/32, ::1")])
            .await;
    for (server, secure) in [(&w.server, false), (&proxied, true)] {
        let r = http
            .post(format!("http://{}/api/v2/auth/login", server.addr))
            .header("x-forwarded-proto", "https")
            .json(&json!({"email": "staff@x.test", "password": "a-new-password-1", "refreshCookie": true}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let set = cookie_of(&r).expect("a refresh cookie");
        assert_eq!(set.ends_with("; Secure"), secure, "{set}");
    }
    proxied.stop().await;
    w.server.stop().await;
}

#[tokio::test]
async fn refresh_rotates_and_reuse_revokes_the_session() {
    let w = world(&[]).await;
    let (_, first) = client(&w.server, "staff@x.test").await;
    assert!(
        first["expiresIn"].as_i64().unwrap() <= 900,
        "short access tokens"
    );
    let anon = Api::new(&w.server, None);
    let refresh = |token: &Value| {
        let anon = anon.clone();
        let body = json!({"refreshToken": token});
        async move { anon.post("/api/v2/auth/refresh", &body).await }
    };
    let (st, second) = refresh(&first["refreshToken"]).await;
    assert_eq!(st, 200, "{second}");
    assert_ne!(second["refreshToken"], first["refreshToken"]);
    assert_eq!(second["sessionId"], first["sessionId"]);
    // Stored as its SHA-256, never as the token.
    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM auth.refresh_tokens WHERE token_hash = sha256(convert_to($1, 'UTF8'))",
    )
    .bind(second["refreshToken"].as_str().unwrap())
    .fetch_one(&w.db.pool)
    .await
    .unwrap();
    assert_eq!(stored, 1);
    let access = Api::new(&w.server, Some(second["token"].as_str().unwrap()));
    assert_eq!(access.get("/api/v2/auth/me").await.0, 200);

    // A new scope comes with the next refresh.
    let (st, _) = patch(
        &w.admin,
        &format!("/api/v2/users/{}", w.staff_id),
        json!({"stores": [w.stores[0], w.stores[1]]}),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(
        access.get("/api/v2/auth/me").await.0,
        401,
        "old scope refused"
    );
    let (st, third) = refresh(&second["refreshToken"]).await;
    assert_eq!(st, 200, "{third}");
    assert_eq!(third["user"]["stores"], json!([w.stores[0], w.stores[1]]));
    let access = Api::new(&w.server, Some(third["token"].as_str().unwrap()));
    assert_eq!(access.get("/api/v2/auth/me").await.0, 200);

    // The first token again: reuse. The whole session is revoked.
    let (st, body) = refresh(&first["refreshToken"]).await;
    assert_eq!(st, 401, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("already used"));
    let (st, body) = access.get("/api/v2/auth/me").await;
    assert_eq!(st, 401, "the session's access token: {body}");
    assert_eq!(
        refresh(&third["refreshToken"]).await.0,
        401,
        "and its newest refresh token"
    );
    assert_eq!(refresh(&json!("not-a-token")).await.0, 401);
    let reason: String =
        sqlx::query_scalar("SELECT revoked_reason FROM auth.sessions WHERE id::text = $1")
            .bind(first["sessionId"].as_str().unwrap())
            .fetch_one(&w.db.pool)
            .await
            .unwrap();
    assert_eq!(reason, "reuse");

    // Logout ends a session; a second logout is fine, an unknown token is 401.
    let (_, s) = client(&w.server, "staff@x.test").await;
    let access = Api::new(&w.server, Some(s["token"].as_str().unwrap()));
    let logout = |t: Value| {
        let anon = anon.clone();
        async move {
            anon.req(Method::POST, "/api/v2/auth/logout")
                .json(&json!({"refreshToken": t}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(logout(s["refreshToken"].clone()).await, 204);
    assert_eq!(access.get("/api/v2/auth/me").await.0, 401);
    assert_eq!(refresh(&s["refreshToken"]).await.0, 401);
    assert_eq!(logout(s["refreshToken"].clone()).await, 204);
    assert_eq!(logout(json!("nope")).await, 401);
    // A disabled user cannot refresh, nor after being enabled again: their
    // sessions ended.
    let (_, s) = client(&w.server, "staff@x.test").await;
    let staff_path = format!("/api/v2/users/{}", w.staff_id);
    patch(&w.admin, &staff_path, json!({"disabled": true})).await;
    assert_eq!(refresh(&s["refreshToken"]).await.0, 401);
    patch(&w.admin, &staff_path, json!({"disabled": false})).await;
    let (st, body) = refresh(&s["refreshToken"]).await;
    assert_eq!(st, 401, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("ended"),
        "{body}"
    );
    patch(&w.admin, &staff_path, json!({"disabled": true})).await;
    let (st, body) = login(&w.server, "staff@x.test", PASSWORD).await;
    assert_eq!(st, 403, "{body}");

    // All of it is in the user's history, newest first, with who did it.
    let history = format!("/api/v2/users/{}/history", w.staff_id);
    let (st, h) = w.admin.get(&history).await;
    assert_eq!(st, 200, "{h}");
    let kinds: Vec<(&str, Option<&str>)> = h["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["event"].as_str().unwrap(), e["data"]["reason"].as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("user-updated", None),
            ("user-updated", None),
            ("user-updated", None),
            ("session-revoked", Some("logout")),
            ("session-revoked", Some("reuse")),
            ("user-updated", None),
            ("user-created", None),
        ],
        "{h}"
    );
    // An event without stores is shown as it is: no `"stores": null`.
    let no_stores = |h: &Value| {
        for e in h["data"].as_array().unwrap() {
            if e["event"] == "session-revoked" {
                assert!(e["data"].get("stores").is_none(), "{e}");
            }
        }
    };
    no_stores(&h);
    let (_, me) = w.admin.get("/api/v2/auth/me").await;
    assert_eq!(h["data"][0]["actorId"], me["id"], "the admin disabled them");
    assert_eq!(h["data"][0]["data"]["changed"], json!(["disabled"]));
    assert_eq!(h["data"][5]["data"]["changed"], json!(["stores"]));
    assert_eq!(
        w.manager.get(&history).await.0,
        200,
        "staff of the manager's store"
    );
    assert_eq!(w.other_manager.get(&history).await.0, 404);
    // Given a store outside the manager's, the staff member's history shows
    // the manager only the stores both share, as their document does.
    let (a, c) = (w.stores[0], w.stores[2]);
    patch(&w.admin, &staff_path, json!({"stores": [a, c]})).await;
    let (_, full) = w.admin.get(&history).await;
    assert_eq!(full["data"][0]["data"]["stores"], json!([a, c]), "{full}");
    let (st, mine) = w.manager.get(&history).await;
    assert_eq!(st, 200, "{mine}");
    assert_eq!(mine["data"][0]["data"]["stores"], json!([a]), "{mine}");
    no_stores(&mine);
    for e in mine["data"].as_array().unwrap() {
        assert!(
            !e["data"]["stores"]
                .as_array()
                .is_some_and(|s| s.contains(&json!(c))),
            "{e}"
        );
    }
    w.server.stop().await;
}

/// A refresh token a refresh has already used, presented to a logout, was
/// copied as surely as one presented to a refresh: the session is revoked
/// as a reuse (401, `session-revoked` with `"reason": "reuse"`), not ended
/// as an ordinary logout. A logout of the session once it has ended is
/// still no error.
#[tokio::test]
async fn a_logout_with_a_used_refresh_token_revokes_the_session_as_a_reuse() {
    let w = world(&[]).await;
    let anon = Api::new(&w.server, None);
    let logout = |token: &Value| {
        let (anon, body) = (anon.clone(), json!({"refreshToken": token}));
        async move { anon.post("/api/v2/auth/logout", &body).await }
    };
    let (_, first) = client(&w.server, "staff@x.test").await;
    let (st, second) = refresh_session(&w.server, &first).await;
    assert_eq!(st, 200, "{second}");
    let access = Api::new(&w.server, second["token"].as_str());
    assert_eq!(access.get("/api/v2/auth/me").await.0, 200);

    let (st, body) = logout(&first["refreshToken"]).await;
    assert_eq!(st, 401, "the used token: {body}");
    assert_eq!(
        body["error"]["message"],
        "refresh token already used; the session is revoked, log in again"
    );
    let (st, body) = access.get("/api/v2/auth/me").await;
    assert_eq!(st, 401, "the session's access token: {body}");
    let (st, body) = refresh_session(&w.server, &second).await;
    assert_eq!(st, 401, "and its newest refresh token: {body}");
    let reason: String =
        sqlx::query_scalar("SELECT revoked_reason FROM auth.sessions WHERE id::text = $1")
            .bind(first["sessionId"].as_str().unwrap())
            .fetch_one(&w.db.pool)
            .await
            .unwrap();
    assert_eq!(reason, "reuse");
    let (_, h) = w
        .admin
        .get(&format!("/api/v2/users/{}/history", w.staff_id))
        .await;
    assert_eq!(h["data"][0]["event"], "session-revoked", "{h}");
    assert_eq!(h["data"][0]["data"]["reason"], "reuse", "{h}");
    // The session has ended: logging out of it again, with either token,
    // is no error and revokes nothing more.
    assert_eq!(logout(&first["refreshToken"]).await.0, 204);
    assert_eq!(logout(&second["refreshToken"]).await.0, 204);
    let revoked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sales.events WHERE kind = 'session-revoked'
         AND payload->>'sessionId' = $1",
    )
    .bind(first["sessionId"].as_str().unwrap())
    .fetch_one(&w.db.pool)
    .await
    .unwrap();
    assert_eq!(revoked, 1, "one revocation");

    // From a cookie, as from the body; the refusal removes the cookie.
    let http = reqwest::Client::new();
    let url = |p: &str| format!("http://{}{p}", w.server.addr);
    let post = |path: &str, cookie: Option<&str>, body: Value| {
        let mut rq = http.post(url(path)).json(&body);
        if let Some(c) = cookie {
            rq = rq.header("cookie", format!("pg_sales_refresh={c}"));
        }
        rq.send()
    };
    let r = post(
        "/api/v2/auth/login",
        None,
        json!({"email": "staff@x.test", "password": PASSWORD, "refreshCookie": true}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let first = value(&cookie_of(&r).expect("a refresh cookie"));
    let r = post("/api/v2/auth/refresh", Some(&first), json!({}))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let second = value(&cookie_of(&r).expect("a rotated cookie"));
    let r = post("/api/v2/auth/logout", Some(&first), json!({}))
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let removed = cookie_of(&r).expect("a removing cookie");
    assert!(
        removed.starts_with("pg_sales_refresh=;") && removed.contains("Max-Age=0"),
        "{removed}"
    );
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("already used"),
        "{body}"
    );
    let r = post("/api/v2/auth/refresh", Some(&second), json!({}))
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "the whole session ended");
    w.server.stop().await;
}

/// An access token past its expiry is refused with a message that points to
/// the refresh, which its session's refresh token still answers.
#[tokio::test]
async fn an_expired_access_token_says_to_refresh_it() {
    use base64::Engine;
    let w = world(&[]).await;
    let (_, login) = client(&w.server, "staff@x.test").await;
    // The session's own token, as the server issued it, but past its
    // expiry (and the clock-skew leeway).
    let token = login["token"].as_str().unwrap();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let payload = b64.decode(token.split('.').nth(1).unwrap()).unwrap();
    let mut claims: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(claims["sid"], login["sessionId"], "{claims}");
    let now = chrono::Utc::now().timestamp();
    claims["iat"] = json!(now - 1000);
    claims["exp"] = json!(now - 100);
    let expired = sales_e2e::fixtures::token::sign_claims(&claims, sales_e2e::TEST_JWT_SECRET);
    let (st, body) = Api::new(&w.server, Some(&expired))
        .get("/api/v2/auth/me")
        .await;
    assert_eq!(st, 401, "{body}");
    assert_eq!(
        body["error"]["message"],
        "token expired; refresh it (POST /api/v2/auth/refresh) or log in again"
    );
    // As it says: the session's refresh token still answers a new token.
    let (st, refreshed) = refresh_session(&w.server, &login).await;
    assert_eq!(st, 200, "{refreshed}");
    let access = Api::new(&w.server, refreshed["token"].as_str());
    assert_eq!(access.get("/api/v2/auth/me").await.0, 200);
    w.server.stop().await;
}

/// A login answered after the free attempts of `what` (its address or
/// account) were used up, the last failure sent at `failed_at` (taken
/// before it was sent, so that the time the server counts from is not
/// before it): 429 for `what`, unless the first wait (1 s) had already
/// passed, which only the elapsed time may excuse (a machine too slow to
/// ask within it).
fn throttled(st: u16, body: &Value, failed_at: Instant, what: &str) {
    let waited = failed_at.elapsed();
    if st != 429 {
        assert_eq!(st, 200, "{body}");
        assert!(
            waited >= Duration::from_secs(1),
            "{st} {body} after {waited:?}"
        );
    } else {
        assert!(
            body["error"]["message"].as_str().unwrap().contains(what),
            "{body}"
        );
    }
}

fn address_throttled(st: u16, body: &Value, failed_at: Instant) {
    throttled(st, body, failed_at, "address")
}

/// Behind a reverse proxy named in TRUSTED_PROXIES, the per-address
/// throttle counts the address the proxy saw (`X-Forwarded-For`), so one
/// client's failures do not lock out everyone behind the proxy; without
/// it, the header is ignored and cannot be used to dodge the throttle.
#[tokio::test]
async fn login_throttling_per_address_behind_a_trusted_proxy() {
    let db = TestDb::new().await;
    let settings = [
        ("LOGIN_ATTEMPTS_PER_MINUTE", "100"),
        ("LOGIN_ATTEMPTS_PER_IP", "2"),
    ];
    let proxied = db
        .server(&[
            settings[0],
            settings[1],
            ("TRUSTED_PROXIES", "127.0.0.1/32, ::1"),
        ])
        .await;
    let direct = db.server(&settings).await;
    add_user(&db, "a@x.test", "admin", &[]).await;
    let http = reqwest::Client::new();
    let login_from = |server: &RunningServer, from: &'static str, password: &'static str| {
        let (http, url) = (
            http.clone(),
            format!("http://{}/api/v2/auth/login", server.addr),
        );
        async move {
            let r = http
                .post(url)
                .header("x-forwarded-for", from)
                .json(&json!({"email": "a@x.test", "password": password}))
                .send()
                .await
                .unwrap();
            let st = r.status().as_u16();
            (st, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    // Two failures from one client behind the proxy; a third attempt from
    // it waits (unless the first 1 s wait has passed by then), another
    // client behind the same proxy does not.
    assert_eq!(
        login_from(&proxied, "203.0.113.1", "wrong-password")
            .await
            .0,
        401
    );
    let failed_at = Instant::now();
    assert_eq!(
        login_from(&proxied, "203.0.113.1", "wrong-password")
            .await
            .0,
        401
    );
    let (st, body) = login_from(&proxied, "203.0.113.1", PASSWORD).await;
    address_throttled(st, &body, failed_at);
    let (st, body) = login_from(&proxied, "203.0.113.2", PASSWORD).await;
    assert_eq!(st, 200, "another client behind the proxy: {body}");
    // Entries a client writes itself, left of what the proxy appends, do
    // not change the address it is counted as.
    let (st, body) = login_from(&proxied, "198.51.100.7, 203.0.113.1", PASSWORD).await;
    if st != 429 {
        assert!(failed_at.elapsed() >= Duration::from_secs(1), "{st} {body}");
    }
    // An IPv6 client counts as its /64, whatever address in it it picks
    // (each new address started afresh); another /64 is another client.
    let mut failed_at = Instant::now();
    for from in ["2001:db8:1:2::1", "2001:db8:1:2::ffff"] {
        failed_at = Instant::now();
        assert_eq!(login_from(&proxied, from, "wrong-password").await.0, 401);
    }
    let (st, body) = login_from(&proxied, "2001:db8:1:2:abcd::9", PASSWORD).await;
    address_throttled(st, &body, failed_at);
    let (st, body) = login_from(&proxied, "2001:db8:1:3::1", PASSWORD).await;
    assert_eq!(st, 200, "another /64: {body}");

    // No trusted proxies: every attempt counts as the peer's (127.0.0.1),
    // whatever the header says.
    assert_eq!(
        login_from(&direct, "203.0.113.3", "wrong-password").await.0,
        401
    );
    let failed_at = Instant::now();
    assert_eq!(
        login_from(&direct, "203.0.113.4", "wrong-password").await.0,
        401
    );
    let (st, body) = login_from(&direct, "203.0.113.5", PASSWORD).await;
    address_throttled(st, &body, failed_at);
    proxied.stop().await;
    direct.stop().await;
}

/// Per account and per address, with a growing delay; unknown and known
/// emails answer alike.
#[tokio::test]
async fn login_throttling_per_account_and_address() {
    let db = TestDb::new().await;
    let server = db
        .server(&[
            ("LOGIN_ATTEMPTS_PER_MINUTE", "2"),
            ("LOGIN_ATTEMPTS_PER_IP", "4"),
        ])
        .await;
    add_user(&db, "known@x.test", "admin", &[]).await;
    let (st_known, known) = login(&server, "known@x.test", "wrong-password").await;
    let (st_unknown, unknown) = login(&server, "unknown@x.test", "wrong-password").await;
    assert_eq!((st_known, st_unknown), (401, 401));
    assert_eq!(known["error"]["message"], unknown["error"]["message"]);
    // Second failure for `known`: its account now waits, another does not.
    let failed_at = Instant::now();
    assert_eq!(
        login(&server, "known@x.test", "wrong-password").await.0,
        401
    );
    let (st, body) = login(&server, "known@x.test", PASSWORD).await;
    throttled(st, &body, failed_at, "account");
    // An unknown email is throttled the same way (nothing tells them apart).
    add_user(&db, "fresh@x.test", "admin", &[]).await;
    let failed_at = Instant::now();
    assert_eq!(
        login(&server, "unknown@x.test", "wrong-password").await.0,
        401
    );
    let (st, body) = login(&server, "unknown@x.test", "wrong-password").await;
    if st != 429 {
        // Past its first wait on a slow machine: the attempt was made, and
        // failed.
        assert_eq!(st, 401, "{body}");
        assert!(failed_at.elapsed() >= Duration::from_secs(1), "{body}");
    }
    // Four failures from this address in all: every account now waits
    // (the first wait is 1 s; on a machine too slow to ask within it the
    // login goes through, which only the elapsed time may excuse).
    let (st, body) = login(&server, "fresh@x.test", PASSWORD).await;
    address_throttled(st, &body, failed_at);
    server.stop().await;
}

/// Waits for the close frame of a WebSocket; returns its code.
async fn close_code(ws: &mut sales_e2e_ws::Socket) -> u16 {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a close frame in time")
        {
            Some(Ok(Message::Close(Some(f)))) => return f.code.into(),
            Some(Ok(_)) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    }
}

mod sales_e2e_ws {
    pub type Socket = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;
}

async fn open_ws(server: &RunningServer, token: &str) -> sales_e2e_ws::Socket {
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws?token={token}", server.addr))
            .await
            .expect("ws connect");
    // The `ready` frame: the connection is registered.
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.contains("ready") => return ws,
            Some(Ok(_)) => continue,
            other => panic!("no ready frame: {other:?}"),
        }
    }
}

/// A change of a user's stores and a write to a store it takes away, in one
/// transaction (plain SQL, so every instance learns of the change from the
/// relay only): the user's open connections close with 4012 before that
/// write's event goes out, on every instance. The event of the change comes
/// first in the log; the connections used to get the write's event and
/// only then close, once the change had been read back.
#[tokio::test]
async fn a_narrowed_scope_closes_before_the_events_it_takes_away() {
    let w = world(&[]).await;
    let b = w.db.server(&[]).await;
    for round in 0..3 {
        let mut sockets = Vec::new();
        for server in [&w.server, &b] {
            let (_, m) = client(server, "manager@x.test").await;
            let mut ws = open_ws(server, m["token"].as_str().unwrap()).await;
            futures_util::SinkExt::send(
                &mut ws,
                Message::text(json!({"type": "subscribe", "event": "all-stores"}).to_string()),
            )
            .await
            .unwrap();
            // The answer: subscribed (and the opening hold released).
            tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    if let Some(Ok(Message::Text(t))) = ws.next().await {
                        if t.contains("subscribed") {
                            return;
                        }
                    }
                }
            })
            .await
            .expect("subscribed");
            sockets.push(ws);
        }
        let (keep, lose) = (w.stores[1], w.stores[0]);
        sqlx::raw_sql(&format!(
            "BEGIN;
             UPDATE sales.users SET store_ids = '{{{keep}}}' WHERE id = {m};
             INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
             VALUES ({lose}, 2024, {month}, '{{\"1\": {{\"sales\": 5, \"customers\": 1}}}}');
             COMMIT;
             UPDATE sales.users SET store_ids = '{{{keep},{lose}}}' WHERE id = {m};",
            m = w.manager_id,
            month = round + 1,
        ))
        .execute(&w.db.pool)
        .await
        .unwrap();
        for (i, ws) in sockets.iter_mut().enumerate() {
            let code = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    match ws.next().await {
                        Some(Ok(Message::Close(Some(f)))) => return u16::from(f.code),
                        Some(Ok(Message::Text(t))) => {
                            let v: Value = serde_json::from_str(&t).unwrap();
                            assert_ne!(
                                v["data"]["storeId"].as_i64(),
                                Some(lose),
                                "round {round}, instance {i}: an event of a store taken away: {v}"
                            );
                        }
                        Some(Ok(_)) => continue,
                        other => panic!("round {round}, instance {i}: no close frame: {other:?}"),
                    }
                }
            })
            .await
            .expect("closed in time");
            assert_eq!(code, 4012, "round {round}, instance {i}");
        }
    }
}

/// While another transaction that wrote an event stays open (a long batch,
/// a bulk load in psql), the events after it wait their turn in delivery
/// order, and so did a user's change: the other instance kept accepting the
/// user's older token, for REST writes too, until that transaction ended.
/// The change is announced as it commits (`sales_access`), so the other
/// instance refuses the token and closes its WebSocket while the
/// transaction is still open; the change's event still comes in its turn.
#[tokio::test]
async fn revocation_reaches_the_other_instance_while_a_transaction_holds_events_back() {
    use sqlx::Connection;
    let w = world(&[]).await;
    let b = w.db.server(&[]).await;
    let (_, staff_session) = client(&b, "staff@x.test").await;
    let staff_token = staff_session["token"].as_str().unwrap().to_string();
    let (_, manager_session) = client(&b, "manager@x.test").await;
    let manager_token = manager_session["token"].as_str().unwrap().to_string();
    let staff_on_b = Api::new(&b, Some(&staff_token));
    let manager_on_b = Api::new(&b, Some(&manager_token));
    assert_eq!(staff_on_b.get("/api/v2/auth/me").await.0, 200);
    let mut ws = open_ws(&b, &staff_token).await;

    // An event-writing transaction left open.
    let mut holder = sqlx::PgConnection::connect(&w.db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("SELECT sales.emit('test-holder', '{}')")
        .execute(&mut holder)
        .await
        .unwrap();
    let held = |db: &TestDb| {
        let pool = db.pool.clone();
        async move {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM sales.event_holders()")
                .fetch_one(&pool)
                .await
                .unwrap();
            n > 0
        }
    };
    assert!(held(&w.db).await, "the holder holds delivery back");

    // Disabled, and a manager's stores narrowed, through instance A.
    let (st, _) = patch(
        &w.admin,
        &format!("/api/v2/users/{}", w.staff_id),
        json!({"disabled": true}),
    )
    .await;
    assert_eq!(st, 200);
    let (st, _) = patch(
        &w.admin,
        &format!("/api/v2/users/{}", w.manager_id),
        json!({"stores": [w.stores[0]]}),
    )
    .await;
    assert_eq!(st, 200);
    eventually(
        Duration::from_secs(10),
        "both refused on instance B",
        || async {
            let staff = staff_on_b.get("/api/v2/auth/me").await.0;
            let manager = manager_on_b.get("/api/v2/auth/me").await.0;
            (staff == 401 && manager == 401).then_some(())
        },
    )
    .await;
    assert_eq!(close_code(&mut ws).await, 4010, "closed: account disabled");
    // The manager's old token writes nothing to the store taken away.
    let (st, _) = manager_on_b
        .post(
            "/api/v2/sales/batch",
            &json!({"salesDataArray": [sales_e2e::month(w.stores[1], 2031, 1, 1, 5.0)]}),
        )
        .await;
    assert_eq!(st, 401);
    assert!(
        held(&w.db).await,
        "all of this while the transaction still held events back"
    );
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
}

/// Announcements made while an instance's listener was away are not lost:
/// once it listens again it reads every user's access back. A user's
/// stores changed by plain SQL (the trigger moves the generation and
/// writes the event) while an event-writing transaction holds delivery
/// back and the listener's connection is cut: the old token is refused and
/// its WebSocket closed with 4012, while the transaction still runs.
#[tokio::test]
async fn a_change_announced_while_the_listener_was_away_is_read_back() {
    use sqlx::Connection;
    let w = world(&[]).await;
    let relay = || async {
        let (st, body) = w.admin.get("/api/admin/websocket/stats").await;
        assert_eq!(st, 200, "{body}");
        body["relay"].clone()
    };
    let mut holder = sqlx::PgConnection::connect(&w.db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("SELECT sales.emit('test-holder', '{}')")
        .execute(&mut holder)
        .await
        .unwrap();
    // The listener comes back after 100 ms at least: a commit right after
    // the cut reaches no listener. When it did reach one (checked after
    // the commit: a listener connected then may have heard it), the round
    // proved nothing and is run again with a new token.
    let mut missed = false;
    for round in 0..3 {
        let (_, staff_session) = client(&w.server, "staff@x.test").await;
        let staff_token = staff_session["token"].as_str().unwrap().to_string();
        let staff = Api::new(&w.server, Some(&staff_token));
        assert_eq!(staff.get("/api/v2/auth/me").await.0, 200);
        let mut ws = open_ws(&w.server, &staff_token).await;
        eventually(
            Duration::from_secs(10),
            "the listener listening",
            || async { (relay().await["listening"] == json!(true)).then_some(()) },
        )
        .await;
        let mut changer = sqlx::PgConnection::connect(&w.db.url).await.unwrap();
        sqlx::query("BEGIN").execute(&mut changer).await.unwrap();
        sqlx::query("UPDATE sales.users SET store_ids = $1 WHERE id = $2")
            .bind(vec![w.stores[1 + round % 2]])
            .bind(w.staff_id)
            .execute(&mut changer)
            .await
            .unwrap();
        assert_eq!(w.db.cut_listeners().await, 1);
        sqlx::query("COMMIT").execute(&mut changer).await.unwrap();
        let back: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'sales-server-ephemeral'",
        )
        .fetch_one(&w.db.pool)
        .await
        .unwrap();
        eventually(Duration::from_secs(15), "the old token refused", || async {
            (staff.get("/api/v2/auth/me").await.0 == 401).then_some(())
        })
        .await;
        assert_eq!(close_code(&mut ws).await, 4012, "closed: access changed");
        if back == 0 {
            missed = true;
            break;
        }
    }
    assert!(
        missed,
        "in every round the listener was back before the commit"
    );
    let held: i64 = sqlx::query_scalar("SELECT count(*) FROM sales.event_holders()")
        .fetch_one(&w.db.pool)
        .await
        .unwrap();
    assert!(
        held > 0,
        "all of this while the transaction held events back"
    );
    let relay = relay().await;
    assert!(
        relay["listenerReconnects"].as_u64().unwrap() >= 1,
        "{relay}"
    );
    assert_eq!(relay["listening"], json!(true), "{relay}");
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
}

/// Two instances on one database: a change made through one is refused
/// on the other as its event arrives (how long that took is printed), for
/// REST and WebSockets alike, with a close code that says why; the admins'
/// `admin` channel sees the change.
#[tokio::test]
async fn revocation_reaches_every_instance() {
    let w = world(&[]).await;
    let b = w.db.server(&[]).await;
    let (_, staff_session) = client(&b, "staff@x.test").await;
    let token = staff_session["token"].as_str().unwrap().to_string();
    let on_b = Api::new(&b, Some(&token));
    assert_eq!(on_b.get("/api/v2/auth/me").await.0, 200);
    let mut ws = open_ws(&b, &token).await;
    // An admin on instance B follows the audit channel.
    let (_, admin_session) = client(&b, "admin@x.test").await;
    let mut audit = open_ws(&b, admin_session["token"].as_str().unwrap()).await;
    futures_util::SinkExt::send(
        &mut audit,
        Message::text(json!({"type": "subscribe", "event": "admin"}).to_string()),
    )
    .await
    .unwrap();

    // Disabled through instance A.
    let (st, _) = patch(
        &w.admin,
        &format!("/api/v2/users/{}", w.staff_id),
        json!({"disabled": true}),
    )
    .await;
    assert_eq!(st, 200);
    let t0 = Instant::now();
    let (st, body) = eventually(Duration::from_secs(30), "401 on instance B", || async {
        let (st, body) = on_b.get("/api/v2/auth/me").await;
        (st == 401).then_some((st, body))
    })
    .await;
    let rest = t0.elapsed();
    assert_eq!(st, 401);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("disabled"),
        "{body}"
    );
    assert_eq!(close_code(&mut ws).await, 4010, "closed: account disabled");
    let socket = t0.elapsed();
    // How long it took is printed, not asserted (a busy machine may take
    // longer; the bounds above only keep a missing revocation from hanging).
    println!("revocation on the second instance: REST refused after {rest:?}, WebSocket closed after {socket:?}");
    // A new WebSocket with the old token is refused as well.
    let refused =
        tokio_tungstenite::connect_async(format!("ws://{}/ws?token={token}", b.addr)).await;
    assert!(refused.is_err(), "upgrade with a revoked token");

    // The audit event reached the admin on B.
    let audit_event = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(Ok(Message::Text(t))) = audit.next().await {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["event"] == "user-updated" {
                    return v;
                }
            }
        }
    })
    .await
    .expect("user-updated on the admin channel");
    assert_eq!(audit_event["data"]["userId"], w.staff_id);
    assert_eq!(audit_event["data"]["disabled"], true);
    assert_eq!(audit_event["data"]["changed"], json!(["disabled"]));

    // A role change closes with 4012, a logout on A with 4014 on B, a
    // deletion with 4011.
    let (_, m) = client(&b, "manager@x.test").await;
    let mut mws = open_ws(&b, m["token"].as_str().unwrap()).await;
    patch(
        &w.admin,
        &format!("/api/v2/users/{}", w.manager_id),
        json!({"stores": [w.stores[0]]}),
    )
    .await;
    assert_eq!(close_code(&mut mws).await, 4012);
    let (_, m) = client(&b, "manager@x.test").await;
    let mut mws = open_ws(&b, m["token"].as_str().unwrap()).await;
    let st = Api::new(&w.server, None)
        .req(Method::POST, "/api/v2/auth/logout")
        .json(&json!({"refreshToken": m["refreshToken"]}))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(st, 204);
    assert_eq!(close_code(&mut mws).await, 4014);
    let (_, m) = client(&b, "manager@x.test").await;
    let mut mws = open_ws(&b, m["token"].as_str().unwrap()).await;
    assert_eq!(
        delete(&w.admin, &format!("/api/v2/users/{}", w.manager_id)).await,
        204
    );
    assert_eq!(close_code(&mut mws).await, 4011);
    let on_b = Api::new(&b, Some(m["token"].as_str().unwrap()));
    let (st, _) = on_b.get("/api/v2/auth/me").await;
    assert_eq!(st, 401);

    // Counted: four closes on B (4010, 4012, 4014, 4011).
    let metrics = reqwest::get(b.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("websocket_closed_revoked_total") && l.ends_with(" 4")),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("revoked"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // An instance started after the changes refuses the same tokens.
    let c = w.db.server(&[]).await;
    assert_eq!(
        Api::new(&c, Some(&token)).get("/api/v2/auth/me").await.0,
        401
    );
    assert_eq!(
        Api::new(&c, Some(m["token"].as_str().unwrap()))
            .get("/api/v2/auth/me")
            .await
            .0,
        401
    );
    c.stop().await;
    b.stop().await;
    w.server.stop().await;
}

/// An RSA key made with openssl: (private PEM, its JWK with `kid`).
fn rsa_key(dir: &std::path::Path, kid: &str) -> (Vec<u8>, Value) {
    let pem = dir.join(format!("{kid}.pem"));
    let ok = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&pem)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok, "openssl genpkey");
    let out = std::process::Command::new("openssl")
        .args(["rsa", "-noout", "-modulus", "-in"])
        .arg(&pem)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let hex = text.trim().strip_prefix("Modulus=").expect("modulus");
    let n: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let jwk = json!({"kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig",
                     "n": b64.encode(n), "e": "AQAB"});
    (std::fs::read(&pem).unwrap(), jwk)
}

/// The issuer of the tests' identity provider.
const IDP: &str = "https://idp.x.test";

fn outside_token(
    pem: &[u8],
    kid: &str,
    sub: &str,
    email: &str,
    role: &str,
    stores: &[i64],
) -> String {
    outside_token_from(pem, kid, Some(IDP), sub, email, role, stores)
}

fn outside_token_from(
    pem: &[u8],
    kid: &str,
    iss: Option<&str>,
    sub: &str,
    email: &str,
    role: &str,
    stores: &[i64],
) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some(kid.to_string());
    let now = chrono::Utc::now().timestamp();
    let mut claims = json!({"sub": sub, "email": email, "email_verified": true,
                            "role": role, "stores": stores, "iat": now, "exp": now + 600});
    if let Some(iss) = iss {
        claims["iss"] = iss.into();
    }
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_rsa_pem(pem).unwrap(),
    )
    .unwrap()
}

/// Serves `body` (changeable) at `http://addr/jwks.json`.
async fn jwks_server(body: std::sync::Arc<std::sync::Mutex<String>>) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let body = body.lock().unwrap().clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    });
    addr
}

/// Outside identity provider: RS256 tokens verified with the JWKS key they
/// name, from a file or a URL; a new key is accepted once published, a
/// withdrawn one refused. A token stands for the user an admin linked its
/// (iss, sub) to, and for nobody else: not the user with its email (a
/// manager can create one with any address), not the user whose id its sub
/// spells. The linked user's disabling applies to it, and a link or unlink
/// reaches every instance.
#[tokio::test]
async fn jwks_rotation_and_outside_users() {
    let dir = std::env::temp_dir().join(format!("pgs_jwks_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (k1, jwk1) = rsa_key(&dir, "k1");
    let (k2, jwk2) = rsa_key(&dir, "k2");
    let file = dir.join("jwks.json");
    std::fs::write(&file, json!({"keys": [jwk1]}).to_string()).unwrap();

    let db = TestDb::new().await;
    let stores = db.stores(2).await;
    let server = db
        .server(&[
            ("JWT_JWKS_FILE", file.to_str().unwrap()),
            ("JWT_JWKS_REFRESH", "1s"),
        ])
        .await;
    add_user(&db, "admin@x.test", "admin", &[]).await;
    let local = add_user(&db, "ext@x.test", "manager", &[stores[0]]).await;
    add_user(&db, "mgr@x.test", "manager", &[stores[0]]).await;
    let (admin, _) = client(&server, "admin@x.test").await;
    let (mgr, _) = client(&server, "mgr@x.test").await;
    let link = |api: &Api, user: i64, subject: &str| {
        let (api, path) = (api.clone(), format!("/api/v2/users/{user}/identity"));
        let body = json!({"issuer": IDP, "subject": subject});
        async move { put(&api, &path, &body).await }
    };
    let me = |t: &str| {
        let api = Api::new(&server, Some(t));
        async move { api.get("/api/v2/auth/me").await }
    };

    // The provider's admin, and a staff user a manager made with the same
    // address: the token is not theirs, nor anyone's until linked.
    let boss = outside_token(&k1, "k1", "boss-sub", "boss@x.test", "admin", &[]);
    let (st, body) = mgr
        .post(
            "/api/v2/users",
            &json!({"email": "boss@x.test", "role": "staff", "stores": [stores[0]],
                    "password": "impostor-pass-1"}),
        )
        .await;
    assert_eq!(st, 201, "{body}");
    let impostor = body["data"]["id"].as_i64().unwrap();
    let (st, body) = me(&boss).await;
    assert_eq!(st, 401, "an email names nobody: {body}");
    assert!(
        body.to_string().contains("not linked"),
        "the refusal says why: {body}"
    );
    // Only an admin links.
    let (st, body) = link(&mgr, impostor, "boss-sub").await;
    assert_eq!(st, 403, "{body}");
    assert_eq!(me(&boss).await.0, 401);

    let t1 = outside_token(
        &k1,
        "k1",
        "ext-sub",
        "other-address@x.test",
        "manager",
        &[stores[0]],
    );
    assert_eq!(me(&t1).await.0, 401, "not linked yet");
    let link_path = format!("/api/v2/users/{local}/identity");
    for (bad, field) in [
        (json!({"issuer": "", "subject": "ext-sub"}), "issuer"),
        (json!({"issuer": IDP, "subject": " ext-sub"}), "subject"),
        (json!({"subject": "ext-sub"}), "issuer"),
        (json!({"issuer": IDP, "subject": "ext\u{0}sub"}), "subject"),
        (
            json!({"issuer": "x".repeat(1001), "subject": "ext-sub"}),
            "issuer",
        ),
    ] {
        let (st, body) = put(&admin, &link_path, &bad).await;
        assert_eq!(st, 422, "{bad}: {body}");
        assert!(body.to_string().contains(field), "{bad}: {body}");
    }
    let (st, body) = link(&admin, local, "ext-sub").await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(
        body["data"]["identity"],
        json!({"issuer": IDP, "subject": "ext-sub"})
    );
    let (st, me1) = me(&t1).await;
    assert_eq!(st, 200, "{me1}");
    assert_eq!(
        (me1["id"].as_i64(), me1["registered"].as_bool()),
        (Some(local), Some(true))
    );
    // `me` answers what the token grants (the provider's role and stores,
    // which every check applies), not the local user's.
    let t_staff = outside_token(&k1, "k1", "ext-sub", "x@x.test", "staff", &[stores[1]]);
    let (st, me2) = me(&t_staff).await;
    assert_eq!(st, 200, "{me2}");
    assert_eq!(
        (me2["id"].as_i64(), me2["role"].as_str(), &me2["stores"]),
        (Some(local), Some("staff"), &json!([stores[1]])),
        "{me2}"
    );
    assert_eq!(me2["email"], "ext@x.test", "{me2}");
    // One user per identity: linking it to another is refused, naming the holder.
    let (st, body) = link(&admin, impostor, "ext-sub").await;
    assert_eq!(st, 409, "{body}");
    assert!(
        body.to_string()
            .contains(&format!("already linked to user {local}")),
        "{body}"
    );
    // The same subject from another issuer, or without one, is nobody; a
    // numeric sub is not taken for a user id.
    for t in [
        outside_token_from(
            &k1,
            "k1",
            Some("https://elsewhere.test"),
            "ext-sub",
            "e@x.test",
            "admin",
            &[],
        ),
        outside_token_from(&k1, "k1", None, "ext-sub", "e@x.test", "admin", &[]),
        outside_token(&k1, "k1", &local.to_string(), "ext@x.test", "admin", &[]),
    ] {
        assert_eq!(me(&t).await.0, 401);
    }

    // Disabled here: the provider's token is refused too; enabled: accepted again.
    let path = format!("/api/v2/users/{local}");
    assert_eq!(patch(&admin, &path, json!({"disabled": true})).await.0, 200);
    let (st, body) = me(&t1).await;
    assert_eq!(st, 401, "{body}");
    assert_eq!(
        patch(&admin, &path, json!({"disabled": false})).await.0,
        200
    );
    assert_eq!(me(&t1).await.0, 200, "outside tokens know no generation");
    // An open WebSocket is judged like REST: a change of the user's access
    // (which moves the generation outside tokens do not carry) keeps it
    // open; disabling the user closes it (4010, not 4012 for the change).
    let mut ws = open_ws(&server, &t1).await;
    assert_eq!(
        patch(&admin, &path, json!({"stores": [stores[0], stores[1]]}))
            .await
            .0,
        200
    );
    assert_eq!(me(&t1).await.0, 200);
    assert_eq!(patch(&admin, &path, json!({"disabled": true})).await.0, 200);
    assert_eq!(
        close_code(&mut ws).await,
        4010,
        "closed for the disable only"
    );
    assert_eq!(
        patch(&admin, &path, json!({"disabled": false})).await.0,
        200
    );
    // Shown with the user; a user with none shows none.
    let (_, shown) = admin.get(&path).await;
    assert_eq!(shown["data"]["identity"]["subject"], "ext-sub", "{shown}");
    let (_, shown) = mgr.get(&format!("/api/v2/users/{impostor}")).await;
    assert!(shown["data"].get("identity").is_none(), "{shown}");

    // Rotation through the file: k2 published, k1 withdrawn.
    let t2 = outside_token(&k2, "k2", "ext-sub", "ext@x.test", "manager", &[stores[0]]);
    assert_eq!(
        Api::new(&server, Some(&t2)).get("/api/v2/auth/me").await.0,
        401,
        "k2 not published yet"
    );
    std::fs::write(&file, json!({"keys": [jwk2]}).to_string()).unwrap();
    eventually(Duration::from_secs(15), "the new key accepted", || async {
        (Api::new(&server, Some(&t2)).get("/api/v2/auth/me").await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(me(&t1).await.0, 401, "the withdrawn key");

    // The same from a URL.
    let served = std::sync::Arc::new(std::sync::Mutex::new(
        json!({"keys": [jwk1.clone()]}).to_string(),
    ));
    let addr = jwks_server(served.clone()).await;
    let by_url = db
        .server(&[
            ("JWT_JWKS_URL", &format!("http://{addr}/jwks.json")),
            ("JWT_JWKS_REFRESH", "1s"),
        ])
        .await;
    assert_eq!(
        Api::new(&by_url, Some(&t1)).get("/api/v2/auth/me").await.0,
        200
    );
    // An unlink on one instance reaches the other through its event; a
    // link again too. A WebSocket the token opened there is closed by the
    // unlink (4012, access changed).
    let mut ws = open_ws(&by_url, &t1).await;
    let (st, body) = api_delete(&admin, &link_path).await;
    assert_eq!(st, 200, "{body}");
    assert!(body["data"].get("identity").is_none(), "{body}");
    let on_by_url = |token: String, status: u16, what: &'static str| {
        let by_url = &by_url;
        async move {
            eventually(Duration::from_secs(15), what, || async {
                (Api::new(by_url, Some(&token))
                    .get("/api/v2/auth/me")
                    .await
                    .0
                    == status)
                    .then_some(())
            })
            .await
        }
    };
    on_by_url(t1.clone(), 401, "the unlink on the other instance").await;
    assert_eq!(close_code(&mut ws).await, 4012, "closed by the unlink");
    assert_eq!(me(&t1).await.0, 401);
    let (st, body) = link(&admin, local, "ext-sub").await;
    assert_eq!(st, 200, "{body}");
    on_by_url(t1.clone(), 200, "the link on the other instance").await;
    // A link removed by plain SQL is announced as the server's own are.
    let mut sql = db.connect().await;
    sqlx::query("DELETE FROM auth.identities WHERE user_id = $1")
        .bind(local)
        .execute(&mut sql)
        .await
        .unwrap();
    on_by_url(t1.clone(), 401, "an unlink by plain SQL").await;
    sqlx::query(
        "INSERT INTO auth.identities (user_id, issuer, subject) VALUES ($1, $2, 'ext-sub')",
    )
    .bind(local)
    .bind(IDP)
    .execute(&mut sql)
    .await
    .unwrap();
    on_by_url(t1.clone(), 200, "a link by plain SQL").await;
    let (_, history) = admin.get(&format!("/api/v2/users/{local}/history")).await;
    assert_eq!(
        history["data"][0]["data"]["identity"],
        json!({"issuer": IDP, "subject": "ext-sub"}),
        "{history}"
    );
    *served.lock().unwrap() = json!({"keys": [jwk1, jwk2]}).to_string();
    on_by_url(t2.clone(), 200, "the new key from the URL").await;
    by_url.stop().await;
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

fn cli(db: &TestDb, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    use std::io::Write;
    let mut cmd = std::process::Command::new(sales_e2e::server_bin());
    cmd.args(args)
        .envs(db.env())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("sales-server");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

/// A command other than `migrate` and `serve` changes nothing on a database
/// migrated before: with the extension older than this release (updating
/// it would leave the instances serving the database on an extension newer
/// than theirs) or a migration missing, `user list` and `seed` refuse,
/// saying to run `migrate`, and the extension keeps its version.
#[tokio::test]
async fn commands_leave_an_older_database_to_migrate() {
    let db = TestDb::new().await;
    let text = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();
    let version = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT extversion FROM pg_extension WHERE extname = 'pg_sales'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    sqlx::query("UPDATE pg_extension SET extversion = '0.1.0' WHERE extname = 'pg_sales'")
        .execute(&db.pool)
        .await
        .unwrap();
    for args in [
        &["user", "list"][..],
        &["seed", "--stores", "1", "--months", "1"][..],
    ] {
        let out = cli(&db, args, None);
        assert!(!out.status.success(), "{args:?}: {}", text(&out));
        assert!(
            text(&out).contains(&format!(
                "extension pg_sales in the database is 0.1.0 and this release needs {}; run `sales-server migrate` first",
                sales_server::VERSION
            )),
            "{args:?}: {}",
            text(&out)
        );
        assert_eq!(version().await, "0.1.0", "{args:?} changed the extension");
    }
    sqlx::query("UPDATE pg_extension SET extversion = $1 WHERE extname = 'pg_sales'")
        .bind(sales_server::VERSION)
        .execute(&db.pool)
        .await
        .unwrap();
    let out = cli(&db, &["user", "list"], None);
    assert!(out.status.success(), "{}", text(&out));

    sqlx::query(
        "DELETE FROM _sqlx_migrations WHERE version = (SELECT max(version) FROM _sqlx_migrations)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let out = cli(&db, &["user", "list"], None);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("lacks 1 of this release's migrations")
            && text(&out).contains("run `sales-server migrate` first"),
        "{}",
        text(&out)
    );
    // One left partly applied is named as such (`migrate` refuses it too).
    sqlx::query("UPDATE _sqlx_migrations SET success = false WHERE version = 1")
        .execute(&db.pool)
        .await
        .unwrap();
    let out = cli(&db, &["user", "list"], None);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("migration 0001 extension was left partly applied"),
        "{}",
        text(&out)
    );
    let stores: i64 = sqlx::query_scalar("SELECT count(*) FROM sales.stores")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(stores, 0, "seed wrote to a database it refused");
}

/// `user list|disable|enable|set-password|link|unlink`: a change from the command line
/// reaches a running server through its event, like any other.
#[tokio::test]
async fn command_line_user_management() {
    let w = world(&[]).await;
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let out = cli(&w.db, &["user", "list"], None);
    assert!(out.status.success(), "{}", text(&out));
    let listed = text(&out);
    for email in [
        "admin@x.test",
        "manager@x.test",
        "staff@x.test",
        "staff-c@x.test",
    ] {
        assert!(listed.contains(email), "{listed}");
    }

    let out = cli(&w.db, &["user", "disable", "--email", "STAFF@x.test"], None);
    assert!(out.status.success(), "{}", text(&out));
    // Named as stored, whatever case it was typed in.
    assert!(
        text(&out).contains("disabled user staff@x.test (id "),
        "{}",
        text(&out)
    );
    // On a terminal, a store that does not exist is refused before the
    // password is asked for (it was asked twice, then refused): run under
    // `script`, which gives the command a terminal, with nothing to type.
    let command = format!(
        "{} user add --email new@x.test --role staff --store 99999999",
        sales_e2e::server_bin().display()
    );
    let out = std::process::Command::new("timeout")
        .args(["60", "script", "-qec", &command, "/dev/null"])
        .envs(w.db.env())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("script");
    let said = text(&out);
    assert!(
        said.contains("--store: no store with id [99999999]") && !said.contains("Password:"),
        "{said}"
    );
    eventually(
        Duration::from_secs(30),
        "the running server refuses the token",
        || async { (w.staff.get("/api/v2/auth/me").await.0 == 401).then_some(()) },
    )
    .await;
    assert!(text(&cli(&w.db, &["user", "list"], None)).contains("disabled"));
    assert_eq!(login(&w.server, "staff@x.test", PASSWORD).await.0, 403);
    let out = cli(&w.db, &["user", "enable", "--email", "staff@x.test"], None);
    assert!(out.status.success(), "{}", text(&out));

    let out = cli(
        &w.db,
        &[
            "user",
            "set-password",
            "--email",
            "staff@x.test",
            "--password",
            "short",
        ],
        None,
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("--password: must be at least 8"),
        "{}",
        text(&out)
    );
    let out = cli(
        &w.db,
        &["user", "set-password", "--email", "staff@x.test"],
        Some("from-stdin-pass\n"),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        login(&w.server, "staff@x.test", "from-stdin-pass").await.0,
        200
    );
    let out = cli(
        &w.db,
        &["user", "disable", "--email", "nobody@x.test"],
        None,
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no user nobody@x.test"),
        "{}",
        text(&out)
    );
    // The last enabled admin stays.
    let out = cli(&w.db, &["user", "disable", "--email", "admin@x.test"], None);
    assert!(!out.status.success());
    assert!(text(&out).contains("last enabled admin"), "{}", text(&out));

    // Outside identities: linked and unlinked from the command line, with
    // the API's rules (both parts given, one user per identity).
    let link = |email: &str, subject: &str| {
        cli(
            &w.db,
            &[
                "user",
                "link",
                "--email",
                email,
                "--issuer",
                "https://idp.x.test",
                "--subject",
                subject,
            ],
            None,
        )
    };
    let out = link("staff@x.test", "");
    assert!(!out.status.success());
    assert!(
        text(&out).contains("--subject: must not be empty"),
        "{}",
        text(&out)
    );
    let out = link("staff@x.test", "s-1");
    assert!(out.status.success(), "{}", text(&out));
    let shown = |id: i64| {
        let admin = &w.admin;
        async move {
            admin.get(&format!("/api/v2/users/{id}")).await.1["data"]["identity"]["subject"]
                .as_str()
                .map(str::to_string)
        }
    };
    assert_eq!(shown(w.staff_id).await.as_deref(), Some("s-1"));
    let listed = text(&cli(&w.db, &["user", "list"], None));
    assert!(
        listed
            .lines()
            .any(|l| l.contains("staff@x.test") && l.ends_with("https://idp.x.test s-1")),
        "{listed}"
    );
    let out = link("manager@x.test", "s-1");
    assert!(!out.status.success());
    assert!(
        text(&out).contains(&format!(
            "--issuer, --subject: this issuer and subject are already linked to user {}",
            w.staff_id
        )),
        "{}",
        text(&out)
    );
    assert_eq!(shown(w.manager_id).await, None);
    let out = cli(&w.db, &["user", "unlink", "--email", "staff@x.test"], None);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("unlinked"), "{}", text(&out));
    assert_eq!(shown(w.staff_id).await, None);
    let out = cli(&w.db, &["user", "unlink", "--email", "staff@x.test"], None);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("had no linked identity"),
        "{}",
        text(&out)
    );
    w.server.stop().await;
}

/// A burst of parallel wrong passwords for one account: each attempt is
/// counted when it is admitted, not after its (slow) verification, so no
/// more than the free attempts are verified; the rest wait (429).
#[tokio::test]
async fn parallel_wrong_logins_are_throttled() {
    let db = TestDb::new().await;
    let server = db
        .server(&[
            ("LOGIN_ATTEMPTS_PER_MINUTE", "3"),
            ("LOGIN_ATTEMPTS_PER_IP", "1000"),
            ("PASSWORD_HASH_CONCURRENCY", "4"),
        ])
        .await;
    add_user(&db, "burst@x.test", "admin", &[]).await;
    let burst = (0..16).map(|_| login(&server, "burst@x.test", "wrong-password"));
    let statuses: Vec<u16> = futures_util::future::join_all(burst)
        .await
        .into_iter()
        .map(|(st, _)| st)
        .collect();
    let refused = statuses.iter().filter(|s| **s == 401).count();
    let waiting = statuses.iter().filter(|s| **s == 429).count();
    // A machine busy enough to keep a request waiting for a database
    // connection past its bound answers it 503 (busy): it was not
    // verified either.
    let busy = statuses.iter().filter(|s| **s == 503).count();
    assert!(refused <= 3, "at most the free attempts: {statuses:?}");
    assert_eq!(refused + waiting + busy, statuses.len(), "{statuses:?}");
    server.stop().await;
}

/// A login whose password is verified just before a password reset gets
/// no session: the reset is waited for and the verified hash is stale.
#[tokio::test]
async fn a_login_racing_a_password_reset_gets_no_session() {
    let db = TestDb::new().await;
    let server = db.server(&[]).await;
    let id = add_user(&db, "racer@x.test", "admin", &[]).await;
    add_user(&db, "admin@x.test", "admin", &[]).await;
    // The reset, uncommitted: it holds the user's row.
    let mut reset = db.pool.begin().await.unwrap();
    sales_server::users::lock(&mut reset).await.unwrap();
    let hash = sales_server::users::hash_password("a-new-password-9").unwrap();
    sales_server::users::update(
        &mut reset,
        id,
        sales_server::users::UserPatch {
            password_hash: Some(hash),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // The old password still verifies (the reset is not committed).
    let attempt = tokio::spawn({
        let api = Api::new(&server, None);
        async move {
            api.post(
                "/api/v2/auth/login",
                &json!({"email": "racer@x.test", "password": PASSWORD}),
            )
            .await
        }
    });
    // Until the login waits for the user's row (or, wrongly, is answered).
    until_blocked(
        &db,
        &attempt,
        "the login waits for the reset",
        "wait_event_type = 'Lock' AND query LIKE '%FOR SHARE%'",
    )
    .await;
    reset.commit().await.unwrap();
    let (st, body) = attempt.await.unwrap();
    assert_eq!(st, 401, "no session survives the reset: {body}");
    assert_eq!(
        login(&server, "racer@x.test", "a-new-password-9").await.0,
        200
    );
    server.stop().await;
}

/// PATCH with `password` on one's own id would skip the current-password
/// check of /auth/password: refused, naming the field.
#[tokio::test]
async fn own_password_is_not_set_through_patch() {
    let w = world(&[]).await;
    let (_, me) = w.admin.get("/api/v2/auth/me").await;
    let path = format!("/api/v2/users/{}", me["id"]);
    let (st, body) = patch(&w.admin, &path, json!({"password": "another-password-7"})).await;
    assert_eq!(st, 422, "{body}");
    assert_eq!(body["error"]["details"]["field"], "password", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/api/v2/auth/password"),
        "{body}"
    );
    assert_eq!(
        login(&w.server, "admin@x.test", "another-password-7")
            .await
            .0,
        401,
        "the password did not change"
    );
    // Another user's password stays an admin's to set.
    let (st, body) = patch(
        &w.admin,
        &format!("/api/v2/users/{}", w.staff_id),
        json!({"password": "another-password-7"}),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    w.server.stop().await;
}

/// A manager's change is checked against the user as they are under the
/// users lock: staff moved out of the manager's stores meanwhile are not
/// theirs to change any more.
#[tokio::test]
async fn a_manager_change_is_checked_under_the_lock() {
    let w = world(&[]).await;
    // An admin's change, uncommitted: moves the staff to store C.
    let mut move_out = w.db.pool.begin().await.unwrap();
    sales_server::users::lock(&mut move_out).await.unwrap();
    sales_server::users::update(
        &mut move_out,
        w.staff_id,
        sales_server::users::UserPatch {
            stores: Some(vec![w.stores[2]]),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let attempt = tokio::spawn({
        let api = w.manager.clone();
        let path = format!("/api/v2/users/{}", w.staff_id);
        async move { patch(&api, &path, json!({"disabled": true})).await }
    });
    until_blocked(
        &w.db,
        &attempt,
        "the manager's change waits for the lock",
        "wait_event = 'advisory'",
    )
    .await;
    move_out.commit().await.unwrap();
    let (st, body) = attempt.await.unwrap();
    assert_eq!(st, 404, "no longer theirs: {body}");
    let (_, user) = w.admin.get(&format!("/api/v2/users/{}", w.staff_id)).await;
    assert_eq!(user["data"]["disabled"], false, "{user}");
    w.server.stop().await;
}

/// A password change verified just before an admin's reset does not undo
/// the reset: the reset is waited for and the current password is stale.
#[tokio::test]
async fn a_password_change_racing_a_reset_does_not_undo_it() {
    let w = world(&[]).await;
    let mut reset = w.db.pool.begin().await.unwrap();
    sales_server::users::lock(&mut reset).await.unwrap();
    let hash = sales_server::users::hash_password("reset-by-admin-5").unwrap();
    sales_server::users::update(
        &mut reset,
        w.staff_id,
        sales_server::users::UserPatch {
            password_hash: Some(hash),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let attempt = tokio::spawn({
        let api = w.staff.clone();
        async move {
            api.post(
                "/api/v2/auth/password",
                &json!({"currentPassword": PASSWORD, "newPassword": "chosen-by-user-6"}),
            )
            .await
        }
    });
    until_blocked(
        &w.db,
        &attempt,
        "the change waits for the reset",
        "wait_event = 'advisory'",
    )
    .await;
    reset.commit().await.unwrap();
    let (st, body) = attempt.await.unwrap();
    assert_eq!(st, 403, "{body}");
    assert_eq!(
        login(&w.server, "staff@x.test", "chosen-by-user-6").await.0,
        401
    );
    assert_eq!(
        login(&w.server, "staff@x.test", "reset-by-admin-5").await.0,
        200,
        "the reset stands"
    );
    w.server.stop().await;
}

/// `sales-server maintain` deletes what sessions leave behind for users
/// who stay logged in: sessions over for longer than an access token
/// lives, and refresh tokens used longer ago than REFRESH_TOKEN_TTL. A live
/// session keeps working, and a token used recently still gives a reuse
/// away (its session is revoked).
#[tokio::test]
async fn maintain_prunes_ended_sessions_and_old_used_refresh_tokens() {
    let w = world(&[]).await;
    let count = |sql: &'static str| {
        let pool = w.db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    // A long-lived session: four refreshes leave four used tokens.
    let (_, mut live) = client(&w.server, "manager@x.test").await;
    let mut used = Vec::new();
    for _ in 0..4 {
        let (st, next) = refresh_session(&w.server, &live).await;
        assert_eq!(st, 200, "{next}");
        used.push(live["refreshToken"].clone());
        live = next;
    }
    // An ended one: logged out an hour ago (past any access token of it).
    let (ended_api, ended) = client(&w.server, "staff-c@x.test").await;
    let st = ended_api
        .post(
            "/api/v2/auth/logout",
            &json!({"refreshToken": ended["refreshToken"]}),
        )
        .await
        .0;
    assert!(st == 200 || st == 204, "logout: {st}");
    sqlx::query(
        "UPDATE auth.sessions SET revoked_at = now() - interval '1 hour',
                                  access_until = now() - interval '45 minutes'
         WHERE id = $1::uuid",
    )
    .bind(ended["sessionId"].as_str().unwrap())
    .execute(&w.db.pool)
    .await
    .unwrap();
    // The first three used tokens were used 8 days ago (REFRESH_TOKEN_TTL
    // is 7 days); the fourth just now.
    for t in &used[..3] {
        sqlx::query(
            "UPDATE auth.refresh_tokens SET used_at = now() - interval '8 days'
             WHERE token_hash = sha256(convert_to($1, 'UTF8'))",
        )
        .bind(t.as_str().unwrap())
        .execute(&w.db.pool)
        .await
        .unwrap();
    }
    let sessions_before = count("SELECT count(*) FROM auth.sessions").await;
    let tokens_before = count("SELECT count(*) FROM auth.refresh_tokens").await;

    let out = cli(&w.db, &["maintain"], None);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("pruned 1 ended sessions and 3 refresh tokens used more than 604800s ago"),
        "{text}"
    );
    assert_eq!(
        count("SELECT count(*) FROM auth.sessions").await,
        sessions_before - 1
    );
    // The ended session's one token went with it, and the three old used ones.
    let ended_tokens = 1;
    assert_eq!(
        count("SELECT count(*) FROM auth.refresh_tokens").await,
        tokens_before - 3 - ended_tokens
    );
    // The live session refreshes on; the recently used token is still known
    // as used: presenting it again revokes the session.
    let (st, next) = refresh_session(&w.server, &live).await;
    assert_eq!(st, 200, "{next}");
    let (st, body) = refresh_session(&w.server, &json!({"refreshToken": used[3]})).await;
    assert_eq!(st, 401, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("already used"),
        "{body}"
    );
    w.server.stop().await;
}

/// User and session events are applied as the database holds them: the
/// event only names the user or session to read back. Events written by
/// hand (any role allowed to write event rows can, through `sales.emit`)
/// that say a user was deleted or disabled, or end a session, change no
/// one's access; a change the database bears out, sent the same way after
/// them, is applied (and, applied in delivery order, shows that the forged
/// ones before it were read back and dropped).
#[tokio::test]
async fn hand_written_user_events_change_no_ones_access() {
    let w = world(&[]).await;
    let (other, _) = client(&w.server, "staff-c@x.test").await;
    let (st, me) = w.staff.get("/api/v2/auth/me").await;
    assert_eq!(st, 200, "{me}");
    let emit = |kind: &'static str, payload: Value| {
        let pool = w.db.pool.clone();
        async move {
            sqlx::query("SELECT sales.emit($1, $2)")
                .bind(kind)
                .bind(payload)
                .execute(&pool)
                .await
                .unwrap();
        }
    };
    emit("user-deleted", json!({"userId": w.staff_id})).await;
    emit(
        "user-updated",
        json!({"userId": w.staff_id, "email": "staff@x.test",
               "generation": 9_000_000_000_000_000_000i64, "disabled": true, "revoke": "disabled"}),
    )
    .await;
    emit(
        "session-revoked",
        json!({"userId": w.staff_id, "sessionId": me["sessionId"]}),
    )
    .await;
    // A change the database holds, with its event.
    let generation: i64 = sqlx::query_scalar(
        "INSERT INTO auth.user_state (user_id, generation, disabled) VALUES ($1, 1, true)
         ON CONFLICT (user_id) DO UPDATE SET generation = auth.user_state.generation + 1,
                                             disabled = true
         RETURNING generation",
    )
    .bind(w.other_staff_id)
    .fetch_one(&w.db.pool)
    .await
    .unwrap();
    emit(
        "user-updated",
        json!({"userId": w.other_staff_id, "email": "staff-c@x.test",
               "generation": generation, "disabled": true, "revoke": "disabled"}),
    )
    .await;
    eventually(
        Duration::from_secs(20),
        "the change the database holds to be applied",
        || async { (other.get("/api/v2/auth/me").await.0 == 401).then_some(()) },
    )
    .await;
    let (st, body) = w.staff.get("/api/v2/auth/me").await;
    assert_eq!(st, 200, "the hand-written events changed nothing: {body}");
    w.server.stop().await;
}

/// A session that ended is kept while an access token issued for it may
/// still be presented (`auth.sessions.access_until`, recorded at login and
/// refresh), whatever JWT_EXPIRY `maintain` runs with: its row is what tells
/// a starting instance to refuse that token. A `maintain` with the default
/// 15 minutes beside servers issuing hour-long tokens used to delete it, and
/// a restarted server then accepted a logged-out token.
#[tokio::test]
async fn maintain_keeps_ended_sessions_while_their_tokens_live() {
    let w = world(&[("JWT_EXPIRY", "3600")]).await;
    let (api, session) = client(&w.server, "staff@x.test").await;
    assert_eq!(api.get("/api/v2/auth/me").await.0, 200);
    let st = api
        .post(
            "/api/v2/auth/logout",
            &json!({"refreshToken": session["refreshToken"]}),
        )
        .await
        .0;
    assert!(st == 200 || st == 204, "logout: {st}");
    assert_eq!(api.get("/api/v2/auth/me").await.0, 401);
    // Ended 20 minutes ago: past the 15 minutes `maintain` runs with here,
    // within the hour its token lives.
    sqlx::query(
        "UPDATE auth.sessions SET revoked_at = now() - interval '20 minutes' WHERE id = $1::uuid",
    )
    .bind(session["sessionId"].as_str().unwrap())
    .execute(&w.db.pool)
    .await
    .unwrap();
    let out = cli(&w.db, &["maintain"], None);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("pruned 0 ended sessions"), "{text}");
    // A server started now still refuses the token.
    w.server.stop().await;
    let again = w.db.server(&[("JWT_EXPIRY", "3600")]).await;
    let token = session["token"].as_str().unwrap();
    let (st, body) = Api::new(&again, Some(token)).get("/api/v2/auth/me").await;
    assert_eq!(st, 401, "{body}");
    again.stop().await;
    // So does one whose own tokens live 15 minutes (the default): the
    // session ended longer ago than that, but a token issued for it by an
    // instance with hour-long tokens still lives (`access_until`).
    let short = w.db.server(&[("JWT_EXPIRY", "900")]).await;
    let (st, body) = Api::new(&short, Some(token)).get("/api/v2/auth/me").await;
    assert_eq!(st, 401, "{body}");
    short.stop().await;
}

/// A running instance whose own tokens live 15 minutes, told of a session
/// revoked longer ago than that (its event read back from the database),
/// still refuses a token issued for the session by an instance with
/// hour-long tokens: it keeps the revocation until the session's
/// `access_until`, as a starting instance does.
#[tokio::test]
async fn a_running_instance_keeps_a_revocation_while_its_tokens_live() {
    let w = world(&[("JWT_EXPIRY", "3600")]).await;
    let (api, session) = client(&w.server, "staff@x.test").await;
    assert_eq!(api.get("/api/v2/auth/me").await.0, 200);
    let short = w.db.server(&[("JWT_EXPIRY", "900")]).await;
    let token = session["token"].as_str().unwrap();
    let on_short = Api::new(&short, Some(token));
    assert_eq!(on_short.get("/api/v2/auth/me").await.0, 200);
    // Revoked 20 minutes ago (past the short instance's 15), as a restore
    // or a hand-made change could leave it, then announced.
    sqlx::query(
        "UPDATE auth.sessions SET revoked_at = now() - interval '20 minutes' WHERE id = $1::uuid",
    )
    .bind(session["sessionId"].as_str().unwrap())
    .execute(&w.db.pool)
    .await
    .unwrap();
    sqlx::query("SELECT sales.emit('session-revoked', $1)")
        .bind(json!({"userId": w.staff_id, "sessionId": session["sessionId"]}))
        .execute(&w.db.pool)
        .await
        .unwrap();
    eventually(
        Duration::from_secs(20),
        "the long-lived instance to refuse the token",
        || async { (api.get("/api/v2/auth/me").await.0 == 401).then_some(()) },
    )
    .await;
    // The short instance read the same event; it refuses the token too.
    eventually(
        Duration::from_secs(20),
        "the short instance to refuse the token",
        || async { (on_short.get("/api/v2/auth/me").await.0 == 401).then_some(()) },
    )
    .await;
    short.stop().await;
    w.server.stop().await;
}

/// A deleted user's tokens stay refused as long as any instance's tokens
/// may live: an instance with 15-minute tokens, started 20 minutes after
/// the deletion, refuses a token issued by an instance with hour-long
/// tokens (it used to drop the tombstone after its own 15 minutes, and then
/// judge the token, of a user it has no row for, by its signature alone).
#[tokio::test]
async fn a_deleted_users_tokens_stay_refused_while_any_may_live() {
    let w = world(&[("JWT_EXPIRY", "3600")]).await;
    let (api, session) = client(&w.server, "staff@x.test").await;
    assert_eq!(api.get("/api/v2/auth/me").await.0, 200);
    let r = w
        .admin
        .req(
            reqwest::Method::DELETE,
            &format!("/api/v2/users/{}", w.staff_id),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    assert_eq!(api.get("/api/v2/auth/me").await.0, 401);
    sqlx::query("UPDATE auth.deleted_users SET deleted_at = now() - interval '20 minutes'")
        .execute(&w.db.pool)
        .await
        .unwrap();
    w.server.stop().await;
    let short = w.db.server(&[("JWT_EXPIRY", "900")]).await;
    let token = session["token"].as_str().unwrap();
    let (st, body) = Api::new(&short, Some(token)).get("/api/v2/auth/me").await;
    assert_eq!(st, 401, "{body}");
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM auth.deleted_users")
        .fetch_one(&w.db.pool)
        .await
        .unwrap();
    assert_eq!(kept, 1, "the tombstone outlives the short instance's start");
    short.stop().await;
}

/// A manager may enable again a user they (or another manager) disabled,
/// not one an admin disabled: that is the admin's to undo.
#[tokio::test]
async fn a_manager_does_not_undo_an_admins_disable() {
    let w = world(&[]).await;
    let path = format!("/api/v2/users/{}", w.staff_id);
    let (st, body) = patch(&w.admin, &path, json!({"disabled": true})).await;
    assert_eq!(st, 200, "{body}");
    let (st, body) = patch(&w.manager, &path, json!({"disabled": false})).await;
    assert_eq!(st, 403, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("disabled by an admin"),
        "{body}"
    );
    let (_, body) = w.admin.get(&path).await;
    assert_eq!(body["data"]["disabled"], true, "{body}");
    // Enabled by the admin, then disabled by the manager: theirs to undo.
    let (st, _) = patch(&w.admin, &path, json!({"disabled": false})).await;
    assert_eq!(st, 200);
    let (st, _) = patch(&w.manager, &path, json!({"disabled": true})).await;
    assert_eq!(st, 200);
    let (st, body) = patch(&w.manager, &path, json!({"disabled": false})).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["data"]["disabled"], false, "{body}");
    // The command line's disable is an admin's too.
    let out = cli(&w.db, &["user", "disable", "--email", "staff@x.test"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (st, body) = patch(&w.manager, &path, json!({"disabled": false})).await;
    assert_eq!(st, 403, "{body}");
    // Disabled by the manager, then by an admin: the admin's disable
    // holds, although the user was disabled already.
    let (st, _) = patch(&w.admin, &path, json!({"disabled": false})).await;
    assert_eq!(st, 200);
    let (st, _) = patch(&w.manager, &path, json!({"disabled": true})).await;
    assert_eq!(st, 200);
    let (st, body) = patch(&w.admin, &path, json!({"disabled": true})).await;
    assert_eq!(st, 200, "{body}");
    let (st, body) = patch(&w.manager, &path, json!({"disabled": false})).await;
    assert_eq!(st, 403, "{body}");
    // The same when the admin's request changes something else too.
    let (st, _) = patch(&w.admin, &path, json!({"disabled": false})).await;
    assert_eq!(st, 200);
    let (st, _) = patch(&w.manager, &path, json!({"disabled": true})).await;
    assert_eq!(st, 200);
    let (st, body) = patch(
        &w.admin,
        &path,
        json!({"disabled": true, "stores": [w.stores[0], w.stores[1]]}),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let (st, body) = patch(&w.manager, &path, json!({"disabled": false})).await;
    assert_eq!(st, 403, "{body}");
    // A user a manager creates disabled is the manager's to enable.
    let (st, body) = w
        .manager
        .send_json(
            Method::POST,
            "/api/v2/users",
            &json!({"email": "held@x.test", "role": "staff", "stores": [w.stores[0]],
                    "password": "a-fine-password", "disabled": true}),
        )
        .await;
    assert_eq!(st, 201, "{body}");
    let held = format!("/api/v2/users/{}", body["data"]["id"]);
    let (st, body) = patch(&w.manager, &held, json!({"disabled": false})).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["data"]["disabled"], false, "{body}");
    // One an admin creates disabled is not.
    let (st, body) = w
        .admin
        .send_json(
            Method::POST,
            "/api/v2/users",
            &json!({"email": "held2@x.test", "role": "staff", "stores": [w.stores[0]],
                    "password": "a-fine-password", "disabled": true}),
        )
        .await;
    assert_eq!(st, 201, "{body}");
    let held = format!("/api/v2/users/{}", body["data"]["id"]);
    let (st, body) = patch(&w.manager, &held, json!({"disabled": false})).await;
    assert_eq!(st, 403, "{body}");
    w.server.stop().await;
}

/// Migration 0023 composes addresses stored decomposed before the server
/// composed them, except one whose composed form another user has.
#[tokio::test]
async fn the_migration_composes_stored_addresses_it_can() {
    let w = world(&[]).await;
    let hash: String =
        sqlx::query_scalar("SELECT password_hash FROM sales.users WHERE email = 'staff@x.test'")
            .fetch_one(&w.db.pool)
            .await
            .unwrap();
    for email in [
        "zoe\u{308}@x.test",
        "ana\u{301}@x.test",
        "an\u{e1}@x.test",
        "e\u{301}\u{301}@x.test",
    ] {
        sqlx::query(
            "INSERT INTO sales.users (email, password_hash, role, store_ids) VALUES ($1, $2, 'staff', '{}')",
        )
        .bind(email)
        .bind(&hash)
        .execute(&w.db.pool)
        .await
        .unwrap();
    }
    let migration = include_str!("../../migrations/0023_user_emails_nfc.sql");
    for _ in 0..2 {
        sqlx::raw_sql(migration).execute(&w.db.pool).await.unwrap();
    }
    let emails: Vec<String> = sqlx::query_scalar("SELECT email FROM sales.users ORDER BY id")
        .fetch_all(&w.db.pool)
        .await
        .unwrap();
    assert!(
        emails.contains(&"zo\u{eb}@x.test".to_string()),
        "{emails:?}"
    );
    assert!(
        !emails.contains(&"zoe\u{308}@x.test".to_string()),
        "{emails:?}"
    );
    // Its composed form is another user's: both stay.
    assert!(
        emails.contains(&"ana\u{301}@x.test".to_string()),
        "{emails:?}"
    );
    assert!(
        emails.contains(&"an\u{e1}@x.test".to_string()),
        "{emails:?}"
    );
    // Nothing composes the second accent; the order of marks is kept.
    assert!(
        emails.contains(&"\u{e9}\u{301}@x.test".to_string()),
        "{emails:?}"
    );
    let (st, body) = login(&w.server, "zoe\u{308}@x.test", PASSWORD).await;
    assert_eq!(st, 200, "{body}");
    // Each of the two left as they were logs in as itself, typed as stored.
    for email in ["ana\u{301}@x.test", "an\u{e1}@x.test"] {
        let (st, body) = login(&w.server, email, PASSWORD).await;
        assert_eq!(st, 200, "{body}");
        let token = body["token"].as_str().unwrap();
        let (_, me) = Api::new(&w.server, Some(token))
            .get("/api/v2/auth/me")
            .await;
        assert_eq!(me["email"], email, "{me}");
    }
    w.server.stop().await;
}

/// An address is one account however its letters are composed: a
/// precomposed `ü` and `u` with a combining diaeresis look the same, so
/// they are stored, compared and logged in with in normalization form C.
/// Blank-looking characters are refused, and the length is counted in
/// characters, as the schema says.
#[tokio::test]
async fn emails_are_one_account_however_their_letters_are_composed() {
    let w = world(&[]).await;
    let nfc = "j\u{fc}rgen@x.test";
    let nfd = "ju\u{308}rgen@x.test";
    let post = |email: &str| {
        let (api, body) = (
            w.admin.clone(),
            json!({"email": email, "role": "staff", "stores": [w.stores[0]],
                   "password": "a-fine-password"}),
        );
        async move { api.send_json(Method::POST, "/api/v2/users", &body).await }
    };
    let (st, body) = post(nfd).await;
    assert_eq!(st, 201, "{body}");
    assert_eq!(body["data"]["email"], nfc, "stored composed: {body}");
    let (st, body) = post(nfc).await;
    assert_eq!(st, 409, "the same address composed: {body}");
    for email in [nfc, nfd] {
        let (st, body) = login(&w.server, email, "a-fine-password").await;
        assert_eq!(st, 200, "{email:?}: {body}");
    }
    let (st, body) = post("ca\u{2800}se@x.test").await;
    assert_eq!(st, 422, "a blank Braille pattern: {body}");
    assert_eq!(body["error"]["details"]["field"], "email", "{body}");
    // 300 two-byte letters: under the 320 characters the schema allows.
    let long = format!("{}@x.test", "\u{e9}".repeat(300));
    let (st, body) = post(&long).await;
    assert_eq!(st, 201, "307 characters, 607 bytes: {body}");
    let longer = format!("{}@x.test", "\u{e9}".repeat(320));
    let (st, body) = post(&longer).await;
    assert_eq!(st, 400, "327 characters: {body}");
    assert!(body.to_string().contains("email"), "{body}");
    w.server.stop().await;
}

/// `PATCH` and `DELETE /api/v2/users/{id}` with `If-Match` act only on the
/// state that ETag (from a GET of the user, as the caller sees it) names:
/// a writer holding a stale one gets 412 with the current ETag and nothing
/// changes. A manager's ETag is of the manager's view of their staff.
#[tokio::test]
async fn if_match_guards_user_changes_and_deletion() {
    let w = world(&[]).await;
    let path = format!("/api/v2/users/{}", w.staff_id);
    let send = |api: &Api, method: Method, tag: &str, body: Option<Value>| {
        let (api, path, tag) = (api.clone(), path.clone(), tag.to_string());
        async move {
            api.send_if_match(method, &path, Some(&tag), body.as_ref())
                .await
        }
    };
    let read = w.manager.etag(&path).await;
    let (st, body) = send(
        &w.manager,
        Method::PATCH,
        &read,
        Some(json!({"disabled": true})),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    // The admin read before that change: stale now.
    let (st, body) = send(
        &w.admin,
        Method::PATCH,
        &read,
        Some(json!({"disabled": false})),
    )
    .await;
    assert_eq!(st, 412, "{body}");
    assert_eq!(body["error"]["code"], "precondition_failed", "{body}");
    let (st, body) = send(&w.admin, Method::DELETE, &read, None).await;
    assert_eq!(st, 412, "{body}");
    let (_, doc) = w.admin.get(&path).await;
    assert_eq!(doc["data"]["disabled"], true, "{doc}");
    // With the current ETag the change and then the deletion go through.
    let now = w.admin.etag(&path).await;
    assert_eq!(body["error"]["details"]["etag"], now, "{body}");
    let (st, body) = send(
        &w.admin,
        Method::PATCH,
        &now,
        Some(json!({"disabled": false})),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let (st, _) = send(&w.admin, Method::DELETE, &now, None).await;
    assert_eq!(st, 412, "the PATCH moved the state on");
    let now = w.admin.etag(&path).await;
    let (st, body) = send(&w.admin, Method::DELETE, &now, None).await;
    assert_eq!(st, 204, "{body}");
    assert_eq!(w.admin.get(&path).await.0, 404);
}

/// A token from before a disable, the user enabled again since: refused
/// saying to log in again (the disable ended every session, so the
/// "refresh the token" an access change says could only fail), and its
/// refresh token is refused as a session that ended.
#[tokio::test]
async fn a_token_from_before_a_disable_says_to_log_in_again_once_enabled() {
    let w = world(&[]).await;
    let (old, login_body) = client(&w.server, "staff-c@x.test").await;
    let path = format!("/api/v2/users/{}", w.other_staff_id);
    let (st, body) = patch(&w.admin, &path, json!({"disabled": true})).await;
    assert_eq!(st, 200, "{body}");
    let (st, body) = patch(&w.admin, &path, json!({"disabled": false})).await;
    assert_eq!(st, 200, "{body}");
    let (st, body) = old.get("/api/v2/auth/me").await;
    assert_eq!(st, 401, "{body}");
    assert_eq!(
        body["error"]["message"], "token revoked: session ended; log in again",
        "{body}"
    );
    let (st, body) = refresh_session(&w.server, &login_body).await;
    assert_eq!(st, 401, "{body}");
    // A new login works, and its token is not refused.
    let (fresh, _) = client(&w.server, "staff-c@x.test").await;
    let (st, body) = fresh.get("/api/v2/auth/me").await;
    assert_eq!(st, 200, "{body}");
}
