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
mod admissions;
pub mod api_models;
mod codec;
pub mod custom_models;
pub mod files;
pub mod idempotency;
pub mod identities;
pub mod jobs;
pub mod notifications;
pub mod operators;
pub mod outbox;
pub mod predictions;
pub mod presets;
pub mod projects;
pub mod rows;
pub mod scheduling;
pub mod settings;
pub mod trainings;
mod transitions;
pub mod webhooks;

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{Any, AnyPool, Connection, Executor, Transaction};
use std::time::Duration;

/// How long a pooled connection may sit idle before it is pinged on its
/// way out of the pool.
const IDLE_BEFORE_PING: Duration = Duration::from_secs(1);

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

/// The stored definition of SQLite's `jobs` table.
async fn jobs_ddl(conn: &mut sqlx::AnyConnection) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'jobs'")
        .fetch_optional(conn)
        .await
}

/// `ddl` (SQLite's `CREATE TABLE jobs …`) without the CHECK that lists the
/// job kinds, as `jobs_new`; `None` when it has no such CHECK.
fn without_kind_check(ddl: &str) -> Option<String> {
    const CHECK: &str = "CHECK (job_type IN (";
    let start = ddl.find(CHECK)?;
    // The CHECK ends where its opening parenthesis closes.
    let open = start + "CHECK ".len();
    let mut depth = 0usize;
    let mut end = None;
    for (i, c) in ddl[open..].char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    end = Some(open + i + 1);
                    break;
                }
            }
            _ => {}
        }
    }
    let mut out = format!("{}{}", &ddl[..start], &ddl[end?..]);
    let name = out.find("jobs")?;
    out.replace_range(name..name + "jobs".len(), "jobs_new");
    Some(out)
}

/// The rebuild of [`Store::sqlite_open_job_types`]: foreign keys off, then
/// in one `BEGIN IMMEDIATE` transaction (re-checked inside it, as another
/// process may have done it meanwhile) the new table, the copy, the swap
/// and the table's indexes again; foreign keys back on.
async fn rebuild_jobs_without_kind_check(conn: &mut sqlx::AnyConnection) -> sqlx::Result<()> {
    conn.execute("PRAGMA foreign_keys = OFF").await?;
    conn.execute("BEGIN IMMEDIATE").await?;
    let rebuilt = async {
        let Some(new_ddl) = jobs_ddl(conn).await?.and_then(|d| without_kind_check(&d)) else {
            return Ok(());
        };
        let indexes: Vec<String> = sqlx::query_scalar(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'jobs' AND sql IS NOT NULL",
        )
        .fetch_all(&mut *conn)
        .await?;
        conn.execute(new_ddl.as_str()).await?;
        conn.execute("INSERT INTO jobs_new SELECT * FROM jobs").await?;
        conn.execute("DROP TABLE jobs").await?;
        conn.execute("ALTER TABLE jobs_new RENAME TO jobs").await?;
        for index in &indexes {
            conn.execute(index.as_str()).await?;
        }
        Ok::<_, sqlx::Error>(())
    }
    .await;
    match rebuilt {
        Ok(()) => conn.execute("COMMIT").await?,
        Err(e) => {
            let _ = conn.execute("ROLLBACK").await;
            return Err(e);
        }
    };
    conn.execute("PRAGMA foreign_keys = ON").await?;
    Ok(())
}
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

/// Handle to the database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    dialect: Dialect,
    /// Admissions waiting for a batch statement (PostgreSQL).
    admitter: std::sync::Arc<admissions::Admitter>,
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
            // A connection is pinged before it is handed out only after it
            // sat idle for a while (a restarted server or a dropped socket
            // shows there), not on every acquire: a busy pool would
            // otherwise pay one extra round trip per statement it runs
            // outside a transaction. A failed ping closes that connection
            // and the pool takes or opens another.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= IDLE_BEFORE_PING {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
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
        Ok(Store {
            pool,
            dialect,
            admitter: Default::default(),
        })
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
    /// IMMEDIATE`. The new table is the stored definition without that
    /// CHECK, so columns that later migrations add are kept. A connection
    /// that fails midway is closed, never returned to the pool with foreign
    /// keys off.
    async fn sqlite_open_job_types(&self) -> Result<()> {
        let mut conn = self.pool.acquire().await?;
        if !jobs_ddl(&mut conn)
            .await?
            .is_some_and(|ddl| without_kind_check(&ddl).is_some())
        {
            return Ok(());
        }
        match rebuild_jobs_without_kind_check(&mut conn).await {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = conn.close().await;
                Err(e.into())
            }
        }
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

/// The file of a `sqlite:` database URL (none for an in-memory database).
pub fn sqlite_path(url: &str) -> Option<String> {
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

/// `count` placeholders, `$first, $first+1, …`: the inside of an SQL
/// `IN (…)` list whose values are bound in order from parameter `first`.
pub(crate) fn placeholders(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// JSON column helpers.
/// Row ids as the inside of an SQL `IN (…)` list. Integers this code
/// formats: nothing to escape, and one statement however many there are.
pub(crate) fn id_list(ids: &[i64]) -> String {
    ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
}

pub(crate) fn to_json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

pub(crate) fn from_json<T: serde::de::DeserializeOwned>(s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// `text` for a `LIKE` pattern with `ESCAPE '\'`: its `\`, `%` and `_`
/// match only themselves.
pub(crate) fn like_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '\\' | '%' | '_') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(any(test, feature = "test-util"))]
pub mod testing;

#[cfg(test)]
mod tests {
    use super::without_kind_check;

    #[test]
    fn the_kind_check_is_cut_out_of_the_stored_definition() {
        let ddl = "CREATE TABLE jobs (\n    id TEXT PRIMARY KEY,\n    job_type TEXT NOT NULL CHECK (job_type IN ('a', 'b')),\n    \
                   status TEXT NOT NULL CHECK (status IN ('pending')), inputs TEXT)";
        let open = without_kind_check(ddl).expect("has the check");
        assert_eq!(
            open,
            "CREATE TABLE jobs_new (\n    id TEXT PRIMARY KEY,\n    job_type TEXT NOT NULL ,\n    \
             status TEXT NOT NULL CHECK (status IN ('pending')), inputs TEXT)"
        );
        assert_eq!(without_kind_check(&open.replace("jobs_new", "jobs")), None);
    }
}

#[cfg(test)]
mod conformance;
