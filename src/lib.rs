//! Amazon Aurora DSQL for `tokio-postgres`.
//!
//! DSQL is a serverless, distributed, PostgreSQL-compatible database. Its password is a
//! short-lived IAM auth token (a SigV4 presigned URL), TLS is mandatory and routed by SNI,
//! connections last at most an hour, and write conflicts surface at `COMMIT` as SQLSTATE
//! `40001`. This crate handles those rules so a tokio service can use plain `tokio-postgres`:
//!
//! - [`DsqlConfig`]: a builder, `postgres://` URLs and `key=value` strings, or the environment.
//! - [`TokenSigner`]: a pure, synchronous token signer that reproduces `aws-sdk-dsql`'s tokens
//!   and reuses the SigV4 signing key.
//! - [`DsqlConnector`]: region and credentials (`aws-config`'s default chain or your provider),
//!   one cached token shared by all connections, rustls with verify-full and SNI, direct TLS;
//!   DSQL's refusals as typed errors ([`Error::AccessDenied`], [`Error::Unavailable`]), the
//!   transient ones retried with backoff inside a connect deadline.
//! - [`DsqlConnector::pool`]: a [`DsqlPool`] (`bb8`) whose connections are recycled before
//!   DSQL's one-hour cut, with jitter, and whose checkouts return the connect error itself.
//! - [`retry_transaction_on`]: re-runs a whole transaction on an optimistic-concurrency conflict
//!   (`40001`, `OC000`/`OC001`), with backoff and jitter; its future is `Send`, for spawned
//!   tasks and handlers ([`retry_postgres_transaction_on`] is the async-closure form).
//! - `emulator::DsqlEmulator` (feature `emulator`): a local DSQL endpoint in front of a real
//!   PostgreSQL that verifies tokens like the service, for offline tests.
//!
//! ```no_run
//! use tokio_postgres_dsql::{DsqlConfig, DsqlConnector};
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let connector = DsqlConnector::new(DsqlConfig::from_env()?).await?;
//! let client = connector.connect().await?;
//! for row in client.query("SELECT now()::text", &[]).await? {
//!     println!("{}", row.get::<_, String>(0));
//! }
//! # Ok(()) }
//! ```
//!
//! # Guides
//!
//! The depth is in the [`guide`] module, one topic a page: [architecture](guide::architecture),
//! [configuration](guide::configuration), [pooling and retries](guide::pooling),
//! [a service](guide::service), [refusals](guide::refusals),
//! [multi-Region clusters](guide::multi_region), [observability](guide::observability),
//! [migrations](guide::migrations), [the emulator](guide::emulator) and
//! [its SQL rules](guide::sql_rules), [DSQL notes](guide::dsql_notes),
//! [tests](guide::testing) and [performance](guide::performance).
//!
//! # Features
//!
//! | feature | default | what it does |
//! |---|---|---|
//! | `aws-lc-rs` | yes | rustls crypto provider used when the application has not installed one |
//! | `ring` | no | the same with `ring` (used only when `aws-lc-rs` is off) |
//! | `emulator` | no | a local DSQL emulator in front of a real PostgreSQL, for tests |
//! | `anyhow` | no | [`AsOccConflict`] for `anyhow::Error` |
//! | `metrics` | no | metrics through the `metrics` facade ([`guide::observability`] lists them) |
//! | `deadpool` | no | a `deadpool` pool ([`DsqlConnector::deadpool`]) besides the bb8 one |
//! | `with-uuid-1`, `with-time-0_3`, `with-chrono-0_4`, `with-serde_json-1` | no | tokio-postgres's support for those crates' types |
//!
//! The library never installs a process-wide crypto provider: if your application calls
//! `rustls::crypto::CryptoProvider::install_default`, that provider is used.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod admission;
pub mod config;
mod connector;
#[cfg(feature = "diesel-async")]
pub mod diesel;
#[cfg(feature = "emulator")]
pub mod emulator;
mod error;
pub mod guide;
#[cfg(feature = "migrate")]
pub mod migrate;
pub mod pool;
pub mod retry;
mod session;
mod telemetry;
pub mod tls;
pub mod token;

#[cfg(test)]
mod test_support;

pub use config::{
    DsqlConfig, DsqlConfigBuilder, Endpoint, FailoverPolicy, Peer, RootCerts, SslMode,
    SslNegotiation,
};
pub use connector::{DsqlConnector, EndpointHealth};
pub use error::{AccessDeniedReason, Error, UnavailableReason};
pub use pool::{DsqlConnection, DsqlConnectionManager, DsqlPool, DsqlPooledConnection};
#[cfg(feature = "deadpool")]
pub use pool::{DsqlDeadpool, DsqlDeadpoolManager};
pub use retry::{
    AsClient, AsOccConflict, OccConflict, PooledTx, RetryError, RetryPolicy, Tx,
    retry_postgres_transaction_on, retry_statement_on, retry_transaction_on,
};

// The crates whose types appear in this crate's API, so that a service can name them without
// depending on them (and on the right versions) itself.
pub use aws_credential_types;
pub use aws_credential_types::Credentials;
pub use aws_credential_types::provider::ProvideCredentials;
pub use aws_smithy_async;
pub use bb8;
#[cfg(feature = "deadpool")]
pub use deadpool;
#[cfg(feature = "metrics")]
pub use metrics;
pub use rustls;
pub use tokio_postgres;

pub use tls::DsqlTls;
pub use token::{Action, AuthToken, TokenSigner};

/// The README's examples, compiled and run as doctests (they use the emulator).
#[cfg(all(doctest, feature = "emulator"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

#[cfg(test)]
mod readme_tests {
    use std::collections::BTreeSet;
    use std::path::Path;

    /// The README and every guide, as (path from the crate root, text).
    fn documents() -> Vec<(String, String)> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut docs = vec![(
            "README.md".to_owned(),
            std::fs::read_to_string(root.join("README.md")).unwrap(),
        )];
        let mut guides: Vec<_> = std::fs::read_dir(root.join("src/guide"))
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|e| e == "md"))
            .collect();
        guides.sort();
        for path in guides {
            let name = format!("src/guide/{}", path.file_name().unwrap().to_string_lossy());
            docs.push((name, std::fs::read_to_string(path).unwrap()));
        }
        docs
    }

    /// The lines of `text` outside fenced code blocks, and those inside blocks whose fence
    /// starts with `lang`, separately.
    fn split_code<'a>(text: &'a str, lang: &str) -> (Vec<&'a str>, Vec<&'a str>) {
        let (mut prose, mut code) = (Vec::new(), Vec::new());
        let mut fence: Option<bool> = None;
        for line in text.lines() {
            // A fence may be indented (in a list item).
            let trimmed = line.trim_start();
            if trimmed.starts_with("```") {
                fence = match fence {
                    None => Some(trimmed.starts_with(&format!("```{lang}"))),
                    Some(_) => None,
                };
                continue;
            }
            match fence {
                None => prose.push(line),
                Some(true) => code.push(line),
                Some(false) => {}
            }
        }
        (prose, code)
    }

    /// The crate names a `[dependencies]`-style TOML block of `text` lists, as Rust names.
    fn listed_crates(text: &str) -> Vec<String> {
        let (_, toml) = split_code(text, "toml");
        toml.iter()
            .filter_map(|line| line.split_once(" = "))
            .map(|(name, _)| name.trim().replace('-', "_"))
            .collect()
    }

    /// Every crate a snippet of the README or of a guide names at the start of a path
    /// (`name::…`) must be listed in one of the README's dependency blocks (`tokio-postgres-dsql`
    /// and `tokio`) or in a TOML block of its own document (the Prometheus exporter for its
    /// snippet). Everything else must come through this crate's re-exports, or the snippets
    /// would not compile in a service that copies the blocks.
    #[test]
    fn snippets_use_only_the_dependencies_the_docs_list() {
        let docs = documents();
        let readme = &docs[0].1;
        let mut readme_roots = BTreeSet::new();
        for (name, text) in &docs {
            let mut roots = BTreeSet::new();
            let (_, rust) = split_code(text, "rust");
            // Diesel's `table!` declares a module named after its table (`notes::table`).
            let mut declared = Vec::new();
            for (index, line) in rust.iter().enumerate() {
                if let Some((_, after)) = line.split_once("table! {") {
                    let after = if after.trim().is_empty() {
                        rust.get(index + 1).copied().unwrap_or("")
                    } else {
                        after
                    };
                    if let Some(name) = after.split_whitespace().next() {
                        declared.push(name.to_owned());
                    }
                }
            }
            for line in rust {
                let bytes = line.as_bytes();
                for (at, _) in line.match_indices("::") {
                    let start = line[..at]
                        .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .map_or(0, |i| i + 1);
                    let root = &line[start..at];
                    let before = start.checked_sub(1).map(|i| bytes[i]);
                    let is_path_start = !matches!(before, Some(b':') | Some(b'.'));
                    if is_path_start
                        && root.starts_with(|c: char| c.is_ascii_lowercase())
                        && !root.is_empty()
                    {
                        roots.insert(root.to_owned());
                    }
                }
            }
            let mut allowed = vec!["std".to_owned()];
            allowed.extend(listed_crates(readme));
            allowed.extend(listed_crates(text));
            allowed.extend(declared);
            let extra: Vec<_> = roots.iter().filter(|r| !allowed.contains(r)).collect();
            assert!(extra.is_empty(), "{name}'s snippets name {extra:?}");
            if name == "README.md" {
                readme_roots = roots;
            }
        }
        assert!(
            readme_roots.contains("tokio_postgres_dsql"),
            "{readme_roots:?}"
        );
        assert!(
            readme.contains("[dependencies]\ntokio-postgres-dsql = ")
                && readme.contains("\ntokio = { version = \"1\""),
            "the dependency block changed: update `allowed` with it"
        );
    }

    /// GitHub's anchor for a heading: lower case, punctuation but `-` and `_` dropped, spaces
    /// as `-`.
    fn slug(heading: &str) -> String {
        heading
            .trim()
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
            .map(|c| if c == ' ' { '-' } else { c })
            .collect()
    }

    /// The anchors of a Markdown document's headings.
    fn anchors(text: &str) -> BTreeSet<String> {
        let (prose, _) = split_code(text, "\u{0}");
        prose
            .iter()
            .filter(|line| line.starts_with('#'))
            .map(|line| slug(line.trim_start_matches('#')))
            .collect()
    }

    /// The targets of the inline links (`[text](target)`) in prose, inline code left out.
    fn link_targets(text: &str) -> Vec<String> {
        let (prose, _) = split_code(text, "\u{0}");
        let mut targets = Vec::new();
        for line in prose {
            // Inline code is not a link.
            let plain: String = line
                .split('`')
                .enumerate()
                .map(|(i, part)| if i % 2 == 0 { part } else { "" })
                .collect::<Vec<_>>()
                .join("``");
            let mut rest = plain.as_str();
            while let Some(at) = rest.find("](") {
                let after = &rest[at + 2..];
                let end = after.find(')').unwrap_or(after.len());
                targets.push(after[..end].trim().to_owned());
                rest = &after[end..];
            }
        }
        targets
    }

    /// Every link of the README and the guides resolves: the README's relative links name
    /// files of the repository (and headings that exist, for `#anchor`s), so they work on
    /// GitHub; the guides, rendered by rustdoc on docs.rs, link only to the web, to their own
    /// headings or to items (`crate::…`, which `cargo doc -D warnings` checks), never to a
    /// repository file, which docs.rs does not have.
    #[test]
    fn the_links_of_the_readme_and_the_guides_resolve() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let docs = documents();
        let mut dead = Vec::new();
        let mut checked = 0;
        for (name, text) in &docs {
            for target in link_targets(text) {
                checked += 1;
                if target.starts_with("https://") || target.starts_with("http://") {
                    continue;
                }
                let is_guide = name.starts_with("src/guide/");
                if is_guide && (target.starts_with("crate::") || target.starts_with("super::")) {
                    continue;
                }
                let (file, anchor) = match target.split_once('#') {
                    Some((file, anchor)) => (file, Some(anchor)),
                    None => (target.as_str(), None),
                };
                if is_guide && !file.is_empty() {
                    dead.push(format!(
                        "{name}: `{target}` is a file link docs.rs cannot follow"
                    ));
                    continue;
                }
                let path = if file.is_empty() {
                    root.join(name)
                } else {
                    root.join(file)
                };
                if !path.exists() {
                    dead.push(format!("{name}: `{target}`: no such file"));
                    continue;
                }
                if let Some(anchor) = anchor
                    && path.extension().is_some_and(|e| e == "md")
                {
                    let target_text = std::fs::read_to_string(&path).unwrap();
                    if !anchors(&target_text).contains(anchor) {
                        dead.push(format!("{name}: `{target}`: no such heading"));
                    }
                }
            }
        }
        assert!(dead.is_empty(), "dead links:\n{}", dead.join("\n"));
        assert!(
            checked > 20,
            "only {checked} links found: is the parser broken?"
        );
        // The parser finds what it should.
        assert_eq!(
            link_targets("see [a](b.md#c) and `[x](y)` or [d](https://e)"),
            ["b.md#c", "https://e"]
        );
        assert_eq!(
            slug(" DSQL's SQL rules (on by default)"),
            "dsqls-sql-rules-on-by-default"
        );
    }

    /// Every guide file is one of the `guide` module's pages, and the README links to each.
    #[test]
    fn every_guide_is_rendered_and_linked_from_the_readme() {
        let module = include_str!("guide/mod.rs");
        let docs = documents();
        let readme = &docs[0].1;
        for (name, _) in &docs[1..] {
            let file = name.trim_start_matches("src/guide/");
            assert!(
                module.contains(&format!("include_str!(\"{file}\")")),
                "{name} is not in src/guide/mod.rs"
            );
            assert!(
                readme.contains(&format!("]({name})")),
                "the README does not link {name}"
            );
        }
    }
}
