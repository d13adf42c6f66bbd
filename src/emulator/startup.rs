//! DSQL's rules for a startup message: which parameters it accepts, the cluster id in
//! `options`, and what goes on to the upstream PostgreSQL.

use super::Rejection;

/// Startup parameters DSQL accepts (besides `user`, `database` and `options`).
pub(crate) fn parameter_allowed(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    matches!(
        name.as_str(),
        "application_name"
            | "client_encoding"
            | "datestyle"
            | "extra_float_digits"
            | "intervalstyle"
            | "timezone"
            | "search_path"
            | "dsql.enable_batched_nestloop"
            | "disable_sync_create_index"
    ) || name.starts_with("enable_")
}

/// The checked startup: who, and what to send upstream.
#[derive(Debug, PartialEq)]
pub(crate) struct Startup {
    pub(crate) user: String,
    pub(crate) upstream_parameters: Vec<(String, String)>,
}

/// A startup refused: SQLSTATE and message.
#[derive(Debug, PartialEq)]
pub(crate) struct StartupRefusal {
    pub(crate) reason: Rejection,
    pub(crate) code: &'static str,
    pub(crate) message: String,
}

/// Applies DSQL's startup rules to the client's parameters.
pub(crate) fn check_startup(
    parameters: Vec<(String, String)>,
    cluster_id: &str,
) -> Result<Startup, StartupRefusal> {
    let unsupported = |name: &str| StartupRefusal {
        reason: Rejection::UnsupportedParameter,
        code: "0A000",
        message: format!("setting configuration parameter \"{name}\" not supported"),
    };
    let mut user = None;
    let mut database = None;
    let mut settings: Vec<(String, String)> = Vec::new();
    for (name, value) in parameters {
        match name.as_str() {
            "user" => user = Some(value),
            "database" => database = Some(value),
            "options" => {
                let parsed = super::util::parse_options(&value).map_err(|why| StartupRefusal {
                    reason: Rejection::UnsupportedParameter,
                    code: "08P01",
                    message: format!("invalid command-line argument in options: {why}"),
                })?;
                for (name, value) in parsed {
                    let name = name.replace('-', "_");
                    if name.eq_ignore_ascii_case("amzn_cluster_id") {
                        if value != cluster_id {
                            return Err(StartupRefusal {
                                reason: Rejection::WrongClusterId,
                                code: "08004",
                                message: format!(
                                    "unable to accept connection, cluster id {value} not found"
                                ),
                            });
                        }
                        continue;
                    }
                    if !parameter_allowed(&name) {
                        return Err(unsupported(&name));
                    }
                    settings.push((name, value));
                }
            }
            _ if parameter_allowed(&name) => settings.push((name, value)),
            _ => return Err(unsupported(&name)),
        }
    }
    let user = user.filter(|u| !u.is_empty()).ok_or(StartupRefusal {
        reason: Rejection::Protocol,
        code: "28000",
        message: "no PostgreSQL user name specified in startup packet".into(),
    })?;
    let mut upstream_parameters = vec![
        ("user".to_owned(), user.clone()),
        (
            "database".to_owned(),
            database.unwrap_or_else(|| "postgres".into()),
        ),
    ];
    // Settings PostgreSQL itself does not know stay here.
    let options: Vec<(&str, &str)> = settings
        .iter()
        .filter(|(name, _)| !name.eq_ignore_ascii_case("disable_sync_create_index"))
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    if !options.is_empty() {
        upstream_parameters.push(("options".to_owned(), super::util::options_value(&options)));
    }
    Ok(Startup {
        user,
        upstream_parameters,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "abcdefghijklmnopqrstuvwxyz";

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn allowed_startup_is_forwarded() {
        let startup = check_startup(
            params(&[
                ("user", "app"),
                ("database", "postgres"),
                ("client_encoding", "UTF8"),
                ("application_name", "x"),
                (
                    "options",
                    "-c search_path=my\\ schema -c amzn-cluster-id=abcdefghijklmnopqrstuvwxyz \
                     -c disable_sync_create_index=on --enable_seqscan=off",
                ),
            ]),
            ID,
        )
        .unwrap();
        assert_eq!(startup.user, "app");
        assert_eq!(
            startup.upstream_parameters,
            params(&[
                ("user", "app"),
                ("database", "postgres"),
                (
                    "options",
                    "-c client_encoding=UTF8 -c application_name=x -c search_path=my\\ schema \
                     -c enable_seqscan=off"
                ),
            ])
        );
    }

    #[test]
    fn unsupported_parameters_are_refused_with_dsql_text() {
        for (name, value) in [
            ("statement_timeout", "5s"),
            ("client_min_messages", "debug"),
        ] {
            let refusal = check_startup(params(&[("user", "app"), (name, value)]), ID).unwrap_err();
            assert_eq!(refusal.reason, Rejection::UnsupportedParameter);
            assert_eq!(
                refusal.message,
                format!("setting configuration parameter \"{name}\" not supported")
            );
            let in_options = format!("-c {name}={value}");
            let refusal = check_startup(params(&[("user", "app"), ("options", &in_options)]), ID)
                .unwrap_err();
            assert_eq!(refusal.reason, Rejection::UnsupportedParameter);
        }
        let refusal =
            check_startup(params(&[("user", "app"), ("replication", "true")]), ID).unwrap_err();
        assert_eq!(refusal.reason, Rejection::UnsupportedParameter);
    }

    #[test]
    fn cluster_id_must_match_and_user_is_required() {
        let refusal = check_startup(
            params(&[
                ("user", "app"),
                ("options", "-c amzn-cluster-id=zzzzzzzzzzzzzzzzzzzzzzzzzz"),
            ]),
            ID,
        )
        .unwrap_err();
        assert_eq!(refusal.reason, Rejection::WrongClusterId);
        let refusal = check_startup(params(&[("database", "postgres")]), ID).unwrap_err();
        assert_eq!(refusal.reason, Rejection::Protocol);
    }
}
