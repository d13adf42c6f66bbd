//! Preparing the upstream PostgreSQL for the rules (`bootstrap.sql`).

/// The startup parameter that tells the upstream's event triggers a session has the rules on.
pub(crate) const RULES_PARAMETER: &str = "dsql_emulator.sql_rules";

/// The session parameter that says how long an asynchronous DDL's job stays `submitted`, in
/// milliseconds (`DsqlEmulatorBuilder::index_build_delay`).
pub(crate) const BUILD_DELAY_PARAMETER: &str = "dsql_emulator.index_build_delay_ms";

/// How long preparing the upstream may take (a server that does not answer fails the start).
pub(super) const PREPARE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Creates what the upstream PostgreSQL needs for the rules (`bootstrap.sql`: `sys.jobs`,
/// `sys.wait_for_job`, the event triggers of the catalog limits), as `admin`, within
/// [`PREPARE_TIMEOUT`]. Blocking; runs on a thread of its own, so it may be called from inside
/// an async runtime.
pub(crate) fn prepare_upstream(url: String) -> Result<(), crate::emulator::EmulatorError> {
    crate::emulator::upstream::execute(url, include_str!("bootstrap.sql"), PREPARE_TIMEOUT).map_err(
        |(reason, source)| crate::emulator::EmulatorError::Failed {
            reason: format!(
                "cannot prepare the upstream PostgreSQL for DSQL's SQL rules ({reason}); its \
                 `admin` role must be a superuser, or turn the rules off with sql_rules(false)"
            ),
            source,
        },
    )
}

/// The major version of the upstream PostgreSQL at `url` (`server_version_num / 10000`), read
/// within [`PREPARE_TIMEOUT`]; `None` if it cannot be read.
pub(crate) fn upstream_major(url: String) -> Option<u32> {
    crate::emulator::upstream::query_first(url, "SHOW server_version_num", PREPARE_TIMEOUT)
        .ok()
        .flatten()
        .and_then(|n| n.trim().parse::<u32>().ok())
        .map(|n| n / 10_000)
}

/// What differs from DSQL (PostgreSQL 16) when the emulator runs on PostgreSQL `major`: said
/// once at start, in the log and in `dsql-emulator`'s ready line. `None` on 16.
pub(crate) fn version_note(major: u32) -> Option<String> {
    match major {
        16 => None,
        m if m < 16 => Some(format!(
            "the emulator runs on PostgreSQL {m}, not DSQL's 16: PostgreSQL 16 syntax DSQL \
             accepts fails here with 42601 (a column's STORAGE in CREATE TABLE and ADD COLUMN, \
             unnamed CREATE STATISTICS, ...); \
             point PG_BIN at PostgreSQL 16 for full fidelity"
        )),
        m => Some(format!(
            "the emulator runs on PostgreSQL {m}, not DSQL's 16: syntax newer than 16 (JSON_TABLE, \
             MERGE ... RETURNING, COPY ... ON_ERROR, ...) is accepted here where DSQL refuses \
             it; point PG_BIN at PostgreSQL 16 for full fidelity"
        )),
    }
}
