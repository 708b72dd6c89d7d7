-- Models API models (contract §8, Scenario-compatible): the record of a
-- LoRA/fine-tune model of an account. Lists, arrays and objects the API
-- carries as they are (tags, collectionIds, concepts, parameters, class)
-- are JSON text; status and type are the code's enums.
CREATE TABLE api_models (
    id                 TEXT PRIMARY KEY,
    account_id         TEXT NOT NULL REFERENCES accounts(id),
    name               TEXT NOT NULL,
    short_description  TEXT NOT NULL,
    model_type         TEXT NOT NULL,
    status             TEXT NOT NULL,
    privacy            TEXT NOT NULL,
    base_model_id      TEXT,
    epoch              TEXT,
    tags               TEXT NOT NULL DEFAULT '[]',
    extra              TEXT NOT NULL DEFAULT '{}',
    description        TEXT,
    created_at         BIGINT NOT NULL,
    updated_at         BIGINT NOT NULL,
    deleted_at         BIGINT
);
CREATE INDEX api_models_account ON api_models (account_id, created_at, id);
