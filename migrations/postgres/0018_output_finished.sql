-- The operator view's rate per work queue: outputs that ended in the last
-- minutes, found without reading every output that ever ended.
CREATE INDEX outputs_finalized ON outputs (queue, finalized_at) WHERE finalized_at IS NOT NULL;
