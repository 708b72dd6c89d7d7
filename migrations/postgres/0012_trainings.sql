-- Trainings of custom models (contract §7) and Models API models (§8). A
-- training is a job of kind `training` (one output: the trained weights,
-- charged when it completes, released when it fails or is cancelled); this
-- row adds what the training APIs show: the model it trains, its trigger
-- word and parameters, its frozen dataset and the progress the trainer
-- reports. Its status is the job's. Weights live in the object store; the
-- output names them.
CREATE TABLE trainings (
    id             TEXT PRIMARY KEY,
    account_id     TEXT NOT NULL REFERENCES accounts(id),
    api            TEXT NOT NULL,
    model_id       TEXT NOT NULL,
    job_id         TEXT NOT NULL REFERENCES jobs(id),
    trigger_word   TEXT NOT NULL,
    model_type     TEXT NOT NULL,
    parameters     TEXT NOT NULL DEFAULT '{}',
    image_count    BIGINT NOT NULL,
    dataset_key    TEXT NOT NULL,
    progress       TEXT,
    created_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL,
    deleted_at     BIGINT
);
CREATE INDEX trainings_model ON trainings (model_id, created_at);
CREATE UNIQUE INDEX trainings_job ON trainings (job_id);
CREATE INDEX trainings_account ON trainings (account_id, created_at);

-- Predictions (contract §7): a job of kind `prediction`; this row keeps
-- the warnings its creation answered and its soft delete.
CREATE TABLE predictions (
    id          TEXT PRIMARY KEY REFERENCES jobs(id),
    account_id  TEXT NOT NULL REFERENCES accounts(id),
    warnings    TEXT NOT NULL DEFAULT '[]',
    created_at  BIGINT NOT NULL,
    deleted_at  BIGINT
);
