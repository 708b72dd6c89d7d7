-- Presets and categories (contract §6, seed 000). A preset is a reusable
-- instruction of one job kind; a category groups presets. `owner_id` NULL
-- marks a system item (operator-seeded, read by all, written by none
-- through the API). Visibility is derived: system, shared (with at least
-- one group) or private. Deleted items keep their rows (`deleted_at`).
CREATE TABLE presets (
    code              TEXT PRIMARY KEY,
    owner_id          TEXT REFERENCES accounts(id),
    name              TEXT NOT NULL,
    description       TEXT,
    preset_type       TEXT NOT NULL,
    instruction_data  TEXT NOT NULL,
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL,
    deleted_at        BIGINT
);
CREATE UNIQUE INDEX presets_owner_name ON presets (owner_id, name) WHERE deleted_at IS NULL;
CREATE UNIQUE INDEX presets_system_name ON presets (name) WHERE owner_id IS NULL AND deleted_at IS NULL;

CREATE TABLE preset_categories (
    id             TEXT PRIMARY KEY,
    owner_id       TEXT REFERENCES accounts(id),
    name           TEXT NOT NULL,
    description    TEXT,
    thumbnail_url  TEXT,
    created_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL,
    deleted_at     BIGINT
);
CREATE UNIQUE INDEX preset_categories_owner_name ON preset_categories (owner_id, name) WHERE deleted_at IS NULL;
CREATE UNIQUE INDEX preset_categories_system_name ON preset_categories (name) WHERE owner_id IS NULL AND deleted_at IS NULL;

CREATE TABLE preset_category_members (
    category_id  TEXT NOT NULL REFERENCES preset_categories(id),
    preset_code  TEXT NOT NULL REFERENCES presets(code),
    added_at     BIGINT NOT NULL,
    PRIMARY KEY (category_id, preset_code)
);
CREATE INDEX preset_category_members_preset ON preset_category_members (preset_code);

CREATE TABLE preset_shares (
    preset_code  TEXT NOT NULL REFERENCES presets(code),
    group_id     TEXT NOT NULL REFERENCES groups(id),
    PRIMARY KEY (preset_code, group_id)
);
CREATE INDEX preset_shares_group ON preset_shares (group_id);

CREATE TABLE preset_category_shares (
    category_id  TEXT NOT NULL REFERENCES preset_categories(id),
    group_id     TEXT NOT NULL REFERENCES groups(id),
    PRIMARY KEY (category_id, group_id)
);
CREATE INDEX preset_category_shares_group ON preset_category_shares (group_id);
