//! The cost of `DsqlConnector::connect()` through the emulator: direct TLS against SSLRequest,
//! `admin` against a custom role with `search_path`, with no added latency and with 20 ms each
//! way. With latency, each case also prints its time in round trips (time / RTT, RTT = 40 ms),
//! which is what a real network makes of it.

mod support;

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tokio_postgres_dsql::{DsqlConnector, SslNegotiation};

const ONE_WAY: Duration = Duration::from_millis(20);

fn connect(c: &mut Criterion) {
    let rt = support::runtime();
    let emulator = support::emulator(&rt);
    let cases: Vec<(String, DsqlConnector)> = rt.block_on(async {
        let mut cases = Vec::new();
        for (negotiation, label) in [
            (SslNegotiation::Direct, "direct"),
            (SslNegotiation::Postgres, "ssl_request"),
        ] {
            cases.push((
                format!("{label}/admin"),
                support::connector(&emulator, "admin", |b| b.ssl_negotiation(negotiation)).await,
            ));
            cases.push((
                format!("{label}/custom_role_search_path"),
                support::connector(&emulator, support::APP_ROLE, |b| {
                    b.ssl_negotiation(negotiation)
                        .search_path(support::APP_SCHEMA)
                })
                .await,
            ));
        }
        cases
    });

    if !support::test_mode() {
        for (label, connector) in &cases {
            report_round_trips(&rt, &emulator, label, connector);
        }
        emulator.set_latency(Duration::ZERO);
    }

    let mut group = c.benchmark_group("connect");
    for latency in [Duration::ZERO, ONE_WAY] {
        emulator.set_latency(latency);
        if !latency.is_zero() {
            group
                .sample_size(10)
                .measurement_time(Duration::from_secs(4));
        }
        for (label, connector) in &cases {
            group.bench_with_input(
                BenchmarkId::new(label.as_str(), format!("{}ms", latency.as_millis())),
                connector,
                |b, connector| {
                    b.to_async(&rt).iter(|| async {
                        let client = connector.connect().await.unwrap();
                        drop(client);
                    })
                },
            );
        }
    }
    group.finish();
}

/// Times connects by hand without and with added latency, and prints the difference in round
/// trips. Local work (TLS crypto, the PostgreSQL backend start) is in both medians, so it
/// cancels out. The round trip is calibrated the same way, with `SELECT 1` on an open
/// connection (the added delay is 40 ms plus the timer's rounding).
fn report_round_trips(
    rt: &tokio::runtime::Runtime,
    emulator: &tokio_postgres_dsql::emulator::DsqlEmulator,
    label: &str,
    connector: &DsqlConnector,
) {
    let client = rt.block_on(connector.connect()).unwrap();
    let median = |latency: Duration, query: bool| {
        emulator.set_latency(latency);
        let mut times: Vec<Duration> = rt.block_on(async {
            let mut times = Vec::new();
            for _ in 0..9 {
                let start = Instant::now();
                if query {
                    client.simple_query("SELECT 1").await.unwrap();
                } else {
                    drop(connector.connect().await.unwrap());
                }
                times.push(start.elapsed());
            }
            times
        });
        times.sort();
        times[times.len() / 2]
    };
    let (base, slow) = (median(Duration::ZERO, false), median(ONE_WAY, false));
    let rtt = median(ONE_WAY, true) - median(Duration::ZERO, true);
    println!(
        "connect {label}: median {:.2} ms locally, {:.1} ms with {} ms each way \
         (measured RTT {:.1} ms): {:.2} round trips after TCP",
        base.as_secs_f64() * 1e3,
        slow.as_secs_f64() * 1e3,
        ONE_WAY.as_millis(),
        rtt.as_secs_f64() * 1e3,
        (slow - base).as_secs_f64() / rtt.as_secs_f64()
    );
}

criterion_group!(benches, connect);
criterion_main!(benches);
