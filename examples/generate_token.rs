//! Prints a DSQL auth token, like `aws dsql generate-db-connect[-admin]-auth-token`.
//!
//! ```sh
//! export CLUSTER_ENDPOINT=<id>.dsql.<region>.on.aws      # CLUSTER_USER defaults to admin
//! PGPASSWORD="$(cargo run -q --example generate_token)" \
//!   psql "host=$CLUSTER_ENDPOINT user=admin dbname=postgres sslmode=verify-full sslrootcert=system"
//! cargo run -q --example generate_token -- --user app --expires-in 3600
//! ```
//!
//! Options override the environment: `--user <role>`, `--region <region>`,
//! `--expires-in <seconds>` (default 900, at most 604800). The user picks the action: `admin`
//! signs `DbConnectAdmin`, any other role `DbConnect`.

use std::process::ExitCode;
use std::time::Duration;

use tokio_postgres_dsql::{DsqlConfig, DsqlConnector};

const USAGE: &str = "usage: generate_token [--user <role>] [--region <region>] [--expires-in <seconds>]\n\
                     needs CLUSTER_ENDPOINT (and AWS credentials) in the environment";

async fn run(args: Vec<String>) -> Result<String, Box<dyn std::error::Error>> {
    let mut builder = DsqlConfig::from_env()?.into_builder();
    let mut args = args.into_iter();
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        builder = match flag.as_str() {
            "--user" => builder.user(value()?),
            "--region" => builder.region(value()?),
            "--expires-in" => {
                let raw = value()?;
                let secs: u64 = raw
                    .parse()
                    .map_err(|_| format!("--expires-in: `{raw}` is not a number of seconds"))?;
                builder.token_duration(Duration::from_secs(secs))
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument `{other}`\n{USAGE}").into()),
        };
    }
    let connector = DsqlConnector::new(builder.build()?).await?;
    Ok(connector.token().await?.as_str().to_owned())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run(std::env::args().skip(1).collect()).await {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("generate_token: {error}");
            ExitCode::FAILURE
        }
    }
}
