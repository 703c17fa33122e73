//! The dashboard in a real browser: a server with demo data and an admin, then
//! `node tests/browser/dashboard.test.mjs` (playwright-core driving Debian's
//! chromium) logs in, checks the chart, posts batches and watches the page
//! update live, drops the network and sees it resume, exports, and leaves
//! screenshots in `test-output/`. Then a manager logs in where the admin
//! logged out (none of the admin's figures may show while theirs load), loses
//! a store (4012: every figure follows the new scope), looks at next year
//! (last year's bars are last year's own months), sees a store renamed and
//! moved to another region live, and sees `resync_required` and
//! `table-truncated` reload everything. Along the way: a refused WebSocket
//! upgrade is followed by a refresh, a month whose figures fail to load
//! shows none of another month's and is tried again, a failed store list
//! is shown and tried again, the year-over-year caption compares the same
//! months, and the heartbeat does not take a hidden tab's throttled timer
//! for silence. At the end, tabs: two of one session refresh at once, names
//! with U+202E stay isolated, a refresh answering another tab's user is
//! not adopted, "Log out" ends the tab's own session (not the cookie's),
//! and a refresh with no cookie left says so plainly.
//!
//! Needs `node` (20+), `/usr/bin/chromium` and `tests/browser/node_modules`
//! (`make test` installs all three; this test runs `npm ci` itself when the
//! modules are missing).

use sales_e2e::TestDb;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

const EMAIL: &str = "dashboard-admin@example.com";
const PASSWORD: &str = "dashboard-password-1";
/// The browser part's own limit (the whole test stays under four minutes).
const BROWSER_TIMEOUT: Duration = Duration::from_secs(200);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

fn chromium() -> String {
    std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_string())
}

/// Checks the tools, installing the npm modules when only they are missing.
async fn browser_tools(dir: &Path) {
    let node = tokio::process::Command::new("node")
        .arg("--version")
        .output()
        .await;
    assert!(
        node.as_ref().is_ok_and(|o| o.status.success()),
        "node is missing: `make test` installs it (apt-get install -y nodejs npm)"
    );
    assert!(
        Path::new(&chromium()).exists(),
        "{} is missing: `make test` installs it (apt-get install -y chromium)",
        chromium()
    );
    if !dir
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        let st = tokio::process::Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(dir)
            .status()
            .await
            .expect("run npm ci");
        assert!(st.success(), "npm ci in {} failed", dir.display());
    }
}

#[tokio::test]
async fn dashboard_in_chromium() {
    let dir = repo_root().join("tests/browser");
    browser_tools(&dir).await;

    let db = TestDb::new().await;
    // Demo data: 24 stores in 6 regions, last month and this one (up to today).
    let summary = sales_server::seed::seed(
        &db.pool,
        &sales_server::cli::SeedArgs {
            stores: 24,
            regions: 6,
            months: 2,
            end: None,
            seed: 7,
            batch: 500,
            if_empty: false,
        },
    )
    .await
    .expect("seed demo data");
    assert_eq!(summary.stores, 24);
    sales_server::users::upsert_user(&db.pool, EMAIL, "admin", &[], PASSWORD)
        .await
        .expect("create admin");
    // A store named with a right-to-left override (U+202E), written by plain
    // SQL (the API refuses direction controls in names, but a name stored
    // otherwise may hold one): the page keeps it from reordering the rest of
    // its line.
    let bidi_store: i64 = sqlx::query_scalar(
        "INSERT INTO sales.stores (code, name, region) VALUES ('BIDI1', $1, 'Bidi Region') RETURNING id",
    )
    .bind("\u{202E}evil store")
    .fetch_one(&db.pool)
    .await
    .expect("a store named with U+202E");
    let server = db.server(&[("RATE_LIMIT_PER_MINUTE", "100000")]).await;
    let with_export =
        sales_server::http::openapi_json(server.state.clone()).contains("\"/api/v2/sales/export\"");

    let out = repo_root().join("test-output");
    std::fs::create_dir_all(&out).expect("test-output");
    let mut child = tokio::process::Command::new("node")
        .arg("dashboard.test.mjs")
        .current_dir(&dir)
        .env("DASHBOARD_URL", server.url(""))
        .env("DASHBOARD_EMAIL", EMAIL)
        .env("DASHBOARD_PASSWORD", PASSWORD)
        .env("DASHBOARD_OUT", &out)
        .env("DASHBOARD_EXPORT", if with_export { "1" } else { "0" })
        .env("DASHBOARD_BIDI_STORE", bidi_store.to_string())
        .env("CHROMIUM", chromium())
        // The seed's "current month" is UTC; the page and the script use local time.
        .env("TZ", "UTC")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start node");
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let read = |r: Box<dyn tokio::io::AsyncRead + Unpin + Send>| {
        tokio::spawn(async move {
            let mut r = r;
            let mut s = String::new();
            let _ = tokio::io::AsyncReadExt::read_to_string(&mut r, &mut s).await;
            s
        })
    };
    let (out_task, err_task) = (read(Box::new(stdout)), read(Box::new(stderr)));
    let status = tokio::time::timeout(BROWSER_TIMEOUT, child.wait()).await;
    if status.is_err() {
        let _ = child.kill().await;
    }
    let (o, e) = (
        out_task.await.unwrap_or_default(),
        err_task.await.unwrap_or_default(),
    );
    println!("{o}");
    eprintln!("{e}");
    match status {
        Err(_) => panic!("browser test timed out after {BROWSER_TIMEOUT:?}\n{o}\n{e}"),
        Ok(st) => assert!(
            st.expect("wait for node").success(),
            "browser test failed\n{o}\n{e}"
        ),
    }
    assert!(out.join("dashboard.png").exists(), "no screenshot");
    server.stop().await;
}
