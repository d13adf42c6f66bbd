//! The pet clinic as a small HTTP service with axum: the shape of a service built on this
//! crate, meant to be copied. A `DsqlPool` in the router state; every write under
//! `DsqlPool::retry_transaction`, which takes a connection per attempt and gives it back
//! between retries (a hot row's backoff holds no connection) and moves to the peer endpoint of
//! a multi-Region cluster when one stops answering; errors mapped to HTTP codes with bodies
//! that carry no internal detail (endpoints, IAM ARNs and server messages go to the log);
//! liveness and readiness apart; `tracing` logs, Prometheus metrics at `/metrics`, graceful
//! shutdown.
//!
//! ```sh
//! cargo run --example service            # on the embedded DSQL emulator
//! CLUSTER_ENDPOINT=<id>.dsql.<region>.on.aws cargo run --example service   # on DSQL
//! ```
//!
//! Environment: what `DsqlConfig::from_env` reads (`CLUSTER_ENDPOINT`, `CLUSTER_USER`,
//! `AWS_REGION`, ...); `PORT` (default 8080; 0 picks a free one) and `BIND` (default
//! 127.0.0.1). It prints `listening on http://<addr>` when it is ready.
//!
//! | route | does |
//! |---|---|
//! | `POST /owners` | `{"name", "city", "telephone"}` → 201 and the owner with its `id` |
//! | `GET /owners/{id}` | the owner with its pets; 404 if there is none |
//! | `POST /owners/{id}/pets` | `{"name", "birth_date": "YYYY-MM-DD"}` → 201 and the pet |
//! | `POST /owners/{id}/visits` | counts a visit on the owner's row (a hot row: concurrent calls conflict and are retried) |
//! | `GET /vets` | the vets with their specialties |
//! | `GET /livez` | 200 while the process serves HTTP (liveness: no database call, so an outage of DSQL does not get the pod restarted) |
//! | `GET /readyz` (also `/healthz`) | 200 when a pooled connection answers a query within 2 s, else 503 (readiness: take the pod out of the load balancer) |
//! | `GET /metrics` | Prometheus text |
//!
//! Errors are JSON `{"error": "…"}`: 400 for bad input, 404 for unknown ids, 409 when the
//! conflict retries are exhausted, 503 with `Retry-After` when DSQL is unavailable for now
//! (admission refusals, timeouts, an outage), 500 for what retrying will not fix (access
//! denied, an unknown role, TLS: a deployment to fix) and for a commit whose outcome is
//! unknown (the body says so: check before retrying).

use std::net::SocketAddr;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};
use tokio_postgres_dsql::emulator::DsqlEmulator;
use tokio_postgres_dsql::migrate::Migrator;
use tokio_postgres_dsql::tokio_postgres::Row;
use tokio_postgres_dsql::{
    AsOccConflict, DsqlConfig, DsqlConnector, DsqlPool, Error, OccConflict, RetryPolicy,
    retry_transaction_on,
};
use uuid::Uuid;

/// What the handlers share.
#[derive(Clone)]
struct AppState {
    pool: DsqlPool,
    policy: RetryPolicy,
    prometheus: PrometheusHandle,
}

/// The service's error type: what `?` gives in handlers and in transaction bodies.
#[derive(Debug)]
enum AppError {
    Dsql(Error),
    BadRequest(String),
    NotFound(String),
}

impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        AppError::Dsql(e)
    }
}

impl From<tokio_postgres_dsql::tokio_postgres::Error> for AppError {
    fn from(e: tokio_postgres_dsql::tokio_postgres::Error) -> Self {
        AppError::Dsql(e.into())
    }
}

impl AsOccConflict for AppError {
    fn occ_conflict(&self) -> Option<OccConflict> {
        match self {
            AppError::Dsql(e) => e.occ_conflict(),
            _ => None,
        }
    }
}

impl From<JsonRejection> for AppError {
    fn from(rejection: JsonRejection) -> Self {
        AppError::BadRequest(rejection.body_text())
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            AppError::BadRequest(message) => (StatusCode::BAD_REQUEST, message),
            AppError::NotFound(message) => (StatusCode::NOT_FOUND, message),
            AppError::Dsql(error) => {
                let (status, message) = status_for(&error);
                if status.is_server_error() || status == StatusCode::CONFLICT {
                    // The detail (endpoint, IAM ARN, server message) is for the operator.
                    tracing::warn!(%status, %error, "request failed");
                }
                (status, message)
            }
        };
        let mut response = (status, Json(serde_json::json!({ "error": message }))).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        response
    }
}

/// The HTTP status for a database-side failure, and what the client is told: never the
/// error's own text, which names endpoints, IAM ARNs and server internals.
fn status_for(error: &Error) -> (StatusCode, String) {
    if error.occ_conflict().is_some() {
        // The retry helpers return a conflict only when their attempts ran out.
        return (
            StatusCode::CONFLICT,
            "the row is busy (write conflicts); try again".into(),
        );
    }
    let unavailable = || {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the database is unavailable for now; try again".to_owned(),
        )
    };
    let internal = || {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error (logged)".to_owned(),
        )
    };
    match error {
        Error::CommitOutcomeUnknown { .. } => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "the outcome of this request is unknown (the connection was lost while \
             committing); check before repeating it"
                .into(),
        ),
        // A deployment to fix (IAM policy, role, certificates, configuration): retrying the
        // request will not help, and a 503 would make clients and load balancers wait for it.
        Error::AccessDenied { .. }
        | Error::UnknownRole { .. }
        | Error::Tls { .. }
        | Error::TlsConfig { .. }
        | Error::Config { .. }
        | Error::Credentials { .. } => internal(),
        other if other.is_transient() => unavailable(),
        Error::Query { source, .. } if source.as_db_error().is_none() => unavailable(),
        Error::Query { .. } => match error.db_error() {
            // Bad input the database caught (invalid text representation, datetime format,
            // value out of range): its message is about the client's own value.
            Some(db) if db.code().code().starts_with("22") => (
                StatusCode::BAD_REQUEST,
                format!("invalid value: {}", db.message()),
            ),
            _ => internal(),
        },
        _ => internal(),
    }
}

fn parse_id(id: &str) -> Result<Uuid, AppError> {
    id.parse()
        .map_err(|_| AppError::BadRequest(format!("`{id}` is not a UUID")))
}

#[derive(Deserialize)]
struct NewOwner {
    name: String,
    city: String,
    telephone: Option<String>,
}

#[derive(Serialize)]
struct Owner {
    id: Uuid,
    name: String,
    city: String,
    telephone: Option<String>,
    visits: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pets: Option<Vec<Pet>>,
}

impl Owner {
    fn from_row(row: &Row) -> Owner {
        Owner {
            id: row.get("id"),
            name: row.get("name"),
            city: row.get("city"),
            telephone: row.get("telephone"),
            visits: row.get("visits"),
            pets: None,
        }
    }
}

#[derive(Deserialize)]
struct NewPet {
    name: String,
    birth_date: String,
}

#[derive(Serialize)]
struct Pet {
    id: Uuid,
    name: String,
    birth_date: String,
}

#[derive(Serialize)]
struct Vet {
    name: String,
    specialties: Vec<String>,
}

const OWNER_COLUMNS: &str = "id, name, city, telephone, visits";

async fn create_owner(
    State(state): State<AppState>,
    body: Result<Json<NewOwner>, JsonRejection>,
) -> Result<(StatusCode, Json<Owner>), AppError> {
    let Json(new) = body?;
    if new.name.trim().is_empty() {
        return Err(AppError::BadRequest("`name` must not be empty".into()));
    }
    let new = &new;
    let owner = state
        .pool
        .retry_transaction(&state.policy, |tx| async move {
            let row = tx
                .query_one(
                    &format!(
                        "INSERT INTO owner (id, name, city, telephone, visits) \
                     VALUES ($1, $2, $3, $4, 0) RETURNING {OWNER_COLUMNS}"
                    ),
                    &[&Uuid::new_v4(), &new.name, &new.city, &new.telephone],
                )
                .await?;
            Ok::<_, AppError>(Owner::from_row(&row))
        })
        .await?;
    Ok((StatusCode::CREATED, Json(owner)))
}

async fn get_owner(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Owner>, AppError> {
    let id = parse_id(&id)?;
    let conn = state.pool.get().await?;
    let row = conn
        .query_opt(
            &format!("SELECT {OWNER_COLUMNS} FROM owner WHERE id = $1"),
            &[&id],
        )
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no owner {id}")))?;
    let mut owner = Owner::from_row(&row);
    let pets = conn
        .query(
            "SELECT id, name, birth_date::text AS birth_date FROM pet WHERE owner_id = $1 \
             ORDER BY name",
            &[&id],
        )
        .await?
        .iter()
        .map(|row| Pet {
            id: row.get("id"),
            name: row.get("name"),
            birth_date: row.get("birth_date"),
        })
        .collect();
    owner.pets = Some(pets);
    Ok(Json(owner))
}

async fn add_pet(
    State(state): State<AppState>,
    Path(owner_id): Path<String>,
    body: Result<Json<NewPet>, JsonRejection>,
) -> Result<(StatusCode, Json<Pet>), AppError> {
    let owner_id = parse_id(&owner_id)?;
    let Json(new) = body?;
    let new = &new;
    let pet = state
        .pool
        .retry_transaction(&state.policy, |tx| async move {
            // No foreign keys (as in AWS's sample): the service checks the owner itself.
            if tx
                .query_opt("SELECT 1 FROM owner WHERE id = $1", &[&owner_id])
                .await?
                .is_none()
            {
                return Err(AppError::NotFound(format!("no owner {owner_id}")));
            }
            let row = tx
                .query_one(
                    "INSERT INTO pet (id, name, birth_date, owner_id) \
                 VALUES ($1, $2, $3::text::date, $4) \
                 RETURNING id, name, birth_date::text AS birth_date",
                    &[&Uuid::new_v4(), &new.name, &new.birth_date, &owner_id],
                )
                .await?;
            Ok(Pet {
                id: row.get("id"),
                name: row.get("name"),
                birth_date: row.get("birth_date"),
            })
        })
        .await?;
    Ok((StatusCode::CREATED, Json(pet)))
}

/// One more visit on the owner's row: every concurrent call writes the same row, so they
/// conflict, and `DsqlPool::retry_transaction` re-runs the losers until each has counted once,
/// giving the connection back to the pool during each backoff.
async fn add_visit(
    State(state): State<AppState>,
    Path(owner_id): Path<String>,
) -> Result<Json<serde_json::Value>, AppError> {
    let owner_id = parse_id(&owner_id)?;
    let visits = state
        .pool
        .retry_transaction(&state.policy, |tx| async move {
            let row = tx
                .query_opt(
                    "UPDATE owner SET visits = visits + 1 WHERE id = $1 RETURNING visits",
                    &[&owner_id],
                )
                .await?
                .ok_or_else(|| AppError::NotFound(format!("no owner {owner_id}")))?;
            Ok::<i64, AppError>(row.get(0))
        })
        .await?;
    Ok(Json(serde_json::json!({ "visits": visits })))
}

async fn list_vets(State(state): State<AppState>) -> Result<Json<Vec<Vet>>, AppError> {
    let conn = state.pool.get().await?;
    let rows = conn
        .query(
            "SELECT v.name, s.name FROM vet v \
             LEFT JOIN vet_specialty vs ON vs.vet_id = v.id \
             LEFT JOIN specialty s ON s.id = vs.specialty_id \
             ORDER BY v.name, s.name",
            &[],
        )
        .await?;
    let mut vets: Vec<Vet> = Vec::new();
    for row in rows {
        let name: String = row.get(0);
        let specialty: Option<String> = row.get(1);
        if vets.last().is_none_or(|v| v.name != name) {
            vets.push(Vet {
                name,
                specialties: Vec::new(),
            });
        }
        if let (Some(vet), Some(specialty)) = (vets.last_mut(), specialty) {
            vet.specialties.push(specialty);
        }
    }
    Ok(Json(vets))
}

/// Liveness: the process answers. No database call: an outage of DSQL must not get every pod
/// restarted (which would only add connects to the outage).
async fn livez() -> &'static str {
    "ok"
}

/// Readiness: a pooled connection answers within 2 s.
async fn readyz(State(state): State<AppState>) -> Result<&'static str, AppError> {
    let check = async {
        state.pool.get().await?.simple_query("SELECT 1").await?;
        Ok::<_, AppError>(())
    };
    match tokio::time::timeout(Duration::from_secs(2), check).await {
        Ok(result) => result.map(|()| "ok"),
        Err(_) => Err(AppError::Dsql(Error::PoolTimeout)),
    }
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.prometheus.render(),
    )
}

/// The schema through the migration runner (`examples/migrations/service/`: each statement in
/// its own transaction, under a lease, so that replicas starting at once apply it once), then
/// the vets (once).
async fn create_schema(pool: &DsqlPool) -> Result<(), Box<dyn std::error::Error>> {
    let migrations = tokio_postgres_dsql::migrations!(
        "examples/migrations/service/0001_create_tables.sql",
        "examples/migrations/service/0002_pet_owner_index.sql",
    )?;
    let report = Migrator::new(migrations).run(pool.connector()).await?;
    if !report.applied.is_empty() {
        tracing::info!(applied = ?report.applied, "schema migrations applied");
    }
    let policy = RetryPolicy::default();
    let mut conn = pool.get().await?;
    let vets = [
        ("Akua Mansa", &["Exotic"][..]),
        ("Carlos Salazar", &["Cats", "Dogs"][..]),
    ];
    retry_transaction_on(&mut conn, &policy, |tx| async move {
        if tx
            .query_opt("SELECT 1 FROM vet LIMIT 1", &[])
            .await?
            .is_some()
        {
            return Ok(());
        }
        let mut specialties = std::collections::BTreeMap::new();
        for name in ["Exotic", "Dogs", "Cats"] {
            let id = Uuid::new_v4();
            tx.execute(
                "INSERT INTO specialty (id, name) VALUES ($1, $2)",
                &[&id, &name],
            )
            .await?;
            specialties.insert(name, id);
        }
        for (vet, kinds) in vets {
            let vet_id = Uuid::new_v4();
            tx.execute(
                "INSERT INTO vet (id, name) VALUES ($1, $2)",
                &[&vet_id, &vet],
            )
            .await?;
            for kind in kinds {
                tx.execute(
                    "INSERT INTO vet_specialty (id, vet_id, specialty_id) VALUES ($1, $2, $3)",
                    &[&Uuid::new_v4(), &vet_id, &specialties[kind]],
                )
                .await?;
            }
        }
        Ok::<_, Error>(())
    })
    .await?;
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("shutting down: finishing the requests in flight");
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_max_level(tracing::Level::INFO)
        .init();
    // The recorder first: the pool registers its metrics when it is built.
    let prometheus = PrometheusBuilder::new().install_recorder()?;

    // On DSQL with CLUSTER_ENDPOINT, else on the embedded emulator (kept alive until the end).
    let (config, _emulator) = if std::env::var_os("CLUSTER_ENDPOINT").is_some() {
        (DsqlConfig::from_env()?, None)
    } else {
        let emulator = DsqlEmulator::start().await?;
        println!(
            "no CLUSTER_ENDPOINT: running on the embedded DSQL emulator ({})",
            emulator.endpoint()
        );
        (emulator.config_for("admin").build()?, Some(emulator))
    };
    let pool = DsqlConnector::new(config).await?.pool().await?;
    create_schema(&pool).await?;

    let state = AppState {
        pool,
        // A hot row takes many rounds under load: retry longer than the default (each backoff
        // without a connection); a request never waits on one attempt for more than 5 s.
        policy: RetryPolicy::default()
            .with_max_attempts(50)
            .delays(Duration::from_millis(5), Duration::from_millis(200))
            .with_attempt_timeout(Duration::from_secs(5))
            .with_deadline(Duration::from_secs(20)),
        prometheus,
    };
    let app = axum::Router::new()
        .route("/owners", post(create_owner))
        .route("/owners/{id}", get(get_owner))
        .route("/owners/{id}/pets", post(add_pet))
        .route("/owners/{id}/visits", post(add_visit))
        .route("/vets", get(list_vets))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/healthz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state);

    let port: u16 = match std::env::var("PORT") {
        Ok(port) => port
            .parse()
            .map_err(|_| format!("PORT=`{port}` is not a port number"))?,
        Err(_) => 8080,
    };
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1".into());
    let address: SocketAddr = format!("{bind}:{port}")
        .parse()
        .map_err(|_| format!("BIND=`{bind}` is not an IP address"))?;
    let listener = tokio::net::TcpListener::bind(address).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    println!("stopped");
    Ok(())
}
