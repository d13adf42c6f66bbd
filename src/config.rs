//! [`DsqlConfig`]: where and how to connect, from a builder, a connection string or the
//! environment.
//!
//! | option | builder | URL / conninfo key | environment | default |
//! |---|---|---|---|---|
//! | endpoint | [`host`](DsqlConfigBuilder::host) | `host` | `CLUSTER_ENDPOINT` | required |
//! | port | [`port`](DsqlConfigBuilder::port) | `port` | `PGPORT` | 5432 |
//! | database role | [`user`](DsqlConfigBuilder::user) | `user` | `CLUSTER_USER` | `admin` |
//! | database | [`database`](DsqlConfigBuilder::database) | `dbname` | `PGDATABASE` | `postgres` |
//! | region | [`region`](DsqlConfigBuilder::region) | `region` | `AWS_REGION`, `AWS_DEFAULT_REGION` | from the endpoint, else environment, else profile |
//! | address to dial | [`hostaddr`](DsqlConfigBuilder::hostaddr) | `hostaddr` | `PGHOSTADDR` | resolve the endpoint |
//! | token life | [`token_duration`](DsqlConfigBuilder::token_duration) | `token_duration_secs` | | 900 s (at most 604 800 s) |
//! | AWS profile | [`profile`](DsqlConfigBuilder::profile) | `profile` | `AWS_PROFILE` | the default chain |
//! | credentials | [`credentials_provider`](DsqlConfigBuilder::credentials_provider) | | | `aws-config`'s default chain |
//! | CA certificates | [`ssl_root_cert`](DsqlConfigBuilder::ssl_root_cert) | `sslrootcert` | `PGSSLROOTCERT` | webpki roots (`system`: the OS store) |
//! | TLS verification | [`ssl_mode`](DsqlConfigBuilder::ssl_mode) | `sslmode` | | `verify-full` |
//! | TLS negotiation | [`ssl_negotiation`](DsqlConfigBuilder::ssl_negotiation) | `sslnegotiation` | `PGSSLNEGOTIATION` | `direct` |
//! | schema search path | [`search_path`](DsqlConfigBuilder::search_path) | `options=-c search_path=…` | | server default |
//! | application name prefix | [`application_name`](DsqlConfigBuilder::application_name) | `application_name` | `PGAPPNAME` | none |
//! | pool max lifetime | [`max_lifetime`](DsqlConfigBuilder::max_lifetime) | | | 55 min |
//! | PrivateLink cluster id | [`amzn_cluster_id`](DsqlConfigBuilder::amzn_cluster_id) | `options=-c amzn-cluster-id=…` | | none |
//! | one connect attempt | [`connect_timeout`](DsqlConfigBuilder::connect_timeout) | `connect_timeout` | `PGCONNECT_TIMEOUT` | 10 s |
//! | whole connect, retries included | [`connect_deadline`](DsqlConfigBuilder::connect_deadline) | `connect_deadline` | | 30 s |
//! | client-side connect rate | [`connect_rate_limit`](DsqlConfigBuilder::connect_rate_limit) | | | none |
//! | one credentials call | [`credentials_timeout`](DsqlConfigBuilder::credentials_timeout) | | | 5 s |
//! | TCP keepalives | [`keepalives`](DsqlConfigBuilder::keepalives) | `keepalives` (0/1) | | on |
//! | keepalive idle time | [`keepalives_idle`](DsqlConfigBuilder::keepalives_idle) | `keepalives_idle` (s) | | 60 s |
//! | keepalive probe interval | [`keepalives_interval`](DsqlConfigBuilder::keepalives_interval) | `keepalives_interval` (s) | | 15 s |
//! | keepalive probes | [`keepalives_retries`](DsqlConfigBuilder::keepalives_retries) | `keepalives_count` | | 3 |
//! | unacknowledged-data limit | [`tcp_user_timeout`](DsqlConfigBuilder::tcp_user_timeout) | `tcp_user_timeout` (ms) | | 30 s |
//!
//! Time limits, as libpq means them: `connect_timeout` bounds one attempt from the TCP connect
//! to the end of authentication (a server that accepts TCP and then says nothing cannot hang a
//! connect); `connect_deadline` bounds the whole [`connect`](crate::DsqlConnector::connect),
//! including retries after DSQL's `rate exceeded`, `too many open connections` and `waking up`
//! refusals and waits for the client-side rate limit.
//!
//! The keepalive defaults find a dead peer on an idle connection in about 90 s (60 s idle, then
//! up to 3 probes 15 s apart, cut short by `tcp_user_timeout`), well before AWS NAT gateways
//! drop idle flows (350 s), and `tcp_user_timeout` drops a connection whose sent data has gone
//! unacknowledged for 30 s (a half-open connection) instead of the kernel's 15 minutes. A long
//! query is not affected: the server's kernel acknowledges the query while it runs.

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_smithy_async::time::{SharedTimeSource, TimeSource};

use crate::Error;
use crate::token::{DEFAULT_TOKEN_DURATION, MAX_TOKEN_DURATION};

/// DSQL's port.
pub const DEFAULT_PORT: u16 = 5432;
/// DSQL's built-in administrator role.
pub const DEFAULT_USER: &str = "admin";
/// DSQL has exactly one database, `postgres`.
pub const DEFAULT_DATABASE: &str = "postgres";
/// Pooled connections are recycled after 55 minutes: DSQL closes every connection at 60 minutes,
/// and a transaction may last up to 5, so a connection handed out before 55 minutes can finish
/// any transaction it starts.
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(55 * 60);
/// DSQL's hard limit on a connection's age.
pub const SERVER_MAX_CONNECTION_AGE: Duration = Duration::from_secs(60 * 60);

/// How TLS starts on a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SslNegotiation {
    /// TLS from the first byte, with ALPN `postgresql` (libpq's `sslnegotiation=direct`). Saves
    /// the SSLRequest round trip. The default.
    #[default]
    Direct,
    /// The classic SSLRequest exchange, then TLS (libpq's `sslnegotiation=postgres`).
    Postgres,
}

/// How the server's certificate is checked. TLS itself is never off: DSQL requires it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SslMode {
    /// Check the chain against the trusted roots and the name against the endpoint (libpq's
    /// `verify-full`). The default.
    #[default]
    VerifyFull,
    /// Encrypt but do not check the certificate (libpq's `require`). Only for reaching a cluster
    /// through a PrivateLink VPC endpoint by its DNS name or IP, where the certificate cannot
    /// match; it therefore requires [`DsqlConfigBuilder::amzn_cluster_id`].
    Require,
}

/// Where to find the CA certificates that the server's chain must lead to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum RootCerts {
    /// The Mozilla root set compiled in by `webpki-roots` (includes Amazon Root CA 1).
    #[default]
    WebPki,
    /// The operating system's store (libpq's `sslrootcert=system`).
    System,
    /// PEM certificates from a file.
    File(PathBuf),
}

/// Everything needed to connect to one DSQL endpoint. Build it with [`DsqlConfig::builder`],
/// parse it from a `postgres://` URL or a `key=value` string, or read it with
/// [`DsqlConfig::from_env`].
///
/// `Debug` shows every setting except the credentials provider's contents.
#[derive(Clone)]
pub struct DsqlConfig {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) user: String,
    pub(crate) database: String,
    pub(crate) region: Option<String>,
    pub(crate) hostaddr: Option<IpAddr>,
    pub(crate) token_duration: Duration,
    pub(crate) profile: Option<String>,
    pub(crate) credentials_provider: Option<SharedCredentialsProvider>,
    pub(crate) root_certs: RootCerts,
    pub(crate) ssl_mode: SslMode,
    pub(crate) ssl_negotiation: SslNegotiation,
    pub(crate) search_path: Option<String>,
    pub(crate) application_name: Option<String>,
    pub(crate) max_lifetime: Duration,
    pub(crate) amzn_cluster_id: Option<String>,
    pub(crate) connect: ConnectSettings,
    pub(crate) options: Vec<(String, String)>,
    pub(crate) time_source: Option<SharedTimeSource>,
}

/// Default bound on one connect attempt (TCP, TLS, startup, authentication). An attempt is
/// three round trips plus a token check (p99 120 ms in-Region); 10 s leaves room for a slow
/// network without letting a silent peer hold a caller.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bound on a whole connect, retries included: long enough for a burst of connects
/// refused with `rate exceeded` to drain at DSQL's 100/s, short enough to surface an outage.
/// Raise it for clusters that scale to zero, which may take a minute or more to wake up.
pub const DEFAULT_CONNECT_DEADLINE: Duration = Duration::from_secs(30);
/// Default bound on one call to the credentials provider; `aws-config`'s own identity cache
/// uses the same.
pub const DEFAULT_CREDENTIALS_TIMEOUT: Duration = Duration::from_secs(5);
/// Default TCP keepalive idle time.
pub const DEFAULT_KEEPALIVES_IDLE: Duration = Duration::from_secs(60);
/// Default interval between TCP keepalive probes.
pub const DEFAULT_KEEPALIVES_INTERVAL: Duration = Duration::from_secs(15);
/// Default number of unanswered keepalive probes before the connection is dropped.
pub const DEFAULT_KEEPALIVES_RETRIES: u32 = 3;
/// Default `TCP_USER_TIMEOUT`: how long sent data may stay unacknowledged.
pub const DEFAULT_TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// Connection-level limits and TCP settings (see the table in the module docs).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ConnectSettings {
    pub(crate) timeout: Duration,
    pub(crate) deadline: Duration,
    /// New connections a second, and the burst.
    pub(crate) rate_limit: Option<(f64, u32)>,
    pub(crate) credentials_timeout: Duration,
    pub(crate) keepalives: bool,
    pub(crate) keepalives_idle: Duration,
    pub(crate) keepalives_interval: Duration,
    pub(crate) keepalives_retries: u32,
    pub(crate) tcp_user_timeout: Option<Duration>,
}

impl Default for ConnectSettings {
    fn default() -> Self {
        ConnectSettings {
            timeout: DEFAULT_CONNECT_TIMEOUT,
            deadline: DEFAULT_CONNECT_DEADLINE,
            rate_limit: None,
            credentials_timeout: DEFAULT_CREDENTIALS_TIMEOUT,
            keepalives: true,
            keepalives_idle: DEFAULT_KEEPALIVES_IDLE,
            keepalives_interval: DEFAULT_KEEPALIVES_INTERVAL,
            keepalives_retries: DEFAULT_KEEPALIVES_RETRIES,
            tcp_user_timeout: Some(DEFAULT_TCP_USER_TIMEOUT),
        }
    }
}

impl fmt::Debug for DsqlConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DsqlConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("database", &self.database)
            .field("region", &self.region)
            .field("hostaddr", &self.hostaddr)
            .field("token_duration", &self.token_duration)
            .field("profile", &self.profile)
            .field(
                "credentials_provider",
                &self.credentials_provider.as_ref().map(|_| "<set>"),
            )
            .field("root_certs", &self.root_certs)
            .field("ssl_mode", &self.ssl_mode)
            .field("ssl_negotiation", &self.ssl_negotiation)
            .field("search_path", &self.search_path)
            .field("application_name", &self.application_name)
            .field("max_lifetime", &self.max_lifetime)
            .field("amzn_cluster_id", &self.amzn_cluster_id)
            .field("connect", &self.connect)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Builds a [`DsqlConfig`]. Every setter consumes and returns the builder; [`build`](Self::build)
/// checks the whole configuration and names the field at fault.
#[derive(Default, Clone)]
#[must_use]
pub struct DsqlConfigBuilder {
    host: Option<String>,
    port: Option<u16>,
    user: Option<String>,
    database: Option<String>,
    region: Option<String>,
    hostaddr: Option<IpAddr>,
    token_duration: Option<Duration>,
    profile: Option<String>,
    credentials_provider: Option<SharedCredentialsProvider>,
    root_certs: RootCerts,
    ssl_mode: SslMode,
    ssl_negotiation: SslNegotiation,
    search_path: Option<String>,
    application_name: Option<String>,
    max_lifetime: Option<Duration>,
    amzn_cluster_id: Option<String>,
    connect: ConnectSettings,
    options: Vec<(String, String)>,
    time_source: Option<SharedTimeSource>,
    /// Region used only when neither the host nor `region` gives one (from the environment).
    fallback_region: Option<String>,
}

impl fmt::Debug for DsqlConfigBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DsqlConfigBuilder")
            .field("host", &self.host)
            .field("user", &self.user)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

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
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect.timeout = timeout;
        self
    }

    /// The bound on a whole [`connect`](crate::DsqlConnector::connect): every attempt, the
    /// backoff after DSQL's transient refusals, and waits for the client-side rate limit.
    /// Default [`DEFAULT_CONNECT_DEADLINE`] (30 s).
    pub fn connect_deadline(mut self, deadline: Duration) -> Self {
        self.connect.deadline = deadline;
        self
    }

    /// Limits how fast this connector (with its clones and pools) opens connections: a token
    /// bucket of `per_second` new connections a second with bursts of up to `burst`. Connects
    /// wait their turn (within the connect deadline) instead of being refused by the cluster.
    ///
    /// DSQL admits 100 new connections a second per cluster, with bursts of 1 000. With `n`
    /// service instances, `per_second = 100 / n` (minus headroom for other clients) keeps the
    /// fleet under the cluster's rate; `burst` is what one instance may open at once, e.g. its
    /// pool size. Default: no limit.
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
    /// accepts only a few (see the README); others are refused by the server.
    pub fn option(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.options.push((name.into(), value.into()));
        self
    }

    /// The clock used for token signing and expiry. Default: the system clock. For tests.
    pub fn time_source(mut self, time_source: impl TimeSource + 'static) -> Self {
        self.time_source = Some(SharedTimeSource::new(time_source));
        self
    }

    /// Checks the configuration. The error names the first field at fault.
    pub fn build(self) -> Result<DsqlConfig, Error> {
        let host = self.host.ok_or_else(|| {
            Error::config(
                "host",
                "an endpoint is required (<cluster-id>.dsql.<region>.on.aws, or a 26-character \
                 cluster id with a region)",
            )
        })?;
        let host = validate_host(&host)?;

        if let Some(region) = &self.region {
            validate_region("region", region)?;
        }
        let host_region = region_from_host(&host);
        let region = match (host_region, self.region) {
            (Some(from_host), Some(explicit)) if from_host != explicit => {
                return Err(Error::config(
                    "region",
                    format!(
                        "`{explicit}` does not match the endpoint's region `{from_host}` \
                         (tokens must be signed for the endpoint's region)"
                    ),
                ));
            }
            (Some(from_host), _) => Some(from_host.to_owned()),
            (None, Some(explicit)) => Some(explicit),
            (None, None) => self.fallback_region,
        };
        let host = match &region {
            Some(region) if is_cluster_id(&host) => format!("{host}.dsql.{region}.on.aws"),
            _ => host,
        };

        let port = self.port.unwrap_or(DEFAULT_PORT);
        if port == 0 {
            return Err(Error::config("port", "must be between 1 and 65535"));
        }
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
                "`require` skips certificate verification and is only for PrivateLink VPC \
                 endpoints; set amzn_cluster_id too, or use verify-full",
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

        Ok(DsqlConfig {
            host,
            port,
            user,
            database,
            region,
            hostaddr: self.hostaddr,
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
        })
    }

    /// Applies one connection-string or environment setting. `field` is how errors name it.
    fn apply(self, key: &str, value: &str, field: &'static str) -> Result<Self, Error> {
        let bad = |reason: &str| Error::config(field, format!("`{value}`: {reason}"));
        Ok(match key {
            "host" => {
                if value.contains(',') {
                    return Err(bad("only one host is supported"));
                }
                self.host(value)
            }
            "hostaddr" => self.hostaddr(
                value
                    .parse()
                    .map_err(|_| bad("not an IPv4 or IPv6 address"))?,
            ),
            "port" => self.port(
                value
                    .parse()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| bad("not a port number (1-65535)"))?,
            ),
            "user" => self.user(value),
            "dbname" => self.database(value),
            "region" => self.region(value),
            "profile" => self.profile(value),
            "token_duration_secs" => {
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
    /// A builder with every option at its default.
    pub fn builder() -> DsqlConfigBuilder {
        DsqlConfigBuilder::default()
    }

    /// Reads the configuration from the environment:
    ///
    /// | variable | meaning |
    /// |---|---|
    /// | `CLUSTER_ENDPOINT` | endpoint or cluster id (required) |
    /// | `CLUSTER_USER` | database role (default `admin`) |
    /// | `AWS_REGION`, `AWS_DEFAULT_REGION` | region, when the endpoint does not name one |
    /// | `AWS_PROFILE` | profile for credentials |
    /// | `PGHOSTADDR`, `PGPORT`, `PGDATABASE` | address to dial, port, database |
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
        for name in ["AWS_REGION", "AWS_DEFAULT_REGION"] {
            if let Some(region) = var(name) {
                validate_region(name, &region)?;
                builder.fallback_region = Some(region);
                break;
            }
        }
        builder.build()
    }

    /// A builder holding this configuration, to override some settings (for example a
    /// configuration read with [`from_env`](Self::from_env), then a different user).
    pub fn into_builder(self) -> DsqlConfigBuilder {
        DsqlConfigBuilder {
            host: Some(self.host),
            port: Some(self.port),
            user: Some(self.user),
            database: Some(self.database),
            region: self.region,
            hostaddr: self.hostaddr,
            token_duration: Some(self.token_duration),
            profile: self.profile,
            credentials_provider: self.credentials_provider,
            root_certs: self.root_certs,
            ssl_mode: self.ssl_mode,
            ssl_negotiation: self.ssl_negotiation,
            search_path: self.search_path,
            application_name: self.application_name,
            max_lifetime: Some(self.max_lifetime),
            amzn_cluster_id: self.amzn_cluster_id,
            connect: self.connect,
            options: self.options,
            time_source: self.time_source,
            fallback_region: None,
        }
    }

    /// The endpoint host name (SNI, certificate name; the token's host unless
    /// [`amzn_cluster_id`](DsqlConfigBuilder::amzn_cluster_id) is set).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The database role.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The database name.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// The region, if known without asking the AWS profile.
    pub fn region(&self) -> Option<&str> {
        self.region.as_deref()
    }

    /// The address dialled instead of resolving the host.
    pub fn hostaddr(&self) -> Option<IpAddr> {
        self.hostaddr
    }

    /// The token life.
    pub fn token_duration(&self) -> Duration {
        self.token_duration
    }

    /// The pool's maximum connection lifetime.
    pub fn max_lifetime(&self) -> Duration {
        self.max_lifetime
    }

    /// The TLS negotiation.
    pub fn ssl_negotiation(&self) -> SslNegotiation {
        self.ssl_negotiation
    }

    /// The certificate check.
    pub fn ssl_mode(&self) -> SslMode {
        self.ssl_mode
    }

    /// Where trusted CA certificates come from.
    pub fn root_certs(&self) -> &RootCerts {
        &self.root_certs
    }

    /// The search path sent at startup.
    pub fn search_path(&self) -> Option<&str> {
        self.search_path.as_deref()
    }

    /// The `application_name` the server sees.
    pub fn application_name(&self) -> String {
        let ours = concat!("tokio-postgres-dsql/", env!("CARGO_PKG_VERSION"));
        match &self.application_name {
            Some(prefix) => format!("{prefix}:{ours}"),
            None => ours.to_owned(),
        }
    }

    /// The bound on one connect attempt.
    pub fn connect_timeout(&self) -> Duration {
        self.connect.timeout
    }

    /// The bound on a whole connect, retries included.
    pub fn connect_deadline(&self) -> Duration {
        self.connect.deadline
    }

    /// The client-side connect rate limit (new connections a second, burst), if set.
    pub fn connect_rate_limit(&self) -> Option<(f64, u32)> {
        self.connect.rate_limit
    }

    /// The bound on one credentials-provider call.
    pub fn credentials_timeout(&self) -> Duration {
        self.connect.credentials_timeout
    }

    /// The PrivateLink cluster id, if set.
    pub fn amzn_cluster_id(&self) -> Option<&str> {
        self.amzn_cluster_id.as_deref()
    }

    /// The settings sent as `options=-c …` at startup: `search_path`, `amzn-cluster-id` and
    /// any extra [`option`](DsqlConfigBuilder::option)s, in that order.
    pub fn startup_options(&self) -> Vec<(&str, &str)> {
        let mut out = Vec::new();
        if let Some(path) = &self.search_path {
            out.push(("search_path", path.as_str()));
        }
        if let Some(id) = &self.amzn_cluster_id {
            out.push(("amzn-cluster-id", id.as_str()));
        }
        out.extend(self.options.iter().map(|(n, v)| (n.as_str(), v.as_str())));
        out
    }

    /// The host name tokens are signed for, given the resolved region: the endpoint itself, or
    /// `<amzn_cluster_id>.dsql.<region>.on.aws` in the PrivateLink case.
    pub(crate) fn token_host(&self, region: &str) -> String {
        match &self.amzn_cluster_id {
            Some(id) => format!("{id}.dsql.{region}.on.aws"),
            None => self.host.clone(),
        }
    }

    /// The endpoint host once the region is known (expands a bare cluster id).
    pub(crate) fn endpoint_for(&self, region: &str) -> String {
        if is_cluster_id(&self.host) {
            format!("{}.dsql.{region}.on.aws", self.host)
        } else {
            self.host.clone()
        }
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
    const KEYS: [&str; 22] = [
        "host",
        "hostaddr",
        "port",
        "user",
        "dbname",
        "region",
        "profile",
        "token_duration_secs",
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
    token_duration_secs, sslrootcert, sslmode, sslnegotiation, application_name, options, \
    connect_timeout, connect_deadline, keepalives, keepalives_idle, keepalives_interval, \
    keepalives_count, tcp_user_timeout";

fn unknown_key(key: &str) -> Error {
    Error::Config {
        field: Cow::Owned(key.chars().take(64).collect()),
        reason: format!("unknown parameter (known: {KNOWN_KEYS})"),
    }
}

fn parse_url(url: &str) -> Result<DsqlConfigBuilder, Error> {
    let parsed = url::Url::parse(url)
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
    if let Some(host) = parsed.host_str() {
        builder = builder.apply("host", &decode(host, "host")?, "host")?;
    }
    if let Some(port) = parsed.port() {
        builder = builder.apply("port", &port.to_string(), "port")?;
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

/// Lowercases and checks a host name (or cluster id).
fn validate_host(host: &str) -> Result<String, Error> {
    let host = host.trim().trim_end_matches('.').to_ascii_lowercase();
    let bad = |reason: &str| Error::config("host", format!("`{host}` {reason}"));
    if host.is_empty() {
        return Err(Error::config("host", "is empty"));
    }
    if host.len() > 253 {
        return Err(bad("is longer than 253 characters"));
    }
    if host.contains(':') || host.contains('/') {
        return Err(bad(
            "must be a host name only, without scheme, port or path",
        ));
    }
    for label in host.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(bad("has an empty or over-long label"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            || label.starts_with('-')
            || label.ends_with('-')
        {
            return Err(bad("is not a valid DNS name"));
        }
    }
    if host.parse::<IpAddr>().is_ok() {
        return Err(bad(
            "is an IP address; set the endpoint name as host and the IP as hostaddr",
        ));
    }
    Ok(host)
}

fn validate_region(field: &'static str, region: &str) -> Result<(), Error> {
    let ok = region.len() <= 32
        && region.starts_with(|c: char| c.is_ascii_lowercase())
        && region.contains('-')
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && region.ends_with(|c: char| c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(Error::config(
            field,
            format!("`{region}` is not an AWS region name (like us-east-1)"),
        ))
    }
}

/// The region in `<id>.dsql[-xxxx].<region>.on.aws` (DSQL_FACTS: `\.dsql[^.]*\.([^.]+)\.on\.aws$`).
pub(crate) fn region_from_host(host: &str) -> Option<&str> {
    let rest = host.strip_suffix(".on.aws")?;
    let (before, region) = rest.rsplit_once('.')?;
    let service = before.rsplit('.').next()?;
    (service.starts_with("dsql") && before.contains('.') && !region.is_empty()).then_some(region)
}

/// A bare cluster id: 26 lowercase letters and digits.
pub(crate) fn is_cluster_id(s: &str) -> bool {
    s.len() == 26
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
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

#[cfg(test)]
mod tests;

/// A positive whole number of seconds.
fn positive_secs(value: &str) -> Option<Duration> {
    value
        .parse()
        .ok()
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
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
        }
        if self.keepalives_retries == 0 {
            return Err(Error::config("keepalives_retries", "must be at least 1"));
        }
        if let Some((per_second, burst)) = self.rate_limit {
            if !(per_second.is_finite() && per_second > 0.0) {
                return Err(Error::config(
                    "connect_rate_limit",
                    format!("{per_second} new connections a second: must be more than 0"),
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
