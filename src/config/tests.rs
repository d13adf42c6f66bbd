use super::*;
use std::collections::HashMap;

const ID: &str = "abcdefghijklmnopqrstuvwxyz";
const HOST: &str = "abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws";

fn parse(s: &str) -> Result<DsqlConfig, Error> {
    s.parse()
}

/// The field an error names; panics on success or another kind of error.
fn field_of(result: Result<DsqlConfig, Error>) -> String {
    match result {
        Err(Error::Config { field, .. }) => field.into_owned(),
        Err(other) => panic!("expected a config error, got {other:?}"),
        Ok(config) => panic!("expected an error, got {config:?}"),
    }
}

fn env(vars: &[(&str, &str)]) -> Result<DsqlConfig, Error> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    DsqlConfig::from_env_with(|name| map.get(name).cloned())
}

#[test]
fn builder_defaults() {
    let config = DsqlConfig::builder().host(HOST).build().unwrap();
    assert_eq!(config.host(), HOST);
    assert_eq!(config.port(), 5432);
    assert_eq!(config.user(), "admin");
    assert_eq!(config.database(), "postgres");
    assert_eq!(config.region(), Some("us-east-1"));
    assert_eq!(config.token_duration(), Duration::from_secs(900));
    assert_eq!(config.max_lifetime(), Duration::from_secs(3300));
    assert_eq!(config.ssl_negotiation(), SslNegotiation::Direct);
    assert_eq!(config.ssl_mode(), SslMode::VerifyFull);
    assert_eq!(config.root_certs(), &RootCerts::WebPki);
    assert_eq!(config.hostaddr(), None);
    assert!(config.startup_options().is_empty());
    assert_eq!(
        config.application_name(),
        concat!("tokio-postgres-dsql/", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn host_forms() {
    // Public endpoint, upper case and a trailing dot normalised.
    let config = DsqlConfig::builder()
        .host("ABCDEFGHIJKLMNOPQRSTUVWXYZ.DSQL.US-EAST-1.ON.AWS.")
        .build()
        .unwrap();
    assert_eq!(config.host(), HOST);
    // PrivateLink private DNS.
    let config = DsqlConfig::builder()
        .host(format!("{ID}.dsql-fnh4.eu-west-2.on.aws"))
        .build()
        .unwrap();
    assert_eq!(config.region(), Some("eu-west-2"));
    // FIPS.
    let config = DsqlConfig::builder()
        .host(format!("{ID}.dsql-fips.us-gov-west-1.on.aws"))
        .build()
        .unwrap();
    assert_eq!(config.region(), Some("us-gov-west-1"));
    // Bare cluster id with a region.
    let config = DsqlConfig::builder()
        .host(ID)
        .region("ap-northeast-1")
        .build()
        .unwrap();
    assert_eq!(config.host(), format!("{ID}.dsql.ap-northeast-1.on.aws"));
    // Bare cluster id without a region: resolved later by the connector.
    let config = DsqlConfig::builder().host(ID).build().unwrap();
    assert_eq!(config.host(), ID);
    assert_eq!(config.region(), None);
    assert_eq!(
        config.endpoints()[0].host_in("us-west-2"),
        format!("{ID}.dsql.us-west-2.on.aws")
    );
    // Another name (a VPC endpoint) with an explicit region.
    let config = DsqlConfig::builder()
        .host("vpce-1.vpce-svc-2.us-east-1.vpce.amazonaws.com")
        .region("us-east-1")
        .build()
        .unwrap();
    assert_eq!(config.region(), Some("us-east-1"));
}

#[test]
fn region_from_host_matches_the_documented_pattern() {
    assert_eq!(region_from_host(HOST), Some("us-east-1"));
    assert_eq!(
        region_from_host("x.dsql-abcd.eu-central-1.on.aws"),
        Some("eu-central-1")
    );
    assert_eq!(region_from_host("x.notdsql.us-east-1.on.aws"), None);
    assert_eq!(region_from_host("dsql.us-east-1.on.aws"), None);
    assert_eq!(region_from_host("x.dsql.us-east-1.amazonaws.com"), None);
    assert_eq!(region_from_host("on.aws"), None);
}

#[test]
fn builder_errors_name_their_field() {
    let b = || DsqlConfig::builder().host(HOST);
    assert_eq!(field_of(DsqlConfig::builder().build()), "host");
    assert_eq!(field_of(DsqlConfig::builder().host("").build()), "host");
    assert_eq!(
        field_of(DsqlConfig::builder().host("bad_host!").build()),
        "host"
    );
    assert_eq!(field_of(DsqlConfig::builder().host("a..b").build()), "host");
    assert_eq!(
        field_of(DsqlConfig::builder().host("h:5432").build()),
        "host"
    );
    assert_eq!(
        field_of(DsqlConfig::builder().host("127.0.0.1").build()),
        "host"
    );
    assert_eq!(
        field_of(DsqlConfig::builder().host("a".repeat(254)).build()),
        "host"
    );
    assert_eq!(field_of(b().region("us-west-2").build()), "region");
    assert_eq!(field_of(b().region("US_EAST_1").build()), "region");
    assert_eq!(field_of(b().region("").build()), "region");
    assert_eq!(field_of(b().port(0).build()), "port");
    assert_eq!(field_of(b().user("").build()), "user");
    assert_eq!(field_of(b().user("a\0b").build()), "user");
    assert_eq!(field_of(b().database("").build()), "database");
    assert_eq!(
        field_of(b().token_duration(Duration::ZERO).build()),
        "token_duration"
    );
    assert_eq!(
        field_of(b().token_duration(Duration::from_secs(604_801)).build()),
        "token_duration"
    );
    assert!(
        b().token_duration(Duration::from_secs(604_800))
            .build()
            .is_ok()
    );
    assert_eq!(
        field_of(b().max_lifetime(Duration::ZERO).build()),
        "max_lifetime"
    );
    assert_eq!(
        field_of(b().max_lifetime(Duration::from_secs(3601)).build()),
        "max_lifetime"
    );
    assert_eq!(
        field_of(b().amzn_cluster_id("short").build()),
        "amzn_cluster_id"
    );
    assert_eq!(field_of(b().ssl_mode(SslMode::Require).build()), "sslmode");
    assert!(
        b().ssl_mode(SslMode::Require)
            .amzn_cluster_id(ID)
            .build()
            .is_ok()
    );
    assert_eq!(field_of(b().search_path("a\0").build()), "search_path");
    assert_eq!(
        field_of(b().application_name("\0").build()),
        "application_name"
    );
    assert_eq!(field_of(b().profile("").build()), "profile");
    assert_eq!(field_of(b().option("a b", "c").build()), "options");
    assert_eq!(
        field_of(b().connect_timeout(Duration::ZERO).build()),
        "connect_timeout"
    );
    assert_eq!(
        field_of(b().connect_deadline(Duration::ZERO).build()),
        "connect_deadline"
    );
    assert_eq!(
        field_of(b().credentials_timeout(Duration::ZERO).build()),
        "credentials_timeout"
    );
    assert_eq!(
        field_of(b().connect_rate_limit(0.0, 1).build()),
        "connect_rate_limit"
    );
    assert_eq!(
        field_of(b().connect_rate_limit(f64::NAN, 1).build()),
        "connect_rate_limit"
    );
    assert_eq!(
        field_of(b().connect_rate_limit(5.0, 0).build()),
        "connect_rate_limit"
    );
    // A rate so low that the wait for the next slot does not fit a `Duration` (it panicked in
    // the limiter, reachable through the builder): refused here, naming the field.
    for tiny in [1e-20, 1e-300, f64::MIN_POSITIVE, 1e-9] {
        let err = b().connect_rate_limit(tiny, 1).build().unwrap_err();
        assert!(err.to_string().contains("0.001"), "{tiny}: {err}");
        assert_eq!(
            field_of(b().connect_rate_limit(tiny, 1).build()),
            "connect_rate_limit",
            "{tiny}"
        );
    }
    assert!(b().connect_rate_limit(0.001, 1).build().is_ok());
    assert_eq!(
        field_of(b().keepalives_retries(0).build()),
        "keepalives_retries"
    );
}

#[test]
fn connect_limits_and_keepalives_have_documented_defaults_and_parse() {
    let config = DsqlConfig::builder().host(HOST).build().unwrap();
    assert_eq!(config.connect_timeout(), DEFAULT_CONNECT_TIMEOUT);
    assert_eq!(config.connect_timeout(), Duration::from_secs(10));
    assert_eq!(config.connect_deadline(), Duration::from_secs(30));
    assert_eq!(config.credentials_timeout(), Duration::from_secs(5));
    assert_eq!(config.connect_rate_limit(), None);
    assert_eq!(config.connect, ConnectSettings::default());
    assert!(config.connect.keepalives);
    assert_eq!(
        config.connect.tcp_user_timeout,
        Some(Duration::from_secs(30))
    );

    let config = parse(&format!(
        "host={HOST} connect_timeout=3 connect_deadline=45 keepalives=1 keepalives_idle=20 \
         keepalives_interval=5 keepalives_count=4 tcp_user_timeout=2500"
    ))
    .unwrap();
    assert_eq!(config.connect_timeout(), Duration::from_secs(3));
    assert_eq!(config.connect_deadline(), Duration::from_secs(45));
    assert_eq!(config.connect.keepalives_idle, Duration::from_secs(20));
    assert_eq!(config.connect.keepalives_interval, Duration::from_secs(5));
    assert_eq!(config.connect.keepalives_retries, 4);
    assert_eq!(
        config.connect.tcp_user_timeout,
        Some(Duration::from_millis(2500))
    );
    let config = parse(&format!(
        "postgres://{HOST}?keepalives=0&tcp_user_timeout=0"
    ))
    .unwrap();
    assert!(!config.connect.keepalives);
    assert_eq!(config.connect.tcp_user_timeout, None);
    for bad in [
        "keepalives=yes",
        "keepalives_idle=0",
        "keepalives_count=-1",
        "tcp_user_timeout=soon",
        "connect_deadline=0",
    ] {
        let key = bad.split('=').next().unwrap();
        assert_eq!(field_of(parse(&format!("host={HOST} {bad}"))), key, "{bad}");
    }
    let config = DsqlConfig::builder()
        .host(HOST)
        .connect_rate_limit(2.5, 10)
        .build()
        .unwrap();
    assert_eq!(config.connect_rate_limit(), Some((2.5, 10)));
}

#[test]
fn wrong_region_error_says_both_regions() {
    let err = DsqlConfig::builder()
        .host(HOST)
        .region("eu-west-1")
        .build()
        .unwrap_err();
    let shown = err.to_string();
    assert!(
        shown.contains("eu-west-1") && shown.contains("us-east-1"),
        "{shown}"
    );
}

#[test]
fn url_form() {
    let config = parse(&format!(
        "postgres://app@{HOST}:6543/postgres?sslnegotiation=postgres&token_duration_secs=60\
         &hostaddr=10.0.0.7&sslrootcert=/etc/ca.pem&application_name=svc&connect_timeout=5\
         &profile=prod&options=-c%20search_path%3Dmyschema"
    ))
    .unwrap();
    assert_eq!(config.user(), "app");
    assert_eq!(config.port(), 6543);
    assert_eq!(config.ssl_negotiation(), SslNegotiation::Postgres);
    assert_eq!(config.token_duration(), Duration::from_secs(60));
    assert_eq!(config.hostaddr(), Some("10.0.0.7".parse().unwrap()));
    assert_eq!(config.root_certs(), &RootCerts::File("/etc/ca.pem".into()));
    assert!(
        config
            .application_name()
            .starts_with("svc:tokio-postgres-dsql/")
    );
    assert_eq!(config.connect_timeout(), Duration::from_secs(5));
    assert_eq!(config.profile.as_deref(), Some("prod"));
    assert_eq!(config.search_path(), Some("myschema"));

    let config = parse(&format!(
        "postgresql://{ID}?region=us-west-2&sslrootcert=system"
    ))
    .unwrap();
    assert_eq!(config.host(), format!("{ID}.dsql.us-west-2.on.aws"));
    assert_eq!(config.root_certs(), &RootCerts::System);
    assert_eq!(config.user(), "admin");

    let config = parse(&format!("postgres://{HOST}")).unwrap();
    assert_eq!(config.database(), "postgres");

    let config = parse(&format!("postgres://a%20b@{HOST}/postgres")).unwrap();
    assert_eq!(config.user(), "a b");
}

#[test]
fn url_errors_name_the_parameter() {
    assert_eq!(
        field_of(parse(&format!("postgres://{HOST}?bogus=1"))),
        "bogus"
    );
    assert_eq!(
        field_of(parse(&format!("postgres://{HOST}?port=x"))),
        "port"
    );
    assert_eq!(
        field_of(parse(&format!("postgres://{HOST}?hostaddr=nope"))),
        "hostaddr"
    );
    assert_eq!(
        field_of(parse(&format!("postgres://{HOST}?token_duration_secs=-1"))),
        "token_duration_secs"
    );
    assert_eq!(
        field_of(parse(&format!(
            "postgres://{HOST}?token_duration_secs=999999"
        ))),
        "token_duration"
    );
    assert_eq!(
        field_of(parse(&format!("postgres://{HOST}?sslnegotiation=maybe"))),
        "sslnegotiation"
    );
    assert_eq!(
        field_of(parse(&format!("postgres://{HOST}?sslmode=disable"))),
        "sslmode"
    );
    assert_eq!(
        field_of(parse(&format!("postgres://{HOST}?sslmode=verify-ca"))),
        "sslmode"
    );
    assert_eq!(
        field_of(parse(&format!("postgres://{HOST}?sslmode=require"))),
        "sslmode"
    );
    assert_eq!(
        field_of(parse(&format!("postgres://{HOST}?connect_timeout=0"))),
        "connect_timeout"
    );
    assert_eq!(
        field_of(parse(&format!("postgres://{HOST}?options=search_path"))),
        "options"
    );
    assert_eq!(
        field_of(parse(&format!("postgres://admin:pw@{HOST}"))),
        "password"
    );
    assert_eq!(
        field_of(parse(&format!("postgres://{HOST}?region=eu-west-1"))),
        "region"
    );
    assert_eq!(field_of(parse("postgres://")), "host");
    // Several hosts that are not DSQL endpoints name no Region.
    assert_eq!(field_of(parse("postgres://a,b/postgres")), "region");
    assert_eq!(field_of(parse("mysql://x")), "connection string");
    assert_eq!(field_of(parse("   ")), "connection string");
    assert_eq!(field_of(parse(&format!("postgres://{HOST}:0"))), "port");
}

#[test]
fn password_error_does_not_echo_the_password() {
    let err = parse(&format!("postgres://admin:hunter2@{HOST}")).unwrap_err();
    assert!(!format!("{err} {err:?}").contains("hunter2"));
    let err = parse(&format!("host={HOST} password=hunter2")).unwrap_err();
    assert!(!format!("{err} {err:?}").contains("hunter2"));
}

#[test]
fn key_value_form() {
    let config = parse(&format!(
        "host={HOST} port = 5433 user=app dbname=postgres sslnegotiation=direct \
         options='-c search_path=my\\\\ schema -c amzn-cluster-id={ID} -c datestyle=ISO' \
         sslmode=require application_name='my app'"
    ))
    .unwrap();
    assert_eq!(config.port(), 5433);
    assert_eq!(config.user(), "app");
    assert_eq!(config.search_path(), Some("my schema"));
    assert_eq!(config.amzn_cluster_id(), Some(ID));
    assert_eq!(config.ssl_mode(), SslMode::Require);
    assert!(config.application_name().starts_with("my app:"));
    assert_eq!(
        config.startup_options(),
        vec![
            ("search_path", "my schema"),
            ("amzn-cluster-id", ID),
            ("datestyle", "ISO")
        ]
    );
    let config = parse(&format!(
        "host={ID} region=us-east-2 options=--search_path=s"
    ))
    .unwrap();
    assert_eq!(config.host(), format!("{ID}.dsql.us-east-2.on.aws"));
    assert_eq!(config.search_path(), Some("s"));
    let config = parse(&format!("host='{HOST}' options='-csearch_path=it\\'s'")).unwrap();
    assert_eq!(config.search_path(), Some("it's"));
}

#[test]
fn key_value_errors() {
    assert_eq!(field_of(parse(&format!("host={HOST} nope=1"))), "nope");
    assert_eq!(
        field_of(parse(&format!("host={HOST} port"))),
        "connection string"
    );
    assert_eq!(
        field_of(parse(&format!("host={HOST} user='open"))),
        "connection string"
    );
    assert_eq!(field_of(parse(&format!("host={HOST} port=99999"))), "port");
    assert_eq!(field_of(parse(&format!("host={HOST},{HOST}"))), "host");
    assert_eq!(
        field_of(parse(&format!("host={HOST} options='-c'"))),
        "options"
    );
    assert_eq!(
        field_of(parse(&format!("host={HOST} options='-c =x'"))),
        "options"
    );
    assert_eq!(
        field_of(parse(&format!("host={HOST} options='x\\'"))),
        "connection string"
    );
    assert_eq!(
        field_of(parse(&format!("postgres://{HOST}?options=x%5C"))),
        "options"
    );
    assert_eq!(field_of(parse("user=app")), "host");
}

#[test]
fn environment() {
    let config = env(&[
        ("CLUSTER_ENDPOINT", HOST),
        ("CLUSTER_USER", "app"),
        ("AWS_REGION", "eu-west-1"), // ignored: the endpoint names its region
        ("AWS_PROFILE", "dev"),
        ("PGHOSTADDR", "127.0.0.1"),
        ("PGPORT", "15432"),
        ("PGDATABASE", "postgres"),
        ("PGSSLROOTCERT", "/tmp/ca.pem"),
        ("PGSSLNEGOTIATION", "postgres"),
        ("PGAPPNAME", "svc"),
        ("PGCONNECT_TIMEOUT", "3"),
    ])
    .unwrap();
    assert_eq!(config.host(), HOST);
    assert_eq!(config.region(), Some("us-east-1"));
    assert_eq!(config.user(), "app");
    assert_eq!(config.profile.as_deref(), Some("dev"));
    assert_eq!(config.hostaddr(), Some("127.0.0.1".parse().unwrap()));
    assert_eq!(config.port(), 15432);
    assert_eq!(config.root_certs(), &RootCerts::File("/tmp/ca.pem".into()));
    assert_eq!(config.ssl_negotiation(), SslNegotiation::Postgres);
    assert!(config.application_name().starts_with("svc:"));
    assert_eq!(config.connect_timeout(), Duration::from_secs(3));

    let config = env(&[
        ("CLUSTER_ENDPOINT", ID),
        ("AWS_DEFAULT_REGION", "sa-east-1"),
    ])
    .unwrap();
    assert_eq!(config.host(), format!("{ID}.dsql.sa-east-1.on.aws"));
    let config = env(&[
        ("CLUSTER_ENDPOINT", ID),
        ("AWS_REGION", "eu-north-1"),
        ("AWS_DEFAULT_REGION", "sa-east-1"),
    ])
    .unwrap();
    assert_eq!(config.region(), Some("eu-north-1"));
    let config = env(&[("CLUSTER_ENDPOINT", HOST), ("CLUSTER_USER", "")]).unwrap();
    assert_eq!(config.user(), "admin");
}

#[test]
fn environment_errors_name_the_variable() {
    assert_eq!(field_of(env(&[])), "CLUSTER_ENDPOINT");
    assert_eq!(
        field_of(env(&[("CLUSTER_ENDPOINT", "")])),
        "CLUSTER_ENDPOINT"
    );
    assert_eq!(field_of(env(&[("CLUSTER_ENDPOINT", "x y")])), "host");
    assert_eq!(
        field_of(env(&[("CLUSTER_ENDPOINT", HOST), ("PGPORT", "x")])),
        "PGPORT"
    );
    assert_eq!(
        field_of(env(&[("CLUSTER_ENDPOINT", HOST), ("PGHOSTADDR", "host")])),
        "PGHOSTADDR"
    );
    assert_eq!(
        field_of(env(&[
            ("CLUSTER_ENDPOINT", HOST),
            ("PGSSLNEGOTIATION", "x")
        ])),
        "PGSSLNEGOTIATION"
    );
    assert_eq!(
        field_of(env(&[
            ("CLUSTER_ENDPOINT", HOST),
            ("PGCONNECT_TIMEOUT", "soon")
        ])),
        "PGCONNECT_TIMEOUT"
    );
    assert_eq!(
        field_of(env(&[("CLUSTER_ENDPOINT", ID), ("AWS_REGION", "Mars")])),
        "AWS_REGION"
    );
}

#[test]
fn into_builder_round_trips_and_allows_overrides() {
    let config = parse(&format!(
        "host={HOST} user=app port=6000 sslnegotiation=postgres options='-c search_path=s'"
    ))
    .unwrap();
    let again = config.clone().into_builder().build().unwrap();
    assert_eq!(format!("{config:?}"), format!("{again:?}"));
    let admin = config.into_builder().user("admin").build().unwrap();
    assert_eq!(admin.user(), "admin");
    assert_eq!(admin.port(), 6000);
    assert_eq!(admin.search_path(), Some("s"));
}

#[test]
fn debug_shows_settings_but_not_the_credentials() {
    let config = DsqlConfig::builder()
        .host(HOST)
        .credentials_provider(aws_credential_types::Credentials::from_keys(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI",
            Some("FwoGZXIvYXdzE".into()),
        ))
        .build()
        .unwrap();
    let shown = format!("{config:?} {:?}", DsqlConfig::builder().host(HOST));
    assert!(shown.contains(HOST) && shown.contains("<set>"), "{shown}");
    for secret in ["AKIDEXAMPLE", "wJalrXUtnFEMI", "FwoGZXIvYXdzE"] {
        assert!(!shown.contains(secret), "{shown}");
    }
}

const PEER: &str = "zyxwvutsrqponmlkjihgfedcba.dsql.us-east-2.on.aws";
const PEER_ID: &str = "zyxwvutsrqponmlkjihgfedcba";

/// (host, port, hostaddr, region) of each endpoint.
fn endpoints(config: &DsqlConfig) -> Vec<(String, u16, Option<String>, Option<String>)> {
    config
        .endpoints()
        .iter()
        .map(|e| {
            (
                e.host().to_owned(),
                e.port(),
                e.hostaddr().map(|a| a.to_string()),
                e.region().map(str::to_owned),
            )
        })
        .collect()
}

fn ep(
    host: &str,
    port: u16,
    addr: Option<&str>,
    region: &str,
) -> (String, u16, Option<String>, Option<String>) {
    (
        host.to_owned(),
        port,
        addr.map(str::to_owned),
        Some(region.to_owned()),
    )
}

#[test]
fn several_endpoints_in_every_form() {
    let expected = vec![
        ep(HOST, 5432, None, "us-east-1"),
        ep(PEER, 5432, None, "us-east-2"),
    ];
    // Builder, conninfo, URL, environment: the same two endpoints, the first preferred.
    let built = DsqlConfig::builder().host(HOST).peer(PEER).build().unwrap();
    assert_eq!(endpoints(&built), expected);
    assert_eq!(
        endpoints(&parse(&format!("host={HOST},{PEER}")).unwrap()),
        expected
    );
    assert_eq!(
        endpoints(&parse(&format!("host='{HOST}, {PEER}'")).unwrap()),
        expected
    );
    assert_eq!(
        endpoints(&parse(&format!("postgres://admin@{HOST},{PEER}/postgres")).unwrap()),
        expected
    );
    assert_eq!(
        endpoints(&env(&[("CLUSTER_ENDPOINT", &format!("{HOST},{PEER}"))]).unwrap()),
        expected
    );
    assert_eq!(built.host(), HOST);
    assert_eq!(built.region(), Some("us-east-1"));

    // Lists of the same length, or one value for all.
    let config = parse(&format!(
        "host={HOST},{PEER} hostaddr=127.0.0.1,::1 port=15432,25432"
    ))
    .unwrap();
    assert_eq!(
        endpoints(&config),
        vec![
            ep(HOST, 15432, Some("127.0.0.1"), "us-east-1"),
            ep(PEER, 25432, Some("::1"), "us-east-2"),
        ]
    );
    // One address for several hosts is refused, as libpq refuses it: it would dial one host's
    // address with every host's name and token.
    let err = parse(&format!("host={HOST},{PEER} hostaddr=10.0.0.1 port=6000")).unwrap_err();
    assert_eq!(err.field(), Some("hostaddr"), "{err}");
    assert!(
        err.to_string().contains("one address for each host"),
        "{err}"
    );
    let config = env(&[
        ("CLUSTER_ENDPOINT", &format!("{HOST},{PEER}")),
        ("PGHOSTADDR", "127.0.0.1,127.0.0.2"),
        ("PGPORT", "1,2"),
    ])
    .unwrap();
    assert_eq!(
        endpoints(&config),
        vec![
            ep(HOST, 1, Some("127.0.0.1"), "us-east-1"),
            ep(PEER, 2, Some("127.0.0.2"), "us-east-2"),
        ]
    );
    // URL hosts with their own ports; one without takes 5432.
    let config = parse(&format!(
        "postgresql://app@{HOST}:6000,{PEER}/postgres?sslnegotiation=postgres"
    ))
    .unwrap();
    assert_eq!(
        endpoints(&config),
        vec![
            ep(HOST, 6000, None, "us-east-1"),
            ep(PEER, 5432, None, "us-east-2")
        ]
    );
    assert_eq!(config.user(), "app");
    assert_eq!(config.ssl_negotiation(), SslNegotiation::Postgres);

    // Bare cluster ids with a Region each; the builder's peer with its own settings.
    let config = parse(&format!("host={ID},{PEER_ID} region=us-east-1,us-east-2")).unwrap();
    assert_eq!(endpoints(&config), expected);
    let config = DsqlConfig::builder()
        .host(ID)
        .region("us-east-1")
        .port(7000)
        .peer(
            Peer::new(PEER_ID)
                .region("us-east-2")
                .hostaddr("127.0.0.1".parse().unwrap()),
        )
        .build()
        .unwrap();
    assert_eq!(
        endpoints(&config),
        vec![
            ep(HOST, 7000, None, "us-east-1"),
            ep(PEER, 7000, Some("127.0.0.1"), "us-east-2")
        ]
    );
    // The round trip keeps both.
    let again = config.clone().into_builder().build().unwrap();
    assert_eq!(endpoints(&again), endpoints(&config));
}

#[test]
fn several_endpoints_errors_name_the_field() {
    // Lists of another length than the hosts'.
    assert_eq!(
        field_of(parse(&format!("host={HOST},{PEER} port=1,2,3"))),
        "port"
    );
    assert_eq!(
        field_of(parse(&format!("host={HOST} hostaddr=127.0.0.1,127.0.0.2"))),
        "hostaddr"
    );
    assert_eq!(
        field_of(env(&[
            ("CLUSTER_ENDPOINT", &format!("{HOST},{PEER}")),
            ("PGPORT", "1,2,3"),
        ])),
        "PGPORT"
    );
    // Empty entries.
    assert_eq!(field_of(parse(&format!("host={HOST},"))), "host");
    assert_eq!(
        field_of(env(&[("CLUSTER_ENDPOINT", &format!(",{HOST}"))])),
        "CLUSTER_ENDPOINT"
    );
    assert_eq!(
        field_of(parse(&format!("postgres://{HOST},/postgres"))),
        "host"
    );
    // Duplicates, also spelled differently.
    let err = parse(&format!("host={HOST},{}", HOST.to_uppercase())).unwrap_err();
    assert!(err.to_string().contains("listed twice"), "{err}");
    assert_eq!(
        field_of(
            DsqlConfig::builder()
                .host(ID)
                .region("us-east-1")
                .peer(HOST)
                .build()
        ),
        "host"
    );
    // A bare cluster id among several needs its own Region (the environment's is one Region).
    let err = env(&[
        ("CLUSTER_ENDPOINT", &format!("{HOST},{PEER_ID}")),
        ("AWS_REGION", "us-east-2"),
    ])
    .unwrap_err();
    assert!(
        matches!(&err, Error::Config { field, .. } if field == "region"),
        "{err:?}"
    );
    assert!(err.to_string().contains(PEER_ID), "{err}");
    // One Region for all that does not match a host's.
    assert_eq!(
        field_of(parse(&format!("host={HOST},{PEER} region=us-east-1"))),
        "region"
    );
    // A bad peer host or port.
    assert_eq!(
        field_of(DsqlConfig::builder().host(HOST).peer("bad host").build()),
        "host"
    );
    assert_eq!(
        field_of(
            DsqlConfig::builder()
                .host(HOST)
                .peer(Peer::new(PEER).port(0))
                .build()
        ),
        "port"
    );
    // PrivateLink names one cluster.
    assert_eq!(
        field_of(
            DsqlConfig::builder()
                .host(HOST)
                .peer(PEER)
                .amzn_cluster_id(ID)
                .build()
        ),
        "amzn_cluster_id"
    );
    assert_eq!(
        field_of(
            DsqlConfig::builder()
                .host(HOST)
                .failback_probe_interval(Duration::ZERO)
                .build()
        ),
        "failback_probe_interval"
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

    #[test]
    fn parsing_arbitrary_text_never_panics(s in ".{0,200}") {
        let _ = s.parse::<DsqlConfig>();
        let _ = format!("postgres://{s}").parse::<DsqlConfig>();
        let _ = format!("host={HOST} {s}").parse::<DsqlConfig>();
        let _ = format!("host={HOST} options='{s}'").parse::<DsqlConfig>();
        let _ = format!("postgres://{HOST}?{s}").parse::<DsqlConfig>();
    }

    #[test]
    fn parsing_structured_junk_never_panics(
        key in "(host|port|user|dbname|region|hostaddr|options|sslmode|sslnegotiation|token_duration_secs|connect_timeout|[a-z_]{1,8})",
        value in "[ -~]{0,40}",
    ) {
        let _ = format!("host={HOST} {key}='{value}'").parse::<DsqlConfig>();
        let _ = format!("postgres://{HOST}?{key}={value}").parse::<DsqlConfig>();
        let _ = DsqlConfig::from_env_with(|name| {
            (name == "CLUSTER_ENDPOINT").then(|| value.clone())
        });
    }
}
