//! [`DsqlConfig`]: where and how to connect, from a builder, a connection string or the
//! environment.
//!
//! | option | builder | URL / conninfo key | environment | default |
//! |---|---|---|---|---|
//! | endpoint | [`host`](DsqlConfigBuilder::host) | `host` | `CLUSTER_ENDPOINT` | required |
//! | peer endpoints (multi-Region) | [`peer`](DsqlConfigBuilder::peer) | `host=a,b` | `CLUSTER_ENDPOINT=a,b` | none |
//! | port | [`port`](DsqlConfigBuilder::port) | `port` | `PGPORT` | 5432 |
//! | database role | [`user`](DsqlConfigBuilder::user) | `user` | `CLUSTER_USER` | `admin` |
//! | database | [`database`](DsqlConfigBuilder::database) | `dbname` | `PGDATABASE` | `postgres` |
//! | region | [`region`](DsqlConfigBuilder::region) | `region` | `AWS_REGION`, `AWS_DEFAULT_REGION` | from the endpoint, else environment, else profile |
//! | address to dial | [`hostaddr`](DsqlConfigBuilder::hostaddr) | `hostaddr` | `PGHOSTADDR` | resolve the endpoint |
//! | token life | [`token_duration`](DsqlConfigBuilder::token_duration) | `token_duration_secs` (or the AWS connectors' `tokenDurationSecs`) | | 900 s (at most 604 800 s) |
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
//! | failback probe interval | [`failback_probe_interval`](DsqlConfigBuilder::failback_probe_interval) | | | 2 s |
//! | endpoint down / up rules | [`failover`](DsqlConfigBuilder::failover) | | | [`FailoverPolicy::default`] |
//!
//! Every duration is at most an hour ([`MAX_DURATION`]; the token life at most a week), so no
//! setting can overflow a clock. When `connect_timeout` (or `PGCONNECT_TIMEOUT`) is set and
//! `connect_deadline` is not, the deadline is `connect_timeout` times the number of endpoints:
//! one bounded attempt per host, as libpq means `connect_timeout`.
//!
//! ## Several endpoints (multi-Region clusters)
//!
//! A multi-Region cluster is two peered clusters, each with its own endpoint, cluster id and
//! Region. A configuration may name both, the first preferred, in libpq's multi-host forms:
//! `host=<a>,<b>` (with `port` and `region` as lists of the same length or one value for all,
//! and `hostaddr` with one address per host), `postgres://admin@<a>,<b>/postgres` (each host may carry its `:port`),
//! `CLUSTER_ENDPOINT=<a>,<b>` with `PGHOSTADDR` and `PGPORT` lists in the same order, or
//! [`DsqlConfigBuilder::peer`]. Each endpoint's Region comes from its host name or is given;
//! with several endpoints, a bare cluster id needs its Region given (the environment's Region
//! names one Region, not two). The same endpoint twice is refused, and so is
//! [`amzn_cluster_id`](DsqlConfigBuilder::amzn_cluster_id) (it names one cluster). How the
//! connector fails over between them is in [`guide::multi_region`](crate::guide::multi_region).
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
pub use failover::*;

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
/// The lowest client-side connect rate
/// [`connect_rate_limit`](DsqlConfigBuilder::connect_rate_limit) accepts: one new connection in
/// 1 000 s.
pub const MIN_CONNECT_RATE: f64 = 0.001;
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
    /// The PrivateLink case: reaching a cluster through a VPC endpoint by its DNS name or IP,
    /// which no certificate names; it therefore requires
    /// [`DsqlConfigBuilder::amzn_cluster_id`]. The chain is checked against the trusted roots
    /// as always, and the name against **DSQL's names for that cluster in its Region** instead
    /// of the host dialled: `<cluster-id>.dsql.<region>.on.aws` or the PrivateLink private DNS
    /// form `<cluster-id>.dsql-<suffix>.<region>.on.aws` (a wildcard certificate for either
    /// included). A certificate for any other name, however trusted (a host on the path with a
    /// free certificate for its own domain), is refused before anything is sent: the auth
    /// token is a bearer credential, valid for up to a week. libpq's `require` checks nothing.
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
    /// The preferred endpoint first, then its peers; never empty.
    pub(crate) endpoints: Vec<Endpoint>,
    pub(crate) user: String,
    pub(crate) database: String,
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
    pub(crate) failback_probe_interval: Duration,
    pub(crate) failover: FailoverPolicy,
}

/// One endpoint of a [`DsqlConfig`], checked: its host name (a bare cluster id expanded when its
/// Region is known), port, the address dialled instead of resolving the host, and its Region
/// when known without asking the environment or the AWS profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) hostaddr: Option<IpAddr>,
    pub(crate) region: Option<String>,
}

impl Endpoint {
    /// The endpoint host name (SNI, certificate name, token host).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address dialled instead of resolving the host.
    pub fn hostaddr(&self) -> Option<IpAddr> {
        self.hostaddr
    }

    /// The Region tokens for this endpoint are signed for, if known from the configuration.
    pub fn region(&self) -> Option<&str> {
        self.region.as_deref()
    }
}

/// A peer endpoint to add with [`DsqlConfigBuilder::peer`]: the other cluster of a
/// multi-Region cluster. A host name converts into one (`.peer("<id>.dsql.us-east-2.on.aws")`);
/// set its own port, `hostaddr` or Region with the methods.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct Peer {
    host: String,
    port: Option<u16>,
    hostaddr: Option<IpAddr>,
    region: Option<String>,
}

impl Peer {
    /// A peer endpoint: `<id>.dsql.<region>.on.aws`, or a bare cluster id with
    /// [`region`](Self::region).
    pub fn new(host: impl Into<String>) -> Self {
        Peer {
            host: host.into(),
            port: None,
            hostaddr: None,
            region: None,
        }
    }

    /// Its port. Default: the configuration's [`port`](DsqlConfigBuilder::port).
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// The address to dial instead of resolving its host. Default: none (resolve the host).
    pub fn hostaddr(mut self, hostaddr: IpAddr) -> Self {
        self.hostaddr = Some(hostaddr);
        self
    }

    /// Its Region. Default: from its host name; required for a bare cluster id.
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }
}

impl From<&str> for Peer {
    fn from(host: &str) -> Self {
        Peer::new(host)
    }
}

impl From<String> for Peer {
    fn from(host: String) -> Self {
        Peer::new(host)
    }
}

/// Default interval between probes of an endpoint marked down, before jitter (each wait is
/// drawn uniformly from half to one and a half times it).
pub const DEFAULT_FAILBACK_PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// The longest duration any setting takes (the token life aside): an hour.
pub const MAX_DURATION: Duration = Duration::from_secs(3600);

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
    /// `timeout` / `deadline` were set (not defaults): see `build`.
    pub(crate) timeout_set: bool,
    pub(crate) deadline_set: bool,
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
            timeout_set: false,
            deadline_set: false,
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
            .field("endpoints", &self.endpoints)
            .field("user", &self.user)
            .field("database", &self.database)
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
    peers: Vec<Peer>,
    failback_probe_interval: Option<Duration>,
    failover: FailoverPolicy,
    /// Endpoint settings from a connection string or the environment, possibly lists.
    lists: parse::EndpointLists,
    /// Region used only when neither the host nor `region` gives one (from the environment).
    fallback_region: Option<String>,
}

impl fmt::Debug for DsqlConfigBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DsqlConfigBuilder")
            .field("host", &self.host)
            .field("peers", &self.peers)
            .field("user", &self.user)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl DsqlConfig {
    /// A builder with every option at its default.
    pub fn builder() -> DsqlConfigBuilder {
        DsqlConfigBuilder::default()
    }

    /// A builder holding this configuration, to override some settings (for example a
    /// configuration read with [`from_env`](Self::from_env), then a different user).
    pub fn into_builder(self) -> DsqlConfigBuilder {
        let mut endpoints = self.endpoints.into_iter();
        let first = endpoints.next().expect("a configuration has an endpoint");
        let peers = endpoints
            .map(|e| Peer {
                host: e.host,
                port: Some(e.port),
                hostaddr: e.hostaddr,
                region: e.region,
            })
            .collect();
        DsqlConfigBuilder {
            host: Some(first.host),
            port: Some(first.port),
            user: Some(self.user),
            database: Some(self.database),
            region: first.region,
            hostaddr: first.hostaddr,
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
            peers,
            failback_probe_interval: Some(self.failback_probe_interval),
            failover: self.failover,
            lists: Default::default(),
            fallback_region: None,
        }
    }

    /// The (preferred) endpoint host name (SNI, certificate name; the token's host unless
    /// [`amzn_cluster_id`](DsqlConfigBuilder::amzn_cluster_id) is set).
    pub fn host(&self) -> &str {
        &self.endpoints[0].host
    }

    /// The (preferred) endpoint's TCP port.
    pub fn port(&self) -> u16 {
        self.endpoints[0].port
    }

    /// Every endpoint, the preferred one first, then its peers (a multi-Region cluster's).
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// How often an endpoint marked down is probed, before jitter.
    pub fn failback_probe_interval(&self) -> Duration {
        self.failback_probe_interval
    }

    /// When an endpoint is taken for down and up again (several endpoints only).
    pub fn failover(&self) -> &FailoverPolicy {
        &self.failover
    }

    /// The database role.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The database name.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// The (preferred) endpoint's region, if known without asking the AWS profile.
    pub fn region(&self) -> Option<&str> {
        self.endpoints[0].region.as_deref()
    }

    /// The address dialled instead of resolving the (preferred) endpoint's host.
    pub fn hostaddr(&self) -> Option<IpAddr> {
        self.endpoints[0].hostaddr
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
}

mod builder;
#[cfg(feature = "emulator")]
mod emulator;
mod endpoint;
mod failover;
mod parse;
#[cfg(test)]
mod tests;

pub(crate) use endpoint::{is_cluster_id, region_from_host, resolve_region};
use endpoint::{region_variable, validate_host, validate_region};
