//! DSQL's admin surface for custom roles: `AWS IAM GRANT <role> TO '<arn>'`, `AWS IAM REVOKE
//! <role> FROM '<arn>'` and `sys.iam_pg_role_mappings`, through either protocol and psql; and,
//! when the emulator knows the ARN behind a key, the mapping enforced at connect.

use std::process::Command;

use aws_credential_types::Credentials;
use tokio_postgres::Client;
use tokio_postgres_dsql::emulator::{DsqlEmulator, Rejection, SharedPostgres};
use tokio_postgres_dsql::{DsqlConnector, Error};

use crate::support::{connect_to, psql_on};

const KEY: &str = "AKIAIAMROLETESTKEY00";
const SECRET: &str = "iam/role+test=secret";
const ARN: &str = "arn:aws:iam::123456789012:role/app-runtime";

async fn endpoint(enforcing: bool) -> DsqlEmulator {
    let mut builder = SharedPostgres::global()
        .expect("the shared PostgreSQL starts")
        .endpoint()
        .credentials(Credentials::new(KEY, SECRET, None, None, "test"));
    if enforcing {
        builder = builder.iam_identity(KEY, ARN);
    }
    builder.start().await.expect("an endpoint starts")
}

async fn connect(emulator: &DsqlEmulator, user: &str) -> Result<Client, Error> {
    connect_to(emulator, user).await
}

/// A role name of this test's own: roles are shared by every endpoint of one server.
fn role(prefix: &str) -> String {
    format!("{prefix}_{:08x}", fastrand::u32(..))
}

async fn mappings(client: &Client) -> Vec<(String, String, String)> {
    client
        .query(
            "SELECT pg_role_name::text, arn, grantor_pg_role_name::text \
             FROM sys.iam_pg_role_mappings ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

fn code(error: &tokio_postgres::Error) -> (String, String) {
    let db = error.as_db_error().expect("a server error");
    (db.code().code().to_owned(), db.message().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_iam_grant_and_revoke_maintain_the_role_mappings() {
    let emulator = endpoint(false).await;
    let admin = connect(&emulator, "admin").await.unwrap();
    let app = role("iam_app");
    admin
        .batch_execute(&format!("CREATE ROLE {app} WITH LOGIN"))
        .await
        .unwrap();
    assert!(mappings(&admin).await.is_empty());

    // Simple protocol, then extended (a prepared statement), then a lower-case spelling.
    admin
        .batch_execute(&format!("AWS IAM GRANT {app} TO '{ARN}'"))
        .await
        .unwrap();
    let other = "arn:aws:iam::123456789012:user/ci";
    admin
        .execute(&format!("AWS IAM GRANT {app} TO '{other}'"), &[])
        .await
        .unwrap();
    admin
        .batch_execute(&format!("aws iam grant {app} to '{ARN}';"))
        .await
        .expect("granting again is harmless");
    assert_eq!(
        mappings(&admin).await,
        vec![
            (app.clone(), ARN.to_owned(), "admin".to_owned()),
            (app.clone(), other.to_owned(), "admin".to_owned()),
        ]
    );
    // DSQL's columns.
    let columns: Vec<String> = admin
        .prepare("SELECT * FROM sys.iam_pg_role_mappings")
        .await
        .unwrap()
        .columns()
        .iter()
        .map(|c| c.name().to_owned())
        .collect();
    assert_eq!(
        columns,
        [
            "iam_oid",
            "arn",
            "pg_role_oid",
            "pg_role_name",
            "grantor_pg_role_oid",
            "grantor_pg_role_name"
        ]
    );

    admin
        .batch_execute(&format!("AWS IAM REVOKE {app} FROM '{other}'"))
        .await
        .unwrap();
    assert_eq!(
        mappings(&admin).await,
        vec![(app.clone(), ARN.to_owned(), "admin".to_owned())]
    );

    // Refusals: an unknown role, a malformed ARN, with DML in one transaction.
    let unknown = admin
        .batch_execute(&format!("AWS IAM GRANT no_such_role_x TO '{ARN}'"))
        .await
        .unwrap_err();
    assert_eq!(
        code(&unknown),
        (
            "42704".into(),
            "role \"no_such_role_x\" does not exist".into()
        )
    );
    let malformed = admin
        .batch_execute(&format!("AWS IAM GRANT {app} TO 'not-an-arn'"))
        .await
        .unwrap_err();
    assert_eq!(code(&malformed).0, "22023");
    admin
        .batch_execute("CREATE TABLE IF NOT EXISTS iam_t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let mixed = admin
        .batch_execute(&format!(
            "BEGIN; INSERT INTO iam_t VALUES (1); AWS IAM GRANT {app} TO '{other}'"
        ))
        .await;
    let _ = admin.batch_execute("ROLLBACK").await;
    // A multi-statement text is not one AWS IAM statement: PostgreSQL's parser answers it.
    assert!(mixed.is_err());
    admin
        .batch_execute("BEGIN; INSERT INTO iam_t VALUES (2)")
        .await
        .unwrap();
    let mixed = admin
        .batch_execute(&format!("AWS IAM GRANT {app} TO '{other}'"))
        .await
        .unwrap_err();
    assert_eq!(
        code(&mixed),
        (
            "0A000".into(),
            "ddl and dml are not supported in the same transaction".into()
        )
    );
    admin.batch_execute("ROLLBACK").await.unwrap();

    // Only admin manages the mappings.
    admin
        .batch_execute(&format!(
            "CREATE SCHEMA {app}_s; GRANT USAGE ON SCHEMA {app}_s TO {app}"
        ))
        .await
        .ok();
    let custom = connect(&emulator, &app).await.unwrap();
    let denied = custom
        .batch_execute(&format!("AWS IAM GRANT {app} TO '{other}'"))
        .await
        .unwrap_err();
    assert_eq!(code(&denied).0, "42501");
    // Everyone may read them, as on DSQL.
    assert_eq!(mappings(&custom).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_iam_grant_through_psql() {
    if Command::new("psql").arg("--version").output().is_err() {
        println!("skipping: psql is not installed (CI installs it)");
        return;
    }
    let emulator = endpoint(false).await;
    let admin = connect(&emulator, "admin").await.unwrap();
    let app = role("iam_psql");
    admin
        .batch_execute(&format!("CREATE ROLE {app} WITH LOGIN"))
        .await
        .unwrap();
    let token = DsqlConnector::new(emulator.config_for("admin").build().unwrap())
        .await
        .unwrap()
        .token()
        .await
        .unwrap();
    let psql = |sql: &str| {
        psql_on(&emulator, "admin", &token)
            .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .unwrap()
    };
    let granted = psql(&format!("AWS IAM GRANT {app} TO '{ARN}';"));
    assert!(
        granted.status.success(),
        "{}",
        String::from_utf8_lossy(&granted.stderr)
    );
    let listed = psql(&format!(
        "SELECT arn FROM sys.iam_pg_role_mappings WHERE pg_role_name = '{app}'"
    ));
    assert_eq!(String::from_utf8_lossy(&listed.stdout).trim(), ARN);
    let revoked = psql(&format!("AWS IAM REVOKE {app} FROM '{ARN}';"));
    assert!(
        revoked.status.success(),
        "{}",
        String::from_utf8_lossy(&revoked.stderr)
    );
    assert!(mappings(&admin).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_role_connects_only_once_granted_to_the_keys_identity() {
    let emulator = endpoint(true).await;
    let admin = connect(&emulator, "admin")
        .await
        .expect("admin needs no mapping");
    let app = role("iam_enf");
    admin
        .batch_execute(&format!("CREATE ROLE {app} WITH LOGIN"))
        .await
        .unwrap();

    let refused = connect(&emulator, &app).await.unwrap_err();
    let db = refused.db_error().expect("a server refusal");
    assert_eq!(db.code().code(), "08006");
    assert_eq!(db.message(), "unable to accept connection, access denied");
    assert_eq!(
        db.hint(),
        Some(format!("User: {ARN} is not authorized to access this resource").as_str())
    );
    assert!(matches!(refused, Error::AccessDenied { .. }), "{refused:?}");
    assert_eq!(emulator.stats().rejected(Rejection::NotAuthorized), 1);

    admin
        .batch_execute(&format!("AWS IAM GRANT {app} TO '{ARN}'"))
        .await
        .unwrap();
    let client = connect(&emulator, &app).await.expect("granted: connects");
    let who: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, app);

    admin
        .batch_execute(&format!("AWS IAM REVOKE {app} FROM '{ARN}'"))
        .await
        .unwrap();
    assert!(
        connect(&emulator, &app).await.is_err(),
        "revoked: refused again"
    );
    // An identity the role was granted to is not another identity.
    admin
        .batch_execute(&format!(
            "AWS IAM GRANT {app} TO 'arn:aws:iam::123456789012:role/someone-else'"
        ))
        .await
        .unwrap();
    assert!(connect(&emulator, &app).await.is_err());
}

/// A mapping the emulator cannot read (here: its table renamed away in the endpoint's own
/// database) is not a refusal: the connect gets DSQL's transient `XX000 server unavailable`
/// (retryable), not a permanent "not authorized"; once it can read again, a granted role
/// connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_mapping_is_unavailable_not_a_refusal() {
    let emulator = endpoint(true).await;
    let admin = connect(&emulator, "admin").await.unwrap();
    let app = role("iam_unavail");
    for statement in [
        format!("CREATE ROLE {app} WITH LOGIN"),
        format!("AWS IAM GRANT {app} TO '{ARN}'"),
    ] {
        admin.batch_execute(&statement).await.unwrap();
    }
    let (upstream, connection) =
        tokio_postgres::connect(&emulator.upstream_url("admin"), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    let relation: String = upstream
        .query_one(
            "SELECT CASE relkind WHEN 'v' THEN 'VIEW' ELSE 'TABLE' END FROM pg_class \
             WHERE oid = 'sys.iam_pg_role_mappings'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    upstream
        .batch_execute(&format!(
            "ALTER {relation} sys.iam_pg_role_mappings RENAME TO iam_pg_role_mappings_away"
        ))
        .await
        .unwrap();
    let unavailable = connect(&emulator, &app).await.unwrap_err();
    let restore = upstream
        .batch_execute(&format!(
            "ALTER {relation} sys.iam_pg_role_mappings_away RENAME TO iam_pg_role_mappings"
        ))
        .await;
    let db = unavailable.db_error().expect("a server answer");
    assert_eq!(
        (db.code().code(), db.message()),
        ("XX000", "server unavailable"),
        "{unavailable:?}"
    );
    assert!(unavailable.is_transient(), "{unavailable:?}");
    assert_eq!(emulator.stats().rejected(Rejection::NotAuthorized), 0);
    restore.unwrap();
    connect(&emulator, &app)
        .await
        .expect("the mapping reads again: the granted role connects");
}
