-- A job admitted while the identity it needs is still being preprocessed
-- waits for that preprocessing job (`waits_for`): the scheduler holds its
-- outputs until it ends, then gives them the face it built, or fails them
-- with its reason (nothing charged).
ALTER TABLE jobs ADD COLUMN waits_for TEXT;
