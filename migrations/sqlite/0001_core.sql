-- Atelier core schema (SQLite). The PostgreSQL twin in ../postgres differs only
-- where the dialects must: auto-increment keys and trigger syntax.
-- Conventions: ids TEXT (prefixed, sortable), timestamps BIGINT epoch ms,
-- credits BIGINT milli-credits, JSON as TEXT, flags BIGINT 0/1.

CREATE TABLE accounts (
    id                 TEXT PRIMARY KEY,
    name               TEXT NOT NULL UNIQUE,
    plan               TEXT NOT NULL DEFAULT 'standard' CHECK (plan IN ('standard', 'enterprise')),
    max_size           TEXT NOT NULL DEFAULT '4K' CHECK (max_size IN ('1K', '2K', '4K')),
    custom_dimensions  BIGINT NOT NULL DEFAULT 0 CHECK (custom_dimensions IN (0, 1)),
    is_operator        BIGINT NOT NULL DEFAULT 0 CHECK (is_operator IN (0, 1)),
    -- Credits of this account as a billing owner; the ledger explains every change.
    balance            BIGINT NOT NULL DEFAULT 0,
    reserved           BIGINT NOT NULL DEFAULT 0,
    -- Jobs of the capped types that are pending or processing.
    active_jobs        BIGINT NOT NULL DEFAULT 0,
    created_at         BIGINT NOT NULL,
    CHECK (reserved >= 0 AND balance >= reserved AND active_jobs >= 0)
);

CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    account_id  TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    key_hash    TEXT NOT NULL UNIQUE,
    name        TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT,
    revoked_at  BIGINT
);
CREATE INDEX api_keys_account ON api_keys (account_id);

CREATE TABLE groups (
    id               TEXT PRIMARY KEY,
    name             TEXT NOT NULL UNIQUE,
    owner_account_id TEXT NOT NULL REFERENCES accounts(id),
    shared_billing   BIGINT NOT NULL DEFAULT 0 CHECK (shared_billing IN (0, 1)),
    created_at       BIGINT NOT NULL
);

CREATE TABLE group_members (
    group_id    TEXT NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
    account_id  TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (group_id, account_id)
);

CREATE TABLE projects (
    id          TEXT PRIMARY KEY,
    account_id  TEXT NOT NULL REFERENCES accounts(id),
    name        TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    UNIQUE (account_id, name)
);

CREATE TABLE files (
    id            TEXT PRIMARY KEY,
    account_id    TEXT NOT NULL REFERENCES accounts(id),
    project_id    TEXT NOT NULL REFERENCES projects(id),
    filename      TEXT NOT NULL,
    content_type  TEXT NOT NULL,
    object_key    TEXT NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('pending', 'uploaded')),
    size_bytes    BIGINT,
    width         BIGINT,
    height        BIGINT,
    created_at    BIGINT NOT NULL,
    uploaded_at   BIGINT,
    CHECK (status = 'pending' OR (size_bytes IS NOT NULL AND uploaded_at IS NOT NULL))
);
CREATE INDEX files_account ON files (account_id, created_at);

CREATE TABLE jobs (
    id                      TEXT PRIMARY KEY,
    account_id              TEXT NOT NULL REFERENCES accounts(id),
    billing_account_id      TEXT NOT NULL REFERENCES accounts(id),
    project_id              TEXT REFERENCES projects(id) ON DELETE CASCADE,
    job_type                TEXT NOT NULL CHECK (job_type IN ('create_packshot', 'model_swap', 'flat_2_model', 'identity_creation', 'identity_preprocessing')),
    status                  TEXT NOT NULL CHECK (status IN ('pending', 'processing', 'completed', 'failed', 'aborted')),
    spec                    TEXT NOT NULL,
    total_outputs           BIGINT NOT NULL CHECK (total_outputs > 0),
    completed_outputs       BIGINT NOT NULL DEFAULT 0,
    failed_outputs          BIGINT NOT NULL DEFAULT 0,
    should_post_process     BIGINT NOT NULL DEFAULT 0 CHECK (should_post_process IN (0, 1)),
    post_processing_status  TEXT CHECK (post_processing_status IN ('pending', 'processing', 'completed', 'failed')),
    post_processing_error   TEXT,
    error_message           TEXT,
    counts_against_cap      BIGINT NOT NULL DEFAULT 1 CHECK (counts_against_cap IN (0, 1)),
    created_at              BIGINT NOT NULL,
    updated_at              BIGINT NOT NULL,
    finalized_at            BIGINT,
    CHECK (completed_outputs >= 0 AND failed_outputs >= 0 AND completed_outputs + failed_outputs <= total_outputs),
    -- Terminal exactly when finalized.
    CHECK ((status IN ('completed', 'failed', 'aborted')) = (finalized_at IS NOT NULL)),
    CHECK (status <> 'failed' OR error_message IS NOT NULL),
    CHECK (status <> 'completed' OR completed_outputs > 0),
    CHECK (status NOT IN ('completed', 'failed') OR completed_outputs + failed_outputs = total_outputs)
);
CREATE INDEX jobs_account ON jobs (account_id, created_at);
CREATE INDEX jobs_project ON jobs (project_id);

CREATE TABLE outputs (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id             TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    billing_account_id TEXT NOT NULL REFERENCES accounts(id),
    queue              TEXT NOT NULL,
    instruction_index  BIGINT NOT NULL,
    variation_index    BIGINT NOT NULL,
    version            BIGINT NOT NULL DEFAULT 0,
    status             TEXT NOT NULL CHECK (status IN ('pending', 'dispatched', 'running', 'completed', 'failed', 'cancelled')),
    attempt            BIGINT NOT NULL DEFAULT 0,
    max_attempts       BIGINT NOT NULL,
    engine_index       BIGINT NOT NULL DEFAULT 0,
    scheduled_at       BIGINT NOT NULL,
    lease_expires_at   BIGINT,
    lease_owner        TEXT,
    cost               BIGINT NOT NULL CHECK (cost >= 0),
    full_key           TEXT,
    thumb_key          TEXT,
    output_format      TEXT NOT NULL,
    width              BIGINT,
    height             BIGINT,
    model_used         TEXT,
    input_description  TEXT,
    processing_ms      BIGINT,
    last_error         TEXT,
    error_message      TEXT,
    created_at         BIGINT NOT NULL,
    updated_at         BIGINT NOT NULL,
    started_at         BIGINT,
    finalized_at       BIGINT,
    UNIQUE (job_id, instruction_index, variation_index, version),
    CHECK (attempt >= 0 AND attempt <= max_attempts),
    CHECK ((status IN ('completed', 'failed', 'cancelled')) = (finalized_at IS NOT NULL)),
    CHECK ((status IN ('dispatched', 'running')) = (lease_expires_at IS NOT NULL)),
    CHECK (status NOT IN ('dispatched', 'running', 'completed') OR attempt >= 1),
    CHECK (status <> 'completed' OR (full_key IS NOT NULL AND thumb_key IS NOT NULL AND model_used IS NOT NULL)),
    CHECK (status NOT IN ('failed', 'cancelled') OR error_message IS NOT NULL)
);
CREATE INDEX outputs_job ON outputs (job_id);
CREATE INDEX outputs_dispatch ON outputs (status, queue, scheduled_at);
CREATE INDEX outputs_lease ON outputs (status, lease_expires_at);

-- One reservation per job: what it still holds, what it charged and released.
CREATE TABLE reservations (
    job_id       TEXT PRIMARY KEY REFERENCES jobs(id) ON DELETE CASCADE,
    account_id   TEXT NOT NULL REFERENCES accounts(id),
    amount       BIGINT NOT NULL CHECK (amount >= 0),
    held         BIGINT NOT NULL,
    charged      BIGINT NOT NULL DEFAULT 0,
    released     BIGINT NOT NULL DEFAULT 0,
    created_at   BIGINT NOT NULL,
    closed_at    BIGINT,
    CHECK (held >= 0 AND charged >= 0 AND released >= 0),
    CHECK (held + charged + released = amount),
    CHECK (closed_at IS NULL OR held = 0)
);

-- Append-only: every credit movement, never updated or deleted (triggers below).
-- (output_id, kind) is unique, so an output can be charged or released once.
CREATE TABLE credit_ledger (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id  TEXT NOT NULL REFERENCES accounts(id),
    job_id      TEXT,
    output_id   BIGINT,
    kind        TEXT NOT NULL CHECK (kind IN ('grant', 'reserve', 'charge', 'release')),
    amount      BIGINT NOT NULL,
    reason      TEXT,
    created_at  BIGINT NOT NULL,
    CHECK (kind = 'grant' OR amount >= 0)
);
CREATE UNIQUE INDEX credit_ledger_output_once ON credit_ledger (output_id, kind);
CREATE UNIQUE INDEX credit_ledger_job_reserve_once ON credit_ledger (job_id, kind) WHERE kind = 'reserve';
CREATE INDEX credit_ledger_account ON credit_ledger (account_id, created_at);

CREATE TRIGGER credit_ledger_no_update BEFORE UPDATE ON credit_ledger
BEGIN
    SELECT RAISE(ABORT, 'credit_ledger is append-only');
END;
CREATE TRIGGER credit_ledger_no_delete BEFORE DELETE ON credit_ledger
BEGIN
    SELECT RAISE(ABORT, 'credit_ledger is append-only');
END;

-- Transactional outbox: written with the state change, published by the relay.
CREATE TABLE outbox (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    topic         TEXT NOT NULL,
    payload       TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    claimed_until BIGINT,
    attempts      BIGINT NOT NULL DEFAULT 0,
    sent_at       BIGINT,
    last_error    TEXT
);
CREATE INDEX outbox_unsent ON outbox (sent_at, id);

CREATE TABLE notifications (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id  TEXT NOT NULL REFERENCES accounts(id),
    name        TEXT NOT NULL,
    job_id      TEXT,
    data        TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    deleted_at  BIGINT
);
CREATE INDEX notifications_account ON notifications (account_id, id);

CREATE TABLE settings (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);

-- The embedded queue (queue.url = embedded): durable messages with leases.
CREATE TABLE queue_messages (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    queue         TEXT NOT NULL,
    payload       TEXT NOT NULL,
    headers       TEXT NOT NULL DEFAULT '{}',
    available_at  BIGINT NOT NULL,
    deliveries    BIGINT NOT NULL DEFAULT 0,
    locked_until  BIGINT,
    lock_owner    TEXT,
    created_at    BIGINT NOT NULL
);
CREATE INDEX queue_messages_ready ON queue_messages (queue, available_at, id);
