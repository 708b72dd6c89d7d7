-- Identities beyond their owner (contract §5.1, §5.3): shared with the
-- members of a group, or offered by the platform to every account whose
-- plan reaches `default_tier` (`standard`: all; `enterprise`: enterprise
-- accounts), with the operator's description of the person (`gender`,
-- `age`) for the list filters. Nothing here is guessed from the photo.
CREATE TABLE identity_shares (
    identity_code TEXT NOT NULL REFERENCES identities(code) ON DELETE CASCADE,
    group_id      TEXT NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
    created_at    BIGINT NOT NULL,
    PRIMARY KEY (identity_code, group_id)
);
CREATE INDEX identity_shares_group ON identity_shares (group_id);
ALTER TABLE identities ADD COLUMN default_tier TEXT;
ALTER TABLE identities ADD COLUMN gender TEXT;
ALTER TABLE identities ADD COLUMN age BIGINT;
