//! Diesel (feature `diesel-async`) through the emulator: the pool of `AsyncPgConnection`s
//! keeps the crate pool's guarantees, `retry_transaction` retries conflicts and lost
//! connections and never a COMMIT of unknown outcome, and DSQL's answers are read by SQLSTATE.
//! Each test has an endpoint (and database) of its own; outcomes and counts are asserted,
//! never durations.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_types::{Int8, Text};
use diesel_async::{AnsiTransactionManager, AsyncConnection, RunQueryDsl, TransactionManager};
use tokio_postgres_dsql::diesel::{
    DsqlDieselError, DsqlDieselPool, DsqlErrorKind, SchemaMismatch, check_schema, print_schema,
};
use tokio_postgres_dsql::emulator::DsqlEmulator;
use tokio_postgres_dsql::migrate::Migrator;
use tokio_postgres_dsql::{DsqlConnector, Error, RetryPolicy};

use crate::support;

diesel::table! {
    counters (id) {
        id -> Int8,
        n -> Int8,
    }
}

/// A connector for `admin` on `emulator`, with `max_lifetime` if given.
async fn connector(emulator: &DsqlEmulator, max_lifetime: Option<Duration>) -> DsqlConnector {
    let mut config = emulator.config_for("admin");
    if let Some(lifetime) = max_lifetime {
        config = config.max_lifetime(lifetime);
    }
    DsqlConnector::new(config.build().unwrap()).await.unwrap()
}

/// `counters` with rows `0..rows`, all at zero.
async fn counters(connector: &DsqlConnector, rows: i64) {
    let client = connector.connect().await.unwrap();
    client
        .batch_execute("CREATE TABLE counters (id bigint PRIMARY KEY, n bigint NOT NULL)")
        .await
        .unwrap();
    for id in 0..rows {
        client
            .execute("INSERT INTO counters VALUES ($1, 0)", &[&id])
            .await
            .unwrap();
    }
}

async fn count_of(pool: &DsqlDieselPool, id: i64) -> i64 {
    let mut conn = pool.get().await.unwrap();
    counters::table
        .find(id)
        .select(counters::n)
        .first(&mut conn)
        .await
        .unwrap()
}

async fn increment(conn: &mut diesel_async::AsyncPgConnection, id: i64) -> QueryResult<usize> {
    diesel::update(counters::table.find(id))
        .set(counters::n.eq(counters::n + 1))
        .execute(conn)
        .await
}

/// A transaction through the helper commits one increment of row 0, which was at zero: the
/// pool's connection is clean for the next user.
async fn one_increment_lands(pool: &DsqlDieselPool) {
    pool.retry_transaction(&RetryPolicy::default(), async |conn| {
        increment(conn, 0).await?;
        Ok::<_, Error>(())
    })
    .await
    .unwrap();
    assert_eq!(count_of(pool, 0).await, 1);
}

fn hot_row_policy() -> RetryPolicy {
    RetryPolicy::default().with_max_attempts(200)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_notes_service_writes_reads_back_and_counts_likes_exactly() {
    let emulator = support::own_endpoint().await;
    let connector = connector(&emulator, None).await;
    let migrations = tokio_postgres_dsql::migrations!(
        "examples/migrations/diesel/0001_create_tables.sql",
        "examples/migrations/diesel/0002_notes_user_index.sql",
    )
    .unwrap();
    Migrator::new(migrations).run(&connector).await.unwrap();
    let pool = connector.diesel_pool().await.unwrap();

    let user = uuid::Uuid::new_v4();
    let note = uuid::Uuid::new_v4();
    pool.retry_transaction(&RetryPolicy::default(), async |conn| {
        diesel::sql_query("INSERT INTO users (id, name) VALUES ($1, 'Ada')")
            .bind::<diesel::sql_types::Uuid, _>(user)
            .execute(conn)
            .await?;
        diesel::sql_query("INSERT INTO notes (id, user_id, body) VALUES ($1, $2, 'hello')")
            .bind::<diesel::sql_types::Uuid, _>(note)
            .bind::<diesel::sql_types::Uuid, _>(user)
            .execute(conn)
            .await?;
        Ok::<_, Error>(())
    })
    .await
    .unwrap();

    // 8 tasks × 10 likes on one note, each a read-modify-write under retry.
    let pool_ref = &pool;
    let runs = AtomicU32::new(0);
    let runs_ref = &runs;
    let likes = (0..8).map(|_| async move {
        for _ in 0..10 {
            pool_ref
                .retry_transaction(&hot_row_policy(), async |conn| {
                    runs_ref.fetch_add(1, Ordering::SeqCst);
                    let likes: i64 = diesel::sql_query("SELECT likes FROM notes WHERE id = $1")
                        .bind::<diesel::sql_types::Uuid, _>(note)
                        .get_result::<Likes>(conn)
                        .await?
                        .likes;
                    diesel::sql_query("UPDATE notes SET likes = $1 WHERE id = $2")
                        .bind::<Int8, _>(likes + 1)
                        .bind::<diesel::sql_types::Uuid, _>(note)
                        .execute(conn)
                        .await?;
                    Ok::<_, Error>(())
                })
                .await?;
        }
        Ok::<_, Error>(())
    });
    futures_util::future::try_join_all(likes).await.unwrap();
    let mut conn = pool.get().await.unwrap();
    let row: Likes = diesel::sql_query("SELECT likes FROM notes WHERE id = $1")
        .bind::<diesel::sql_types::Uuid, _>(note)
        .get_result(&mut conn)
        .await
        .unwrap();
    assert_eq!(row.likes, 80);
    eprintln!(
        "80 likes in {} runs ({} conflicts retried)",
        runs.load(Ordering::SeqCst),
        runs.load(Ordering::SeqCst) - 80
    );

    // One schema: the checked-in schema.rs agrees with what the migrations built, and a
    // column the migrations add and schema.rs lacks is named.
    let client = connector.connect().await.unwrap();
    check_schema(
        &client,
        "public",
        include_str!("../../examples/schema/diesel_notes.rs"),
    )
    .await
    .unwrap();
    client
        .batch_execute("ALTER TABLE notes ADD COLUMN pinned boolean")
        .await
        .unwrap();
    let printed = print_schema(&client, "public").await.unwrap();
    assert!(
        printed.contains("        pinned -> Nullable<Bool>,\n"),
        "{printed}"
    );
    let error = check_schema(
        &client,
        "public",
        include_str!("../../examples/schema/diesel_notes.rs"),
    )
    .await
    .unwrap_err();
    match &error {
        SchemaMismatch::Differs { table, column, .. } => {
            assert_eq!(table, "notes");
            assert_eq!(column.as_deref(), Some("pinned"));
        }
        other => panic!("{other:?}"),
    }

    // A domain is written as its base type (NOT NULL if the domain is), and a name that is
    // not a Rust identifier gets a spelling that is, keeping its own in `sql_name`.
    client
        .batch_execute("CREATE DOMAIN mood AS varchar(8) NOT NULL")
        .await
        .unwrap();
    client
        .batch_execute("CREATE TABLE moods (id uuid PRIMARY KEY, \"the mood\" mood)")
        .await
        .unwrap();
    let with_moods = print_schema(&client, "public").await.unwrap();
    assert!(
        with_moods.contains(
            "    moods (id) {\n        id -> Uuid,\n        #[sql_name = \"the mood\"]\n        \
             #[max_length = 8]\n        the_mood -> Varchar,\n    }\n"
        ),
        "{with_moods}"
    );
    // A table schema.rs lacks is named, though it sorts before the others.
    match check_schema(&client, "public", &printed).await {
        Err(SchemaMismatch::Differs {
            table,
            column: None,
            expected,
            ..
        }) if table == "moods" => assert_eq!(expected, "(no such table)"),
        other => panic!("{other:?}"),
    }
}

#[derive(QueryableByName, Debug)]
struct Likes {
    #[diesel(sql_type = Int8)]
    likes: i64,
}

#[derive(QueryableByName, Debug)]
struct Setting {
    #[diesel(sql_type = Text)]
    value: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_role_fails_the_checkout_with_access_denied_not_a_pool_timeout() {
    let emulator = support::own_endpoint().await;
    let connector = connector(&emulator, None).await;
    // No warm connection kept (`min_idle` 0): one opened by the pool in the background just
    // before the revocation would rightly keep working, as on DSQL, and hide what is tested.
    let pool = connector
        .diesel_pool_with(|b| {
            b.min_idle(Some(0))
                .connection_timeout(Duration::from_secs(30))
        })
        .await
        .unwrap();
    {
        let mut conn = pool.get().await.unwrap();
        diesel::sql_query("SELECT 1")
            .execute(&mut conn)
            .await
            .unwrap();
    }
    // Access taken away at runtime: open connections are cut (a failover, a recycle), and
    // every new one is refused.
    emulator.revoke_access(emulator.credentials().access_key_id(), true);
    emulator.drop_all_connections();
    let started = tokio::time::Instant::now();
    let mut outcome = None;
    // A connection the pool has not yet seen closed can be handed out once; its query fails.
    for _ in 0..5 {
        match pool.get().await {
            Ok(mut conn) => {
                let _ = diesel::sql_query("SELECT 1").execute(&mut conn).await;
            }
            Err(error) => {
                outcome = Some(error);
                break;
            }
        }
    }
    let error = outcome.expect("the checkout fails");
    match &error {
        Error::AccessDenied { hint, .. } => {
            assert!(hint.contains("is not authorized to perform"), "{hint}");
            assert_eq!(error.hint(), Some(hint.as_str()));
            assert_eq!(DsqlDieselError::hint(&error), Some(hint.as_str()));
        }
        other => panic!("expected AccessDenied, got {other:?}"),
    }
    // At once: the refusal was not retried until a deadline (a counted fact, not a timing).
    assert_eq!(
        emulator.stats().total_rejected(),
        1,
        "{:?}",
        emulator.stats()
    );
    // And every checkout right after gets it too, without a login of its own: none waits
    // for a connect that bb8 would not start (the window right after a refusal).
    for _ in 0..3 {
        let again = pool.get().await.map(|_| ());
        assert!(
            matches!(again, Err(Error::AccessDenied { .. })),
            "{again:?}"
        );
    }
    assert_eq!(emulator.stats().total_rejected(), 1);
    eprintln!("refused after {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_swallows_a_failed_statement_is_rolled_back_not_ok() {
    let emulator = support::own_endpoint().await;
    let connector = connector(&emulator, None).await;
    counters(&connector, 1).await;
    let pool = connector.diesel_pool().await.unwrap();
    let result = pool
        .retry_transaction(&RetryPolicy::default(), async |conn| {
            increment(conn, 0).await?;
            // A duplicate key: the transaction has failed; the body goes on as if not.
            let _ = diesel::sql_query("INSERT INTO counters VALUES (0, 0)")
                .execute(conn)
                .await;
            Ok::<_, Error>(())
        })
        .await;
    assert!(
        matches!(result, Err(Error::TransactionRolledBack { .. })),
        "{result:?}"
    );
    assert_eq!(count_of(&pool, 0).await, 0, "the first update was kept");
    // The connection is clean for the next transaction.
    one_increment_lands(&pool).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_diesel_connection_is_handed_out_past_its_recycle_point() {
    let emulator = support::own_emulator(|b| b.max_connection_age(Duration::from_secs(3))).await;
    let connector = connector(&emulator, Some(Duration::from_secs(2))).await;
    let pool = connector.diesel_pool_with(|b| b.max_size(2)).await.unwrap();
    let mut errors = Vec::new();
    let mut queries = 0;
    let mut past_deadline = 0;
    let until = tokio::time::Instant::now() + Duration::from_secs(8);
    while tokio::time::Instant::now() < until {
        let asked = tokio::time::Instant::now();
        match pool.get().await {
            Ok(mut conn) => {
                if asked >= conn.recycle_at() {
                    past_deadline += 1;
                }
                match diesel::sql_query("SELECT 1").execute(&mut conn).await {
                    Ok(_) => queries += 1,
                    Err(error) => errors.push(error.to_string()),
                }
            }
            Err(error) => errors.push(error.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let stats = emulator.stats();
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(past_deadline, 0);
    assert_eq!(stats.closed_at_max_age, 0, "{stats:?}");
    assert!(queries > 10, "{queries}");
    // Connections were replaced: 8 s of 2 s lifetimes.
    assert!(stats.accepted >= 3, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_at_commit_is_an_unknown_outcome_and_the_body_runs_once() {
    let emulator = support::own_endpoint().await;
    let connector = connector(&emulator, None).await;
    counters(&connector, 1).await;
    let pool = connector.diesel_pool().await.unwrap();
    for (code, message) in [
        (
            "57P01",
            "terminating connection due to administrator command",
        ),
        ("XX000", "server unavailable"),
        ("08006", "connection failure"),
        // Not a class that says so by itself: the FATAL severity does.
        ("53300", "too many connections"),
    ] {
        let before = count_of(&pool, 0).await;
        emulator.fail_next_commit(code, message);
        let runs = AtomicU32::new(0);
        let runs_ref = &runs;
        let result = pool
            .retry_transaction(&RetryPolicy::default(), async |conn| {
                runs_ref.fetch_add(1, Ordering::SeqCst);
                increment(conn, 0).await?;
                Ok::<_, Error>(())
            })
            .await;
        assert!(
            matches!(result, Err(Error::CommitOutcomeUnknown { .. })),
            "{code}: {result:?}"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 1, "{code}: the body ran again");
        // The emulator committed before cutting: the write is there, once.
        assert_eq!(count_of(&pool, 0).await, before + 1, "{code}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nested_transaction_is_refused_with_the_reason_and_nothing_is_written() {
    let emulator = support::own_endpoint().await;
    let connector = connector(&emulator, None).await;
    counters(&connector, 1).await;
    let pool = connector.diesel_pool_with(|b| b.max_size(1)).await.unwrap();
    let runs = AtomicU32::new(0);
    let runs_ref = &runs;
    let result = pool
        .retry_transaction(&RetryPolicy::default(), async |conn| {
            runs_ref.fetch_add(1, Ordering::SeqCst);
            increment(conn, 0).await?;
            conn.transaction(async |inner| increment(inner, 0).await)
                .await?;
            Ok::<_, Error>(())
        })
        .await;
    assert!(
        matches!(result, Err(Error::NestedTransaction)),
        "{result:?}"
    );
    let message = Error::NestedTransaction.to_string();
    assert!(
        message.contains("SAVEPOINT") && message.contains("DSQL"),
        "{message}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1, "not retried");
    assert_eq!(count_of(&pool, 0).await, 0, "nothing written");
    // The one connection is clean again: the next transaction begins with BEGIN, not a
    // savepoint.
    one_increment_lands(&pool).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusals_sqlstate_is_read_through_the_helper_and_not_retried() {
    let emulator = support::own_endpoint().await;
    let connector = connector(&emulator, None).await;
    counters(&connector, 1).await;
    let pool = connector.diesel_pool().await.unwrap();
    let runs = AtomicU32::new(0);
    let runs_ref = &runs;
    let error = pool
        .retry_transaction(&RetryPolicy::default(), async |conn| {
            runs_ref.fetch_add(1, Ordering::SeqCst);
            diesel::sql_query("TRUNCATE counters").execute(conn).await?;
            Ok::<_, Error>(())
        })
        .await
        .unwrap_err();
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(error.sqlstate().as_deref(), Some("0A000"), "{error:?}");
    assert_eq!(error.dsql_kind(), Some(DsqlErrorKind::Unsupported));
    assert!(matches!(error, Error::Diesel { .. }), "{error:?}");
    assert!(error.to_string().contains("0A000"), "{error}");

    // What diesel users meet, straight on a pooled connection (no helper): a synchronous
    // index (0A000), and SERIAL, which DSQL answers as an unknown type (42704).
    let mut conn = pool.get().await.unwrap();
    let refused = diesel::sql_query("CREATE INDEX counters_n ON counters (n)")
        .execute(&mut conn)
        .await
        .unwrap_err();
    assert_eq!(refused.sqlstate().as_deref(), Some("0A000"), "{refused:?}");
    assert_eq!(refused.dsql_kind(), Some(DsqlErrorKind::Unsupported));
    assert!(
        refused
            .server_message()
            .is_some_and(|m| m.contains("CREATE INDEX ASYNC")),
        "{refused:?}"
    );
    let serial = diesel::sql_query("CREATE TABLE serials (id SERIAL PRIMARY KEY)")
        .execute(&mut conn)
        .await
        .unwrap_err();
    assert_eq!(serial.sqlstate().as_deref(), Some("42704"), "{serial:?}");
    assert_eq!(serial.dsql_kind(), Some(DsqlErrorKind::Other));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_returned_dirty_is_cleaned_and_kept() {
    let emulator = support::own_endpoint().await;
    let connector = connector(&emulator, None).await;
    counters(&connector, 1).await;
    let pool = connector.diesel_pool_with(|b| b.max_size(1)).await.unwrap();
    let opened = {
        let mut conn = pool.get().await.unwrap();
        // A session setting changed (outside any transaction, so only a reset undoes it)...
        diesel::sql_query("SET TIME ZONE 'Europe/Paris'")
            .execute(&mut conn)
            .await
            .unwrap();
        // ...and a transaction left open (a handler that returned early, a cancelled future).
        AnsiTransactionManager::begin_transaction(&mut **conn)
            .await
            .unwrap();
        increment(&mut conn, 0).await.unwrap();
        conn.opened_at()
    };
    let mut conn = pool.get().await.unwrap();
    assert_eq!(
        conn.opened_at(),
        opened,
        "the connection was dropped, not cleaned"
    );
    // Rolled back, and Diesel's own bookkeeping with it: this is a BEGIN, not a savepoint.
    conn.transaction(async |conn| increment(conn, 0).await)
        .await
        .unwrap();
    let setting: Setting = diesel::sql_query("SELECT current_setting('TimeZone') AS value")
        .get_result(&mut conn)
        .await
        .unwrap();
    // diesel-async's own setting is back, not the server's default.
    assert_eq!(setting.value, "UTC");
    drop(conn);
    assert_eq!(
        count_of(&pool, 0).await,
        1,
        "the abandoned update was not rolled back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_before_commit_is_retried_on_a_fresh_one() {
    let emulator = support::own_endpoint().await;
    let connector = connector(&emulator, None).await;
    counters(&connector, 1).await;
    let pool = connector.diesel_pool().await.unwrap();
    let runs = AtomicU32::new(0);
    let (runs_ref, emulator_ref) = (&runs, &emulator);
    pool.retry_transaction(&RetryPolicy::default(), async |conn| {
        if runs_ref.fetch_add(1, Ordering::SeqCst) == 0 {
            increment(conn, 0).await?;
            emulator_ref.drop_all_connections();
            // Until the cut reaches this connection.
            for _ in 0..100 {
                increment(conn, 0).await?;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("the connection was never cut");
        }
        increment(conn, 0).await?;
        Ok::<_, Error>(())
    })
    .await
    .unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_eq!(count_of(&pool, 0).await, 1, "written once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_commits_itself_is_not_reported_ok_nor_retried() {
    let emulator = support::own_endpoint().await;
    let connector = connector(&emulator, None).await;
    counters(&connector, 1).await;
    let pool = connector.diesel_pool_with(|b| b.max_size(1)).await.unwrap();
    let runs = AtomicU32::new(0);
    let runs_ref = &runs;
    let result = pool
        .retry_transaction(&RetryPolicy::default(), async |conn| {
            runs_ref.fetch_add(1, Ordering::SeqCst);
            increment(conn, 0).await?;
            diesel::sql_query("COMMIT").execute(conn).await?;
            Ok::<_, Error>(())
        })
        .await;
    assert!(
        matches!(result, Err(Error::TransactionEndedByBody)),
        "{result:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1, "not retried");
    // What it committed itself landed; the helper said it could not vouch either way.
    assert_eq!(count_of(&pool, 0).await, 1);
    // A statement cut in flight leaves the one connection clean for the next user.
    let policy = RetryPolicy::default();
    let call = pool.retry_transaction(&policy, async |conn| {
        increment(conn, 0).await?;
        diesel::sql_query("SELECT pg_sleep(5)")
            .execute(conn)
            .await?;
        Ok::<_, Error>(())
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(500), call)
            .await
            .is_err()
    );
    pool.retry_transaction(&RetryPolicy::default(), async |conn| {
        increment(conn, 0).await?;
        Ok::<_, Error>(())
    })
    .await
    .unwrap();
    assert_eq!(
        count_of(&pool, 0).await,
        2,
        "the cut increment did not land"
    );
}

/// What one step of the property test below does.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Increment a row; commits.
    Increment(i64),
    /// Increment, then return an error of the body's own: rolled back.
    Abandon(i64),
    /// Increment, then swallow a failed statement: rolled back at COMMIT.
    Swallow(i64),
    /// Increment, then open a nested transaction: refused.
    Nest(i64),
    /// Increment, then drop the whole call midway (a cancelled request).
    Cancel(i64),
    /// Increment, then drop the call while a statement is in flight (Diesel marks the
    /// connection broken; the pool must clean it).
    CancelInFlight(i64),
    /// Increment, then send ROLLBACK itself: the helper must not report `Ok`.
    EndsItself(i64),
}

fn steps(seed: u64, tasks: usize, per_task: usize, rows: i64) -> Vec<Vec<Step>> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..tasks)
        .map(|_| {
            (0..per_task)
                .map(|_| {
                    let row = rng.i64(0..rows);
                    match rng.u8(0..12) {
                        0..=4 => Step::Increment(row),
                        5 => Step::Abandon(row),
                        6 => Step::Swallow(row),
                        7 => Step::Nest(row),
                        8 => Step::Cancel(row),
                        9 => Step::CancelInFlight(row),
                        _ => Step::EndsItself(row),
                    }
                })
                .collect()
        })
        .collect()
}

/// Random mixes of committing, failing, swallowing, nesting and cancelled transactions from
/// several tasks over a small pool (so every connection is reused after every kind of end):
/// each row ends with exactly the increments whose call returned `Ok` (a call cancelled
/// before `COMMIT` writes nothing), and every other call returns the error its kind promises.
/// `DSQL_DIESEL_SEEDS=n` runs `n` more seeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_transaction_mixes_write_exactly_what_they_report() {
    let emulator = support::own_endpoint().await;
    let connector = connector(&emulator, None).await;
    let rows = 3;
    counters(&connector, rows).await;
    let pool = connector.diesel_pool_with(|b| b.max_size(2)).await.unwrap();
    let extra: u64 = std::env::var("DSQL_DIESEL_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let seeds: Vec<u64> = [20261207, 7, 4242]
        .into_iter()
        .chain((0..extra).map(|i| 1_000 + i))
        .collect();
    for seed in seeds {
        let before: Vec<i64> =
            futures_util::future::join_all((0..rows).map(|r| count_of(&pool, r))).await;
        let plan = steps(seed, 3, 8, rows);
        let policy = hot_row_policy();
        let committed = std::sync::Mutex::new(vec![0i64; rows as usize]);
        let cancelled = AtomicU32::new(0);
        let (pool_ref, policy_ref, committed_ref, cancelled_ref) =
            (&pool, &policy, &committed, &cancelled);
        let tasks = plan.iter().map(|steps| async move {
            for step in steps {
                let result = match *step {
                    Step::Increment(row) => {
                        pool_ref
                            .retry_transaction(policy_ref, async |conn| {
                                increment(conn, row).await?;
                                Ok::<_, Error>(row)
                            })
                            .await
                    }
                    Step::Abandon(row) => {
                        pool_ref
                            .retry_transaction(policy_ref, async |conn| {
                                increment(conn, row).await?;
                                Err::<i64, _>(Error::PoolTimeout)
                            })
                            .await
                    }
                    Step::Swallow(row) => {
                        pool_ref
                            .retry_transaction(policy_ref, async |conn| {
                                increment(conn, row).await?;
                                let _ = diesel::sql_query("SELECT 1/0").execute(conn).await;
                                Ok::<_, Error>(row)
                            })
                            .await
                    }
                    Step::Nest(row) => {
                        pool_ref
                            .retry_transaction(policy_ref, async |conn| {
                                increment(conn, row).await?;
                                conn.transaction(async |inner| increment(inner, row).await)
                                    .await?;
                                Ok::<_, Error>(row)
                            })
                            .await
                    }
                    Step::Cancel(row) => {
                        let call = pool_ref.retry_transaction(policy_ref, async |conn| {
                            increment(conn, row).await?;
                            std::future::pending::<()>().await;
                            Ok::<_, Error>(row)
                        });
                        // Cut before COMMIT: nothing may land.
                        let cut = tokio::time::timeout(Duration::from_millis(200), call).await;
                        assert!(cut.is_err(), "seed {seed}: a pending body finished");
                        cancelled_ref.fetch_add(1, Ordering::SeqCst);
                        continue;
                    }
                    Step::CancelInFlight(row) => {
                        let call = pool_ref.retry_transaction(policy_ref, async |conn| {
                            increment(conn, row).await?;
                            diesel::sql_query("SELECT pg_sleep(5)")
                                .execute(conn)
                                .await?;
                            Ok::<_, Error>(row)
                        });
                        let cut = tokio::time::timeout(Duration::from_millis(300), call).await;
                        assert!(cut.is_err(), "seed {seed}: a sleeping body finished");
                        cancelled_ref.fetch_add(1, Ordering::SeqCst);
                        continue;
                    }
                    Step::EndsItself(row) => {
                        pool_ref
                            .retry_transaction(policy_ref, async |conn| {
                                increment(conn, row).await?;
                                diesel::sql_query("ROLLBACK").execute(conn).await?;
                                Ok::<_, Error>(row)
                            })
                            .await
                    }
                };
                match (*step, result) {
                    (Step::Increment(_), Ok(row)) => {
                        committed_ref.lock().unwrap()[row as usize] += 1;
                    }
                    (Step::Abandon(_), Err(Error::PoolTimeout))
                    | (Step::Swallow(_), Err(Error::TransactionRolledBack { .. }))
                    | (Step::Nest(_), Err(Error::NestedTransaction))
                    | (Step::EndsItself(_), Err(Error::TransactionEndedByBody)) => {}
                    (step, outcome) => {
                        panic!("seed {seed}: {step:?} ended with {outcome:?}")
                    }
                }
            }
        });
        futures_util::future::join_all(tasks).await;
        let committed = committed.into_inner().unwrap();
        for row in 0..rows {
            let now = count_of(&pool, row).await;
            assert_eq!(
                now - before[row as usize],
                committed[row as usize],
                "seed {seed}: row {row} (plan {plan:?})"
            );
        }
        eprintln!(
            "seed {seed}: {:?} committed, {} cancelled",
            committed,
            cancelled.load(Ordering::SeqCst)
        );
    }
}
