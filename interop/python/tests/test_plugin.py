"""The plugin as a Python team uses it: psycopg against an endpoint per test, a retry loop
against injected conflicts, an unknown outcome at a cut COMMIT, endpoints that do not see each
other."""

import psycopg
import pytest


def connect(endpoint, **kwargs):
    return psycopg.connect(**endpoint.conninfo(), password=endpoint.token(), **kwargs)


def with_retry(conn, work, attempts=5):
    """A retry loop as services write one: the whole transaction again on 40001."""
    for attempt in range(1, attempts + 1):
        try:
            with conn.transaction():
                work(conn)
            return attempt
        except psycopg.errors.SerializationFailure:
            continue
    raise AssertionError("still conflicting")


def test_an_endpoint_answers_as_dsql(dsql_endpoint):
    with connect(dsql_endpoint, autocommit=True) as conn:
        assert conn.execute("SHOW server_version").fetchone()[0] == "16.15"
        conn.execute("CREATE TABLE notes (id uuid PRIMARY KEY, body text)")
        # DSQL's rules: no SERIAL (42704, as a cluster answers).
        with pytest.raises(psycopg.errors.UndefinedObject, match='type "serial" does not exist'):
            conn.execute("CREATE TABLE counters (id serial PRIMARY KEY)")


def test_one_injected_conflict_is_retried_once_and_commits(dsql_endpoint):
    with connect(dsql_endpoint, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id int PRIMARY KEY, n int)")
        conn.execute("INSERT INTO orders VALUES (1, 0)")
        dsql_endpoint.inject_conflicts(["orders"], count=1)
        attempts = with_retry(
            conn, lambda c: c.execute("UPDATE orders SET n = n + 1 WHERE id = 1")
        )
        assert attempts == 2
        assert conn.execute("SELECT n FROM orders").fetchone()[0] == 1
    assert dsql_endpoint.stats()["injected_conflicts"] == 1


def test_a_cut_commit_leaves_the_outcome_unknown(dsql_endpoint):
    with connect(dsql_endpoint, autocommit=True) as conn:
        conn.execute("CREATE TABLE ledger (id int PRIMARY KEY)")
    dsql_endpoint.fault("cut_next_commit")
    conn = connect(dsql_endpoint)
    conn.execute("INSERT INTO ledger VALUES (1)")
    # The connection is gone with COMMIT in flight: psycopg cannot say whether it committed.
    with pytest.raises(psycopg.OperationalError):
        conn.commit()
    conn.close()


def test_two_endpoints_see_neither_the_others_tables_nor_faults(dsql_emulator):
    a, b = dsql_emulator.endpoint(), dsql_emulator.endpoint()
    try:
        with connect(a, autocommit=True) as on_a, connect(b, autocommit=True) as on_b:
            on_a.execute("CREATE TABLE mine (id int PRIMARY KEY)")
            with pytest.raises(psycopg.errors.UndefinedTable):
                on_b.execute("SELECT * FROM mine")
            on_b.execute("CREATE TABLE mine (id int PRIMARY KEY)")
            a.inject_conflicts()  # any table, every commit, on a only
            with pytest.raises(psycopg.errors.SerializationFailure):
                with on_a.transaction():
                    on_a.execute("INSERT INTO mine VALUES (1)")
            with on_b.transaction():
                on_b.execute("INSERT INTO mine VALUES (1)")
    finally:
        a.close()
        b.close()


def test_fifty_endpoints_come_and_go(dsql_emulator):
    import time

    started = time.monotonic()
    for _ in range(50):
        dsql_emulator.endpoint().close()
    print(f"50 endpoints made and dropped in {time.monotonic() - started:.2f} s")
