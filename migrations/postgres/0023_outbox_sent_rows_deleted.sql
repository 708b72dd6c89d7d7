-- The relay deletes an outbox row once its message is confirmed, instead of
-- setting `sent_at`: nothing reads a sent row again, and marked rows were
-- never removed (the table grew by a row per job for ever).
--
-- `outbox_unsent (sent_at, id)` becomes `(id) WHERE sent_at IS NULL`.
-- Every mark wrote a new entry into the old index, and the claim found its
-- rows with a bitmap scan for `sent_at IS NULL`, which walked the entries
-- of every row marked since the last vacuum: about 2 ms per claim after
-- 8,000 jobs in `cargo bench --bench distributed`, 15 % of the database
-- time of an admission. The claim now walks the partial index in id order
-- (no sort), and a plain index scan marks the entries of deleted rows dead
-- as it passes them. `sent_at` stays for a relay of the previous version
-- during a rolling upgrade; the relay deletes the rows such a relay marked
-- (`Store::delete_marked_outbox`).
DELETE FROM outbox WHERE sent_at IS NOT NULL;
DROP INDEX IF EXISTS outbox_unsent;
CREATE INDEX outbox_unsent ON outbox (id) WHERE sent_at IS NULL;
