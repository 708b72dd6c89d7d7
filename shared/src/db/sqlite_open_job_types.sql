-- Rebuild of `jobs` without the CHECK that listed the job kinds (run by
-- `Store::migrate` on SQLite with foreign keys off, inside BEGIN IMMEDIATE).
CREATE TABLE jobs_new (
    id                      TEXT PRIMARY KEY,
    account_id              TEXT NOT NULL REFERENCES accounts(id),
    billing_account_id      TEXT NOT NULL REFERENCES accounts(id),
    project_id              TEXT REFERENCES projects(id) ON DELETE CASCADE,
    job_type                TEXT NOT NULL,
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
    traceparent             TEXT,
    identity_code           TEXT,
    identity_face_job       TEXT,
    inputs                  TEXT,
    CHECK (completed_outputs >= 0 AND failed_outputs >= 0 AND completed_outputs + failed_outputs <= total_outputs),
    -- Terminal exactly when finalized.
    CHECK ((status IN ('completed', 'failed', 'aborted')) = (finalized_at IS NOT NULL)),
    CHECK (status <> 'failed' OR error_message IS NOT NULL),
    CHECK (status <> 'completed' OR completed_outputs > 0),
    CHECK (status NOT IN ('completed', 'failed') OR completed_outputs + failed_outputs = total_outputs)
);
INSERT INTO jobs_new (id, account_id, billing_account_id, project_id, job_type, status, spec, total_outputs,
    completed_outputs, failed_outputs, should_post_process, post_processing_status, post_processing_error,
    error_message, counts_against_cap, created_at, updated_at, finalized_at, traceparent, identity_code,
    identity_face_job, inputs)
SELECT id, account_id, billing_account_id, project_id, job_type, status, spec, total_outputs,
    completed_outputs, failed_outputs, should_post_process, post_processing_status, post_processing_error,
    error_message, counts_against_cap, created_at, updated_at, finalized_at, traceparent, identity_code,
    identity_face_job, inputs
FROM jobs;
DROP TABLE jobs;
ALTER TABLE jobs_new RENAME TO jobs;
CREATE INDEX jobs_account ON jobs (account_id, created_at);
CREATE INDEX jobs_project ON jobs (project_id);
CREATE INDEX jobs_identity ON jobs (identity_code);
