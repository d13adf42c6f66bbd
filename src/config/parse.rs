//! Connection strings (`postgres://` URLs and libpq `key=value` strings) and the environment.

use super::*;

/// The endpoint settings read from a connection string or the environment, each a list
/// (libpq's multi-host form: one entry per host, or one for all), with the name its errors use.
/// [`build`](DsqlConfigBuilder::build) turns them into the preferred endpoint and its peers.
#[derive(Debug, Default, Clone)]
pub(super) struct EndpointLists {
    host: Option<(Vec<String>, &'static str)>,
    hostaddr: Option<(Vec<IpAddr>, &'static str)>,
    port: Option<(Vec<u16>, &'static str)>,
    region: Option<(Vec<String>, &'static str)>,
}

/// Splits a comma-separated list and parses each entry; an empty entry is an error.
fn list<T>(
    value: &str,
    field: &'static str,
    parse: impl Fn(&str) -> Option<T>,
    expected: &str,
) -> Result<(Vec<T>, &'static str), Error> {
    let entries = value
        .split(',')
        .map(|entry| {
            let entry = entry.trim();
            if entry.is_empty() {
                return Err(Error::config(
                    field,
                    format!("`{value}`: has an empty entry"),
                ));
            }
            parse(entry).ok_or_else(|| Error::config(field, format!("`{entry}`: {expected}")))
        })
        .collect::<Result<Vec<T>, Error>>()?;
    Ok((entries, field))
}

impl EndpointLists {
    /// Sets the preferred endpoint from the first entries and adds a peer for each further
    /// host. Every list has one entry per host, or one for all.
    pub(super) fn apply(self, mut builder: DsqlConfigBuilder) -> Result<DsqlConfigBuilder, Error> {
        let hosts = self.host.map(|(hosts, _)| hosts);
        let count = hosts.as_ref().map_or(1, Vec::len);
        fn nth<T: Clone>(
            list: &Option<(Vec<T>, &'static str)>,
            count: usize,
            i: usize,
        ) -> Result<Option<T>, Error> {
            let Some((values, field)) = list else {
                return Ok(None);
            };
            if values.len() != 1 && values.len() != count {
                return Err(Error::config(
                    *field,
                    format!(
                        "has {} values for {count} host(s): give one for each host, in the same \
                         order, or one for all",
                        values.len()
                    ),
                ));
            }
            Ok(Some(values[if values.len() == 1 { 0 } else { i }].clone()))
        }
        if let Some((values, field)) = &self.hostaddr
            && count > 1
            && values.len() != count
        {
            // libpq's rule: one address for each host (one for all would dial one host's
            // address with every other host's name and token).
            return Err(Error::config(
                *field,
                format!(
                    "has {} value(s) for {count} hosts: give one address for each host, in the                      same order",
                    values.len()
                ),
            ));
        }
        let mut peers = Vec::new();
        for i in 0..count {
            let port = nth(&self.port, count, i)?;
            let hostaddr = nth(&self.hostaddr, count, i)?;
            let region = nth(&self.region, count, i)?;
            if i == 0 {
                if let Some(hosts) = &hosts {
                    builder.host = Some(hosts[0].clone());
                }
                builder.port = port.or(builder.port);
                builder.hostaddr = hostaddr.or(builder.hostaddr);
                builder.region = region.or(builder.region);
            } else if let Some(hosts) = &hosts {
                peers.push(Peer {
                    host: hosts[i].clone(),
                    port,
                    hostaddr,
                    region,
                });
            }
        }
        peers.append(&mut builder.peers);
        builder.peers = peers;
        Ok(builder)
    }
}

impl DsqlConfigBuilder {
    /// Applies one connection-string or environment setting. `field` is how errors name it.
    fn apply(mut self, key: &str, value: &str, field: &'static str) -> Result<Self, Error> {
        let bad = |reason: &str| Error::config(field, format!("`{value}`: {reason}"));
        Ok(match key {
            "host" => {
                self.lists.host = Some(list(value, field, |h| Some(h.to_owned()), "")?);
                self
            }
            "hostaddr" => {
                self.lists.hostaddr = Some(list(
                    value,
                    field,
                    |a| a.parse().ok(),
                    "not an IPv4 or IPv6 address",
                )?);
                self
            }
            "port" => {
                self.lists.port = Some(list(
                    value,
                    field,
                    |p| p.parse().ok().filter(|p| *p != 0),
                    "not a port number (1-65535)",
                )?);
                self
            }
            "user" => self.user(value),
            "dbname" => self.database(value),
            "region" => {
                self.lists.region = Some(list(value, field, |r| Some(r.to_owned()), "")?);
                self
            }
            "profile" => self.profile(value),
            // `tokenDurationSecs`: the AWS DSQL connectors' (JDBC, Node.js) spelling.
            "token_duration_secs" | "tokenDurationSecs" => {
                let secs: u64 = value
                    .parse()
                    .map_err(|_| bad("not a whole number of seconds"))?;
                self.token_duration(Duration::from_secs(secs))
            }
            "sslrootcert" => self.ssl_root_cert(value),
            "sslnegotiation" => self.ssl_negotiation(match value {
                "direct" => SslNegotiation::Direct,
                "postgres" => SslNegotiation::Postgres,
                _ => return Err(bad("expected `direct` or `postgres`")),
            }),
            "sslmode" => self.ssl_mode(match value {
                "verify-full" => SslMode::VerifyFull,
                "require" => SslMode::Require,
                "disable" | "allow" | "prefer" => {
                    return Err(bad(
                        "DSQL requires TLS; use verify-full (or require for PrivateLink)",
                    ));
                }
                "verify-ca" => {
                    return Err(bad(
                        "use verify-full: DSQL routes by host name, so the name is always checked",
                    ));
                }
                _ => return Err(bad("expected `verify-full` or `require`")),
            }),
            "application_name" => self.application_name(value),
            "connect_timeout" => self.connect_timeout(
                positive_secs(value)
                    .ok_or_else(|| bad("not a positive whole number of seconds"))?,
            ),
            "connect_deadline" => self.connect_deadline(
                positive_secs(value)
                    .ok_or_else(|| bad("not a positive whole number of seconds"))?,
            ),
            "keepalives" => self.keepalives(match value {
                "1" => true,
                "0" => false,
                _ => return Err(bad("expected 1 or 0")),
            }),
            "keepalives_idle" => self.keepalives_idle(
                positive_secs(value)
                    .ok_or_else(|| bad("not a positive whole number of seconds"))?,
            ),
            "keepalives_interval" => self.keepalives_interval(
                positive_secs(value)
                    .ok_or_else(|| bad("not a positive whole number of seconds"))?,
            ),
            "keepalives_count" => self.keepalives_retries(
                value
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| bad("not a positive whole number"))?,
            ),
            "tcp_user_timeout" => self.tcp_user_timeout(Duration::from_millis(
                value
                    .parse()
                    .map_err(|_| bad("not a whole number of milliseconds"))?,
            )),
            "options" => {
                let mut builder = self;
                for (name, setting) in parse_options(value).map_err(|reason| bad(&reason))? {
                    builder = match name.as_str() {
                        "search_path" => builder.search_path(setting),
                        "amzn-cluster-id" => builder.amzn_cluster_id(setting),
                        _ => builder.option(name, setting),
                    };
                }
                builder
            }
            "password" => {
                return Err(Error::config(
                    field,
                    "remove it: the password is an IAM auth token that the connector signs",
                ));
            }
            _ => return Err(unknown_key(key)),
        })
    }
}

impl DsqlConfig {
    /// Reads the configuration from the environment:
    ///
    /// | variable | meaning |
    /// |---|---|
    /// | `CLUSTER_ENDPOINT` | endpoint or cluster id (required); `<a>,<b>` for a multi-Region cluster's endpoints, the first preferred |
    /// | `CLUSTER_USER` | database role (default `admin`) |
    /// | `AWS_REGION`, `AWS_DEFAULT_REGION` | region, when the endpoint does not name one |
    /// | `AWS_PROFILE` | profile for credentials |
    /// | `PGHOSTADDR`, `PGPORT`, `PGDATABASE` | address to dial, port (each one for all endpoints, or a list in `CLUSTER_ENDPOINT`'s order), database |
    /// | `PGSSLROOTCERT`, `PGSSLNEGOTIATION` | CA file (or `system`), `direct` / `postgres` |
    /// | `PGAPPNAME`, `PGCONNECT_TIMEOUT` | application name prefix, connect timeout (s) |
    ///
    /// Errors name the variable at fault.
    pub fn from_env() -> Result<Self, Error> {
        Self::from_env_with(|name| std::env::var(name).ok())
    }

    pub(crate) fn from_env_with(var: impl Fn(&str) -> Option<String>) -> Result<Self, Error> {
        let var = |name: &str| var(name).filter(|v| !v.is_empty());
        let endpoint = var("CLUSTER_ENDPOINT").ok_or_else(|| {
            Error::config(
                "CLUSTER_ENDPOINT",
                "not set; export the cluster endpoint (<id>.dsql.<region>.on.aws) or id",
            )
        })?;
        let mut builder = DsqlConfig::builder().apply("host", &endpoint, "CLUSTER_ENDPOINT")?;
        const VARS: [(&str, &str); 8] = [
            ("CLUSTER_USER", "user"),
            ("AWS_PROFILE", "profile"),
            ("PGHOSTADDR", "hostaddr"),
            ("PGPORT", "port"),
            ("PGDATABASE", "dbname"),
            ("PGSSLROOTCERT", "sslrootcert"),
            ("PGSSLNEGOTIATION", "sslnegotiation"),
            ("PGAPPNAME", "application_name"),
        ];
        for (name, key) in VARS {
            if let Some(value) = var(name) {
                builder = builder.apply(key, &value, name)?;
            }
        }
        if let Some(value) = var("PGCONNECT_TIMEOUT") {
            builder = builder.apply("connect_timeout", &value, "PGCONNECT_TIMEOUT")?;
        }
        if let Some((name, region)) = region_variable(var) {
            validate_region(name, &region)?;
            builder.fallback_region = Some(region);
        }
        builder.build()
    }
}

impl FromStr for DsqlConfig {
    type Err = Error;

    /// Parses a `postgres://` / `postgresql://` URL or a libpq `key=value` string.
    ///
    /// ```
    /// use tokio_postgres_dsql::DsqlConfig;
    /// let url: DsqlConfig =
    ///     "postgres://admin@abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws/postgres?sslnegotiation=postgres"
    ///         .parse()?;
    /// let kv: DsqlConfig =
    ///     "host=abcdefghijklmnopqrstuvwxyz region=us-east-1 user=app options='-c search_path=myschema'"
    ///         .parse()?;
    /// assert_eq!(url.region(), Some("us-east-1"));
    /// assert_eq!(kv.host(), "abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws");
    /// assert_eq!(kv.search_path(), Some("myschema"));
    /// # Ok::<_, tokio_postgres_dsql::Error>(())
    /// ```
    fn from_str(s: &str) -> Result<Self, Error> {
        let trimmed = s.trim();
        if trimmed.is_empty() {
            return Err(Error::config("connection string", "is empty"));
        }
        let builder = if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://")
        {
            parse_url(trimmed)?
        } else if trimmed.contains("://") {
            return Err(Error::config(
                "connection string",
                "the URL scheme must be postgres:// or postgresql://",
            ));
        } else {
            let mut builder = DsqlConfig::builder();
            for (key, value) in parse_conninfo(trimmed)? {
                let Some(field) = known_key(&key) else {
                    return Err(unknown_key(&key));
                };
                let key = if key == "database" { "dbname" } else { &key };
                builder = builder.apply(key, &value, field)?;
            }
            builder
        };
        builder.build()
    }
}

/// The keys connection strings may use, as `'static` names for errors.
fn known_key(key: &str) -> Option<&'static str> {
    const KEYS: [&str; 23] = [
        "host",
        "hostaddr",
        "port",
        "user",
        "dbname",
        "region",
        "profile",
        "token_duration_secs",
        "tokenDurationSecs",
        "sslrootcert",
        "sslnegotiation",
        "sslmode",
        "application_name",
        "options",
        "connect_timeout",
        "connect_deadline",
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
        "tcp_user_timeout",
        "password",
        "database",
    ];
    KEYS.iter().copied().find(|k| *k == key)
}

const KNOWN_KEYS: &str = "host, hostaddr, port, user, dbname, region, profile, \
    token_duration_secs (or tokenDurationSecs), sslrootcert, sslmode, sslnegotiation, application_name, options, \
    connect_timeout, connect_deadline, keepalives, keepalives_idle, keepalives_interval, \
    keepalives_count, tcp_user_timeout";

fn unknown_key(key: &str) -> Error {
    Error::Config {
        field: Cow::Owned(key.chars().take(64).collect()),
        reason: format!("unknown parameter (known: {KNOWN_KEYS})"),
    }
}

fn parse_url(url: &str) -> Result<DsqlConfigBuilder, Error> {
    // libpq's multi-host URL form (`postgres://user@a:5432,b:5433/db`) is not a URL the `url`
    // crate reads: take the host list out and parse the rest with a stand-in host.
    let (url, hosts) = split_url_hosts(url)?;
    let parsed = url::Url::parse(&url)
        .map_err(|e| Error::config("connection string", format!("not a valid URL: {e}")))?;
    let decode = |s: &str, field: &'static str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| Error::config(field, "is not valid UTF-8 after percent-decoding"))
    };
    let mut builder = DsqlConfig::builder();
    if parsed.password().is_some() {
        builder = builder.apply("password", "", "password")?;
    }
    if !parsed.username().is_empty() {
        builder = builder.user(decode(parsed.username(), "user")?);
    }
    match hosts {
        Some((hosts, ports)) => {
            builder = builder.apply("host", &decode(&hosts, "host")?, "host")?;
            if let Some(ports) = ports {
                builder = builder.apply("port", &ports, "port")?;
            }
        }
        None => {
            if let Some(host) = parsed.host_str() {
                builder = builder.apply("host", &decode(host, "host")?, "host")?;
            }
            if let Some(port) = parsed.port() {
                builder = builder.apply("port", &port.to_string(), "port")?;
            }
        }
    }
    let path = parsed.path().trim_start_matches('/');
    if !path.is_empty() {
        builder = builder.database(decode(path, "dbname")?);
    }
    for (key, value) in parsed.query_pairs() {
        let Some(field) = known_key(&key) else {
            return Err(unknown_key(&key));
        };
        let key = if key == "database" { "dbname" } else { &key };
        builder = builder.apply(key, &value, field)?;
    }
    Ok(builder)
}

/// Host list and port list (`a,b` and `5432,5433`; `None` when no entry has a port) of a URL
/// whose authority names several hosts, and the URL with a stand-in single host.
type UrlHosts = Option<(String, Option<String>)>;

fn split_url_hosts(url: &str) -> Result<(Cow<'_, str>, UrlHosts), Error> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Ok((Cow::Borrowed(url), None));
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let (userinfo, hostlist) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (Some(userinfo), hosts),
        None => (None, authority),
    };
    if !hostlist.contains(',') {
        return Ok((Cow::Borrowed(url), None));
    }
    let mut hosts = Vec::new();
    let mut ports = Vec::new();
    for entry in hostlist.split(',') {
        let (host, port) = match entry.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (entry, None),
        };
        if host.is_empty() {
            return Err(Error::config(
                "host",
                format!("`{hostlist}`: has an empty entry"),
            ));
        }
        hosts.push(host);
        ports.push(port);
    }
    let ports = ports.iter().any(Option::is_some).then(|| {
        let default = DEFAULT_PORT.to_string();
        ports
            .iter()
            .map(|p| p.unwrap_or(&default).to_owned())
            .collect::<Vec<_>>()
            .join(",")
    });
    let userinfo = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
    let stand_in = format!("{scheme}://{userinfo}localhost{tail}");
    Ok((Cow::Owned(stand_in), Some((hosts.join(","), ports))))
}

/// Splits a libpq `key=value` string: values may be single-quoted, with `\'` and `\\` escapes.
fn parse_conninfo(s: &str) -> Result<Vec<(String, String)>, Error> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(Error::config(
                "connection string",
                format!(
                    "expected `=` after `{}`",
                    key.chars().take(64).collect::<String>()
                ),
            ));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => break,
                    },
                    Some(c) => value.push(c),
                    None => {
                        return Err(Error::config(
                            "connection string",
                            format!("unterminated quoted value for `{key}`"),
                        ));
                    }
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some(escaped) = chars.next() {
                        value.push(escaped);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
}

/// Parses libpq's `options`: `-c name=value`, `-cname=value` or `--name=value`, separated by
/// whitespace, with `\` escaping the next character.
pub(crate) fn parse_options(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = s.chars();
    let mut in_word = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                word.push(chars.next().ok_or("ends with a lone `\\`")?);
                in_word = true;
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    let mut out = Vec::new();
    let mut words = words.into_iter();
    while let Some(word) = words.next() {
        let setting = if word == "-c" {
            words.next().ok_or("`-c` needs a name=value after it")?
        } else if let Some(rest) = word.strip_prefix("-c").or_else(|| word.strip_prefix("--")) {
            rest.to_owned()
        } else {
            return Err(format!("expected `-c name=value`, found `{word}`"));
        };
        let (name, value) = setting
            .split_once('=')
            .ok_or_else(|| format!("`{setting}` has no `=value`"))?;
        if name.is_empty() {
            return Err(format!("`{setting}` has no name"));
        }
        out.push((name.to_owned(), value.to_owned()));
    }
    Ok(out)
}

/// A positive whole number of seconds.
fn positive_secs(value: &str) -> Option<Duration> {
    value
        .parse()
        .ok()
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
}
