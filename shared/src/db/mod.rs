//! The store: PostgreSQL in production, SQLite in the embedded mode, behind
//! one type and one set of queries (sqlx `Any`).
//!
//! Portable SQL only: `$n` placeholders (SQLite accepts them), `RETURNING`,
//! `ON CONFLICT`, integer timestamps, TEXT ids and JSON. The dialect shows up
//! in three places: the migration directory, [`Store::begin`] (SQLite write
//! transactions start with `BEGIN IMMEDIATE` so a read-then-write never fails
//! on a stale snapshot), and [`Store::skip_locked`] (Postgres claims rows with
//! `FOR UPDATE SKIP LOCKED` so replicas do not queue behind each other).
//!
//! Invariant for every caller: never hold a transaction across inference,
//! an upload or any network call other than the database itself.

pub mod accounts;
mod codec;
pub mod files;
pub mod identities;
pub mod jobs;
pub mod notifications;
pub mod outbox;
pub mod projects;
pub mod rows;
pub mod scheduling;
pub mod settings;
mod transitions;
pub mod webhooks;

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{Any, AnyPool, Executor, Transaction};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// Failures of the store, typed by what the caller can do about them.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached (connection refused, pool timeout,
    /// server shutting down): the HTTP edge answers 503 with `Retry-After`.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// A unique constraint rejected the write.
    #[error("unique constraint violated: {0}")]
    Conflict(String),
    #[error("row not found")]
    NotFound,
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Other(#[source] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::RowNotFound => StoreError::NotFound,
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e),
            sqlx::Error::Database(db) => {
                if db.is_unique_violation() {
                    return StoreError::Conflict(db.message().to_string());
                }
                let code = db.code().map(|c| c.to_string()).unwrap_or_default();
                // 08xxx connection exceptions, 57P0x shutdown/cannot connect now,
                // 40001/40P01 serialization failure/deadlock (safe to retry),
                // SQLITE_BUSY (5) after the busy timeout.
                if code.starts_with("08")
                    || code.starts_with("57P")
                    || code == "40001"
                    || code == "40P01"
                    || code == "5"
                    || code == "517"
                {
                    StoreError::Unavailable(e)
                } else {
                    StoreError::Other(e)
                }
            }
            sqlx::Error::Protocol(_) => StoreError::Unavailable(e),
            // A stored value this version cannot read (an unknown status,
            // kind or queue; a spec that no longer parses).
            sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
                StoreError::Corrupt(e.to_string())
            }
            _ => StoreError::Other(e),
        }
    }
}

impl StoreError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
pub type Tx = Transaction<'static, Any>;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

/// The rebuild of `jobs` without the CHECK on `job_type` (see
/// [`Store::migrate`]): every column and constraint of migrations 0001–0005
/// but that one.
const SQLITE_OPEN_JOB_TYPES: &str = include_str!("sqlite_open_job_types.sql");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

/// Handle to the database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    dialect: Dialect,
}

impl Store {
    /// Connects (creating the SQLite file and its directory if needed).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Store> {
        install_default_drivers();
        let dialect = if url.starts_with("sqlite:") {
            Dialect::Sqlite
        } else {
            Dialect::Postgres
        };
        if dialect == Dialect::Sqlite
            && let Some(path) = sqlite_path(url)
            && let Some(dir) = std::path::Path::new(&path).parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Unavailable(sqlx::Error::Io(e)))?;
        }
        let opts = AnyPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if dialect == Dialect::Sqlite {
                        // WAL: readers never block the writer; busy_timeout lets
                        // writers queue instead of failing at once.
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA busy_timeout = 10000").await?;
                        conn.execute("PRAGMA foreign_keys = ON").await?;
                    }
                    Ok(())
                })
            });
        let pool = opts.connect(url).await?;
        Ok(Store { pool, dialect })
    }

    pub async fn migrate(&self) -> Result<()> {
        match self.dialect {
            Dialect::Sqlite => {
                SQLITE_MIGRATIONS.run(&self.pool).await?;
                self.sqlite_open_job_types().await?;
            }
            Dialect::Postgres => POSTGRES_MIGRATIONS.run(&self.pool).await?,
        }
        Ok(())
    }

    /// Drops the CHECK that listed the job kinds in `jobs.job_type` (what
    /// PostgreSQL's migration 0006 does): the kinds are the code's
    /// (`domain::kinds`), a row decodes into the kind enum and an unknown
    /// name is a read error, so a new kind needs no schema change. SQLite
    /// cannot drop a CHECK in place, and its rebuild must run with foreign
    /// keys off (else dropping the old table would cascade into the
    /// outputs), which a migration's transaction cannot switch: hence this
    /// step, on one connection, idempotent and serialised by `BEGIN
    /// IMMEDIATE`.
    async fn sqlite_open_job_types(&self) -> Result<()> {
        const CLOSED: &str = "CHECK (job_type IN (";
        let mut conn = self.pool.acquire().await?;
        let has_check = |sql: Option<String>| sql.is_some_and(|s| s.contains(CLOSED));
        let sql: Option<String> = sqlx::query_scalar(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'jobs'",
        )
        .fetch_optional(&mut *conn)
        .await?;
        if !has_check(sql) {
            return Ok(());
        }
        conn.execute("PRAGMA foreign_keys = OFF").await?;
        let rebuilt = async {
            conn.execute("BEGIN IMMEDIATE").await?;
            let sql: Option<String> = sqlx::query_scalar(
                "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'jobs'",
            )
            .fetch_optional(&mut *conn)
            .await?;
            if has_check(sql) {
                conn.execute(SQLITE_OPEN_JOB_TYPES).await?;
            }
            conn.execute("COMMIT").await?;
            Ok::<_, sqlx::Error>(())
        }
        .await;
        if rebuilt.is_err() {
            let _ = conn.execute("ROLLBACK").await;
        }
        conn.execute("PRAGMA foreign_keys = ON").await?;
        rebuilt?;
        Ok(())
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// A write transaction.
    pub async fn begin(&self) -> Result<Tx> {
        Ok(match self.dialect {
            Dialect::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Dialect::Postgres => self.pool.begin().await?,
        })
    }

    /// Suffix for a row-claiming subquery.
    pub fn skip_locked(&self) -> &'static str {
        match self.dialect {
            Dialect::Sqlite => "",
            Dialect::Postgres => " FOR UPDATE SKIP LOCKED",
        }
    }

    /// Suffix that row-locks what a read inside a write transaction returns
    /// (SQLite's `BEGIN IMMEDIATE` already serialises writers).
    pub fn for_update(&self) -> &'static str {
        match self.dialect {
            Dialect::Sqlite => "",
            Dialect::Postgres => " FOR UPDATE",
        }
    }

    /// `FOR UPDATE OF <table>` (PostgreSQL): locks only that table's rows of
    /// a join; SQLite serialises writers anyway.
    pub fn for_update_of(&self, table: &str) -> String {
        match self.dialect {
            Dialect::Sqlite => String::new(),
            Dialect::Postgres => format!(" FOR UPDATE OF {table}"),
        }
    }

    /// Cheap liveness probe.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn sqlite_path(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next()?;
    if path.is_empty() || path == ":memory:" {
        None
    } else {
        Some(path.to_string())
    }
}

/// JSON column helpers.
pub(crate) fn to_json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

pub(crate) fn from_json<T: serde::de::DeserializeOwned>(s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(e.to_string()))
}

#[cfg(any(test, feature = "test-util"))]
pub mod testing;

#[cfg(test)]
mod conformance;
