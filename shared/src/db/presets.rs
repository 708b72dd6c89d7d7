//! Presets and categories (contract §6). Every read is scoped to what the
//! caller may see: its own items, items shared with a group it belongs to,
//! and system items (`owner_id` NULL). Writes are the owner's alone.

use super::{Result, Store, StoreError};
use crate::time::now_ms;

#[derive(Debug, Clone, sqlx::FromRow, PartialEq)]
pub struct PresetRow {
    pub code: String,
    /// `None`: a system preset.
    pub owner_id: Option<String>,
    pub name: String,
    pub description: Option<String>,
    pub preset_type: String,
    /// JSON object.
    pub instruction_data: String,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, sqlx::FromRow, PartialEq)]
pub struct CategoryRow {
    pub id: String,
    pub owner_id: Option<String>,
    pub name: String,
    pub description: Option<String>,
    pub thumbnail_url: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

const PRESET_COLUMNS: &str = "p.code, p.owner_id, p.name, p.description, p.preset_type, p.instruction_data, p.created_at, p.updated_at";
const CATEGORY_COLUMNS: &str =
    "c.id, c.owner_id, c.name, c.description, c.thumbnail_url, c.created_at, c.updated_at";

/// `p` is visible to account `$1`.
const PRESET_VISIBLE: &str = "p.deleted_at IS NULL AND (p.owner_id = $1 OR p.owner_id IS NULL OR EXISTS \
     (SELECT 1 FROM preset_shares s JOIN group_members m ON m.group_id = s.group_id \
      WHERE s.preset_code = p.code AND m.account_id = $1))";
/// `c` is visible to account `$1`.
const CATEGORY_VISIBLE: &str = "c.deleted_at IS NULL AND (c.owner_id = $1 OR c.owner_id IS NULL OR EXISTS \
     (SELECT 1 FROM preset_category_shares s JOIN group_members m ON m.group_id = s.group_id \
      WHERE s.category_id = c.id AND m.account_id = $1))";

/// A new preset.
pub struct NewPreset<'a> {
    pub owner_id: Option<&'a str>,
    pub name: &'a str,
    pub description: Option<&'a str>,
    pub preset_type: &'a str,
    pub instruction_data: &'a serde_json::Value,
    pub category_ids: &'a [String],
    /// Presets the owner may hold (`None`: no cap).
    pub cap: Option<i64>,
}

/// A preset to create with its category (see
/// [`Store::category_with_presets`]).
#[derive(Debug, Clone)]
pub struct PresetDraft {
    pub name: String,
    pub description: Option<String>,
    pub preset_type: String,
    /// JSON text.
    pub instruction_data: String,
}

/// Why a write was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum PresetRefusal {
    NameTaken,
    CapReached { cap: i64 },
    NoCategory(String),
}

/// Filters and position of a preset list.
#[derive(Debug, Clone, Default)]
pub struct PresetQuery {
    pub page: i64,
    pub per_page: i64,
    pub ascending: bool,
    /// `created_at`, `updated_at` or `name`.
    pub sort_by: String,
    pub preset_type: Option<String>,
    pub category_id: Option<String>,
    /// `private`, `shared` or `system`.
    pub visibility: Option<String>,
    pub search: Option<String>,
}

/// `private`, `shared` or `system` of an item, from its owner and shares.
fn visibility(owner: &Option<String>, shared: bool) -> &'static str {
    match (owner, shared) {
        (None, _) => "system",
        (Some(_), true) => "shared",
        (Some(_), false) => "private",
    }
}

/// The SQL predicate of a visibility filter on `alias` (`p` or `c`).
fn visibility_filter(v: &str, shares: &str, key: &str, alias: &str) -> Option<String> {
    Some(match v {
        "system" => format!("{alias}.owner_id IS NULL"),
        "shared" => format!(
            "{alias}.owner_id IS NOT NULL AND EXISTS (SELECT 1 FROM {shares} x WHERE x.{key} = {alias}.{})",
            if alias == "p" { "code" } else { "id" }
        ),
        "private" => format!(
            "{alias}.owner_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM {shares} x WHERE x.{key} = {alias}.{})",
            if alias == "p" { "code" } else { "id" }
        ),
        _ => return None,
    })
}

fn contains(text: &str) -> String {
    format!("%{}%", super::like_escape(&text.to_lowercase()))
}

impl Store {
    /// Whether `owner` already has a (not deleted) category named `name`.
    pub async fn category_name_taken(&self, owner: &str, name: &str) -> Result<bool> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM preset_categories WHERE owner_id = $1 AND name = $2 AND deleted_at IS NULL",
        )
        .bind(owner)
        .bind(name)
        .fetch_one(self.pool())
        .await?;
        Ok(n > 0)
    }

    /// How many (not deleted) presets `owner` holds.
    pub async fn preset_count(&self, owner: &str) -> Result<i64> {
        count_presets(self.pool(), owner).await
    }

    /// Creates a preset (and its category memberships) in one transaction.
    pub async fn create_preset(
        &self,
        p: NewPreset<'_>,
    ) -> Result<std::result::Result<PresetRow, PresetRefusal>> {
        let mut tx = self.begin().await?;
        if let (Some(owner), Some(cap)) = (p.owner_id, p.cap) {
            self.lock_account(&mut tx, owner).await?;
            let held = count_presets(&mut *tx, owner).await?;
            if held >= cap {
                return Ok(Err(PresetRefusal::CapReached { cap }));
            }
        }
        for id in p.category_ids {
            if !category_writable(&mut tx, p.owner_id, id).await? {
                return Ok(Err(PresetRefusal::NoCategory(id.clone())));
            }
        }
        let now = now_ms();
        let row = PresetRow {
            code: format!("pst_{}", crate::domain::ids::base32_lower(16)),
            owner_id: p.owner_id.map(str::to_string),
            name: p.name.to_string(),
            description: p.description.map(str::to_string),
            preset_type: p.preset_type.to_string(),
            instruction_data: p.instruction_data.to_string(),
            created_at: now,
            updated_at: now,
        };
        let r = sqlx::query(
            "INSERT INTO presets (code, owner_id, name, description, preset_type, instruction_data, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
        )
        .bind(&row.code)
        .bind(&row.owner_id)
        .bind(&row.name)
        .bind(&row.description)
        .bind(&row.preset_type)
        .bind(&row.instruction_data)
        .bind(now)
        .execute(&mut *tx)
        .await;
        if let Err(refused) = name_unique(r)? {
            return Ok(Err(refused));
        }
        for id in p.category_ids {
            sqlx::query(
                "INSERT INTO preset_category_members (category_id, preset_code, added_at) VALUES ($1, $2, $3)",
            )
            .bind(id)
            .bind(&row.code)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(Ok(row))
    }

    /// A preset the account may see.
    pub async fn preset_visible(&self, account: &str, code: &str) -> Result<Option<PresetRow>> {
        let sql = format!("SELECT {PRESET_COLUMNS} FROM presets p WHERE p.code = $2 AND {PRESET_VISIBLE}");
        Ok(sqlx::query_as::<_, PresetRow>(&sql)
            .bind(account)
            .bind(code)
            .fetch_optional(self.pool())
            .await?)
    }

    /// `(visibility, group names)` of a preset.
    pub async fn preset_sharing(&self, p: &PresetRow) -> Result<(&'static str, Vec<String>)> {
        let groups: Vec<String> = sqlx::query_scalar(
            "SELECT g.name FROM preset_shares s JOIN groups g ON g.id = s.group_id WHERE s.preset_code = $1 ORDER BY g.name",
        )
        .bind(&p.code)
        .fetch_all(self.pool())
        .await?;
        Ok((visibility(&p.owner_id, !groups.is_empty()), groups))
    }

    /// The categories (visible to `account`) a preset is in.
    pub async fn categories_of_preset(&self, account: &str, code: &str) -> Result<Vec<CategoryRow>> {
        let sql = format!(
            "SELECT {CATEGORY_COLUMNS} FROM preset_categories c JOIN preset_category_members m ON m.category_id = c.id \
             WHERE m.preset_code = $2 AND {CATEGORY_VISIBLE} ORDER BY c.name"
        );
        Ok(sqlx::query_as::<_, CategoryRow>(&sql)
            .bind(account)
            .bind(code)
            .fetch_all(self.pool())
            .await?)
    }

    /// A page of the presets the account may see, and how many match.
    pub async fn list_presets(&self, account: &str, q: &PresetQuery) -> Result<(Vec<PresetRow>, i64)> {
        let mut filter = PRESET_VISIBLE.to_string();
        let mut n = 1;
        let mut binds: Vec<String> = Vec::new();
        if let Some(t) = &q.preset_type {
            n += 1;
            filter.push_str(&format!(" AND p.preset_type = ${n}"));
            binds.push(t.clone());
        }
        if let Some(c) = &q.category_id {
            n += 1;
            filter.push_str(&format!(
                " AND EXISTS (SELECT 1 FROM preset_category_members cm WHERE cm.preset_code = p.code AND cm.category_id = ${n})"
            ));
            binds.push(c.clone());
        }
        if let Some(v) = q.visibility.as_deref().and_then(|v| visibility_filter(v, "preset_shares", "preset_code", "p")) {
            filter.push_str(&format!(" AND {v}"));
        }
        if let Some(s) = &q.search {
            n += 1;
            filter.push_str(&format!(
                " AND (LOWER(p.name) LIKE ${n} ESCAPE '\\' OR LOWER(COALESCE(p.description, '')) LIKE ${n} ESCAPE '\\')"
            ));
            binds.push(contains(s));
        }
        let count_sql = format!("SELECT COUNT(*) FROM presets p WHERE {filter}");
        let mut count = sqlx::query_scalar::<_, i64>(&count_sql).bind(account);
        for b in &binds {
            count = count.bind(b.clone());
        }
        let total = count.fetch_one(self.pool()).await?;
        let column = match q.sort_by.as_str() {
            "updated_at" => "p.updated_at",
            "name" => "p.name",
            _ => "p.created_at",
        };
        let dir = if q.ascending { "ASC" } else { "DESC" };
        let sql = format!(
            "SELECT {PRESET_COLUMNS} FROM presets p WHERE {filter} ORDER BY {column} {dir}, p.code {dir} LIMIT ${} OFFSET ${}",
            n + 1,
            n + 2
        );
        let mut rows = sqlx::query_as::<_, PresetRow>(&sql).bind(account);
        for b in &binds {
            rows = rows.bind(b.clone());
        }
        let rows = rows
            .bind(q.per_page)
            .bind((q.page - 1) * q.per_page)
            .fetch_all(self.pool())
            .await?;
        Ok((rows, total))
    }

    /// Updates the owner's preset; `None` fields are left as they are.
    pub async fn update_preset(
        &self,
        code: &str,
        name: Option<&str>,
        description: Option<&str>,
        instruction_data: Option<&serde_json::Value>,
    ) -> Result<std::result::Result<(), PresetRefusal>> {
        let r = sqlx::query(
            "UPDATE presets SET name = COALESCE($2, name), description = COALESCE($3, description), \
             instruction_data = COALESCE($4, instruction_data), updated_at = $5 WHERE code = $1 AND deleted_at IS NULL",
        )
        .bind(code)
        .bind(name)
        .bind(description)
        .bind(instruction_data.map(|d| d.to_string()))
        .bind(now_ms())
        .execute(self.pool())
        .await;
        Ok(name_unique(r)?.map(|_| ()))
    }

    /// Soft-deletes presets of `owner` among `codes`; the codes deleted.
    pub async fn delete_presets(&self, owner: &str, codes: &[String]) -> Result<Vec<String>> {
        let mut deleted = Vec::new();
        let now = now_ms();
        for code in codes {
            let r = sqlx::query(
                "UPDATE presets SET deleted_at = $3, updated_at = $3 WHERE code = $1 AND owner_id = $2 AND deleted_at IS NULL",
            )
            .bind(code)
            .bind(owner)
            .bind(now)
            .execute(self.pool())
            .await?;
            if r.rows_affected() == 1 {
                deleted.push(code.clone());
            }
        }
        Ok(deleted)
    }

    /// The id of group `name` when `account` is a member of it.
    pub async fn member_group(&self, account: &str, name: &str) -> Result<Option<String>> {
        Ok(sqlx::query_scalar(
            "SELECT g.id FROM groups g JOIN group_members m ON m.group_id = g.id WHERE g.name = $1 AND m.account_id = $2",
        )
        .bind(name)
        .bind(account)
        .fetch_optional(self.pool())
        .await?)
    }

    /// Shares (or, `share = false`, unshares) one preset with a group;
    /// whether anything changed.
    pub async fn set_preset_share(&self, code: &str, group_id: &str, share: bool) -> Result<bool> {
        self.set_share("preset_shares", "preset_code", code, group_id, share)
            .await
    }

    /// Adds (or removes) the row `(key, group)` of a share table;
    /// whether anything changed.
    async fn set_share(
        &self,
        table: &str,
        key_column: &str,
        key: &str,
        group_id: &str,
        share: bool,
    ) -> Result<bool> {
        let sql = if share {
            match self.dialect() {
                super::Dialect::Postgres => format!(
                    "INSERT INTO {table} ({key_column}, group_id) VALUES ($1, $2) ON CONFLICT DO NOTHING"
                ),
                super::Dialect::Sqlite => format!(
                    "INSERT OR IGNORE INTO {table} ({key_column}, group_id) VALUES ($1, $2)"
                ),
            }
        } else {
            format!("DELETE FROM {table} WHERE {key_column} = $1 AND group_id = $2")
        };
        let r = sqlx::query(&sql)
            .bind(key)
            .bind(group_id)
            .execute(self.pool())
            .await?;
        Ok(r.rows_affected() == 1)
    }

    // -- categories ---------------------------------------------------------

    pub async fn create_category(
        &self,
        owner: Option<&str>,
        name: &str,
        description: Option<&str>,
        thumbnail_url: Option<&str>,
    ) -> Result<std::result::Result<CategoryRow, PresetRefusal>> {
        let now = now_ms();
        let row = CategoryRow {
            id: format!("cat_{}", crate::domain::ids::base32_lower(16)),
            owner_id: owner.map(str::to_string),
            name: name.to_string(),
            description: description.map(str::to_string),
            thumbnail_url: thumbnail_url.map(str::to_string),
            created_at: now,
            updated_at: now,
        };
        let r = sqlx::query(
            "INSERT INTO preset_categories (id, owner_id, name, description, thumbnail_url, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $6)",
        )
        .bind(&row.id)
        .bind(&row.owner_id)
        .bind(&row.name)
        .bind(&row.description)
        .bind(&row.thumbnail_url)
        .bind(now)
        .execute(self.pool())
        .await;
        Ok(name_unique(r)?.map(|_| row))
    }

    pub async fn category_visible(&self, account: &str, id: &str) -> Result<Option<CategoryRow>> {
        let sql = format!("SELECT {CATEGORY_COLUMNS} FROM preset_categories c WHERE c.id = $2 AND {CATEGORY_VISIBLE}");
        Ok(sqlx::query_as::<_, CategoryRow>(&sql)
            .bind(account)
            .bind(id)
            .fetch_optional(self.pool())
            .await?)
    }

    /// `(visibility, group names, preset count)` of a category; the count
    /// is of its live presets.
    pub async fn category_sharing(&self, c: &CategoryRow) -> Result<(&'static str, Vec<String>, i64)> {
        let groups: Vec<String> = sqlx::query_scalar(
            "SELECT g.name FROM preset_category_shares s JOIN groups g ON g.id = s.group_id WHERE s.category_id = $1 ORDER BY g.name",
        )
        .bind(&c.id)
        .fetch_all(self.pool())
        .await?;
        let count: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM preset_category_members m JOIN presets p ON p.code = m.preset_code \
             WHERE m.category_id = $1 AND p.deleted_at IS NULL",
        )
        .bind(&c.id)
        .fetch_one(self.pool())
        .await?;
        Ok((visibility(&c.owner_id, !groups.is_empty()), groups, count))
    }

    /// A page of the categories the account may see, and how many match.
    pub async fn list_categories(
        &self,
        account: &str,
        visibility_is: Option<&str>,
        search: Option<&str>,
        page: i64,
        per_page: i64,
        ascending: bool,
    ) -> Result<(Vec<CategoryRow>, i64)> {
        let mut filter = CATEGORY_VISIBLE.to_string();
        if let Some(v) = visibility_is.and_then(|v| {
            visibility_filter(v, "preset_category_shares", "category_id", "c")
        }) {
            filter.push_str(&format!(" AND {v}"));
        }
        let pattern = search.map(contains);
        if pattern.is_some() {
            filter.push_str(" AND LOWER(c.name) LIKE $2 ESCAPE '\\'");
        }
        let n = if pattern.is_some() { 2 } else { 1 };
        let count_sql = format!("SELECT COUNT(*) FROM preset_categories c WHERE {filter}");
        let mut count = sqlx::query_scalar::<_, i64>(&count_sql).bind(account);
        if let Some(p) = &pattern {
            count = count.bind(p.clone());
        }
        let total = count.fetch_one(self.pool()).await?;
        let dir = if ascending { "ASC" } else { "DESC" };
        let sql = format!(
            "SELECT {CATEGORY_COLUMNS} FROM preset_categories c WHERE {filter} ORDER BY c.created_at {dir}, c.id {dir} LIMIT ${} OFFSET ${}",
            n + 1,
            n + 2
        );
        let mut q = sqlx::query_as::<_, CategoryRow>(&sql).bind(account);
        if let Some(p) = &pattern {
            q = q.bind(p.clone());
        }
        let rows = q
            .bind(per_page)
            .bind((page - 1) * per_page)
            .fetch_all(self.pool())
            .await?;
        Ok((rows, total))
    }

    /// The presets of a category the account may see, oldest membership first.
    pub async fn category_presets(&self, account: &str, id: &str) -> Result<Vec<PresetRow>> {
        let sql = format!(
            "SELECT {PRESET_COLUMNS} FROM presets p JOIN preset_category_members m ON m.preset_code = p.code \
             WHERE m.category_id = $2 AND {PRESET_VISIBLE} ORDER BY m.added_at, p.code"
        );
        Ok(sqlx::query_as::<_, PresetRow>(&sql)
            .bind(account)
            .bind(id)
            .fetch_all(self.pool())
            .await?)
    }

    pub async fn update_category(
        &self,
        id: &str,
        name: Option<&str>,
        description: Option<&str>,
        thumbnail_url: Option<&str>,
    ) -> Result<std::result::Result<(), PresetRefusal>> {
        let r = sqlx::query(
            "UPDATE preset_categories SET name = COALESCE($2, name), description = COALESCE($3, description), \
             thumbnail_url = COALESCE($4, thumbnail_url), updated_at = $5 WHERE id = $1 AND deleted_at IS NULL",
        )
        .bind(id)
        .bind(name)
        .bind(description)
        .bind(thumbnail_url)
        .bind(now_ms())
        .execute(self.pool())
        .await;
        Ok(name_unique(r)?.map(|_| ()))
    }

    /// Soft-deletes a category; its presets stay, unassigned.
    pub async fn delete_category(&self, id: &str) -> Result<bool> {
        let mut tx = self.begin().await?;
        let now = now_ms();
        let r = sqlx::query(
            "UPDATE preset_categories SET deleted_at = $2, updated_at = $2 WHERE id = $1 AND deleted_at IS NULL",
        )
        .bind(id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM preset_category_members WHERE category_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM preset_category_shares WHERE category_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(r.rows_affected() == 1)
    }

    /// Adds presets to a category: `(assigned, already assigned)`.
    pub async fn assign_presets(&self, id: &str, codes: &[String]) -> Result<(i64, i64)> {
        let (mut assigned, mut already) = (0, 0);
        let now = now_ms();
        for code in codes {
            let there: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM preset_category_members WHERE category_id = $1 AND preset_code = $2",
            )
            .bind(id)
            .bind(code)
            .fetch_one(self.pool())
            .await?;
            if there > 0 {
                already += 1;
                continue;
            }
            let r = sqlx::query(
                "INSERT INTO preset_category_members (category_id, preset_code, added_at) VALUES ($1, $2, $3)",
            )
            .bind(id)
            .bind(code)
            .bind(now)
            .execute(self.pool())
            .await;
            match r {
                Ok(_) => assigned += 1,
                // A concurrent assignment of the same pair.
                Err(e) => match StoreError::from(e) {
                    StoreError::Conflict(_) => already += 1,
                    other => return Err(other),
                },
            }
        }
        Ok((assigned, already))
    }

    pub async fn unassign_preset(&self, id: &str, code: &str) -> Result<bool> {
        let r = sqlx::query(
            "DELETE FROM preset_category_members WHERE category_id = $1 AND preset_code = $2",
        )
        .bind(id)
        .bind(code)
        .execute(self.pool())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    pub async fn set_category_share(&self, id: &str, group_id: &str, share: bool) -> Result<bool> {
        self.set_share("preset_category_shares", "category_id", id, group_id, share)
            .await
    }

    /// Copies `presets` into a new category of `owner` named `name` (fresh
    /// codes; `source`'s description and thumbnail), in one transaction
    /// within the owner's preset cap.
    pub async fn duplicate_category(
        &self,
        owner: &str,
        name: &str,
        source: &CategoryRow,
        presets: &[PresetRow],
        cap: Option<i64>,
    ) -> Result<std::result::Result<(CategoryRow, i64), PresetRefusal>> {
        let drafts: Vec<PresetDraft> = presets
            .iter()
            .map(|p| PresetDraft {
                name: p.name.clone(),
                description: p.description.clone(),
                preset_type: p.preset_type.clone(),
                instruction_data: p.instruction_data.clone(),
            })
            .collect();
        let made = self
            .category_with_presets(
                owner,
                name,
                source.description.as_deref(),
                source.thumbnail_url.as_deref(),
                &drafts,
                cap,
            )
            .await?;
        Ok(made.map(|(c, codes)| (c, codes.len() as i64)))
    }

    /// Creates a category of `owner` and one preset per draft in it, all
    /// or nothing, within the owner's preset cap; a draft whose name the
    /// owner already uses is suffixed with the category's name. The new
    /// presets' codes, in the drafts' order.
    pub async fn category_with_presets(
        &self,
        owner: &str,
        name: &str,
        description: Option<&str>,
        thumbnail_url: Option<&str>,
        presets: &[PresetDraft],
        cap: Option<i64>,
    ) -> Result<std::result::Result<(CategoryRow, Vec<String>), PresetRefusal>> {
        let mut tx = self.begin().await?;
        self.lock_account(&mut tx, owner).await?;
        if let Some(cap) = cap {
            let held = count_presets(&mut *tx, owner).await?;
            if held + presets.len() as i64 > cap {
                return Ok(Err(PresetRefusal::CapReached { cap }));
            }
        }
        let now = now_ms();
        let category = CategoryRow {
            id: format!("cat_{}", crate::domain::ids::base32_lower(16)),
            owner_id: Some(owner.to_string()),
            name: name.to_string(),
            description: description.map(str::to_string),
            thumbnail_url: thumbnail_url.map(str::to_string),
            created_at: now,
            updated_at: now,
        };
        let r = sqlx::query(
            "INSERT INTO preset_categories (id, owner_id, name, description, thumbnail_url, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $6)",
        )
        .bind(&category.id)
        .bind(owner)
        .bind(name)
        .bind(&category.description)
        .bind(&category.thumbnail_url)
        .bind(now)
        .execute(&mut *tx)
        .await;
        if let Err(refused) = name_unique(r)? {
            return Ok(Err(refused));
        }
        let mut codes = Vec::with_capacity(presets.len());
        for (i, p) in presets.iter().enumerate() {
            let code = format!("pst_{}", crate::domain::ids::base32_lower(16));
            // Names are unique per owner: a copy whose name the owner
            // already uses gets a suffix.
            let taken: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM presets WHERE owner_id = $1 AND name = $2 AND deleted_at IS NULL",
            )
            .bind(owner)
            .bind(&p.name)
            .fetch_one(&mut *tx)
            .await?;
            let copy_name = if taken > 0 {
                format!("{} ({name})", p.name)
            } else {
                p.name.clone()
            };
            sqlx::query(
                "INSERT INTO presets (code, owner_id, name, description, preset_type, instruction_data, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
            )
            .bind(&code)
            .bind(owner)
            .bind(&copy_name)
            .bind(&p.description)
            .bind(&p.preset_type)
            .bind(&p.instruction_data)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from)?;
            sqlx::query(
                "INSERT INTO preset_category_members (category_id, preset_code, added_at) VALUES ($1, $2, $3)",
            )
            .bind(&category.id)
            .bind(&code)
            .bind(now + i as i64)
            .execute(&mut *tx)
            .await?;
            codes.push(code);
        }
        tx.commit().await?;
        Ok(Ok((category, codes)))
    }

    /// Upserts a system preset by code (the operator's import).
    pub async fn put_system_preset(&self, p: &PresetRow, category_ids: &[String]) -> Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM preset_category_members WHERE preset_code = $1")
            .bind(&p.code)
            .execute(&mut *tx)
            .await?;
        let exists: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM presets WHERE code = $1")
            .bind(&p.code)
            .fetch_one(&mut *tx)
            .await?;
        if exists > 0 {
            sqlx::query(
                "UPDATE presets SET owner_id = NULL, name = $2, description = $3, preset_type = $4, instruction_data = $5, \
                 updated_at = $6, deleted_at = NULL WHERE code = $1",
            )
        } else {
            sqlx::query(
                "INSERT INTO presets (code, owner_id, name, description, preset_type, instruction_data, created_at, updated_at) \
                 VALUES ($1, NULL, $2, $3, $4, $5, $6, $6)",
            )
        }
        .bind(&p.code)
        .bind(&p.name)
        .bind(&p.description)
        .bind(&p.preset_type)
        .bind(&p.instruction_data)
        .bind(p.updated_at)
        .execute(&mut *tx)
        .await?;
        for c in category_ids {
            sqlx::query(
                "INSERT INTO preset_category_members (category_id, preset_code, added_at) VALUES ($1, $2, $3)",
            )
            .bind(c)
            .bind(&p.code)
            .bind(p.updated_at)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Upserts a system category by id (the operator's import).
    pub async fn put_system_category(&self, c: &CategoryRow) -> Result<()> {
        let exists: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM preset_categories WHERE id = $1")
            .bind(&c.id)
            .fetch_one(self.pool())
            .await?;
        if exists > 0 {
            sqlx::query(
                "UPDATE preset_categories SET owner_id = NULL, name = $2, description = $3, thumbnail_url = $4, \
                 updated_at = $5, deleted_at = NULL WHERE id = $1",
            )
        } else {
            sqlx::query(
                "INSERT INTO preset_categories (id, owner_id, name, description, thumbnail_url, created_at, updated_at) \
                 VALUES ($1, NULL, $2, $3, $4, $5, $5)",
            )
        }
        .bind(&c.id)
        .bind(&c.name)
        .bind(&c.description)
        .bind(&c.thumbnail_url)
        .bind(c.updated_at)
        .execute(self.pool())
        .await?;
        Ok(())
    }
}

/// A write's result, with a unique-name violation as the refusal it is
/// (the owner already has an item of that name).
fn name_unique<T>(r: std::result::Result<T, sqlx::Error>) -> Result<std::result::Result<T, PresetRefusal>> {
    match r.map_err(StoreError::from) {
        Ok(v) => Ok(Ok(v)),
        Err(StoreError::Conflict(_)) => Ok(Err(PresetRefusal::NameTaken)),
        Err(other) => Err(other),
    }
}

/// Whether `owner` may put presets in category `id` (it owns it; system
/// categories are written only by the operator, `owner` `None`).
async fn category_writable(tx: &mut super::Tx, owner: Option<&str>, id: &str) -> Result<bool> {
    let found: Option<Option<String>> = sqlx::query_scalar(
        "SELECT owner_id FROM preset_categories WHERE id = $1 AND deleted_at IS NULL",
    )
    .bind(id)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(matches!(found, Some(o) if o.as_deref() == owner))
}

/// How many (not deleted) presets `owner` holds, on `e` (the pool, or a
/// transaction that locked the owner's account row).
async fn count_presets<'e, E>(e: E, owner: &str) -> Result<i64>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    Ok(
        sqlx::query_scalar("SELECT COUNT(*) FROM presets WHERE owner_id = $1 AND deleted_at IS NULL")
            .bind(owner)
            .fetch_one(e)
            .await?,
    )
}
