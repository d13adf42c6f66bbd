//! The pet clinic example, run as a program against the emulator, as `admin` and as a custom
//! role in `myschema`; the test checks the rows it leaves behind.

use std::process::Command;

use crate::support::{connector, emulator_environment, ensure_role_with_schema, example_binary};

fn run_pet_clinic(user: &str) {
    let output = Command::new(example_binary("pet_clinic"))
        .env_clear()
        .envs(emulator_environment(user))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "pet_clinic as {user} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("pet clinic: all checks passed"), "{stdout}");
    assert!(
        stdout.contains("DROP TABLE abc failed as expected"),
        "{stdout}"
    );
}

async fn assert_rows(schema: &str) {
    let admin = connector("admin", |b| b).await.connect().await.unwrap();
    let names = |table: &str, column: &str| {
        format!("SELECT {column}::text FROM {schema}.{table} ORDER BY 1")
    };
    let column = |rows: Vec<tokio_postgres::Row>| -> Vec<String> {
        rows.iter().map(|r| r.get::<_, String>(0)).collect()
    };
    let owners = column(admin.query(&names("owner", "name"), &[]).await.unwrap());
    assert_eq!(owners, ["John Doe", "Mary Major"]);
    let pets = admin
        .query(
            &format!(
                "SELECT p.name::text, p.birth_date::text, o.name::text FROM {schema}.pet p \
                 JOIN {schema}.owner o ON o.id = p.owner_id ORDER BY p.name"
            ),
            &[],
        )
        .await
        .unwrap();
    let pets: Vec<(String, String, String)> = pets
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        pets,
        [
            ("Pet1".into(), "2006-10-25".into(), "John Doe".into()),
            ("Pet2".into(), "2021-07-23".into(), "John Doe".into()),
        ]
    );
    let specialties = column(admin.query(&names("specialty", "name"), &[]).await.unwrap());
    assert_eq!(specialties, ["Cats", "Dogs", "Exotic"]);
    let links = admin
        .query(
            &format!(
                "SELECT v.name::text, vs.specialty_id::text FROM {schema}.vet v \
                 JOIN {schema}.vet_specialties vs ON vs.vet_id = v.id ORDER BY 1, 2"
            ),
            &[],
        )
        .await
        .unwrap();
    let links: Vec<(String, String)> = links.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        links,
        [
            ("Akua Mansa".into(), "Exotic".into()),
            ("Carlos Salazar".into(), "Cats".into()),
            ("Carlos Salazar".into(), "Dogs".into()),
        ]
    );
    // UUID keys, made by the client; no foreign-key constraints; abc is gone.
    let row = admin
        .query_one(
            &format!(
                "SELECT (SELECT data_type::text FROM information_schema.columns \
                          WHERE table_schema = '{schema}' AND table_name = 'owner' AND column_name = 'id'), \
                        (SELECT count(*) FROM information_schema.table_constraints \
                          WHERE table_schema = '{schema}' AND constraint_type = 'FOREIGN KEY'), \
                        to_regclass('{schema}.abc') IS NULL"
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "uuid");
    assert_eq!(row.get::<_, i64>(1), 0);
    assert!(row.get::<_, bool>(2));
}

#[tokio::test]
async fn pet_clinic_as_admin_and_as_a_custom_role() {
    tokio::task::spawn_blocking(|| run_pet_clinic("admin"))
        .await
        .unwrap();
    assert_rows("public").await;

    // As a DSQL admin would: CREATE ROLE … WITH LOGIN, the schema, and its grants.
    ensure_role_with_schema("app", "myschema").await;
    tokio::task::spawn_blocking(|| run_pet_clinic("app"))
        .await
        .unwrap();
    assert_rows("myschema").await;
}

#[test]
fn pet_clinic_runs_on_an_emulated_multi_region_pair_and_fails_over() {
    let output = Command::new(example_binary("pet_clinic"))
        .env_clear()
        .env("DSQL_EMULATOR_PAIR", "1")
        .envs(
            ["PATH", "PG_BIN"]
                .into_iter()
                .filter_map(|name| Some((name, std::env::var_os(name)?))),
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "pet_clinic on a pair failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("emulated multi-Region pair"), "{stdout}");
    assert!(stdout.contains("(preferred), then"), "{stdout}");
    assert!(
        stdout.contains("(us-east-2), which sees the same 2 owners"),
        "{stdout}"
    );
    assert!(stdout.contains("pet clinic: all checks passed"), "{stdout}");
}
