-- The relay deletes an outbox row once its message is confirmed, instead of
-- setting `sent_at` (see the PostgreSQL migration of the same name): the
-- marked rows were never removed. The index of unsent rows keeps only
-- those.
DELETE FROM outbox WHERE sent_at IS NOT NULL;
DROP INDEX IF EXISTS outbox_unsent;
CREATE INDEX outbox_unsent ON outbox (id) WHERE sent_at IS NULL;
