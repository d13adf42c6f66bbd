-- Pets are looked up by owner. DSQL builds indexes asynchronously: the statement answers a
-- job id, and the runner waits for the job (sys.wait_for_job) before going on.
CREATE INDEX ASYNC pet_owner_id ON pet (owner_id);
