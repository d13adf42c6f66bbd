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
        for (negotiation, label) in [(SslNegotiation::Direct, "direct"), (SslNegotiation::Postgres, "ssl_request")] {
            cases.push((
                format!("{label}/admin"),
                support::connector(&emulator, "admin", |b| b.ssl_negotiation(negotiation)).await,
            ));
            cases.push((
                format!("{label}/custom_role_search_path"),
                support::connector(&emulator, support::APP_ROLE, |b| {
                    b.ssl_negotiation(negotiation).search_path(support::APP_SCHEMA)
                })
                .await,
            ));
        }
        cases
    });

    let mut group = c.benchmark_group("connect");
    for latency in [Duration::ZERO, ONE_WAY] {
        emulator.set_latency(latency);
        if !latency.is_zero() {
            group.sample_size(10).measurement_time(Duration::from_secs(4));
        }
        for (label, connector) in &cases {
            if !latency.is_zero() && !support::test_mode() {
                report_round_trips(&rt, label, connector, latency * 2);
            }
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

/// Times a few connects by hand and prints the median in round trips.
fn report_round_trips(rt: &tokio::runtime::Runtime, label: &str, connector: &DsqlConnector, rtt: Duration) {
    let mut times: Vec<Duration> = rt.block_on(async {
        let mut times = Vec::new();
        for _ in 0..9 {
            let start = Instant::now();
            drop(connector.connect().await.unwrap());
            times.push(start.elapsed());
        }
        times
    });
    times.sort();
    let median = times[times.len() / 2];
    println!(
        "connect {label}: median {:.1} ms with RTT {} ms = {:.2} round trips after TCP",
        median.as_secs_f64() * 1e3,
        rtt.as_millis(),
        median.as_secs_f64() / rtt.as_secs_f64()
    );
}

criterion_group!(benches, connect);
criterion_main!(benches);
