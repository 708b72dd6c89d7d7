-- W3C traceparent of the request that created the job (trace context for
-- the scheduler and workers).
ALTER TABLE jobs ADD COLUMN traceparent TEXT;
