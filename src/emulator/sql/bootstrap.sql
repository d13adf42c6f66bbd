-- What the emulator's PostgreSQL needs for DSQL's SQL rules: DSQL's `sys.jobs` and
-- `sys.wait_for_job`, and the rules that depend on the catalog (indexes per table, schemas,
-- primary-key columns), checked by event triggers so that they hold whatever protocol a
-- statement comes by. The emulator runs this as `admin` (a superuser) when it starts with the
-- rules on; it may run again, and from two emulators at once. The triggers act only in
-- sessions the emulator opened with the rules on (`dsql_emulator.sql_rules`).
BEGIN ISOLATION LEVEL READ COMMITTED;
SELECT pg_advisory_xact_lock(7306516);

CREATE SCHEMA IF NOT EXISTS sys;
GRANT USAGE ON SCHEMA sys TO PUBLIC;

-- The jobs, with when each is done (`due`: its build takes until then, the endpoint's
-- `index_build_delay`); `sys.jobs` shows them as DSQL does, `submitted` until then. (A database
-- bootstrapped before kept its jobs in a table `sys.jobs`: it becomes the base table.)
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE n.nspname = 'sys' AND c.relname = 'jobs' AND c.relkind = 'r') THEN
        ALTER TABLE sys.jobs RENAME TO dsql_emulator_jobs;
        REVOKE ALL ON sys.dsql_emulator_jobs FROM PUBLIC;
    END IF;
END $$;
CREATE TABLE IF NOT EXISTS sys.dsql_emulator_jobs (
    job_id text PRIMARY KEY,
    status text NOT NULL,
    details text,
    job_type text NOT NULL,
    class_id oid,
    object_id oid,
    object_name text,
    start_time timestamptz NOT NULL,
    update_time timestamptz NOT NULL
);
-- (Only when missing: each takes a lock that a reader of the jobs would make it wait for.)
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                    WHERE attrelid = 'sys.dsql_emulator_jobs'::regclass AND attname = 'due') THEN
        ALTER TABLE sys.dsql_emulator_jobs ADD COLUMN due timestamptz;
    END IF;
    IF to_regclass('sys.jobs') IS NULL THEN
        CREATE VIEW sys.jobs AS
            SELECT job_id,
                   CASE WHEN due > clock_timestamp() THEN 'submitted' ELSE status END AS status,
                   CASE WHEN due > clock_timestamp() THEN NULL ELSE details END AS details,
                   job_type, class_id, object_id, object_name, start_time,
                   CASE WHEN due > clock_timestamp() THEN start_time
                        ELSE greatest(update_time, coalesce(due, update_time)) END AS update_time
              FROM sys.dsql_emulator_jobs;
        GRANT SELECT ON sys.jobs TO PUBLIC;
    END IF;
END $$;

-- When a job just started is done: now, plus the session's build delay
-- (`dsql_emulator.index_build_delay_ms`, set by the emulator at connect).
CREATE OR REPLACE FUNCTION sys.dsql_emulator_job_due() RETURNS timestamptz LANGUAGE sql VOLATILE AS $$
    SELECT clock_timestamp() + make_interval(secs =>
        coalesce(nullif(current_setting('dsql_emulator.index_build_delay_ms', true), ''), '0')
            ::numeric / 1000)
$$;

-- A new job id as DSQL writes them: a random UUID in lower-case base32 (26 characters).
CREATE OR REPLACE FUNCTION sys.dsql_emulator_job_id() RETURNS text LANGUAGE sql VOLATILE AS $$
    SELECT string_agg(substr('abcdefghijklmnopqrstuvwxyz234567',
                             substring(bits FROM i * 5 + 1 FOR 5)::int + 1, 1), '' ORDER BY i)
      FROM (SELECT ('x' || encode(uuid_send(gen_random_uuid()), 'hex'))::bit(128) || B'00'
                   AS bits) AS id,
           generate_series(0, 25) AS i
$$;

-- Records the job `id` of asynchronous DDL just run (synchronously: the job is complete; done
-- after the build delay when it `built` something) and returns the id.
CREATE OR REPLACE FUNCTION sys.dsql_emulator_job(id text, kind text, relation regclass, name text,
                                                 built boolean)
RETURNS text LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    object oid := relation;
    object_name text := name;
BEGIN
    -- (Callable by any role: only for a table its own role owns.)
    IF NOT coalesce(pg_has_role(session_user,
                                (SELECT relowner FROM pg_class WHERE oid = relation), 'USAGE'),
                    false) THEN
        RAISE EXCEPTION USING ERRCODE = '42501',
            MESSAGE = format('must be owner of table %s', relation);
    END IF;
    IF kind = 'INDEX_BUILD' THEN
        -- The index the statement made: the one it named, or the table's newest.
        -- (Named as DSQL names it: with its schema.)
        SELECT c.oid, n.nspname || '.' || c.relname INTO object, object_name
          FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE i.indrelid = relation
         ORDER BY c.relname = name DESC, c.oid DESC
         LIMIT 1;
    END IF;
    -- (`IF NOT EXISTS` of an index that exists builds nothing: that job is done at once.)
    INSERT INTO sys.dsql_emulator_jobs
    VALUES (id, 'completed', NULL, kind, 'pg_class'::regclass, object, object_name, now(),
            clock_timestamp(),
            CASE WHEN built THEN sys.dsql_emulator_job_due() ELSE clock_timestamp() END);
    RETURN id;
END $$;

-- Runs DSQL's asynchronous DDL (`CREATE INDEX ASYNC`, `ALTER TABLE ASYNC … VALIDATE`, without
-- `ASYNC`) as the caller, and returns the id of its job: the relay sends it as
-- `SELECT sys.dsql_emulator_ddl_job(…) AS job_id`, one statement for either protocol. DSQL
-- answers first and builds later: what the build meets fails the job, not the statement
-- (duplicate keys; for a validation, rows that break the constraint). A unique index whose
-- build failed stays, as on DSQL: not valid, checking later writes against the rows written
-- since (built as `placeholder`, the same index over no rows, whose predicate is then taken
-- away).
CREATE OR REPLACE FUNCTION sys.dsql_emulator_ddl_job(ddl text, kind text, relation text, name text,
                                                     placeholder text)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    id text := sys.dsql_emulator_job_id();
    detail text;
    failed text;
    object oid;
    before oid[];
BEGIN
    SELECT coalesce(array_agg(indexrelid), '{}') INTO before
      FROM pg_catalog.pg_index WHERE indrelid = relation::regclass;
    BEGIN
        EXECUTE ddl;
    EXCEPTION
        WHEN unique_violation THEN
            GET STACKED DIAGNOSTICS detail = PG_EXCEPTION_DETAIL;
            failed := SQLERRM || ': ' || coalesce(detail, '');
        WHEN check_violation OR foreign_key_violation OR not_null_violation THEN
            IF kind <> 'VALIDATE_CONSTRAINT' THEN
                RAISE;
            END IF;
            failed := SQLERRM;
    END;
    IF failed IS NULL THEN
        RETURN sys.dsql_emulator_job(id, kind, relation::regclass, name,
            kind <> 'INDEX_BUILD' OR EXISTS (SELECT FROM pg_catalog.pg_index
                                              WHERE indrelid = relation::regclass
                                                AND indexrelid <> ALL (before)));
    END IF;
    IF kind = 'INDEX_BUILD' AND placeholder IS NOT NULL THEN
        EXECUTE placeholder;
        SELECT indexrelid INTO object FROM pg_catalog.pg_index
         WHERE indrelid = relation::regclass AND indexrelid <> ALL (before)
           AND pg_catalog.pg_get_expr(indpred, indrelid) = 'false';
        PERFORM sys.dsql_emulator_keep_failed_index(object);
    END IF;
    PERFORM sys.dsql_emulator_failed_job(id, kind, coalesce(object, relation::regclass), name,
                                         failed);
    RETURN id;
END $$;

-- The index just built as a failed build's placeholder (`WHERE false`, in this transaction):
-- its predicate taken away and marked not valid, so that no query reads it and every later
-- write is checked against the rows written since. Only such an index (over no rows) of a
-- table the session's role owns.
CREATE OR REPLACE FUNCTION sys.dsql_emulator_keep_failed_index(object oid)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE pg_catalog.pg_index i SET indpred = NULL, indisvalid = false
      FROM pg_catalog.pg_class c, pg_catalog.pg_class t
     WHERE i.indexrelid = object AND c.oid = i.indexrelid AND t.oid = i.indrelid
       AND pg_catalog.pg_has_role(session_user, t.relowner, 'USAGE')
       AND pg_catalog.pg_get_expr(i.indpred, i.indrelid) = 'false';
END $$;

-- Records job `id` as failed with `details` (`relation`: the index a failed build left, or the
-- table).
CREATE OR REPLACE FUNCTION sys.dsql_emulator_failed_job(id text, kind text, relation regclass,
                                                        name text, details text)
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    -- (Callable by any role: only for a relation its own role owns.)
    -- (An index the failed build left is named as DSQL names indexes: with its schema.)
    INSERT INTO sys.dsql_emulator_jobs
    SELECT id, 'failed', details, kind, 'pg_class'::regclass, relation,
           CASE WHEN c.relkind = 'i' THEN n.nspname || '.' || c.relname ELSE name END, now(),
           clock_timestamp(), sys.dsql_emulator_job_due()
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = relation AND pg_has_role(session_user, c.relowner, 'USAGE')
$$;

-- Validates a `SELECT … FOR UPDATE` at COMMIT as DSQL does, as if its rows had been written:
-- the relay runs `SELECT sys.dsql_emulator_touch('<table>', ARRAY(SELECT t.ctid … FOR UPDATE))`,
-- which locks the rows again and writes each unchanged, so that another transaction that read
-- them `FOR UPDATE` on an older snapshot fails in turn (PostgreSQL's serialization failure).
CREATE OR REPLACE FUNCTION sys.dsql_emulator_touch(relation text, rows tid[])
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    target regclass := relation::regclass;
    col name;
BEGIN
    IF rows IS NULL OR cardinality(rows) = 0 THEN
        RETURN;
    END IF;
    SELECT attname INTO col FROM pg_attribute
     WHERE attrelid = target AND attnum > 0 AND NOT attisdropped
       AND attgenerated = '' AND attidentity <> 'a'
     ORDER BY attnum LIMIT 1;
    IF col IS NOT NULL THEN
        EXECUTE format('UPDATE %s SET %I = %I WHERE ctid = ANY($1)', target, col, col) USING rows;
    END IF;
END $$;

-- DSQL's job ids are UUIDs in lower-case base32; a build here is over when its statement
-- answers, and reported so once its build delay has passed: that is what is waited for. It
-- answers whether the job succeeded, as DSQL's does (a row, `t` or `f`). (A database
-- bootstrapped before had it without that answer.)
DO $$
BEGIN
    IF to_regprocedure('sys.wait_for_job(text)') IS NOT NULL THEN
        DROP PROCEDURE sys.wait_for_job(text);
    END IF;
END $$;
-- (Helpers of earlier versions that nothing calls any more.)
DROP FUNCTION IF EXISTS sys.dsql_emulator_ddl_job(text, text, text, text);
DROP FUNCTION IF EXISTS sys.dsql_emulator_job(text, text, regclass, text);
DROP FUNCTION IF EXISTS sys.dsql_emulator_keep_failed_index(regclass, text);
DROP FUNCTION IF EXISTS sys.dsql_emulator_settle_builds();
CREATE OR REPLACE PROCEDURE sys.wait_for_job(job_id text, INOUT wait_for_job boolean DEFAULT NULL)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    done timestamptz;
    outcome text;
BEGIN
    IF job_id IS NULL OR job_id !~ '^[a-z2-7]{26}$' THEN
        RAISE EXCEPTION USING ERRCODE = '22P02', MESSAGE = 'Unable to convert text to UUID';
    END IF;
    SELECT j.due, j.status INTO done, outcome FROM sys.dsql_emulator_jobs j WHERE j.job_id = $1;
    WHILE done IS NOT NULL AND done > clock_timestamp() LOOP
        PERFORM pg_sleep(0.05);
    END LOOP;
    wait_for_job := outcome IS NOT DISTINCT FROM 'completed';
END $$;

-- DSQL's IAM role mappings: `AWS IAM GRANT <role> TO '<arn>'` and `AWS IAM REVOKE <role> FROM
-- '<arn>'`, which the relay runs as `CALL sys.dsql_emulator_iam(…)`, as admin only; the view
-- lists them with DSQL's columns.
CREATE SEQUENCE IF NOT EXISTS sys.dsql_emulator_iam_oid START 26000;
CREATE TABLE IF NOT EXISTS sys.dsql_emulator_iam (
    iam_oid oid NOT NULL DEFAULT nextval('sys.dsql_emulator_iam_oid')::oid,
    arn text NOT NULL,
    pg_role_oid oid NOT NULL,
    grantor_pg_role_oid oid NOT NULL,
    PRIMARY KEY (pg_role_oid, arn)
);
CREATE OR REPLACE VIEW sys.iam_pg_role_mappings AS
    SELECT m.iam_oid, m.arn, m.pg_role_oid, r.rolname AS pg_role_name,
           m.grantor_pg_role_oid, g.rolname AS grantor_pg_role_name
      FROM sys.dsql_emulator_iam m
      JOIN pg_roles r ON r.oid = m.pg_role_oid
      LEFT JOIN pg_roles g ON g.oid = m.grantor_pg_role_oid;
GRANT SELECT ON sys.iam_pg_role_mappings TO PUBLIC;

CREATE OR REPLACE PROCEDURE sys.dsql_emulator_iam(is_grant boolean, role text, arn text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    target oid;
BEGIN
    IF session_user <> 'admin' THEN
        RAISE EXCEPTION USING ERRCODE = '42501',
            MESSAGE = format('permission denied to %s IAM role mappings',
                             CASE WHEN is_grant THEN 'grant' ELSE 'revoke' END);
    END IF;
    SELECT oid INTO target FROM pg_roles WHERE rolname = role;
    IF target IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '42704', MESSAGE = format('role "%s" does not exist', role);
    END IF;
    IF arn !~ '^arn:aws[a-z-]*:(iam|sts)::[0-9]{12}:[a-z-]+/.+$' THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = format('invalid IAM ARN: %s', arn);
    END IF;
    IF is_grant THEN
        INSERT INTO sys.dsql_emulator_iam (arn, pg_role_oid, grantor_pg_role_oid)
        VALUES (arn, target, (SELECT oid FROM pg_roles WHERE rolname = session_user))
        ON CONFLICT DO NOTHING;
    ELSE
        DELETE FROM sys.dsql_emulator_iam m WHERE m.pg_role_oid = target AND m.arn = $3;
    END IF;
END $$;

CREATE OR REPLACE FUNCTION sys.dsql_emulator_ddl_end() RETURNS event_trigger
LANGUAGE plpgsql AS $$
DECLARE
    command record;
    relation oid;
BEGIN
    IF current_setting('dsql_emulator.sql_rules', true) IS DISTINCT FROM 'on' THEN
        RETURN;
    END IF;
    FOR command IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
        IF command.command_tag = 'CREATE SCHEMA' THEN
            IF (SELECT count(*) FROM pg_namespace
                 WHERE nspname NOT IN ('public', 'sys', 'information_schema')
                   AND nspname !~ '^pg_') > 10 THEN
                RAISE EXCEPTION USING ERRCODE = '54000',
                    MESSAGE = 'more than 10 schemas not allowed';
            END IF;
        ELSIF command.command_tag = 'CREATE STATISTICS' THEN
            -- DSQL_SQL_RULES §10 (B): 5 extended statistics a table (the message is inferred).
            IF (SELECT count(*) FROM pg_statistic_ext
                 WHERE stxrelid = (SELECT stxrelid FROM pg_statistic_ext
                                    WHERE oid = command.objid)) > 5 THEN
                RAISE EXCEPTION USING ERRCODE = '54000',
                    MESSAGE = 'more than 5 extended statistics per table are not allowed';
            END IF;
        ELSIF command.object_type IN ('view', 'sequence') THEN
            -- §10 (B): 5 000 views, 5 000 sequences (an identity column's own not counted;
            -- the messages are inferred).
            IF (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE c.relkind = CASE command.object_type WHEN 'view' THEN 'v' ELSE 'S' END
                   AND n.nspname NOT IN ('sys', 'information_schema') AND n.nspname !~ '^pg_'
                   AND NOT EXISTS (SELECT FROM pg_depend d
                                    WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                                      AND d.deptype = 'i')) > 5000 THEN
                RAISE EXCEPTION USING ERRCODE = '54000',
                    MESSAGE = format('more than 5000 %ss not allowed', command.object_type);
            END IF;
        ELSIF command.object_type IN ('table', 'index') THEN
            relation := CASE command.object_type
                WHEN 'index' THEN (SELECT indrelid FROM pg_index WHERE indexrelid = command.objid)
                ELSE command.objid END;
            IF (SELECT count(*) FROM pg_index WHERE indrelid = relation) > 24 THEN
                RAISE EXCEPTION USING ERRCODE = '54000',
                    MESSAGE = 'more than 24 indexes per table are not allowed';
            END IF;
            -- §10 (B): 1 000 tables (the message is inferred).
            IF command.command_tag = 'CREATE TABLE'
               AND (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE c.relkind IN ('r', 'p')
                       AND n.nspname NOT IN ('sys', 'information_schema')
                       AND n.nspname !~ '^pg_') > 1000 THEN
                RAISE EXCEPTION USING ERRCODE = '54000',
                    MESSAGE = 'more than 1000 tables not allowed';
            END IF;
        END IF;
    END LOOP;
END $$;

-- The primary-key columns before an ALTER TABLE, for `sys.dsql_emulator_sql_drop`.
CREATE OR REPLACE FUNCTION sys.dsql_emulator_ddl_start() RETURNS event_trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('dsql_emulator.sql_rules', true) IS DISTINCT FROM 'on' THEN
        RETURN;
    END IF;
    PERFORM set_config('dsql_emulator.primary_keys',
        coalesce((SELECT string_agg(i.indrelid || ':' || k.attnum, ' ')
                    FROM pg_index i, unnest(i.indkey) AS k(attnum)
                   WHERE i.indisprimary), ''),
        true);
    PERFORM set_config('dsql_emulator.primary_key_constraints',
        coalesce((SELECT string_agg(oid::text, ' ') FROM pg_constraint WHERE contype = 'p'), ''),
        true);
END $$;

-- The index of a constraint `ALTER TABLE` just added (`UNIQUE USING INDEX`), if its build is
-- not done yet (its job's delay has not passed).
CREATE OR REPLACE FUNCTION sys.dsql_emulator_unbuilt_index(relation oid) RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    -- (Named as when it was built, without its schema: adding the constraint may have renamed
    -- it.)
    SELECT substring(j.object_name FROM '[^.]*$')
      FROM pg_constraint k
      JOIN pg_index i ON i.indexrelid = k.conindid AND i.indrelid = k.conrelid
      JOIN sys.dsql_emulator_jobs j ON j.object_id = k.conindid AND j.job_type = 'INDEX_BUILD'
     WHERE k.conrelid = relation AND k.contype IN ('u', 'p') AND j.status = 'completed'
       AND j.due > clock_timestamp()
     LIMIT 1
$$;

-- After an `ALTER TABLE`: a constraint may not use an index whose build is not done, as on
-- DSQL (`ADD CONSTRAINT … UNIQUE USING INDEX` right after `CREATE UNIQUE INDEX ASYNC`
-- answers 55000 `index "…" is not valid`).
CREATE OR REPLACE FUNCTION sys.dsql_emulator_alter_end() RETURNS event_trigger
LANGUAGE plpgsql AS $$
DECLARE
    command record;
    unbuilt text;
BEGIN
    IF current_setting('dsql_emulator.sql_rules', true) IS DISTINCT FROM 'on' THEN
        RETURN;
    END IF;
    FOR command IN SELECT * FROM pg_event_trigger_ddl_commands() WHERE object_type = 'table' LOOP
        unbuilt := sys.dsql_emulator_unbuilt_index(command.objid);
        IF unbuilt IS NOT NULL THEN
            RAISE EXCEPTION USING ERRCODE = '55000',
                MESSAGE = format('index "%s" is not valid', unbuilt);
        END IF;
    END LOOP;
END $$;

CREATE OR REPLACE FUNCTION sys.dsql_emulator_sql_drop() RETURNS event_trigger
LANGUAGE plpgsql AS $$
DECLARE
    dropped record;
BEGIN
    IF current_setting('dsql_emulator.sql_rules', true) IS DISTINCT FROM 'on' THEN
        RETURN;
    END IF;
    FOR dropped IN SELECT * FROM pg_event_trigger_dropped_objects()
                    WHERE object_type = 'table column' AND original LOOP
        IF dropped.objid || ':' || dropped.objsubid = ANY (string_to_array(
               current_setting('dsql_emulator.primary_keys', true), ' ')) THEN
            RAISE EXCEPTION USING ERRCODE = '0A000',
                MESSAGE = format('cannot drop primary key column %s', dropped.address_names[3]);
        END IF;
    END LOOP;
    -- DSQL_SQL_RULES §9: a table keeps its primary key.
    FOR dropped IN SELECT * FROM pg_event_trigger_dropped_objects()
                    WHERE object_type = 'table constraint' AND original LOOP
        IF dropped.objid::text = ANY (string_to_array(
               current_setting('dsql_emulator.primary_key_constraints', true), ' ')) THEN
            RAISE EXCEPTION USING ERRCODE = '0A000',
                MESSAGE = format('cannot drop primary key constraint %s',
                                 dropped.address_names[3]);
        END IF;
    END LOOP;
END $$;

DO $$
BEGIN
    -- (A database prepared before watched fewer statements: its trigger is made again.)
    IF EXISTS (SELECT FROM pg_event_trigger WHERE evtname = 'dsql_emulator_ddl_end'
                AND evttags IS DISTINCT FROM ARRAY['CREATE TABLE', 'CREATE INDEX', 'CREATE SCHEMA',
                    'CREATE STATISTICS', 'CREATE VIEW', 'CREATE SEQUENCE']) THEN
        DROP EVENT TRIGGER dsql_emulator_ddl_end;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_event_trigger WHERE evtname = 'dsql_emulator_ddl_end') THEN
        CREATE EVENT TRIGGER dsql_emulator_ddl_end ON ddl_command_end
            WHEN TAG IN ('CREATE TABLE', 'CREATE INDEX', 'CREATE SCHEMA', 'CREATE STATISTICS',
                         'CREATE VIEW', 'CREATE SEQUENCE')
            EXECUTE FUNCTION sys.dsql_emulator_ddl_end();
    END IF;
    IF NOT EXISTS (SELECT FROM pg_event_trigger WHERE evtname = 'dsql_emulator_ddl_start') THEN
        CREATE EVENT TRIGGER dsql_emulator_ddl_start ON ddl_command_start
            WHEN TAG IN ('ALTER TABLE')
            EXECUTE FUNCTION sys.dsql_emulator_ddl_start();
    END IF;
    IF NOT EXISTS (SELECT FROM pg_event_trigger WHERE evtname = 'dsql_emulator_alter_end') THEN
        CREATE EVENT TRIGGER dsql_emulator_alter_end ON ddl_command_end
            WHEN TAG IN ('ALTER TABLE')
            EXECUTE FUNCTION sys.dsql_emulator_alter_end();
    END IF;
    IF NOT EXISTS (SELECT FROM pg_event_trigger WHERE evtname = 'dsql_emulator_sql_drop') THEN
        CREATE EVENT TRIGGER dsql_emulator_sql_drop ON sql_drop
            WHEN TAG IN ('ALTER TABLE')
            EXECUTE FUNCTION sys.dsql_emulator_sql_drop();
    END IF;
END $$;

COMMIT;
