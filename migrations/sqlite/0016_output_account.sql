-- The account an output's job belongs to (its lane in the scheduler's fair
-- pick), kept on the output so that the scheduler finds each account's next
-- outputs through an index instead of reading the queue's whole backlog.
-- Only open outputs are filled in: terminal ones never return to the queue
-- (a regeneration inserts a new output, with its account).
ALTER TABLE outputs ADD COLUMN account_id TEXT;
UPDATE outputs SET account_id = (SELECT j.account_id FROM jobs j WHERE j.id = outputs.job_id)
  WHERE status IN ('pending', 'dispatched', 'running');
CREATE INDEX outputs_lanes ON outputs (queue, status, account_id, scheduled_at, id);
