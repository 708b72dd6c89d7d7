-- The quiet `asset_tagging` job that looked at an upload (contract §2.6):
-- its completed output's description holds the asset's tags.
ALTER TABLE files ADD COLUMN tagging_job_id TEXT;
