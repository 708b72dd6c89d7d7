-- `outputs_job (job_id)` repeats the leading column of the unique key
-- `(job_id, instruction_index, variation_index, version)`, which serves
-- every lookup by job as well. Each output row is written four times in a
-- job's life (admitted, dispatched, started, finished) and none of those
-- updates can be HOT (its status is indexed), so each wrote an entry into
-- this index too for nothing. SQLite keeps it (one writer, small tables).
DROP INDEX IF EXISTS outputs_job;
