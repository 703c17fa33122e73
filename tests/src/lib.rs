//! Test harness: every test gets its own database (with the extension and all
//! migrations) on the real Postgres cluster, its own Redis key prefix, and,
//! when it needs one, its own server on a free port. The pieces live in
//! [`fixtures`]; the common ones are re-exported here.

pub mod fixtures;

pub use fixtures::api::{month, warm, Api, Fixture};
pub use fixtures::bare_db::BareDb;
pub use fixtures::db::{base_url, redis_url, user_token, Config, RunningServer, TestDb};
pub use fixtures::server::{server_bin, ServerProc};
pub use fixtures::services::{OwnRedis, PgReplica};
pub use fixtures::token::{token, TEST_JWT_SECRET};
pub use fixtures::{
    eventually, free_port, ids_and_seqs_apart, ids_and_seqs_apart_holding, private_pg,
    relay_caught_up, sqlstate,
};
