-- Identities (contract §5) and profiles (§9): a person built from one photo
-- (identity) or several (profile). Their preprocessing state, crops and
-- embedding are those of the preprocessing job in `job_id`, so an identity's
-- status can never disagree with the job that built it.
CREATE TABLE identities (
    code               TEXT PRIMARY KEY,
    account_id         TEXT NOT NULL REFERENCES accounts(id),
    kind               TEXT NOT NULL CHECK (kind IN ('identity', 'profile')),
    -- Unique per account and kind; a profile's name is its code.
    name               TEXT NOT NULL,
    tag                TEXT,
    original_filename  TEXT,
    -- The canonical photo (identities) or the first photo (profiles).
    photo_key          TEXT,
    -- Where the photos came from, as JSON (object keys and source URLs).
    sources            TEXT NOT NULL DEFAULT '[]',
    training_tier      TEXT,
    job_id             TEXT REFERENCES jobs(id),
    -- A replacement face being preprocessed (POST /identity/{code}/pov):
    -- it takes over from job_id once its job completes; until then, and if
    -- it fails, the identity keeps the face it had.
    pending_job_id     TEXT REFERENCES jobs(id),
    created_at         BIGINT NOT NULL,
    updated_at         BIGINT NOT NULL
);
CREATE UNIQUE INDEX identities_name ON identities (account_id, kind, name);
CREATE INDEX identities_account ON identities (account_id, kind, created_at);

-- The identity a job works with (model swap) or builds (preprocessing):
-- deleting an identity checks it against unfinished jobs.
ALTER TABLE jobs ADD COLUMN identity_code TEXT;
-- The preprocessing job whose face a model swap uses, fixed at admission:
-- every output of the job (and every retry) uses the same face even if
-- the identity's face is replaced meanwhile.
ALTER TABLE jobs ADD COLUMN identity_face_job TEXT;
CREATE INDEX jobs_identity ON jobs (identity_code);
