-- Custom models and their training images (contract §7, seed 001). A model
-- is soft-deleted (`deleted_at`): it disappears from reads but its history
-- stays. Training images live in the object store; a row names the object.
CREATE TABLE custom_models (
    id                 TEXT PRIMARY KEY,
    account_id         TEXT NOT NULL REFERENCES accounts(id),
    display_name       TEXT NOT NULL,
    custom_model_type  TEXT,
    created_at         BIGINT NOT NULL,
    updated_at         BIGINT NOT NULL,
    deleted_at         BIGINT
);
CREATE INDEX custom_models_account ON custom_models (account_id, created_at);

CREATE TABLE training_data (
    id            TEXT PRIMARY KEY,
    model_id      TEXT NOT NULL REFERENCES custom_models(id),
    object_key    TEXT NOT NULL,
    content_type  TEXT NOT NULL,
    size          BIGINT NOT NULL CHECK (size >= 0),
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL
);
CREATE INDEX training_data_model ON training_data (model_id, created_at);
