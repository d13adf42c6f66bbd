//! The Aurora DSQL "pet clinic" sample (AWS's Sequelize example), in Rust with tokio-postgres.
//!
//! ```sh
//! cargo run --example pet_clinic                      # on the embedded DSQL emulator
//! cargo run --example pet_clinic -- --pair            # on an emulated multi-Region pair
//! CLUSTER_ENDPOINT=<id>.dsql.<region>.on.aws cargo run --example pet_clinic   # on DSQL
//! CLUSTER_ENDPOINT=<id1>.dsql.us-east-1.on.aws,<id2>.dsql.us-east-2.on.aws \
//!     cargo run --example pet_clinic                  # on a multi-Region cluster
//! ```
//!
//! With `CLUSTER_ENDPOINT` set it connects with `DsqlConfig::from_env()` (`CLUSTER_USER`, default
//! `admin`, credentials from the usual AWS places); a comma-separated list names the endpoints
//! of a multi-Region cluster, the first preferred. Otherwise it starts the local emulator; with
//! `--pair` (or `DSQL_EMULATOR_PAIR=1`) a peered pair of emulated endpoints in two Regions over
//! one database, and after the clinic it takes the preferred endpoint down to show the pool
//! failing over to the peer. As `admin` it works in `public`; any other role works in
//! `myschema`, which an admin creates and grants (see `src/guide/dsql_notes.md`).
//!
//! The shape is the sample's: UUID keys made by the client, relations without foreign-key
//! constraints, DDL as plain SQL files run by the migration runner (one statement per
//! transaction, DSQL's rule; `examples/migrations/pet_clinic/`), and every DML transaction
//! under optimistic-concurrency retry.

use std::error::Error as StdError;
use std::process::ExitCode;

use time::{Date, Month};
use tokio_postgres::{Row, Transaction};
use tokio_postgres_dsql::emulator::DsqlEmulator;
use tokio_postgres_dsql::migrate::Migrator;
use tokio_postgres_dsql::{
    DsqlConfig, DsqlConnectionManager, DsqlConnector, DsqlPool, RetryPolicy,
    retry_postgres_transaction_on,
};
use uuid::Uuid;

type Pool = bb8::Pool<DsqlConnectionManager>;
type BoxError = Box<dyn StdError + Send + Sync>;

// ---- Models -----------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
struct Owner {
    id: Uuid,
    name: String,
    city: String,
    telephone: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
struct Pet {
    id: Uuid,
    name: String,
    birth_date: Date,
    owner_id: Option<Uuid>,
}

#[derive(Debug, Clone, PartialEq)]
struct Specialty {
    name: String,
}

#[derive(Debug, Clone, PartialEq)]
struct Vet {
    id: Uuid,
    name: String,
    specialties: Vec<Specialty>,
}

impl Owner {
    fn new(name: &str, city: &str, telephone: Option<&str>) -> Owner {
        Owner {
            id: Uuid::new_v4(),
            name: name.into(),
            city: city.into(),
            telephone: telephone.map(Into::into),
        }
    }

    fn from_row(row: &Row) -> Owner {
        Owner {
            id: row.get("id"),
            name: row.get("name"),
            city: row.get("city"),
            telephone: row.get("telephone"),
        }
    }
}

impl Pet {
    fn new(name: &str, birth_date: Date, owner: &Owner) -> Pet {
        Pet {
            id: Uuid::new_v4(),
            name: name.into(),
            birth_date,
            owner_id: Some(owner.id),
        }
    }

    fn from_row(row: &Row) -> Pet {
        Pet {
            id: row.get("id"),
            name: row.get("name"),
            birth_date: row.get("birth_date"),
            owner_id: row.get("owner_id"),
        }
    }
}

// ---- Schema -----------------------------------------------------------------------------------

/// The sample's reset: it starts from nothing each time (the history too, so the migrations
/// run again). A service would not do this; its schema only moves forward.
const RESET: &[&str] = &[
    "DROP TABLE IF EXISTS owner",
    "DROP TABLE IF EXISTS pet",
    "DROP TABLE IF EXISTS specialty",
    "DROP TABLE IF EXISTS vet",
    "DROP TABLE IF EXISTS vet_specialties",
    "DROP TABLE IF EXISTS dsql_migrations",
    "DROP TABLE IF EXISTS dsql_migrations_lock",
];

/// Resets, then creates the schema through the migration runner (`examples/migrations/
/// pet_clinic/`: each statement in its own transaction, the index build waited for).
async fn create_schema(pool: &Pool, connector: &DsqlConnector) -> Result<(), BoxError> {
    {
        let conn = pool.get().await?;
        for statement in RESET {
            conn.batch_execute(statement).await?;
        }
    }
    let migrations = tokio_postgres_dsql::migrations!(
        "examples/migrations/pet_clinic/0001_create_tables.sql",
        "examples/migrations/pet_clinic/0002_pet_owner_index.sql",
    )?;
    let report = Migrator::new(migrations).run(connector).await?;
    println!(
        "Schema: migrations {:?} applied ({} statements, one transaction each)",
        report.applied, report.statements_applied
    );
    Ok(())
}

// ---- Queries ----------------------------------------------------------------------------------

async fn insert_owner(tx: &Transaction<'_>, owner: &Owner) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "INSERT INTO owner (id, name, city, telephone) VALUES ($1, $2, $3, $4)",
        &[&owner.id, &owner.name, &owner.city, &owner.telephone],
    )
    .await
    .map(drop)
}

async fn insert_pet(tx: &Transaction<'_>, pet: &Pet) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "INSERT INTO pet (id, name, birth_date, owner_id) VALUES ($1, $2, $3, $4)",
        &[&pet.id, &pet.name, &pet.birth_date, &pet.owner_id],
    )
    .await
    .map(drop)
}

async fn insert_vet(tx: &Transaction<'_>, vet: &Vet) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "INSERT INTO vet (id, name) VALUES ($1, $2)",
        &[&vet.id, &vet.name],
    )
    .await?;
    for specialty in &vet.specialties {
        tx.execute(
            "INSERT INTO vet_specialties (id, vet_id, specialty_id) VALUES ($1, $2, $3)",
            &[&Uuid::new_v4(), &vet.id, &specialty.name],
        )
        .await?;
    }
    Ok(())
}

async fn pet_by_name(
    tx: &Transaction<'_>,
    name: &str,
) -> Result<Option<Pet>, tokio_postgres::Error> {
    let row = tx
        .query_opt(
            "SELECT id, name, birth_date, owner_id FROM pet WHERE name = $1",
            &[&name],
        )
        .await?;
    Ok(row.as_ref().map(Pet::from_row))
}

async fn owner_by_id(
    tx: &Transaction<'_>,
    id: Uuid,
) -> Result<Option<Owner>, tokio_postgres::Error> {
    let row = tx
        .query_opt(
            "SELECT id, name, city, telephone FROM owner WHERE id = $1",
            &[&id],
        )
        .await?;
    Ok(row.as_ref().map(Owner::from_row))
}

/// Each vet with its specialties, through the join table, ordered by specialty name.
async fn vets_with_specialties(tx: &Transaction<'_>) -> Result<Vec<Vet>, tokio_postgres::Error> {
    let rows = tx
        .query(
            "SELECT v.id, v.name, s.name AS specialty
               FROM vet v
               LEFT JOIN vet_specialties vs ON vs.vet_id = v.id
               LEFT JOIN specialty s ON s.name = vs.specialty_id
              ORDER BY v.name, s.name",
            &[],
        )
        .await?;
    let mut vets: Vec<Vet> = Vec::new();
    for row in rows {
        let id: Uuid = row.get("id");
        if vets.last().is_none_or(|vet| vet.id != id) {
            vets.push(Vet {
                id,
                name: row.get("name"),
                specialties: Vec::new(),
            });
        }
        if let Some(name) = row.get::<_, Option<String>>("specialty") {
            vets.last_mut()
                .expect("pushed above")
                .specialties
                .push(Specialty { name });
        }
    }
    Ok(vets)
}

// ---- The flow ---------------------------------------------------------------------------------

/// A failed check: what was expected and what was found.
#[derive(Debug)]
struct CheckFailed(String);

impl std::fmt::Display for CheckFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "check failed: {}", self.0)
    }
}

impl StdError for CheckFailed {}

fn check(condition: bool, what: impl Into<String>) -> Result<(), BoxError> {
    if condition {
        Ok(())
    } else {
        Err(Box::new(CheckFailed(what.into())))
    }
}

fn date(year: i32, month: Month, day: u8) -> Date {
    Date::from_calendar_date(year, month, day).expect("a valid calendar date")
}

async fn run_clinic(pool: &Pool, summary: &mut Vec<String>) -> Result<(), BoxError> {
    let policy = RetryPolicy::default();

    // 1. Owners.
    let john = Owner::new("John Doe", "Anytown", None);
    let mary = Owner::new("Mary Major", "Anytown", Some("555-555-0123"));
    retry_postgres_transaction_on(&mut pool.get().await?, &policy, async |tx| {
        insert_owner(tx, &john).await?;
        insert_owner(tx, &mary).await
    })
    .await?;
    summary.push("inserted owners John Doe and Mary Major".into());

    // 2. Pets, both John's.
    let pet1 = Pet::new("Pet1", date(2006, Month::October, 25), &john);
    let pet2 = Pet::new("Pet2", date(2021, Month::July, 23), &john);
    retry_postgres_transaction_on(&mut pool.get().await?, &policy, async |tx| {
        insert_pet(tx, &pet1).await?;
        insert_pet(tx, &pet2).await
    })
    .await?;
    summary.push("inserted pets Pet1 and Pet2".into());

    // 3. Read Pet1 and its owner back.
    let (found_pet, found_owner) =
        retry_postgres_transaction_on(&mut pool.get().await?, &policy, async |tx| {
            let pet = pet_by_name(tx, "Pet1").await?;
            let owner = match pet.as_ref().and_then(|p| p.owner_id) {
                Some(id) => owner_by_id(tx, id).await?,
                None => None,
            };
            Ok::<_, tokio_postgres::Error>((pet, owner))
        })
        .await?;
    check(
        found_pet.as_ref() == Some(&pet1),
        format!("Pet1 read back as {found_pet:?}"),
    )?;
    check(
        found_owner.as_ref().map(|o| o.name.as_str()) == Some("John Doe"),
        format!("Pet1's owner read back as {found_owner:?}"),
    )?;
    summary.push("read Pet1 back, owned by John Doe".into());

    // 4. Specialties and vets, linked through the join table.
    let specialties: Vec<Specialty> = ["Exotic", "Dogs", "Cats"]
        .into_iter()
        .map(|name| Specialty { name: name.into() })
        .collect();
    let akua = Vet {
        id: Uuid::new_v4(),
        name: "Akua Mansa".into(),
        specialties: vec![specialties[0].clone()],
    };
    let carlos = Vet {
        id: Uuid::new_v4(),
        name: "Carlos Salazar".into(),
        specialties: vec![specialties[2].clone(), specialties[1].clone()],
    };
    retry_postgres_transaction_on(&mut pool.get().await?, &policy, async |tx| {
        for specialty in &specialties {
            tx.execute(
                "INSERT INTO specialty (name) VALUES ($1)",
                &[&specialty.name],
            )
            .await?;
        }
        insert_vet(tx, &akua).await?;
        insert_vet(tx, &carlos).await
    })
    .await?;
    summary
        .push("inserted specialties Exotic, Dogs, Cats and vets Akua Mansa, Carlos Salazar".into());

    // 5. Each vet with its specialties.
    let vets = retry_postgres_transaction_on(&mut pool.get().await?, &policy, async |tx| {
        vets_with_specialties(tx).await
    })
    .await?;
    fn names(vet: &Vet) -> Vec<&str> {
        vet.specialties.iter().map(|s| s.name.as_str()).collect()
    }
    check(
        vets.len() == 2,
        format!("expected 2 vets, found {}", vets.len()),
    )?;
    check(
        vets[0].name == "Akua Mansa" && names(&vets[0]) == ["Exotic"],
        format!("first vet {:?}", vets[0]),
    )?;
    check(
        vets[1].name == "Carlos Salazar" && names(&vets[1]) == ["Cats", "Dogs"],
        format!("second vet {:?}", vets[1]),
    )?;
    summary.push("Akua Mansa: Exotic; Carlos Salazar: Cats, Dogs".into());
    Ok(())
}

/// The sample's retry part: DDL outside and inside OCC retry, and an expected failure.
async fn run_retry_demo(pool: &Pool, summary: &mut Vec<String>) -> Result<(), BoxError> {
    let conn = pool.get().await?;
    conn.batch_execute("CREATE TABLE IF NOT EXISTS abc (id uuid PRIMARY KEY)")
        .await?;
    conn.batch_execute("DROP TABLE IF EXISTS abc").await?;
    match conn.batch_execute("DROP TABLE abc").await {
        Err(error) => summary.push(format!(
            "DROP TABLE abc failed as expected: {}",
            error
                .as_db_error()
                .map_or_else(|| error.to_string(), |db| db.message().to_owned())
        )),
        Ok(()) => check(
            false,
            "DROP TABLE abc should fail: the table was dropped just before",
        )?,
    }
    drop(conn);

    let policy = RetryPolicy::default();
    for statement in [
        "CREATE TABLE IF NOT EXISTS abc (id uuid PRIMARY KEY)",
        "DROP TABLE IF EXISTS abc",
    ] {
        retry_postgres_transaction_on(&mut pool.get().await?, &policy, async |tx| {
            tx.batch_execute(statement).await
        })
        .await?;
    }
    summary.push("created and dropped abc under OCC retry".into());
    Ok(())
}

async fn main_inner(summary: &mut Vec<String>) -> Result<(), BoxError> {
    // Where to run: a real cluster from the environment, or the embedded emulator (one
    // endpoint, or a multi-Region pair).
    let pair = std::env::args().any(|a| a == "--pair")
        || std::env::var("DSQL_EMULATOR_PAIR").is_ok_and(|v| v == "1");
    let (config, emulators) = if std::env::var_os("CLUSTER_ENDPOINT").is_some() {
        (DsqlConfig::from_env()?, Vec::new())
    } else if pair {
        let (first, second) = DsqlEmulator::start_pair().await?;
        println!(
            "CLUSTER_ENDPOINT is not set: running on an emulated multi-Region pair: {} ({}, \
             preferred) and {} ({})",
            first.endpoint(),
            first.region(),
            second.endpoint(),
            second.region()
        );
        let config = first
            .config_with_peer(&second, "admin")
            .connect_timeout(std::time::Duration::from_secs(2))
            .build()?;
        (config, vec![first, second])
    } else {
        let emulator = DsqlEmulator::start().await?;
        println!(
            "CLUSTER_ENDPOINT is not set: running on the embedded DSQL emulator at {} ({})",
            emulator.address(),
            emulator.endpoint()
        );
        (emulator.config_for("admin").build()?, vec![emulator])
    };
    // As admin, the public schema; any other role, the sample's `myschema`.
    let config = if config.user() == "admin" {
        config
    } else {
        config.into_builder().search_path("myschema").build()?
    };
    let endpoints: Vec<String> = config
        .endpoints()
        .iter()
        .map(|e| e.host().to_owned())
        .collect();
    summary.push(format!(
        "connected to {} as {}",
        endpoints.join(" (preferred), then "),
        config.user()
    ));

    let connector = DsqlConnector::new(config).await?;
    let pool = connector.pool_with(|builder| builder.max_size(4)).await?;
    create_schema(&pool, &connector).await?;
    summary.push("created tables owner, pet, specialty, vet, vet_specialties".into());
    run_clinic(&pool, summary).await?;
    run_retry_demo(&pool, summary).await?;
    if let [preferred, _peer] = emulators.as_slice() {
        run_failover_demo(&pool, &connector, preferred, summary).await?;
    }
    Ok(())
}

/// On the emulated pair: the preferred endpoint goes down (a Region outage) and the pool
/// carries on through the peer, which sees the same rows; then it comes back. The pooled
/// connections were cut with the endpoint: the first attempt may meet one before the pool knows,
/// and `DsqlPool::retry_transaction` runs it again on a fresh connection (nothing had been
/// committed).
async fn run_failover_demo(
    pool: &DsqlPool,
    connector: &DsqlConnector,
    preferred: &DsqlEmulator,
    summary: &mut Vec<String>,
) -> Result<(), BoxError> {
    preferred.set_down(true);
    let (owners, endpoint, region) = pool
        .retry_transaction(&RetryPolicy::default(), |tx| async move {
            let owners: i64 = tx
                .query_one("SELECT count(*) FROM owner", &[])
                .await?
                .get(0);
            Ok::<_, tokio_postgres_dsql::Error>((
                owners,
                tx.endpoint().to_owned(),
                tx.region().to_owned(),
            ))
        })
        .await?;
    if endpoint == preferred.endpoint() || owners != 2 {
        return Err(format!(
            "failover: expected the peer and 2 owners, got {endpoint} and {owners}"
        )
        .into());
    }
    summary.push(format!(
        "failover: with {} down, the pool served from {endpoint} ({region}), which sees the same \
         {owners} owners; new connections go to {}",
        preferred.endpoint(),
        connector.serving_endpoint()
    ));
    preferred.set_down(false);
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
            println!("pet clinic: all checks passed");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("pet clinic failed: {error}");
            let mut source = error.source();
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            ExitCode::FAILURE
        }
    }
}
