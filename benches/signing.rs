//! Token signing: `TokenSigner::sign` against `aws-sdk-dsql`'s `AuthTokenGenerator` (the
//! baseline, in the same run), and `DsqlConnector::token()` on a cache hit.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use aws_credential_types::Credentials;
use aws_sdk_dsql::auth_token::{AuthTokenGenerator, Config};
use aws_smithy_async::time::SystemTimeSource;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tokio_postgres_dsql::{Action, DsqlConfig, DsqlConnector, TokenSigner};

const HOST: &str = "abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws";

fn credentials() -> [(&'static str, Credentials); 2] {
    let session =
        "IQoJb3JpZ2luX2VjEJr//////////wEaCXVzLWVhc3QtMSJGMEQCIHxw+EXAMPLE/session+token=".repeat(6);
    [
        (
            "static_keys",
            Credentials::new(
                "AKIAIOSFODNN7EXAMPLE",
                "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                None,
                None,
                "bench",
            ),
        ),
        (
            "session_token",
            Credentials::new(
                "ASIAIOSFODNN7EXAMPLE",
                "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                Some(session),
                None,
                "bench",
            ),
        ),
    ]
}

fn fresh_token(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let signer = TokenSigner::new(HOST, "us-east-1");
    let mut group = c.benchmark_group("fresh_token");
    for (label, creds) in credentials() {
        group.bench_with_input(
            BenchmarkId::new("tokio-postgres-dsql", label),
            &creds,
            |b, creds| {
                b.iter(|| {
                    signer.sign(
                        black_box(creds),
                        Action::DbConnectAdmin,
                        Duration::from_secs(900),
                        black_box(SystemTime::now()),
                    )
                })
            },
        );
        let generator = AuthTokenGenerator::new(
            Config::builder()
                .hostname(HOST)
                .region(aws_config::Region::new("us-east-1"))
                .credentials(creds.clone())
                .expires_in(900)
                .build()
                .unwrap(),
        );
        let sdk_config = aws_config::SdkConfig::builder()
            .time_source(SystemTimeSource::new())
            .build();
        group.bench_with_input(BenchmarkId::new("aws-sdk-dsql", label), &(), |b, ()| {
            b.to_async(&rt).iter(|| async {
                generator
                    .db_connect_admin_auth_token(&sdk_config)
                    .await
                    .unwrap()
            })
        });
    }
    group.finish();
}

fn cached_token(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let connector = rt.block_on(async {
        let config = DsqlConfig::builder()
            .host(HOST)
            .credentials_provider(credentials()[0].1.clone())
            .build()
            .unwrap();
        DsqlConnector::new(config).await.unwrap()
    });
    let mut group = c.benchmark_group("cached_token");
    group.bench_function("one_thread", |b| {
        b.to_async(&rt)
            .iter(|| async { connector.token().await.unwrap() })
    });
    // Several threads at once (each with its own runtime), time per token across all of them.
    for threads in [2usize, 4] {
        group.bench_with_input(
            BenchmarkId::new("threads", threads),
            &threads,
            |b, &threads| {
                let connector = Arc::new(connector.clone());
                b.iter_custom(|iters| {
                    let per_thread = iters.div_ceil(threads as u64);
                    // Threads and runtimes are set up before the clock starts.
                    let ready = Arc::new(std::sync::Barrier::new(threads + 1));
                    let handles: Vec<_> = (0..threads)
                        .map(|_| {
                            let (connector, ready) = (connector.clone(), ready.clone());
                            std::thread::spawn(move || {
                                let rt = tokio::runtime::Builder::new_current_thread()
                                    .build()
                                    .unwrap();
                                ready.wait();
                                rt.block_on(async {
                                    for _ in 0..per_thread {
                                        black_box(connector.token().await.unwrap());
                                    }
                                })
                            })
                        })
                        .collect();
                    ready.wait();
                    let start = Instant::now();
                    for handle in handles {
                        handle.join().unwrap();
                    }
                    start
                        .elapsed()
                        .mul_f64(iters as f64 / (per_thread * threads as u64) as f64)
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, fresh_token, cached_token);
criterion_main!(benches);
