-- What admission resolved about a job's inputs, as JSON: the object keys of
-- its input files and the identity face it uses. Every task of the job
-- carries it, so workers never read the database. NULL for jobs admitted
-- before this column existed: the scheduler resolves those at dispatch.
ALTER TABLE jobs ADD COLUMN inputs TEXT;
