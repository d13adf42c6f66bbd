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
