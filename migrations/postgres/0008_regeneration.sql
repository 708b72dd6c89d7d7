-- Regenerating an output (contract §3.11) reserves its cost again, as a
-- ledger row of that new output: a job has one reservation row without an
-- output (its admission) and one per regenerated output (each unique by
-- credit_ledger_output_once).
DROP INDEX credit_ledger_job_reserve_once;
CREATE UNIQUE INDEX credit_ledger_job_reserve_once ON credit_ledger (job_id, kind)
    WHERE kind = 'reserve' AND output_id IS NULL;
