-- The draft (an output of an identity_creation job) an identity was
-- promoted from (contract §5.7): one identity per draft, so promoting the
-- same draft twice answers with the identity made the first time.
ALTER TABLE identities ADD COLUMN promoted_from BIGINT;
CREATE UNIQUE INDEX identities_promoted_from ON identities (promoted_from);
