-- Training images of Models API models (contract §8): each a frozen copy
-- in the object store (an attached asset may be deleted later; the model
-- keeps what it was given). An asset is attached to a model at most once.
CREATE TABLE api_model_images (
    id            TEXT PRIMARY KEY,
    model_id      TEXT NOT NULL REFERENCES api_models(id),
    asset_id      TEXT,
    name          TEXT NOT NULL,
    object_key    TEXT NOT NULL,
    content_type  TEXT NOT NULL,
    created_at    BIGINT NOT NULL
);
CREATE INDEX api_model_images_model ON api_model_images (model_id, created_at, id);
CREATE UNIQUE INDEX api_model_images_asset ON api_model_images (model_id, asset_id);
