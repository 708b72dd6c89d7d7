//! Server-wide settings kept in the database (shared by every replica).

use super::{Result, Store};

impl Store {
    /// The value of `key`, set to `init()` first if absent. Concurrent callers
    /// all get the value of whichever insert won.
    pub async fn setting_or_init(
        &self,
        key: &str,
        init: impl FnOnce() -> String,
    ) -> Result<String> {
        sqlx::query(
            "INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
        )
        .bind(key)
        .bind(init())
        .execute(self.pool())
        .await?;
        Ok(
            sqlx::query_scalar("SELECT value FROM settings WHERE key = $1")
                .bind(key)
                .fetch_one(self.pool())
                .await?,
        )
    }
}
