-- Notes are listed by user. DSQL builds indexes asynchronously; the runner waits for the job.
CREATE INDEX ASYNC notes_user_id ON notes (user_id);
