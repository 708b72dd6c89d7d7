-- Notification relay and webhooks (contract §4).

-- Set when the relay has pushed the notification to live listeners and
-- queued its webhook delivery; NULL rows are the relay's backlog.
ALTER TABLE notifications ADD COLUMN relayed_at BIGINT;
UPDATE notifications SET relayed_at = created_at;
CREATE INDEX notifications_unrelayed ON notifications (id) WHERE relayed_at IS NULL;
CREATE INDEX notifications_created ON notifications (created_at);

-- One webhook per account. The secret is kept because every delivery is
-- signed with it; it is shown to the account once, when set.
CREATE TABLE webhooks (
    id                    INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id            TEXT NOT NULL UNIQUE REFERENCES accounts(id),
    url                   TEXT NOT NULL,
    secret                TEXT NOT NULL,
    is_active             INTEGER NOT NULL DEFAULT 1,
    consecutive_failures  BIGINT NOT NULL DEFAULT 0,
    last_response_status  INTEGER,
    last_response_at      BIGINT,
    created_at            BIGINT NOT NULL,
    updated_at            BIGINT NOT NULL
);

-- Each notification (or ping) owed to a webhook. `body` is the exact JSON
-- sent and signed on every attempt.
CREATE TABLE webhook_deliveries (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id        TEXT NOT NULL REFERENCES accounts(id),
    notification_id   BIGINT NOT NULL,
    job_id            TEXT,
    event             TEXT NOT NULL,
    delivery_uuid     TEXT NOT NULL,
    body              TEXT NOT NULL,
    traceparent       TEXT,
    status            TEXT NOT NULL DEFAULT 'pending',
    attempts          BIGINT NOT NULL DEFAULT 0,
    next_attempt_at   BIGINT NOT NULL,
    claimed_until     BIGINT,
    last_status       INTEGER,
    last_error        TEXT,
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL,
    finished_at       BIGINT
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_account ON webhook_deliveries (account_id, id);
CREATE INDEX webhook_deliveries_job ON webhook_deliveries (account_id, job_id, id) WHERE status = 'pending';

-- Named leases for loops that must run on one replica at a time (the
-- notification relay keeps per-job order by relaying from one place).
CREATE TABLE leases (
    name    TEXT PRIMARY KEY,
    holder  TEXT NOT NULL,
    until   BIGINT NOT NULL
);
