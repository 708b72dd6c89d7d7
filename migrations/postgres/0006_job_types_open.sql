-- The set of job kinds is the code's (`domain::kinds`): a row decodes into
-- the kind enum, and an unknown name is a read error. A CHECK listing the
-- kinds would make every new kind a schema change, so this drops it.
ALTER TABLE jobs DROP CONSTRAINT IF EXISTS jobs_job_type_check;
