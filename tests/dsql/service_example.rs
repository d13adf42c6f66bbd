//! `examples/service.rs` end to end, as a user runs it: the built binary on the embedded
//! emulator, driven over HTTP with `reqwest`, then stopped with SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::example_binary;

/// PostgreSQL processes of the emulator the example with `pid` started (their command lines
/// name its work directory).
fn postgres_of(pid: u32) -> Vec<String> {
    let marker = format!("dsql-emulator-{pid}-");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| {
            let cmdline = std::fs::read(entry.ok()?.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(&marker).then_some(cmdline)
        })
        .collect()
}

/// The example's process; killed if the test ends before it stops it.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// GET `url`, as JSON.
async fn get_json(http: &reqwest::Client, url: String) -> Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_example_serves_counts_hot_rows_and_stops_cleanly() {
    let child = Command::new(example_binary("service"))
        .env_remove("CLUSTER_ENDPOINT")
        .env("PORT", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the example starts");
    let mut child = Running(child);
    let pid = child.0.id();
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut said_emulator = false;
    let base = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("the example prints `listening on http://…`");
        said_emulator |= line.contains("embedded DSQL emulator");
        if let Some(address) = line.strip_prefix("listening on ") {
            break address.to_owned();
        }
    };
    assert!(said_emulator, "the example says it runs on the emulator");
    let http = reqwest::Client::new();

    // Owners and pets, read back.
    let response = http
        .post(format!("{base}/owners"))
        .json(&json!({"name": "John Doe", "city": "Anytown", "telephone": "555-555-0150"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let owner: Value = response.json().await.unwrap();
    let id = owner["id"].as_str().unwrap().to_owned();
    assert_eq!(owner["name"], "John Doe");
    for (name, born) in [("Pet1", "2006-10-25"), ("Pet2", "2021-07-23")] {
        let response = http
            .post(format!("{base}/owners/{id}/pets"))
            .json(&json!({"name": name, "birth_date": born}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
    }
    let owner: Value = get_json(&http, format!("{base}/owners/{id}")).await;
    let pets: Vec<&str> = owner["pets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(pets, ["Pet1", "Pet2"]);
    assert_eq!(owner["pets"][0]["birth_date"], "2006-10-25");
    let vets: Value = get_json(&http, format!("{base}/vets")).await;
    assert_eq!(
        vets,
        json!([
            {"name": "Akua Mansa", "specialties": ["Exotic"]},
            {"name": "Carlos Salazar", "specialties": ["Cats", "Dogs"]}
        ])
    );

    // 50 concurrent visits on one row: every one counts, exactly once.
    let visits: Vec<_> = (0..50)
        .map(|_| {
            let (http, url) = (http.clone(), format!("{base}/owners/{id}/visits"));
            tokio::spawn(async move { http.post(url).send().await.unwrap().status() })
        })
        .collect();
    for visit in visits {
        assert_eq!(visit.await.unwrap(), 200);
    }
    let owner: Value = get_json(&http, format!("{base}/owners/{id}")).await;
    assert_eq!(owner["visits"], 50);

    // Bad input and unknown ids: the codes, and a JSON body that says what is wrong.
    let cases = [
        (
            http.post(format!("{base}/owners"))
                .header("content-type", "application/json")
                .body("{not json"),
            400,
            "JSON",
        ),
        (
            http.post(format!("{base}/owners"))
                .json(&json!({"city": "x"})),
            400,
            "name",
        ),
        (
            http.post(format!("{base}/owners/{id}/pets"))
                .json(&json!({"name": "P", "birth_date": "2020-13-45"})),
            400,
            "date",
        ),
        (
            http.get(format!("{base}/owners/not-a-uuid")),
            400,
            "not a UUID",
        ),
        (
            http.get(format!(
                "{base}/owners/00000000-0000-0000-0000-000000000000"
            )),
            404,
            "no owner",
        ),
        (
            http.post(format!(
                "{base}/owners/00000000-0000-0000-0000-000000000000/visits"
            )),
            404,
            "no owner",
        ),
        (
            http.post(format!(
                "{base}/owners/00000000-0000-0000-0000-000000000000/pets"
            ))
            .json(&json!({"name": "P", "birth_date": "2020-01-01"})),
            404,
            "no owner",
        ),
    ];
    for (request, status, says) in cases {
        let response = request.send().await.unwrap();
        assert_eq!(
            response.status(),
            status,
            "expected {status} saying {says:?}"
        );
        let body: Value = response.json().await.expect("a JSON error body");
        let error = body["error"].as_str().expect("an `error` field");
        assert!(error.contains(says), "{status}: {error}");
    }

    // Health and metrics.
    let health = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("dsql_connections_opened_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains("dsql_transaction_conflicts_total"),
        "{metrics}"
    );

    // SIGTERM: it drains, exits 0, and its PostgreSQL goes with it.
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut exited = None;
    for _ in 0..300 {
        exited = child.0.try_wait().unwrap();
        if exited.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let exited = exited.expect("the example exits within 30 s of SIGTERM");
    assert!(exited.success(), "{exited:?}");
    let mut left = postgres_of(pid);
    for _ in 0..50 {
        if left.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        left = postgres_of(pid);
    }
    assert!(left.is_empty(), "PostgreSQL outlived the example: {left:?}");
}
