//! The bridge from a running emulator to a connector configuration (feature `emulator`). It
//! lives on the connector's side: the emulator knows nothing of the connector it checks.

use std::net::Ipv4Addr;

use super::{DsqlConfig, DsqlConfigBuilder, Peer};
use crate::emulator::DsqlEmulator;

impl DsqlEmulator {
    /// A configuration builder preset to reach this emulator as `user`: host, `hostaddr`
    /// 127.0.0.1, port, region, the CA, the accepted credentials, and the emulator's clock if
    /// one was set. Add settings, then `build()`.
    pub fn config_for(&self, user: &str) -> DsqlConfigBuilder {
        let builder = DsqlConfig::builder()
            .host(self.endpoint())
            .region(self.region())
            .hostaddr(Ipv4Addr::LOCALHOST.into())
            .port(self.port())
            .user(user)
            .ssl_root_cert(self.ca_cert_path())
            .credentials_provider(self.credentials().clone());
        match self.time_source() {
            Some(clock) => builder.time_source(clock.clone()),
            None => builder,
        }
    }

    /// A configuration builder preset to reach this endpoint (preferred) and `peer` as one
    /// multi-Region cluster, as `user`: both endpoints with `hostaddr` 127.0.0.1 and their
    /// ports, the pair's CA, the accepted credentials. For a pair from
    /// [`start_pair`](Self::start_pair) (the two share one CA, as one Amazon root serves both
    /// endpoints of a real cluster). Add settings, then `build()`.
    pub fn config_with_peer(&self, peer: &DsqlEmulator, user: &str) -> DsqlConfigBuilder {
        self.config_for(user).peer(
            Peer::new(peer.endpoint())
                .region(peer.region())
                .hostaddr(Ipv4Addr::LOCALHOST.into())
                .port(peer.port()),
        )
    }
}
