//! The migration runner from the command line: `status`, `plan`, `up` or `repair` for a
//! folder of `<version>_<name>.sql` files.
//!
//! ```sh
//! cargo run --example migrate -- status          # the pet clinic's migrations, on the emulator
//! cargo run --example migrate -- up --dir db/migrations
//! cargo run --example migrate -- repair --dir db/migrations   # after a file failed part-way
//! CLUSTER_ENDPOINT=<id>.dsql.<region>.on.aws cargo run --example migrate -- up   # on DSQL
//! ```
//!
//! With `CLUSTER_ENDPOINT` set it connects with `DsqlConfig::from_env()`; otherwise it starts
//! the embedded emulator (a fresh one each time, so `up` there shows a first deploy: `plan`,
//! the run, then `status`). Every statement is checked for what DSQL refuses before anything
//! runs; each then runs in a transaction of its own, under a lease other runners wait for.

use std::process::ExitCode;

use tokio_postgres_dsql::emulator::DsqlEmulator;
use tokio_postgres_dsql::migrate::{MigrationState, Migrations, Migrator, Repaired, Status};
use tokio_postgres_dsql::{DsqlConfig, DsqlConnector};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const USAGE: &str = "usage: migrate status|plan|up|repair [--dir <folder>]";

fn print_status(status: &Status) {
    for m in &status.migrations {
        let state = match &m.state {
            MigrationState::Applied => "applied".to_owned(),
            MigrationState::Pending => "pending".to_owned(),
            MigrationState::Partial { applied, total } => {
                format!("interrupted after {applied} of {total} statements")
            }
            MigrationState::Changed => "CHANGED since it was applied".to_owned(),
            other => format!("{other:?}"),
        };
        println!("  {:>4}  {:<40} {state}", m.version, m.file);
    }
    for (version, name) in &status.unknown {
        println!("  {version:>4}  {name:<40} applied, but no file has it");
    }
}

async fn run() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(1);
    let command = args.next().ok_or(USAGE)?;
    let mut dir = format!(
        "{}/examples/migrations/pet_clinic",
        env!("CARGO_MANIFEST_DIR")
    );
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--dir" => dir = args.next().ok_or("--dir needs a folder")?,
            other => return Err(format!("unknown option `{other}`; {USAGE}").into()),
        }
    }
    let migrator = Migrator::new(Migrations::from_dir(&dir)?);
    // Fails here, naming file and line, before any connection.
    migrator.check()?;

    let mut _emulator = None;
    let config = if std::env::var_os("CLUSTER_ENDPOINT").is_some() {
        DsqlConfig::from_env()?
    } else {
        let emulator = DsqlEmulator::start().await?;
        println!(
            "CLUSTER_ENDPOINT is not set: on the embedded DSQL emulator ({})",
            emulator.endpoint()
        );
        let config = emulator.config_for("admin").build()?;
        _emulator = Some(emulator);
        config
    };
    let connector = DsqlConnector::new(config).await?;
    match command.as_str() {
        "status" => print_status(&migrator.status(&connector).await?),
        "plan" => {
            let plan = migrator.plan(&connector).await?;
            if plan.is_empty() {
                println!("nothing to apply");
            }
            for m in plan {
                println!(
                    "  {:>4}  {:<40} {} statements",
                    m.version, m.file, m.statements_to_run
                );
            }
        }
        "up" => {
            for m in migrator.plan(&connector).await? {
                println!(
                    "  {:>4}  {:<40} {} statements to run",
                    m.version, m.file, m.statements_to_run
                );
            }
            let report = migrator.run(&connector).await?;
            println!(
                "applied {:?}: {} statements, one transaction each{}",
                report.applied,
                report.statements_applied,
                if report.waited_for_lease {
                    " (after waiting for another runner)"
                } else {
                    ""
                }
            );
            print_status(&migrator.status(&connector).await?);
        }
        "repair" => {
            let repaired = migrator.repair(&connector).await?;
            if repaired.is_empty() {
                println!("nothing to repair: no file failed part-way");
            }
            for change in repaired {
                match change {
                    Repaired::Removed { version, file } => {
                        println!("  {version:>4}  {file:<40} record removed (nothing applied)")
                    }
                    Repaired::Accepted {
                        version,
                        file,
                        applied,
                        old_checksum,
                        new_checksum,
                        ..
                    } => println!(
                        "  {version:>4}  {file:<40} {applied} applied statements kept; \
                         checksum {} -> {}",
                        &old_checksum[..12.min(old_checksum.len())],
                        &new_checksum[..12.min(new_checksum.len())]
                    ),
                    _ => {}
                }
            }
            print_status(&migrator.status(&connector).await?);
        }
        _ => return Err(USAGE.into()),
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("migrate: {error}");
            let mut source = error.source();
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            ExitCode::FAILURE
        }
    }
}
