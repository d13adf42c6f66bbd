//! A notes service on DSQL with Diesel (diesel 2.4 + diesel-async 0.10, feature `diesel-async`).
//!
//! ```sh
//! cargo run --example diesel                                   # on the embedded DSQL emulator
//! CLUSTER_ENDPOINT=<id>.dsql.<region>.on.aws cargo run --example diesel   # on DSQL
//! # (on a cluster it stops if its tables exist; DIESEL_EXAMPLE_RESET=1 drops them first)
//! ```
//!
//! Users and notes with UUID keys, a likes counter incremented by 8 tasks at once under
//! optimistic-concurrency retry, and what DSQL refuses that Diesel users meet (a nested
//! transaction's `SAVEPOINT`, `TRUNCATE`) read through [`DsqlDieselError`]. The schema is the
//! migrations (`examples/migrations/diesel/`); `examples/schema/diesel_notes.rs` is Diesel's
//! view of it, written by `print_schema` and checked here with `check_schema`.

use std::error::Error as StdError;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU32, Ordering};

use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};
use tokio_postgres_dsql::diesel::{DsqlDieselError, DsqlDieselPool, DsqlErrorKind};
use tokio_postgres_dsql::emulator::DsqlEmulator;
use tokio_postgres_dsql::migrate::Migrator;
use tokio_postgres_dsql::{DsqlConfig, DsqlConnector, Error, RetryPolicy};
use uuid::Uuid;

#[path = "schema/diesel_notes.rs"]
mod schema;
use schema::{notes, users};

type BoxError = Box<dyn StdError + Send + Sync>;

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = users)]
struct User {
    id: Uuid,
    name: String,
    created_at: time::OffsetDateTime,
}

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = notes)]
struct NewNote<'a> {
    id: Uuid,
    user_id: Uuid,
    body: &'a str,
}

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = notes)]
struct Note {
    id: Uuid,
    body: String,
    likes: i64,
}

/// The service: a pool, and every write under [`DsqlDieselPool::retry_transaction`].
#[derive(Clone)]
struct Notes {
    pool: DsqlDieselPool,
    policy: RetryPolicy,
}

impl Notes {
    async fn create_user(&self, name: &str) -> Result<Uuid, Error> {
        let user = User {
            id: Uuid::new_v4(),
            name: name.to_owned(),
            created_at: time::OffsetDateTime::now_utc(),
        };
        let user = &user;
        self.pool
            .retry_transaction(&self.policy, async |conn| {
                diesel::insert_into(users::table)
                    .values(user)
                    .execute(conn)
                    .await?;
                Ok(user.id)
            })
            .await
    }

    async fn add_note(&self, user_id: Uuid, body: &str) -> Result<Uuid, Error> {
        let id = Uuid::new_v4();
        self.pool
            .retry_transaction(&self.policy, async |conn| {
                diesel::insert_into(notes::table)
                    .values(NewNote { id, user_id, body })
                    .execute(conn)
                    .await?;
                Ok(id)
            })
            .await
    }

    /// One like: a read-modify-write that conflicts with every concurrent like of the same
    /// note; DSQL fails the later COMMIT (40001 OC000) and the helper runs it again.
    async fn like(&self, note: Uuid, runs: &AtomicU32) -> Result<i64, Error> {
        self.pool
            .retry_transaction(&self.policy, async |conn| {
                runs.fetch_add(1, Ordering::Relaxed);
                let likes: i64 = notes::table
                    .find(note)
                    .select(notes::likes)
                    .first(conn)
                    .await?;
                diesel::update(notes::table.find(note))
                    .set(notes::likes.eq(likes + 1))
                    .execute(conn)
                    .await?;
                Ok(likes + 1)
            })
            .await
    }

    async fn notes_of(&self, user: Uuid) -> Result<Vec<Note>, Error> {
        let mut conn = self.pool.get().await?;
        Ok(notes::table
            .filter(notes::user_id.eq(user))
            .order(notes::created_at)
            .select(Note::as_select())
            .load(&mut conn)
            .await?)
    }
}

/// The example starts from nothing each time (the migration history too). On a cluster it
/// drops these only with `DIESEL_EXAMPLE_RESET=1`, and otherwise stops if any exists.
const RESET: &[&str] = &[
    "DROP TABLE IF EXISTS notes",
    "DROP TABLE IF EXISTS users",
    "DROP TABLE IF EXISTS dsql_migrations",
    "DROP TABLE IF EXISTS dsql_migrations_lock",
];

async fn main_inner(summary: &mut Vec<String>) -> Result<(), BoxError> {
    let (config, _emulator) = if std::env::var_os("CLUSTER_ENDPOINT").is_some() {
        (DsqlConfig::from_env()?, None)
    } else {
        let emulator = DsqlEmulator::start().await?;
        println!(
            "CLUSTER_ENDPOINT is not set: running on the embedded DSQL emulator at {} ({})",
            emulator.address(),
            emulator.endpoint()
        );
        (emulator.config_for("admin").build()?, Some(emulator))
    };

    // The glue: a connector, a pool of Diesel connections, a retry policy.
    let connector = DsqlConnector::new(config).await?;
    let client = connector.connect().await?;
    if _emulator.is_none() && std::env::var("DIESEL_EXAMPLE_RESET").as_deref() != Ok("1") {
        for table in ["notes", "users", "dsql_migrations"] {
            let found: Option<String> = client
                .query_one("SELECT to_regclass($1)::text", &[&table])
                .await?
                .get(0);
            if found.is_some() {
                return Err(format!(
                    "table {table} already exists on this cluster: the example drops and \
                     recreates notes, users and the migration history; run it with \
                     DIESEL_EXAMPLE_RESET=1 if that is what you want"
                )
                .into());
            }
        }
    }
    for statement in RESET {
        client.batch_execute(statement).await?;
    }
    let migrations = tokio_postgres_dsql::migrations!(
        "examples/migrations/diesel/0001_create_tables.sql",
        "examples/migrations/diesel/0002_notes_user_index.sql",
    )?;
    let report = Migrator::new(migrations).run(&connector).await?;
    summary.push(format!("migrations {:?} applied", report.applied));
    tokio_postgres_dsql::diesel::check_schema(
        &client,
        "public",
        include_str!("schema/diesel_notes.rs"),
    )
    .await?;
    summary.push("schema.rs agrees with the migrated database".into());

    // Eight writers on one hot row lose most COMMITs: allow many attempts (each is a fresh
    // transaction after a jittered backoff).
    let service = Notes {
        pool: connector.diesel_pool().await?,
        policy: RetryPolicy::default().with_max_attempts(100),
    };

    let ada = service.create_user("Ada").await?;
    let note = service.add_note(ada, "DSQL with Diesel").await?;
    service.add_note(ada, "a second note").await?;
    summary.push("a user and two notes written and read back".into());

    // 8 tasks × 10 likes on one note, each a transaction under retry.
    let runs = AtomicU32::new(0);
    let likes = (0..8).map(|_| {
        let (service, runs) = (&service, &runs);
        async move {
            for _ in 0..10 {
                service.like(note, runs).await?;
            }
            Ok::<_, Error>(())
        }
    });
    futures_util::future::try_join_all(likes).await?;
    let notes = service.notes_of(ada).await?;
    let liked = notes.iter().find(|n| n.id == note).ok_or("note missing")?;
    if liked.likes != 80 || notes.len() != 2 {
        return Err(format!("expected 80 likes on 2 notes, got {notes:?}").into());
    }
    summary.push(format!(
        "80 likes from 8 tasks, exact ({} transaction runs: {} re-run on a conflict)",
        runs.load(Ordering::Relaxed),
        runs.load(Ordering::Relaxed).saturating_sub(80)
    ));
    println!("{}: {:?}", liked.body, liked.likes);

    // What DSQL refuses, read by SQLSTATE rather than by message.
    let mut conn = service.pool.get().await?;
    let refused = diesel::sql_query("TRUNCATE notes")
        .execute(&mut conn)
        .await
        .expect_err("DSQL has no TRUNCATE");
    assert_eq!(refused.dsql_kind(), Some(DsqlErrorKind::Unsupported));
    summary.push(format!(
        "TRUNCATE refused: {} {}",
        refused.sqlstate().unwrap_or_default(),
        refused.server_message().unwrap_or_default()
    ));
    drop(conn);

    // A nested transaction would need a SAVEPOINT: refused, with the reason, nothing written.
    let nested = service
        .pool
        .retry_transaction(&service.policy, async |conn| {
            diesel::update(notes::table.find(note))
                .set(notes::likes.eq(0))
                .execute(conn)
                .await?;
            conn.transaction(async |inner| {
                diesel::update(notes::table.find(note))
                    .set(notes::likes.eq(1))
                    .execute(inner)
                    .await
            })
            .await?;
            Ok::<_, Error>(())
        })
        .await;
    match nested {
        Err(Error::NestedTransaction) => {}
        other => return Err(format!("expected NestedTransaction, got {other:?}").into()),
    }
    let after = service.notes_of(ada).await?;
    if after.iter().find(|n| n.id == note).map(|n| n.likes) != Some(80) {
        return Err(format!("the refused transaction wrote: {after:?}").into());
    }
    summary.push(format!(
        "a nested transaction is refused, nothing written: {}",
        Error::NestedTransaction
    ));
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut summary = Vec::new();
    let outcome = main_inner(&mut summary).await;
    for line in &summary {
        println!("  ok  {line}");
    }
    match outcome {
        Ok(()) => {
            println!("diesel notes: all checks passed");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("diesel notes failed: {error}");
            let mut source = error.source();
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            ExitCode::FAILURE
        }
    }
}
