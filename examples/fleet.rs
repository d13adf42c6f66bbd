//! A fleet in one process: many connectors and pools (one per simulated pod) over an emulated
//! multi-Region pair with DSQL's admission limits, under a steady transaction load, through a
//! one-second outage of the preferred endpoint and its recovery, and then the same with half of
//! the new connections to the recovered endpoint dropped for three seconds (a lossy link;
//! which ones follows a seed).
//!
//! ```text
//! cargo run --release --example fleet                  # 100 pools x 10 connections, both scenarios
//! cargo run --release --example fleet -- --pools 200 --per-pool 5 --json
//! ```
//!
//! Options (defaults in brackets): `--pools N` [100], `--per-pool N` connections each [10],
//! `--rate R` and `--burst B`, the emulator's new-connection limit per endpoint [100/s, 250: a
//! fleet four times the burst, as 4 000 connections are against DSQL's 1 000],
//! `--no-client-limit` (no per-pod `connect_rate_limit`; by default each pod gets
//! `rate / pools` a second with a burst of `burst / pools`, the refusals guide's sizing rule),
//! `--failback-window SECS` [20], `--think MS` between a worker's transactions [500],
//! `--connect-timeout SECS` per attempt [1],
//! `--scenario outage|lossy|both` [both], `--seed N` choosing the lossy link's drops [29],
//! `--json` (one JSON object per scenario on stdout).
//! `FLEET_LOG=1` logs the connectors' warnings (endpoints marked down, ...) on stderr.
//!
//! What it reports, per scenario: peak new connections a second per endpoint (logins the
//! emulator accepted, over any one-second window) and `53400 rate exceeded` refusals; how many
//! times each pod's connector marked each endpoint down and up, and the shortest time one stayed
//! down; time to fail over (cut to each pod's first commit on the peer) and to fail back (the
//! endpoint's recovery to each pod seeing it up, and to the peer holding under 5 % of the
//! fleet's connections); business transactions committed and failed, the failures in flight at
//! the cut, unknown outcomes and whether they committed, and any transaction committed twice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres_dsql::emulator::{DsqlEmulator, Rejection};
use tokio_postgres_dsql::{
    DsqlConnectionManager, DsqlConnector, DsqlPool, Error, FailoverPolicy, RetryPolicy,
};

/// How long the lossy scenario's endpoint drops half of its new connections after the outage.
const LOSS: Duration = Duration::from_secs(3);

/// The command line.
#[derive(Debug, Clone)]
struct Args {
    pools: usize,
    per_pool: u32,
    rate: f64,
    burst: u32,
    client_limit: bool,
    failback_window: Duration,
    think: Duration,
    connect_timeout: Duration,
    scenarios: Vec<Scenario>,
    seed: u64,
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    /// The preferred endpoint is down for a second, then up.
    Outage,
    /// The same, then it drops half of its new connections for [`LOSS`] (which ones: the seed),
    /// then none. The loss is shorter than the failover policy's minimum down time (5 s), so a
    /// pod marks the endpoint down at most once (during the outage or the loss) and up at most
    /// once (after both): a property of the policy, tested on its state machine.
    Lossy,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Outage => "outage",
            Scenario::Lossy => "lossy",
        }
    }
}

impl Args {
    fn parse() -> Result<Args, String> {
        let mut args = Args {
            pools: 100,
            per_pool: 10,
            rate: 100.0,
            burst: 250,
            client_limit: true,
            failback_window: Duration::from_secs(20),
            think: Duration::from_millis(500),
            connect_timeout: Duration::from_secs(1),
            scenarios: vec![Scenario::Outage, Scenario::Lossy],
            seed: 29,
            json: false,
        };
        let mut words = std::env::args().skip(1);
        while let Some(word) = words.next() {
            let mut value =
                |name: &str| words.next().ok_or_else(|| format!("{name} needs a value"));
            let number = |name: &str, text: String| {
                text.parse::<f64>()
                    .ok()
                    .filter(|n| n.is_finite() && *n > 0.0)
                    .ok_or_else(|| format!("{name}: `{text}` is not a positive number"))
            };
            match word.as_str() {
                "--pools" => args.pools = number("--pools", value("--pools")?)? as usize,
                "--per-pool" => args.per_pool = number("--per-pool", value("--per-pool")?)? as u32,
                "--rate" => args.rate = number("--rate", value("--rate")?)?,
                "--burst" => args.burst = number("--burst", value("--burst")?)? as u32,
                "--no-client-limit" => args.client_limit = false,
                "--failback-window" => {
                    let secs = number("--failback-window", value("--failback-window")?)?;
                    args.failback_window = Duration::from_secs_f64(secs.min(3600.0));
                }
                "--connect-timeout" => {
                    let secs = number("--connect-timeout", value("--connect-timeout")?)?;
                    args.connect_timeout = Duration::from_secs_f64(secs.min(60.0));
                }
                "--think" => {
                    let ms = number("--think", value("--think")?)?;
                    args.think = Duration::from_secs_f64(ms.min(60_000.0) / 1000.0);
                }
                "--scenario" => {
                    args.scenarios = match value("--scenario")?.as_str() {
                        "outage" => vec![Scenario::Outage],
                        "lossy" => vec![Scenario::Lossy],
                        "both" => vec![Scenario::Outage, Scenario::Lossy],
                        other => {
                            return Err(format!("--scenario: `{other}`: outage, lossy or both"));
                        }
                    }
                }
                "--json" => args.json = true,
                "--seed" => {
                    let text = value("--seed")?;
                    args.seed = text
                        .parse()
                        .map_err(|_| format!("--seed: `{text}` is not a whole number"))?;
                }
                other => return Err(format!("unknown option `{other}` (see the file's docs)")),
            }
        }
        if args.pools == 0 || args.per_pool == 0 || args.burst == 0 {
            return Err("--pools, --per-pool and --burst must be at least 1".into());
        }
        Ok(args)
    }
}

/// One pod: its connector and pool.
struct Pod {
    connector: DsqlConnector,
    pool: DsqlPool,
}

/// How one business transaction ended.
#[derive(Debug, Clone)]
struct Outcome {
    id: String,
    pod: usize,
    started: Duration,
    finished: Duration,
    /// `Ok(endpoint)`, or the error's kind.
    result: Result<String, &'static str>,
}

/// One sample of the emulators' counters.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Duration,
    accepted: [u64; 2],
    rate_exceeded: [u64; 2],
    /// New connections closed at once (the lossy link's drops).
    dropped: [u64; 2],
    open: [usize; 2],
}

/// A connector's view of one endpoint changing: when, and to up or down.
#[derive(Debug, Clone, Copy)]
struct Change {
    at: Duration,
    up: bool,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("FLEET_LOG").is_some() {
        // The connectors' warnings (endpoints marked down, failed connects) on stderr.
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_max_level(tracing::Level::WARN)
            .init();
    }
    let args = match Args::parse() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("fleet: {message}");
            std::process::exit(2);
        }
    };
    let (east1, east2) = DsqlEmulator::start_pair().await?;
    let emulators = [&east1, &east2];
    for e in emulators {
        // Room for the whole fleet at once while it starts; DSQL's limits apply from the first
        // scenario on.
        e.set_connection_rate_limit(100_000.0, 100_000)?;
    }
    let setup = DsqlConnector::new(
        east1
            .config_for("admin")
            .connect_deadline(Duration::from_secs(120))
            .build()?,
    )
    .await?;
    let client = setup.connect().await?;
    client
        .batch_execute("DROP TABLE IF EXISTS fleet_ledger")
        .await?;
    client
        .batch_execute(
            "CREATE TABLE fleet_ledger (id text PRIMARY KEY, pod int NOT NULL, endpoint text NOT NULL)",
        )
        .await?;

    let started = Instant::now();
    let mut pods = Vec::with_capacity(args.pools);
    for _ in 0..args.pools {
        let mut config = east1
            .config_with_peer(&east2, "admin")
            .connect_timeout(args.connect_timeout)
            .connect_deadline(Duration::from_secs(30))
            .failover(FailoverPolicy::default().failback_window(args.failback_window));
        if args.client_limit {
            let share = (args.burst as usize / args.pools).max(1) as u32;
            config = config.connect_rate_limit(args.rate / args.pools as f64, share);
        }
        let connector = DsqlConnector::new(config.build()?).await?;
        // Built without waiting for its connections: the pods fill at once, each at its
        // client-side rate.
        let manager = DsqlConnectionManager::new(connector.clone());
        let pool = connector
            .pool_builder()
            .max_size(args.per_pool)
            .min_idle(Some(args.per_pool))
            .connection_timeout(Duration::from_secs(10))
            .build_unchecked(manager.clone());
        let pool = DsqlPool::new(pool, &manager);
        pods.push(Pod { connector, pool });
    }
    let fleet = (args.pools * args.per_pool as usize) as u64;
    wait_until(Duration::from_secs(300), || {
        pods.iter()
            .map(|p| u64::from(p.pool.state().connections))
            .sum::<u64>()
            >= fleet
    })
    .await;
    if !args.json {
        println!(
            "fleet: {} pools x {} connections = {fleet} open on {} after {:.1} s; emulator \
             limit {}/s, burst {} per endpoint; per-pod client limit: {}",
            args.pools,
            args.per_pool,
            east1.endpoint(),
            started.elapsed().as_secs_f64(),
            args.rate,
            args.burst,
            if args.client_limit {
                format!(
                    "{:.2}/s, burst {}",
                    args.rate / args.pools as f64,
                    (args.burst as usize / args.pools).max(1)
                )
            } else {
                "none".to_owned()
            },
        );
    }
    for e in emulators {
        e.set_connection_rate_limit(args.rate, args.burst)?;
    }
    let pods = Arc::new(pods);
    for scenario in args.scenarios.clone() {
        let report = run(scenario, &args, &pods, emulators, &setup).await?;
        if args.json {
            println!("{report}");
        } else {
            print_report(&report);
        }
    }
    Ok(())
}

/// Polls `done` every 50 ms until it holds or `bound` passes.
async fn wait_until(bound: Duration, mut done: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + bound;
    while Instant::now() < until {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done()
}

/// Runs one scenario and returns its report.
async fn run(
    scenario: Scenario,
    args: &Args,
    pods: &Arc<Vec<Pod>>,
    [preferred, peer]: [&DsqlEmulator; 2],
    setup: &DsqlConnector,
) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = Arc::new(Mutex::new(Vec::<Outcome>::new()));
    let endpoints = [preferred.endpoint().to_owned(), peer.endpoint().to_owned()];

    // The load: one worker per pod, a transaction every `think`.
    let mut workers = tokio::task::JoinSet::new();
    for index in 0..pods.len() {
        let (pods, stop, outcomes) = (pods.clone(), stop.clone(), outcomes.clone());
        let think = args.think;
        let name = scenario.name();
        workers.spawn(async move {
            let policy = RetryPolicy::default()
                .with_max_attempts(10)
                .delays(Duration::from_millis(10), Duration::from_millis(500))
                .with_attempt_timeout(Duration::from_secs(2));
            let pool = &pods[index].pool;
            // Pods start out of step, as a fleet does.
            tokio::time::sleep(think.mul_f64(fastrand::f64())).await;
            let mut seq = 0u64;
            while !stop.load(Ordering::SeqCst) {
                seq += 1;
                let id = format!("{name}-{index}-{seq}");
                let started = t0.elapsed();
                let id_ref = id.as_str();
                let result = pool
                    .retry_transaction(&policy, |tx| async move {
                        let endpoint = tx.endpoint().to_owned();
                        tx.execute(
                            "INSERT INTO fleet_ledger (id, pod, endpoint) VALUES ($1, $2, $3)",
                            &[&id_ref, &(index as i32), &endpoint],
                        )
                        .await?;
                        Ok::<_, Error>(endpoint)
                    })
                    .await
                    .map_err(|e| kind(&e));
                outcomes.lock().unwrap().push(Outcome {
                    id,
                    pod: index,
                    started,
                    finished: t0.elapsed(),
                    result,
                });
                tokio::time::sleep(think).await;
            }
        });
    }

    // The monitor: the emulators' counters and each connector's view of the endpoints.
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let changes = Arc::new(Mutex::new(vec![
        [Vec::<Change>::new(), Vec::new()];
        pods.len()
    ]));
    let monitoring = Arc::new(AtomicBool::new(true));
    let monitor = {
        let (samples, changes, monitoring) = (samples.clone(), changes.clone(), monitoring.clone());
        let emulators = [preferred, peer];
        async move {
            let mut last_up = vec![[true, true]; pods.len()];
            while monitoring.load(Ordering::SeqCst) {
                let at = t0.elapsed();
                let stats = [emulators[0].stats(), emulators[1].stats()];
                samples.lock().unwrap().push(Sample {
                    at,
                    accepted: [stats[0].accepted, stats[1].accepted],
                    rate_exceeded: [
                        stats[0].rejected(Rejection::RateExceeded),
                        stats[1].rejected(Rejection::RateExceeded),
                    ],
                    dropped: [
                        stats[0].rejected(Rejection::Refused),
                        stats[1].rejected(Rejection::Refused),
                    ],
                    open: [
                        emulators[0].open_connections(),
                        emulators[1].open_connections(),
                    ],
                });
                {
                    let mut changes = changes.lock().unwrap();
                    for (index, pod) in pods.iter().enumerate() {
                        for (side, health) in pod.connector.endpoint_health().iter().enumerate() {
                            if health.up != last_up[index][side] {
                                last_up[index][side] = health.up;
                                // The connector's own time of the change, not the poll's.
                                let at = health
                                    .changed_at
                                    .map(|at| at.saturating_duration_since(t0.into_std()))
                                    .unwrap_or_else(|| t0.elapsed());
                                changes[index][side].push(Change { at, up: health.up });
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };

    // Steady load, then the cut; the monitor runs beside it.
    let drive = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let cut = t0.elapsed();
        preferred.set_down(true);
        tokio::time::sleep(Duration::from_secs(1)).await;
        preferred.set_down(false);
        // New TCP connections to the preferred endpoint during the loss, and how many of them
        // it dropped.
        let mut loss = (0, 0);
        if scenario == Scenario::Lossy {
            let before = preferred.stats();
            preferred.drop_new_connections(0.5, args.seed);
            tokio::time::sleep(LOSS).await;
            preferred.drop_new_connections(0.0, args.seed);
            let after = preferred.stats();
            loss = (
                after.connections - before.connections,
                after.rejected(Rejection::Refused) - before.rejected(Rejection::Refused),
            );
        }
        let recovered = t0.elapsed();
        let fleet = pods.len() * args.per_pool as usize;
        // Done when every pod sees the preferred endpoint up and the peer holds under 5 % of the
        // connections (bounded: the run reports when it did not get there).
        let bound = args.failback_window * 3 + Duration::from_secs(60);
        let settled = wait_until(bound, || {
            pods.iter()
                .all(|p| p.connector.endpoint_health().iter().all(|e| e.up))
                && peer.open_connections() * 20 < fleet
        })
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.store(true, Ordering::SeqCst);
        while let Some(joined) = workers.join_next().await {
            joined?;
        }
        monitoring.store(false, Ordering::SeqCst);
        Ok::<_, Box<dyn std::error::Error>>((cut, recovered, settled, loss))
    };
    let (driven, ()) = tokio::join!(drive, monitor);
    let (cut, recovered, settled, loss) = driven?;

    // The ledger: what committed, and how often.
    let check = setup.connect().await?;
    let prefix = format!("{}-%", scenario.name());
    let rows = check
        .query(
            "SELECT id, count(*) FROM fleet_ledger WHERE id LIKE $1 GROUP BY id",
            &[&prefix],
        )
        .await?;
    let applied: HashMap<String, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();

    let outcomes = outcomes.lock().unwrap().clone();
    let samples = samples.lock().unwrap().clone();
    let changes = changes.lock().unwrap().clone();
    Ok(report(
        scenario,
        args,
        &endpoints,
        Times {
            cut,
            recovered,
            settled,
            loss,
        },
        &outcomes,
        &applied,
        &samples,
        &changes,
    ))
}

/// A short name for how a transaction failed.
fn kind(error: &Error) -> &'static str {
    match error {
        Error::CommitOutcomeUnknown { .. } => "outcome_unknown",
        Error::AttemptTimeout { .. } => "attempt_timeout",
        Error::PoolTimeout => "pool_timeout",
        Error::Query { .. } => "query",
        Error::Unavailable { .. } => "unavailable",
        Error::ConnectTimeout { .. } => "connect_timeout",
        _ => "other",
    }
}

struct Times {
    cut: Duration,
    recovered: Duration,
    settled: bool,
    /// The lossy scenario's loss: new connections to the preferred endpoint, and dropped.
    loss: (u64, u64),
}

fn percentile(values: &mut [f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let at = ((values.len() - 1) as f64 * p).round() as usize;
    Some(values[at])
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

#[allow(clippy::too_many_arguments)]
fn report(
    scenario: Scenario,
    args: &Args,
    endpoints: &[String; 2],
    times: Times,
    outcomes: &[Outcome],
    applied: &HashMap<String, i64>,
    samples: &[Sample],
    changes: &[[Vec<Change>; 2]],
) -> serde_json::Value {
    use serde_json::json;
    // Peak logins a second per endpoint, over any one-second window of the samples.
    let mut peak = [0u64; 2];
    for (i, sample) in samples.iter().enumerate() {
        let later = samples[i..]
            .iter()
            .take_while(|s| s.at <= sample.at + Duration::from_secs(1))
            .last()
            .unwrap_or(sample);
        for (side, peak) in peak.iter_mut().enumerate() {
            *peak = (*peak).max(later.accepted[side] - sample.accepted[side]);
        }
    }
    let (first, last) = (samples.first(), samples.last());
    let delta = |f: fn(&Sample) -> [u64; 2], side: usize| match (first, last) {
        (Some(a), Some(b)) => f(b)[side] - f(a)[side],
        _ => 0,
    };
    // Health changes seen by the pods' connectors.
    let mut per_endpoint = Vec::new();
    for side in 0..2 {
        let downs: Vec<usize> = changes
            .iter()
            .map(|c| c[side].iter().filter(|c| !c.up).count())
            .collect();
        let ups: Vec<usize> = changes
            .iter()
            .map(|c| c[side].iter().filter(|c| c.up).count())
            .collect();
        let mut shortest_down: Option<Duration> = None;
        let mut up_after: Vec<f64> = Vec::new();
        for pod in changes {
            let list = &pod[side];
            for pair in list.windows(2) {
                if !pair[0].up && pair[1].up {
                    let down_for = pair[1].at - pair[0].at;
                    shortest_down = Some(shortest_down.map_or(down_for, |s| s.min(down_for)));
                }
            }
            if let Some(up) = list.iter().find(|c| c.up && c.at >= times.recovered) {
                up_after.push((up.at - times.recovered).as_secs_f64());
            }
        }
        per_endpoint.push(json!({
            "endpoint": endpoints[side],
            "peak_logins_per_second": peak[side],
            "logins": delta(|s| s.accepted, side),
            "rate_exceeded_refusals": delta(|s| s.rate_exceeded, side),
            "dropped_new_connections": delta(|s| s.dropped, side),
            "pods_that_marked_it_down": downs.iter().filter(|n| **n > 0).count(),
            "downs_per_pod_max": downs.iter().max().copied().unwrap_or(0),
            "ups_per_pod_max": ups.iter().max().copied().unwrap_or(0),
            "downs_total": downs.iter().sum::<usize>(),
            "ups_total": ups.iter().sum::<usize>(),
            "shortest_down_s": shortest_down.map(secs),
            "up_after_recovery_s_median": percentile(&mut up_after.clone(), 0.5),
            "up_after_recovery_s_max": percentile(&mut up_after, 1.0),
        }));
    }
    // Failover: each pod's first commit on the peer after the cut.
    let mut to_peer: Vec<f64> = (0..changes.len())
        .filter_map(|pod| {
            outcomes
                .iter()
                .filter(|o| o.pod == pod && o.started >= times.cut)
                .filter(|o| o.result.as_deref() == Ok(endpoints[1].as_str()))
                .map(|o| (o.finished - times.cut).as_secs_f64())
                .reduce(f64::min)
        })
        .collect();
    // Failback: the peer under 5 % of the fleet's connections again.
    let fleet = (args.pools * args.per_pool as usize).max(1);
    // From the last time the peer held 5 % or more of them: it stayed under from then on.
    let drained = samples
        .iter()
        .rposition(|s| s.open[1] * 20 >= fleet)
        .and_then(|last| samples.get(last + 1))
        .filter(|s| s.at >= times.recovered)
        .map(|s| secs(s.at - times.recovered));
    // Transactions.
    let committed = outcomes.iter().filter(|o| o.result.is_ok()).count();
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.result.is_err()).collect();
    let mut failures: HashMap<&str, usize> = HashMap::new();
    for outcome in &failed {
        *failures
            .entry(outcome.result.as_ref().unwrap_err())
            .or_default() += 1;
    }
    let in_flight_at_cut = outcomes
        .iter()
        .filter(|o| o.started <= times.cut && o.finished >= times.cut)
        .count();
    // The cut reaches every session within moments, not at one instant: a transaction begun
    // just after `times.cut` on a connection about to go is cut too. Within a second of it.
    let around_the_cut =
        |o: &&Outcome| o.started <= times.cut + Duration::from_secs(1) && o.finished >= times.cut;
    let in_flight_around_the_cut = outcomes.iter().filter(around_the_cut).count();
    let failed_in_flight = failed.iter().copied().filter(around_the_cut).count();
    let unknown_committed = failed
        .iter()
        .filter(|o| o.result == Err("outcome_unknown") && applied.contains_key(&o.id))
        .count();
    let lost_commits = outcomes
        .iter()
        .filter(|o| o.result.is_ok() && !applied.contains_key(&o.id))
        .count();
    let failed_but_applied = failed
        .iter()
        .filter(|o| o.result != Err("outcome_unknown") && applied.contains_key(&o.id))
        .count();
    let committed_twice = applied.values().filter(|n| **n > 1).count();
    json!({
        "scenario": scenario.name(),
        "seed": args.seed,
        "pools": args.pools,
        "connections_per_pool": args.per_pool,
        "emulator_limit": { "per_second": args.rate, "burst": args.burst },
        "client_limit": args.client_limit,
        "failback_window_s": secs(args.failback_window),
        "settled": times.settled,
        "loss": { "connections": times.loss.0, "dropped": times.loss.1 },
        "endpoints": per_endpoint,
        "failover_s_median": percentile(&mut to_peer.clone(), 0.5),
        "failover_s_max": percentile(&mut to_peer, 1.0),
        "pods_that_failed_over": changes.len().min(outcomes.iter().filter(|o| o.result.as_deref() == Ok(endpoints[1].as_str())).map(|o| o.pod).collect::<std::collections::HashSet<_>>().len()),
        "failback_drained_s": drained,
        "transactions": {
            "total": outcomes.len(),
            "committed": committed,
            "failed": failures,
            "in_flight_at_cut": in_flight_at_cut,
            "in_flight_around_the_cut": in_flight_around_the_cut,
            "failed_around_the_cut": failed_in_flight,
            "failed_later": failed.len() - failed_in_flight,
            "unknown_outcome_that_committed": unknown_committed,
            "reported_committed_but_missing": lost_commits,
            "reported_failed_but_committed": failed_but_applied,
            "committed_twice": committed_twice,
        },
    })
}

fn print_report(report: &serde_json::Value) {
    println!("\n== scenario: {} ==", report["scenario"]);
    for endpoint in report["endpoints"].as_array().into_iter().flatten() {
        println!(
            "{}: peak {} logins/s ({} in all), {} x 53400, {} new connections dropped; pods that \
             marked it down {}, per pod \
             at most {} down / {} up, shortest down {} s, up after recovery median {} s (max {} s)",
            endpoint["endpoint"],
            endpoint["peak_logins_per_second"],
            endpoint["logins"],
            endpoint["rate_exceeded_refusals"],
            endpoint["dropped_new_connections"],
            endpoint["pods_that_marked_it_down"],
            endpoint["downs_per_pod_max"],
            endpoint["ups_per_pod_max"],
            endpoint["shortest_down_s"],
            endpoint["up_after_recovery_s_median"],
            endpoint["up_after_recovery_s_max"],
        );
    }
    println!(
        "failover: first commit on the peer after the cut, median {} s, max {} s; failback: \
         the peer under 5 % of connections {} s after recovery (settled: {})",
        report["failover_s_median"],
        report["failover_s_max"],
        report["failback_drained_s"],
        report["settled"],
    );
    println!("transactions: {}", report["transactions"]);
}
