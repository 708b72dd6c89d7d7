-- Idempotency-Key (contract: every creating POST): the first successful
-- answer to a request carrying a key, replayed to its retries. A row with
-- no status is a request still running; `owner` names that request so that
-- only it completes or releases the row.
CREATE TABLE idempotency_keys (
    account_id TEXT NOT NULL,
    idem_key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    owner TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    status INTEGER,
    content_type TEXT,
    body TEXT,
    PRIMARY KEY (account_id, idem_key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
