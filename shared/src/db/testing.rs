//! Fresh, isolated databases for tests: a temporary SQLite file, or a new
//! PostgreSQL database named `atelier_t_<ulid>` on the server of
//! `ATELIER_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`),
//! so tests run in parallel without seeing each other.

use super::{Dialect, Store};
use sqlx::Connection;

pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

pub fn postgres_admin_url() -> String {
    std::env::var("ATELIER_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_string())
}

/// A migrated store on its own database; dropped databases are cleaned up by
/// `scripts/test` (Postgres cannot drop a database from a `Drop` impl).
pub struct TestDb {
    pub store: Store,
    pub url: String,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    pub async fn new(dialect: Dialect) -> TestDb {
        match dialect {
            Dialect::Sqlite => {
                let dir = tempfile::tempdir().expect("tempdir");
                let url = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
                let store = Store::connect(&url, 5).await.expect("sqlite connects");
                store.migrate().await.expect("migrates");
                TestDb {
                    store,
                    url,
                    _dir: Some(dir),
                }
            }
            Dialect::Postgres => {
                let url = create_postgres_database().await;
                let store = Store::connect(&url, 5).await.expect("postgres connects");
                store.migrate().await.expect("migrates");
                TestDb {
                    store,
                    url,
                    _dir: None,
                }
            }
        }
    }
}

/// Creates an empty database and returns its URL.
pub async fn create_postgres_database() -> String {
    sqlx::any::install_default_drivers();
    let admin = postgres_admin_url();
    let name = format!("atelier_t_{}", ulid::Ulid::new().to_string().to_lowercase());
    let mut conn = sqlx::AnyConnection::connect(&admin).await.expect(
        "PostgreSQL must be reachable for tests (scripts/test starts it); set ATELIER_TEST_POSTGRES_URL",
    );
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create database");
    let base = admin
        .rsplit_once('/')
        .map(|(b, _)| b.to_string())
        .unwrap_or(admin);
    format!("{base}/{name}")
}
