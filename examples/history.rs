//! Soaks the emulator's commit-time conflicts with the randomized history checker that
//! `cargo test` runs on fixed seeds (`tests/dsql/history.rs`): random multi-session histories
//! through every protocol shape drivers send, then DSQL's contract checked over the whole
//! history (no lost or phantom increment, every failure a `40001`, no hang, every session
//! usable).
//!
//! ```text
//! cargo run --example history -- --seed 7 --transactions 20000 [--sessions 4] [--counters 4]
//!     [--relay thread|here]
//! ```
//!
//! `--relay here` relays on the example's own (multi-thread) runtime
//! (`DsqlEmulatorBuilder::relay_on`) instead of the emulator's thread.
//!
//! It starts its own emulator (PostgreSQL from the server binaries, `PG_BIN` as for the tests),
//! prints the report (the seed, outcomes by shape, the documented deviations counted apart)
//! and exits non-zero when an invariant broke; a failing report names the command that
//! replays it.

// The checker and its raw frontend are the integration tests' own files.
#[allow(dead_code)]
#[path = "../tests/dsql/frontend.rs"]
mod frontend;
#[allow(dead_code)]
#[path = "../tests/dsql/history.rs"]
mod history;

use tokio_postgres_dsql::emulator::DsqlEmulator;

const USAGE: &str = "usage: history [--seed N] [--transactions TOTAL] [--sessions N] [--counters N] [--relay thread|here]";

/// The checker's configuration, and whether to relay on this runtime (`--relay here`).
fn parse() -> Result<(history::Config, bool), String> {
    let mut config = history::Config::new(1, 4, 0);
    let mut relay_here = false;
    let mut total = 240;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--help" || flag == "-h" {
            return Err(USAGE.to_owned());
        }
        let value = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let number = |what: &str| -> Result<u64, String> {
            value
                .parse()
                .map_err(|_| format!("{what}: not a number: {value:?}\n{USAGE}"))
        };
        match flag.as_str() {
            "--seed" => config.seed = number("--seed")?,
            "--transactions" => total = number("--transactions")? as usize,
            "--sessions" => config.sessions = (number("--sessions")? as usize).max(2),
            "--counters" => config.counters = (number("--counters")? as u32).max(1),
            "--relay" => {
                relay_here = match value.as_str() {
                    "thread" => false,
                    "here" => true,
                    _ => return Err(format!("--relay: thread or here, not {value:?}\n{USAGE}")),
                }
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    config.transactions = total.div_ceil(config.sessions);
    Ok((config, relay_here))
}

#[tokio::main]
async fn main() {
    let (config, relay_here) = match parse() {
        Ok(config) => config,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    let mut builder = DsqlEmulator::builder();
    if relay_here {
        builder = builder.relay_on(tokio::runtime::Handle::current());
    }
    let emulator = match builder.start().await {
        Ok(emulator) => emulator,
        Err(error) => {
            eprintln!("the emulator did not start: {error}");
            std::process::exit(1);
        }
    };
    let started = std::time::Instant::now();
    let report = history::run(&emulator, &config).await;
    println!("{report}");
    println!(
        "{} sessions × {} transactions in {:.1} s",
        config.sessions,
        config.transactions,
        started.elapsed().as_secs_f64()
    );
    drop(emulator);
    if !report.ok() {
        std::process::exit(1);
    }
}
