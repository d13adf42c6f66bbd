//! `TokenSigner` against `aws-sdk-dsql`'s `AuthTokenGenerator` on generated inputs.
//!
//! The SDK writes query parameters in another order and form-encodes them (`+` for a space), so
//! tokens are compared as the host plus the set of decoded query parameters.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sdk_dsql::auth_token::{AuthTokenGenerator, Config};
use aws_smithy_async::time::StaticTimeSource;
use proptest::prelude::*;
use tokio_postgres_dsql::{Action, TokenSigner};

fn decompose(token: &str) -> (String, BTreeMap<String, String>) {
    let (host, query) = token.split_once("/?").expect("token has host/?query");
    let params: BTreeMap<String, String> = url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    (host.to_owned(), params)
}

fn sdk_token(
    runtime: &tokio::runtime::Runtime,
    host: &str,
    region: &str,
    credentials: &Credentials,
    action: Action,
    expires: u64,
    at: SystemTime,
) -> String {
    let generator = AuthTokenGenerator::new(
        Config::builder()
            .hostname(host)
            .region(aws_config::Region::new(region.to_owned()))
            .credentials(credentials.clone())
            .expires_in(expires)
            .build()
            .unwrap(),
    );
    let sdk_config = aws_config::SdkConfig::builder()
        .time_source(StaticTimeSource::new(at))
        .build();
    runtime.block_on(async {
        match action {
            Action::DbConnect => generator.db_connect_auth_token(&sdk_config).await,
            Action::DbConnectAdmin => generator.db_connect_admin_auth_token(&sdk_config).await,
        }
        .unwrap()
        .as_str()
        .to_owned()
    })
}

fn region() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "us-east-1",
            "us-east-2",
            "us-west-2",
            "eu-west-1",
            "eu-central-1",
            "ap-northeast-1",
            "ap-southeast-2",
            "us-gov-west-1",
            "cn-north-1",
        ])
        .prop_map(str::to_owned),
        "[a-z]{2}-[a-z]{4,9}-[1-9]",
    ]
}

fn host_for(region: String) -> impl Strategy<Value = String> {
    (
        "[a-z0-9]{26}",
        prop_oneof![Just(String::new()), "-[a-z0-9]{4}".prop_map(|s| s)],
    )
        .prop_map(move |(id, suffix)| format!("{id}.dsql{suffix}.{region}.on.aws"))
}

fn credentials() -> impl Strategy<Value = Credentials> {
    (
        "(AKIA|ASIA)[A-Z0-9]{16}",
        "[A-Za-z0-9/+=]{40}",
        prop::option::of("[A-Za-z0-9/+= %&?#~._-]{1,300}"),
    )
        .prop_map(|(akid, secret, session)| Credentials::new(akid, secret, session, None, "test"))
}

#[test]
fn agrees_with_aws_sdk_dsql_on_generated_cases() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(1000));
    let strategy = region().prop_flat_map(|region| {
        (
            host_for(region.clone()),
            Just(region),
            credentials(),
            prop::bool::ANY,
            1u64..=604_800,
            0u64..4_102_444_800,
        )
    });
    let cases = std::cell::Cell::new(0);
    runner
        .run(&strategy, |(host, region, creds, admin, expires, secs)| {
            cases.set(cases.get() + 1);
            let action = if admin {
                Action::DbConnectAdmin
            } else {
                Action::DbConnect
            };
            let at = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
            let ours = TokenSigner::new(host.clone(), region.clone()).sign(
                &creds,
                action,
                Duration::from_secs(expires),
                at,
            );
            let theirs = sdk_token(&runtime, &host, &region, &creds, action, expires, at);
            prop_assert_eq!(decompose(ours.as_str()), decompose(&theirs));
            Ok(())
        })
        .unwrap();
    assert!(cases.get() >= 1000, "only {} cases ran", cases.get());
}

#[test]
fn one_signer_agrees_across_many_signatures() {
    // The signing-key cache must not leak one secret's or day's key into another's token.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let host = "abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws";
    let signer = TokenSigner::new(host, "us-east-1");
    let secrets = ["a/b+c=", "secret", "x"];
    for i in 0..60u64 {
        let creds = Credentials::new("AKID", secrets[(i % 3) as usize], None, None, "test");
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_724_716_800 + (i / 7) * 86_399);
        let action = if i % 2 == 0 {
            Action::DbConnect
        } else {
            Action::DbConnectAdmin
        };
        let ours = signer.sign(&creds, action, Duration::from_secs(900), at);
        let theirs = sdk_token(&runtime, host, "us-east-1", &creds, action, 900, at);
        assert_eq!(decompose(ours.as_str()), decompose(&theirs), "case {i}");
    }
}
