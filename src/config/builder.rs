//! [`DsqlConfigBuilder`]'s setters and the checks of [`build`](DsqlConfigBuilder::build).

use super::*;

impl DsqlConfigBuilder {
    /// The cluster endpoint (`<id>.dsql.<region>.on.aws`, or a PrivateLink
    /// `<id>.dsql-xxxx.<region>.on.aws`), or a bare 26-character cluster id, which is expanded
    /// with the region to `<id>.dsql.<region>.on.aws`. Required.
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.host = Some(host.into());
        self
    }

    /// The TCP port. Default 5432.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// The database role. Default `admin`, which signs tokens with `DbConnectAdmin`; every other
    /// role signs with `DbConnect`.
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// The database name. Default `postgres`, the only database a DSQL cluster has.
    pub fn database(mut self, database: impl Into<String>) -> Self {
        self.database = Some(database.into());
        self
    }

    /// The AWS region tokens are signed for. Default: parsed from the endpoint; else
    /// `AWS_REGION` / `AWS_DEFAULT_REGION`; else the profile's region. When the endpoint names a
    /// region, a different one here is an error.
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// The address to dial instead of resolving the host (libpq's `hostaddr`). The host name is
    /// still used for SNI, the certificate check and the token: for bastions, tunnels,
    /// PrivateLink IPs and local tests.
    pub fn hostaddr(mut self, hostaddr: IpAddr) -> Self {
        self.hostaddr = Some(hostaddr);
        self
    }

    /// How long each token is valid for new connections. Default 900 s, as in the AWS SDKs;
    /// at least 1 s, at most 604 800 s (one week, DSQL's limit). Tokens made from temporary
    /// credentials never outlive them. Open connections outlive their token.
    pub fn token_duration(mut self, duration: Duration) -> Self {
        self.token_duration = Some(duration);
        self
    }

    /// The AWS profile for the default credentials chain (and for the region, if nothing else
    /// gives one). Ignored when a credentials provider is set.
    pub fn profile(mut self, profile: impl Into<String>) -> Self {
        self.profile = Some(profile.into());
        self
    }

    /// The credentials to sign tokens with, instead of `aws-config`'s default chain.
    pub fn credentials_provider(mut self, provider: impl ProvideCredentials + 'static) -> Self {
        self.credentials_provider = Some(SharedCredentialsProvider::new(provider));
        self
    }

    /// A PEM file of CA certificates to trust instead of the built-in webpki roots, or the
    /// literal `system` for the operating system's store (libpq's convention).
    pub fn ssl_root_cert(mut self, path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        self.root_certs = if path.as_os_str() == "system" {
            RootCerts::System
        } else {
            RootCerts::File(path)
        };
        self
    }

    /// How the certificate is checked. Default [`SslMode::VerifyFull`].
    /// [`SslMode::Require`] is only accepted together with
    /// [`amzn_cluster_id`](Self::amzn_cluster_id) (the PrivateLink case).
    pub fn ssl_mode(mut self, mode: SslMode) -> Self {
        self.ssl_mode = mode;
        self
    }

    /// How TLS starts. Default [`SslNegotiation::Direct`] (one round trip fewer).
    pub fn ssl_negotiation(mut self, negotiation: SslNegotiation) -> Self {
        self.ssl_negotiation = negotiation;
        self
    }

    /// The schema search path, sent in the startup message (`options=-c search_path=…`) so the
    /// session is ready without an extra `SET`. Non-admin roles usually need it (they cannot
    /// create objects in `public`).
    pub fn search_path(mut self, search_path: impl Into<String>) -> Self {
        self.search_path = Some(search_path.into());
        self
    }

    /// A prefix for the `application_name` the server sees: `<name>:tokio-postgres-dsql/<version>`.
    /// Without it the name is `tokio-postgres-dsql/<version>`.
    pub fn application_name(mut self, name: impl Into<String>) -> Self {
        self.application_name = Some(name.into());
        self
    }

    /// How long a pooled connection may live before it is replaced. Default 55 minutes (the
    /// server closes connections at 60 and a transaction may last 5). At most 60 minutes.
    pub fn max_lifetime(mut self, lifetime: Duration) -> Self {
        self.max_lifetime = Some(lifetime);
        self
    }

    /// The cluster id, for connecting through a PrivateLink VPC endpoint by its DNS name or IP:
    /// the token is signed for `<id>.dsql.<region>.on.aws` and the startup message carries
    /// `options=-c amzn-cluster-id=<id>`.
    pub fn amzn_cluster_id(mut self, cluster_id: impl Into<String>) -> Self {
        self.amzn_cluster_id = Some(cluster_id.into());
        self
    }

    /// The bound on one connect attempt, from the TCP connect to the end of authentication
    /// (libpq's meaning of `connect_timeout`). Default [`DEFAULT_CONNECT_TIMEOUT`] (10 s).
    ///
    /// Set alone (without [`connect_deadline`](Self::connect_deadline)), it bounds the whole
    /// connect to one attempt per endpoint: the deadline becomes this times the number of
    /// endpoints, as libpq means `connect_timeout`. At most an hour.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect.timeout = timeout;
        self.connect.timeout_set = true;
        self
    }

    /// The bound on a whole [`connect`](crate::DsqlConnector::connect): every attempt, the
    /// backoff after DSQL's transient refusals, and waits for the client-side rate limit.
    /// Default [`DEFAULT_CONNECT_DEADLINE`] (30 s).
    ///
    /// Without it, and with [`connect_timeout`](Self::connect_timeout) set, the deadline is
    /// `connect_timeout` times the number of endpoints. At most an hour.
    pub fn connect_deadline(mut self, deadline: Duration) -> Self {
        self.connect.deadline = deadline;
        self.connect.deadline_set = true;
        self
    }

    /// Limits how fast this connector (with its clones and pools) opens connections: a token
    /// bucket of `per_second` new connections a second with bursts of up to `burst`. Connects
    /// wait their turn (within the connect deadline) instead of being refused by the cluster.
    ///
    /// DSQL admits 100 new connections a second per cluster, with bursts of 1 000. With `n`
    /// service instances, `per_second = 100 / n` (minus headroom for other clients) keeps the
    /// fleet under the cluster's rate; `burst` is what one instance may open at once, e.g. its
    /// pool size. With several endpoints each has a bucket of its own (each peered cluster of
    /// a multi-Region pair has its own budget), so a connect failing over to the peer does
    /// not wait behind connects queued for the failed endpoint. Waits are cancel-safe: a
    /// connect dropped while it waits gives its slot back. Background failback probes take
    /// slots too (a probe is a login). Default: no limit. `per_second` must be at least
    /// [`MIN_CONNECT_RATE`] (one connection in 1 000 s), `burst` at least 1.
    pub fn connect_rate_limit(mut self, per_second: f64, burst: u32) -> Self {
        self.connect.rate_limit = Some((per_second, burst));
        self
    }

    /// The bound on one call to the credentials provider. A provider that does not answer in
    /// time counts as failed (and is backed off from). Default 5 s.
    pub fn credentials_timeout(mut self, timeout: Duration) -> Self {
        self.connect.credentials_timeout = timeout;
        self
    }

    /// TCP keepalives on new connections. Default on.
    pub fn keepalives(mut self, on: bool) -> Self {
        self.connect.keepalives = on;
        self
    }

    /// Idle time before the first keepalive probe. Default [`DEFAULT_KEEPALIVES_IDLE`] (60 s).
    pub fn keepalives_idle(mut self, idle: Duration) -> Self {
        self.connect.keepalives_idle = idle;
        self
    }

    /// Time between keepalive probes. Default [`DEFAULT_KEEPALIVES_INTERVAL`] (15 s).
    pub fn keepalives_interval(mut self, interval: Duration) -> Self {
        self.connect.keepalives_interval = interval;
        self
    }

    /// Unanswered probes before the connection is dropped (libpq's `keepalives_count`).
    /// Default [`DEFAULT_KEEPALIVES_RETRIES`] (3).
    pub fn keepalives_retries(mut self, retries: u32) -> Self {
        self.connect.keepalives_retries = retries;
        self
    }

    /// `TCP_USER_TIMEOUT` (Linux): how long sent data may stay unacknowledged before the
    /// connection is dropped. `Duration::ZERO` leaves the kernel's default (about 15 minutes).
    /// Default [`DEFAULT_TCP_USER_TIMEOUT`] (30 s).
    pub fn tcp_user_timeout(mut self, timeout: Duration) -> Self {
        self.connect.tcp_user_timeout = (!timeout.is_zero()).then_some(timeout);
        self
    }

    /// An extra session setting sent in the startup message (`options=-c name=value`). DSQL
    /// accepts only a few (see [`guide::dsql_notes`](crate::guide::dsql_notes)); others are
    /// refused by the server.
    pub fn option(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.options.push((name.into(), value.into()));
        self
    }

    /// The clock used for token signing and expiry. Default: the system clock. For tests.
    pub fn time_source(mut self, time_source: impl TimeSource + 'static) -> Self {
        self.time_source = Some(SharedTimeSource::new(time_source));
        self
    }

    /// Adds a peer endpoint: the other cluster of a multi-Region cluster (see the module docs).
    /// The endpoint set with [`host`](Self::host) stays the preferred one; peers follow in the
    /// order added. New connections go to the first endpoint that is not marked down.
    ///
    /// ```
    /// use tokio_postgres_dsql::{DsqlConfig, Peer};
    /// let config = DsqlConfig::builder()
    ///     .host("abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws")
    ///     .peer("zyxwvutsrqponmlkjihgfedcba.dsql.us-east-2.on.aws")
    ///     .build()?;
    /// assert_eq!(config.endpoints()[1].region(), Some("us-east-2"));
    /// // Each endpoint may have its own port and address, e.g. through a tunnel:
    /// let tunnelled = DsqlConfig::builder()
    ///     .host("abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws")
    ///     .hostaddr("127.0.0.1".parse()?)
    ///     .port(15432)
    ///     .peer(
    ///         Peer::new("zyxwvutsrqponmlkjihgfedcba")
    ///             .region("us-east-2")
    ///             .hostaddr("127.0.0.1".parse()?)
    ///             .port(25432),
    ///     )
    ///     .build()?;
    /// assert_eq!(
    ///     tunnelled.endpoints()[1].host(),
    ///     "zyxwvutsrqponmlkjihgfedcba.dsql.us-east-2.on.aws"
    /// );
    /// # Ok::<_, Box<dyn std::error::Error>>(())
    /// ```
    pub fn peer(mut self, peer: impl Into<Peer>) -> Self {
        self.peers.push(peer.into());
        self
    }

    /// With several endpoints: how often one marked down is probed (one connect attempt) to
    /// bring new connections back to it, before jitter (each wait is drawn from half to one and
    /// a half times it, so a fleet of clients does not probe in step). Default
    /// [`DEFAULT_FAILBACK_PROBE_INTERVAL`] (2 s).
    pub fn failback_probe_interval(mut self, interval: Duration) -> Self {
        self.failback_probe_interval = Some(interval);
        self
    }

    /// With several endpoints: when one is taken for down and up again, and how fast pools
    /// move back to it. Default [`FailoverPolicy::default`] (see its docs for the rules).
    pub fn failover(mut self, policy: FailoverPolicy) -> Self {
        self.failover = policy;
        self
    }

    /// Checks the configuration. The error names the first field at fault.
    pub fn build(mut self) -> Result<DsqlConfig, Error> {
        let lists = std::mem::take(&mut self.lists);
        let this = lists.apply(self)?;
        this.build_checked()
    }

    fn build_checked(mut self) -> Result<DsqlConfig, Error> {
        let host = self.host.ok_or_else(|| {
            Error::config(
                "host",
                "an endpoint is required (<cluster-id>.dsql.<region>.on.aws, or a 26-character \
                 cluster id with a region)",
            )
        })?;
        let port = self.port.unwrap_or(DEFAULT_PORT);
        let several = !self.peers.is_empty();
        let first = checked_endpoint(
            &host,
            port,
            self.hostaddr,
            self.region,
            (!several).then_some(self.fallback_region).flatten(),
            several,
        )?;
        let mut endpoints = vec![first];
        for peer in self.peers {
            let endpoint = checked_endpoint(
                &peer.host,
                peer.port.unwrap_or(port),
                peer.hostaddr,
                peer.region,
                None,
                true,
            )?;
            if endpoints.iter().any(|e| e.host == endpoint.host) {
                return Err(Error::config(
                    "host",
                    format!(
                        "`{}` is listed twice; a multi-Region cluster's endpoints are distinct",
                        endpoint.host
                    ),
                ));
            }
            endpoints.push(endpoint);
        }
        if several && self.amzn_cluster_id.is_some() {
            return Err(Error::config(
                "amzn_cluster_id",
                "names one cluster, but several endpoints are configured; each peer of a \
                 multi-Region cluster has its own cluster id",
            ));
        }
        let failback_probe_interval = self
            .failback_probe_interval
            .unwrap_or(DEFAULT_FAILBACK_PROBE_INTERVAL);
        if failback_probe_interval.is_zero() || failback_probe_interval > MAX_DURATION {
            return Err(Error::config(
                "failback_probe_interval",
                "must be more than 0 and at most 3600 s",
            ));
        }
        self.failover.check()?;

        let user = self.user.unwrap_or_else(|| DEFAULT_USER.to_owned());
        check_text("user", &user, false)?;
        let database = self.database.unwrap_or_else(|| DEFAULT_DATABASE.to_owned());
        check_text("database", &database, false)?;

        let token_duration = self.token_duration.unwrap_or(DEFAULT_TOKEN_DURATION);
        if token_duration < Duration::from_secs(1) || token_duration > MAX_TOKEN_DURATION {
            return Err(Error::config(
                "token_duration",
                format!(
                    "{} s is out of range: DSQL accepts 1 to {} s",
                    token_duration.as_secs_f64(),
                    MAX_TOKEN_DURATION.as_secs()
                ),
            ));
        }

        let max_lifetime = self.max_lifetime.unwrap_or(DEFAULT_MAX_LIFETIME);
        if max_lifetime.is_zero() || max_lifetime > SERVER_MAX_CONNECTION_AGE {
            return Err(Error::config(
                "max_lifetime",
                "must be more than 0 and at most 60 minutes (DSQL closes connections at 60)",
            ));
        }

        if let Some(id) = &self.amzn_cluster_id
            && !is_cluster_id(id)
        {
            return Err(Error::config(
                "amzn_cluster_id",
                "a cluster id is 26 lowercase letters and digits",
            ));
        }
        if self.ssl_mode == SslMode::Require && self.amzn_cluster_id.is_none() {
            return Err(Error::config(
                "sslmode",
                "`require` is only for PrivateLink VPC endpoints: it checks the certificate \
                 against DSQL's names for the cluster that amzn_cluster_id names; set \
                 amzn_cluster_id too, or use verify-full",
            ));
        }
        if let Some(path) = &self.search_path {
            check_text("search_path", path, true)?;
        }
        if let Some(name) = &self.application_name {
            check_text("application_name", name, true)?;
        }
        if let Some(profile) = &self.profile {
            check_text("profile", profile, false)?;
        }
        for (name, value) in &self.options {
            if name.is_empty() || name.contains(['\0', ' ', '=']) {
                return Err(Error::config(
                    "options",
                    format!("bad setting name `{name}`"),
                ));
            }
            check_text("options", value, true)?;
        }
        self.connect.check()?;
        if self.connect.timeout_set && !self.connect.deadline_set {
            // libpq's meaning: one bounded attempt per host.
            self.connect.deadline = self
                .connect
                .timeout
                .saturating_mul(endpoints.len() as u32)
                .min(MAX_DURATION);
        }

        Ok(DsqlConfig {
            endpoints,
            user,
            database,
            token_duration,
            profile: self.profile,
            credentials_provider: self.credentials_provider,
            root_certs: self.root_certs,
            ssl_mode: self.ssl_mode,
            ssl_negotiation: self.ssl_negotiation,
            search_path: self.search_path,
            application_name: self.application_name,
            max_lifetime,
            amzn_cluster_id: self.amzn_cluster_id,
            connect: self.connect,
            options: self.options,
            time_source: self.time_source,
            failback_probe_interval,
            failover: self.failover,
        })
    }
}

/// Checks one endpoint: its host form, its Region against the host's, and its port. A bare
/// cluster id is expanded once the Region is known; `needs_region` (several endpoints) makes
/// an unknown Region an error.
fn checked_endpoint(
    host: &str,
    port: u16,
    hostaddr: Option<IpAddr>,
    region: Option<String>,
    fallback_region: Option<String>,
    needs_region: bool,
) -> Result<Endpoint, Error> {
    let host = validate_host(host)?;
    if let Some(region) = &region {
        validate_region("region", region)?;
    }
    let region = match (region_from_host(&host), region) {
        (Some(from_host), Some(explicit)) if from_host != explicit => {
            return Err(Error::config(
                "region",
                format!(
                    "`{explicit}` does not match the Region `{from_host}` of the endpoint \
                     `{host}` (tokens must be signed for the endpoint's Region)"
                ),
            ));
        }
        (Some(from_host), _) => Some(from_host.to_owned()),
        (None, Some(explicit)) => Some(explicit),
        (None, None) => fallback_region,
    };
    if region.is_none() && needs_region {
        return Err(Error::config(
            "region",
            format!(
                "the endpoint `{host}` names no Region; with several endpoints each needs its \
                 own (a full <id>.dsql.<region>.on.aws name, or a region for each)"
            ),
        ));
    }
    let host = match &region {
        Some(region) if is_cluster_id(&host) => format!("{host}.dsql.{region}.on.aws"),
        _ => host,
    };
    if port == 0 {
        return Err(Error::config("port", "must be between 1 and 65535"));
    }
    Ok(Endpoint {
        host,
        port,
        hostaddr,
        region,
    })
}

fn check_text(field: &'static str, value: &str, may_be_empty: bool) -> Result<(), Error> {
    if value.contains('\0') {
        return Err(Error::config(field, "contains a NUL character"));
    }
    if !may_be_empty && value.is_empty() {
        return Err(Error::config(field, "is empty"));
    }
    Ok(())
}

impl ConnectSettings {
    /// Names the first setting out of range.
    fn check(&self) -> Result<(), Error> {
        for (field, value) in [
            ("connect_timeout", self.timeout),
            ("connect_deadline", self.deadline),
            ("credentials_timeout", self.credentials_timeout),
            ("keepalives_idle", self.keepalives_idle),
            ("keepalives_interval", self.keepalives_interval),
        ] {
            if value.is_zero() {
                return Err(Error::config(field, "must be more than 0"));
            }
            if value > MAX_DURATION {
                return Err(Error::config(
                    field,
                    format!(
                        "{} s is too long: at most {} s",
                        value.as_secs(),
                        MAX_DURATION.as_secs()
                    ),
                ));
            }
        }
        if let Some(timeout) = self.tcp_user_timeout
            && timeout > MAX_DURATION
        {
            return Err(Error::config(
                "tcp_user_timeout",
                "is too long: at most 3600 s",
            ));
        }
        if self.keepalives_retries == 0 {
            return Err(Error::config("keepalives_retries", "must be at least 1"));
        }
        if let Some((per_second, burst)) = self.rate_limit {
            if !(per_second.is_finite() && per_second >= MIN_CONNECT_RATE) {
                return Err(Error::config(
                    "connect_rate_limit",
                    format!(
                        "{per_second} new connections a second: must be at least \
                         {MIN_CONNECT_RATE} (one connection in {} s)",
                        1.0 / MIN_CONNECT_RATE
                    ),
                ));
            }
            if burst == 0 {
                return Err(Error::config(
                    "connect_rate_limit",
                    "the burst must be at least 1",
                ));
            }
        }
        Ok(())
    }
}
