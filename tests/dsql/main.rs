//! Integration tests: one binary, one module per concern. Everything that touches the network
//! goes through the emulator to a real PostgreSQL, over real TLS, with real tokens.

mod token_agreement;

#[cfg(feature = "emulator")]
mod admission;
#[cfg(feature = "emulator")]
mod commit_point;
#[cfg(feature = "emulator")]
mod conformance;
#[cfg(feature = "emulator")]
mod connect;
#[cfg(feature = "emulator")]
mod deadpool;
#[cfg(all(feature = "emulator", feature = "diesel-async", feature = "migrate"))]
mod diesel;
#[cfg(feature = "emulator")]
mod fleet;
#[cfg(feature = "emulator")]
mod frontend;
#[cfg(feature = "emulator")]
mod history;
#[cfg(feature = "emulator")]
mod hygiene;
#[cfg(feature = "emulator")]
mod iam_roles;
#[cfg(feature = "emulator")]
mod inject;
#[cfg(feature = "emulator")]
mod live;
#[cfg(feature = "emulator")]
mod metrics;
#[cfg(all(feature = "emulator", feature = "migrate"))]
mod migrate;
#[cfg(feature = "emulator")]
mod multi_region;
#[cfg(feature = "emulator")]
mod occ;
#[cfg(feature = "emulator")]
mod pet_clinic;
#[cfg(feature = "emulator")]
mod pool;
#[cfg(feature = "emulator")]
mod privatelink;
#[cfg(feature = "emulator")]
mod protocol;
#[cfg(feature = "emulator")]
mod psql;
#[cfg(feature = "emulator")]
mod recording;
#[cfg(feature = "emulator")]
mod refusals;
#[cfg(feature = "emulator")]
mod relay_on;
#[cfg(feature = "emulator")]
mod retry;
#[cfg(feature = "emulator")]
mod server_binary;
#[cfg(feature = "emulator")]
mod service;
#[cfg(feature = "emulator")]
mod service_example;
#[cfg(feature = "emulator")]
mod shared_postgres;
#[cfg(feature = "emulator")]
mod sql_rules;
#[cfg(feature = "emulator")]
mod support;
