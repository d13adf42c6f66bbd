-- The notes service's tables (examples/diesel.rs): UUID keys made by the client, no foreign
-- keys, defaults the server fills. One statement per transaction, DSQL's rule for DDL.
CREATE TABLE users (
    id uuid PRIMARY KEY,
    name varchar(80) NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE notes (
    id uuid PRIMARY KEY,
    user_id uuid NOT NULL,
    body text NOT NULL,
    likes bigint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now()
);
