-- Work that one scheduler replica does for all (dispatch rounds, the
-- credit audit): the replica holding a duty's unexpired lease does it, the
-- others stand by and take it over once the lease runs out.
CREATE TABLE scheduler_duties (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);
