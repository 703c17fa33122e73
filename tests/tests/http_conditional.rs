//! HTTP semantics end to end (RFC 9110): conditional requests (`If-Match`,
//! `If-None-Match`, on reads and writes, over several header lines),
//! content coding negotiation (`identity` weighed, several
//! `Accept-Encoding` lines on exports) and `Location` on `201 Created`.
//! Every request asserts the server never answers 5xx.

use reqwest::{Method, Response};
use sales_e2e::{month, Api, Fixture};
use serde_json::{json, Value};

/// Two stores with a month of sales each (28 days: a record's body is over
/// the 1 kB compression threshold).
async fn fixture() -> Fixture {
    let f = Fixture::start(2, &[]).await;
    let recs: Vec<Value> = f
        .stores
        .iter()
        .map(|&s| month(s, 2024, 1, 28, 100.0 * s as f64))
        .collect();
    let (st, body) = f
        .admin
        .post("/api/v2/sales/batch", &json!({"salesDataArray": recs}))
        .await;
    assert_eq!(st, 200, "{body}");
    f
}

/// `method` on `path` with the given header lines (a name given twice is
/// sent as two lines) and an optional JSON body.
async fn send(
    api: &Api,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> Response {
    let mut r = api.req(method.clone(), path);
    for (name, value) in headers {
        r = r.header(*name, *value);
    }
    if let Some(b) = body {
        r = r.json(b);
    }
    let r = r.send().await.expect("request");
    assert!(r.status().as_u16() < 500, "{method} {path}: {}", r.status());
    r
}

async fn status_and_json(r: Response) -> (u16, Value) {
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn header<'a>(r: &'a Response, name: &str) -> Option<&'a str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}

/// The id of store `store`'s January 2024 record.
async fn record_id(f: &Fixture, store: i64) -> i64 {
    let (st, body) = f
        .admin
        .get(&format!("/api/v2/sales?storeId={store}&fields=id"))
        .await;
    assert_eq!(st, 200, "{body}");
    body["data"][0]["id"].as_i64().expect("a record id")
}

/// RFC 9110 13.1.2: on a write, an `If-None-Match` that lists the
/// resource's current tag (by weak comparison, any content coding) or `*`
/// (the resource exists) is false: 412 with the current tag, nothing
/// changed. It used to be ignored and the change applied.
#[tokio::test]
async fn if_none_match_refuses_a_store_change_when_it_matches() {
    let f = fixture().await;
    let path = format!("/api/v2/stores/{}", f.stores[0]);
    let (_, before) = f.admin.get(&path).await;
    let tag = f.admin.etag(&path).await;
    let bare = tag.trim_matches('"').to_string();
    for inm in [
        "*".to_string(),
        tag.clone(),
        format!("W/{tag}"),
        format!("\"zz\", \"{bare}-gzip\""),
    ] {
        let r = send(
            &f.admin,
            Method::PATCH,
            &path,
            &[("if-none-match", &inm)],
            Some(&json!({"name": "Changed"})),
        )
        .await;
        let (st, body) = status_and_json(r).await;
        assert_eq!(st, 412, "If-None-Match: {inm}: {body}");
        assert_eq!(body["error"]["code"], "precondition_failed", "{body}");
        assert_eq!(body["error"]["details"]["etag"], tag, "{body}");
        let (_, now) = f.admin.get(&path).await;
        assert_eq!(now, before, "If-None-Match: {inm} changed nothing");
    }
    // A tag of another state: the condition holds, the change is made.
    let r = send(
        &f.admin,
        Method::PATCH,
        &path,
        &[("if-none-match", "\"zz\"")],
        Some(&json!({"name": "Changed"})),
    )
    .await;
    let (st, body) = status_and_json(r).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["data"]["name"], "Changed", "{body}");
    // The old tag no longer names the store: If-None-Match with it holds.
    let r = send(
        &f.admin,
        Method::PATCH,
        &path,
        &[("if-none-match", &tag)],
        Some(&json!({"name": "Again"})),
    )
    .await;
    assert_eq!(r.status(), 200);
    // Both headers: If-Match true, If-None-Match `*` false: 412.
    let now = f.admin.etag(&path).await;
    let r = send(
        &f.admin,
        Method::PATCH,
        &path,
        &[("if-match", &now), ("if-none-match", "*")],
        Some(&json!({"name": "Both"})),
    )
    .await;
    assert_eq!(r.status(), 412);
    assert_eq!(f.admin.etag(&path).await, now);
}

/// The same for users: `PATCH` and `DELETE /api/v2/users/{id}` with an
/// `If-None-Match` that matches the user are 412 and change nothing.
#[tokio::test]
async fn if_none_match_refuses_a_user_change_when_it_matches() {
    let f = fixture().await;
    let (st, body) = f
        .admin
        .post(
            "/api/v2/users",
            &json!({"email": "inm@example.com", "role": "staff",
                    "stores": [f.stores[0]], "password": "Kettle-Drum-93"}),
        )
        .await;
    assert_eq!(st, 201, "{body}");
    let path = format!("/api/v2/users/{}", body["data"]["id"]);
    let tag = f.admin.etag(&path).await;
    for inm in ["*".to_string(), tag.clone(), format!("W/{tag}")] {
        let r = send(
            &f.admin,
            Method::PATCH,
            &path,
            &[("if-none-match", &inm)],
            Some(&json!({"disabled": true})),
        )
        .await;
        let (st, body) = status_and_json(r).await;
        assert_eq!(st, 412, "If-None-Match: {inm}: {body}");
        assert_eq!(body["error"]["details"]["etag"], tag, "{body}");
        assert_eq!(f.admin.etag(&path).await, tag, "nothing changed");
    }
    let r = send(
        &f.admin,
        Method::DELETE,
        &path,
        &[("if-none-match", "*")],
        None,
    )
    .await;
    assert_eq!(r.status(), 412);
    assert_eq!(f.admin.get(&path).await.0, 200, "the user is still there");
    // Another state's tag: the change is made.
    let r = send(
        &f.admin,
        Method::PATCH,
        &path,
        &[("if-none-match", "\"zz\"")],
        Some(&json!({"disabled": true})),
    )
    .await;
    let (st, body) = status_and_json(r).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["data"]["disabled"], true, "{body}");
}

/// RFC 9110 13.1.1 on reads: a GET or HEAD whose `If-Match` names none of
/// the current representation's tags is 412 with the current tag; If-Match
/// is judged before If-None-Match (13.2.2), so a false If-Match with a
/// matching If-None-Match is 412, not 304. It used to be ignored (200).
#[tokio::test]
async fn if_match_on_a_read_is_judged() {
    let f = fixture().await;
    let id = record_id(&f, f.stores[0]).await;
    let path = format!("/api/v2/sales/{id}");
    let tag = f.admin.etag(&path).await;
    let bare = tag.trim_matches('"').to_string();

    let r = send(
        &f.admin,
        Method::GET,
        &path,
        &[("if-match", "\"nonsense\"")],
        None,
    )
    .await;
    assert_eq!(header(&r, "cache-control"), Some("no-store"));
    let (st, body) = status_and_json(r).await;
    assert_eq!(st, 412, "{body}");
    assert_eq!(body["error"]["code"], "precondition_failed", "{body}");
    assert_eq!(body["error"]["details"]["etag"], tag, "{body}");
    // The details name the tag of the coding the request would get.
    let r = send(
        &f.admin,
        Method::GET,
        &path,
        &[("if-match", "\"nonsense\""), ("accept-encoding", "gzip")],
        None,
    )
    .await;
    let (st, body) = status_and_json(r).await;
    assert_eq!(st, 412, "{body}");
    assert_eq!(body["error"]["details"]["etag"], format!("\"{bare}-gzip\""));
    // A weak tag never matches.
    let weak = format!("W/{tag}");
    let r = send(&f.admin, Method::GET, &path, &[("if-match", &weak)], None).await;
    assert_eq!(r.status(), 412);
    // HEAD as its GET.
    let r = send(
        &f.admin,
        Method::HEAD,
        &path,
        &[("if-match", "\"nonsense\"")],
        None,
    )
    .await;
    assert_eq!(r.status(), 412);
    // If-Match false, If-None-Match matching: 412, not 304.
    let r = send(
        &f.admin,
        Method::GET,
        &path,
        &[("if-match", "\"nonsense\""), ("if-none-match", &tag)],
        None,
    )
    .await;
    assert_eq!(r.status(), 412);

    // Tags that match: the current one, one of another coding of the same
    // body, `*`, one in a list.
    for im in [
        tag.clone(),
        format!("\"{bare}-zstd\""),
        "*".to_string(),
        format!("\"x\", {tag}"),
    ] {
        let r = send(&f.admin, Method::GET, &path, &[("if-match", &im)], None).await;
        assert_eq!(r.status(), 200, "If-Match: {im}");
        assert_eq!(header(&r, "etag"), Some(tag.as_str()));
        let (_, body) = status_and_json(r).await;
        assert_eq!(body["data"]["id"], id, "{body}");
    }
    // If-Match true, If-None-Match matching: 304.
    let r = send(
        &f.admin,
        Method::GET,
        &path,
        &[("if-match", &tag), ("if-none-match", &tag)],
        None,
    )
    .await;
    assert_eq!(r.status(), 304);
    // Only answers with a representation are judged: a missing record is
    // 404 as before.
    let r = send(
        &f.admin,
        Method::GET,
        "/api/v2/sales/999999",
        &[("if-match", "\"nonsense\"")],
        None,
    )
    .await;
    assert_eq!(r.status(), 404);
}

/// RFC 9110 5.3: several lines of `If-Match` or `If-None-Match` make one
/// list, on reads and on writes; only the first line used to be read.
#[tokio::test]
async fn conditional_header_lines_make_one_list() {
    let f = fixture().await;
    let id = record_id(&f, f.stores[0]).await;
    let record = format!("/api/v2/sales/{id}");
    let tag = f.admin.etag(&record).await;
    // Reads: the current tag on the second line.
    let r = send(
        &f.admin,
        Method::GET,
        &record,
        &[("if-none-match", "\"zz\""), ("if-none-match", &tag)],
        None,
    )
    .await;
    assert_eq!(r.status(), 304);
    let r = send(
        &f.admin,
        Method::HEAD,
        &record,
        &[("if-none-match", "\"zz\""), ("if-none-match", &tag)],
        None,
    )
    .await;
    assert_eq!(r.status(), 304);
    let r = send(
        &f.admin,
        Method::GET,
        &record,
        &[("if-match", "\"zz\""), ("if-match", &tag)],
        None,
    )
    .await;
    assert_eq!(r.status(), 200);
    let r = send(
        &f.admin,
        Method::GET,
        &record,
        &[("if-match", "\"zz\""), ("if-match", "\"yy\"")],
        None,
    )
    .await;
    assert_eq!(r.status(), 412);

    // Writes: a store.
    let store = format!("/api/v2/stores/{}", f.stores[0]);
    let now = f.admin.etag(&store).await;
    let r = send(
        &f.admin,
        Method::PATCH,
        &store,
        &[("if-none-match", "\"zz\""), ("if-none-match", &now)],
        Some(&json!({"name": "Refused"})),
    )
    .await;
    assert_eq!(r.status(), 412);
    assert_eq!(f.admin.etag(&store).await, now, "nothing changed");
    let r = send(
        &f.admin,
        Method::PATCH,
        &store,
        &[("if-match", "\"zz\""), ("if-match", &now)],
        Some(&json!({"name": "Second line"})),
    )
    .await;
    let (st, body) = status_and_json(r).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["data"]["name"], "Second line");

    // Writes: a user.
    let (st, body) = f
        .admin
        .post(
            "/api/v2/users",
            &json!({"email": "lines@example.com", "role": "staff",
                    "stores": [f.stores[0]], "password": "Kettle-Drum-93"}),
        )
        .await;
    assert_eq!(st, 201, "{body}");
    let user = format!("/api/v2/users/{}", body["data"]["id"]);
    let now = f.admin.etag(&user).await;
    let r = send(
        &f.admin,
        Method::PATCH,
        &user,
        &[("if-none-match", "\"zz\""), ("if-none-match", &now)],
        Some(&json!({"disabled": true})),
    )
    .await;
    assert_eq!(r.status(), 412);
    assert_eq!(f.admin.etag(&user).await, now, "nothing changed");
    let r = send(
        &f.admin,
        Method::PATCH,
        &user,
        &[("if-match", "\"zz\""), ("if-match", &now)],
        Some(&json!({"disabled": true})),
    )
    .await;
    let (st, body) = status_and_json(r).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["data"]["disabled"], true);
}

/// An export reads every `Accept-Encoding` line, as buffered responses do;
/// it used to read the first one only.
#[tokio::test]
async fn an_export_reads_every_accept_encoding_line() {
    let f = fixture().await;
    let path = "/api/v2/sales/export?format=csv&shape=daily";
    let r = send(
        &f.admin,
        Method::GET,
        path,
        &[("accept-encoding", "identity"), ("accept-encoding", "gzip")],
        None,
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-encoding"), Some("gzip"));
    let gz = r.bytes().await.expect("body");
    let mut csv = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&gz[..]), &mut csv)
        .expect("a gzip body");
    assert!(csv.lines().count() > 28, "{csv}");
}

/// `identity` takes its weight (RFC 9110 12.5.3): a coding weighed lower
/// than `identity` is not used, on buffered responses and exports alike;
/// `gzip;q=0.1, identity;q=1` used to answer gzip.
#[tokio::test]
async fn identity_weighed_above_a_coding_wins() {
    let f = fixture().await;
    let id = record_id(&f, f.stores[0]).await;
    let record = format!("/api/v2/sales/{id}");
    let plain_tag = f.admin.etag(&record).await;
    for accept in [
        "gzip;q=0.1, identity;q=1",
        "gzip;q=0.1, identity",
        "zstd;q=0.5, *",
    ] {
        let r = send(
            &f.admin,
            Method::GET,
            &record,
            &[("accept-encoding", accept)],
            None,
        )
        .await;
        assert_eq!(r.status(), 200);
        let coding = header(&r, "content-encoding").map(str::to_string);
        let etag = header(&r, "etag").map(str::to_string);
        let body = r.bytes().await.expect("body");
        if accept.starts_with("zstd") {
            // `*` weighs identity as the codings: a tie goes to a coding.
            assert_eq!(coding.as_deref(), Some("br"), "{accept}");
            continue;
        }
        assert_eq!(coding, None, "{accept}");
        assert!(body.len() >= 1024, "a body worth compressing");
        assert_eq!(etag.as_deref(), Some(plain_tag.as_str()));
    }
    // Weighed above identity, the coding is still used.
    let r = send(
        &f.admin,
        Method::GET,
        &record,
        &[("accept-encoding", "gzip, identity;q=0.5")],
        None,
    )
    .await;
    assert_eq!(header(&r, "content-encoding"), Some("gzip"));

    let export = "/api/v2/sales/export?format=csv&shape=daily";
    let r = send(
        &f.admin,
        Method::GET,
        export,
        &[("accept-encoding", "gzip;q=0.1, identity;q=1")],
        None,
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-encoding"), None);
    let text = r.text().await.expect("a plain body");
    assert!(text.lines().count() > 28, "{text}");
}

/// `201 Created` names the new resource in `Location` (RFC 9110 15.3.2),
/// for stores and users as for imports and async batches; it had none.
#[tokio::test]
async fn created_stores_and_users_have_a_location() {
    let f = fixture().await;
    let r = send(
        &f.admin,
        Method::POST,
        "/api/v2/stores",
        &[],
        Some(&json!({"code": "LOC-1", "name": "Located", "region": "North"})),
    )
    .await;
    assert_eq!(r.status(), 201);
    let location = header(&r, "location").expect("Location").to_string();
    let (_, created) = status_and_json(r).await;
    assert_eq!(
        location,
        format!("/api/v2/stores/{}", created["data"]["id"]),
        "{created}"
    );
    let (st, there) = f.admin.get(&location).await;
    assert_eq!(st, 200, "{there}");
    assert_eq!(there, created);

    let r = send(
        &f.admin,
        Method::POST,
        "/api/v2/users",
        &[],
        Some(&json!({"email": "loc@example.com", "role": "staff",
                     "stores": [f.stores[0]], "password": "Kettle-Drum-93"})),
    )
    .await;
    assert_eq!(r.status(), 201);
    let location = header(&r, "location").expect("Location").to_string();
    let (_, created) = status_and_json(r).await;
    assert_eq!(
        location,
        format!("/api/v2/users/{}", created["data"]["id"]),
        "{created}"
    );
    let (st, there) = f.admin.get(&location).await;
    assert_eq!(st, 200, "{there}");
    assert_eq!(there, created);
}
