-- The rows written for every job (the job, its outputs, reservation, ledger
-- entries, notifications and webhook deliveries) no longer reference the
-- account row through a foreign key. PostgreSQL checks such a key by taking
-- a KEY SHARE lock on the referenced row: about fourteen per job, all on
-- the one row of the paying account, which every admission and settlement
-- also updates. Concurrent share locks on a row that is being updated are
-- kept as multixacts, and reading their members took 16 % of the
-- database's CPU in `cargo bench --bench distributed`, most of it while
-- that row was locked. Accounts are never deleted and every id written
-- here is the authenticated account's or its billing owner's, so the keys
-- guarded against nothing that can happen. Keys to jobs and projects stay;
-- SQLite keeps its keys (one writer at a time: no share locks to pile up).
ALTER TABLE jobs DROP CONSTRAINT IF EXISTS jobs_account_id_fkey;
ALTER TABLE jobs DROP CONSTRAINT IF EXISTS jobs_billing_account_id_fkey;
ALTER TABLE outputs DROP CONSTRAINT IF EXISTS outputs_billing_account_id_fkey;
ALTER TABLE reservations DROP CONSTRAINT IF EXISTS reservations_account_id_fkey;
ALTER TABLE credit_ledger DROP CONSTRAINT IF EXISTS credit_ledger_account_id_fkey;
ALTER TABLE notifications DROP CONSTRAINT IF EXISTS notifications_account_id_fkey;
ALTER TABLE webhook_deliveries DROP CONSTRAINT IF EXISTS webhook_deliveries_account_id_fkey;
