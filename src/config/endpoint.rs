//! Endpoints: the host forms DSQL accepts, the Region (from the host, the settings or the
//! environment: resolved here and nowhere else), and the host tokens are signed for.

use super::*;

impl DsqlConfig {
    /// The host name tokens for `endpoint` are signed for, given its resolved region: the
    /// endpoint itself, or `<amzn_cluster_id>.dsql.<region>.on.aws` in the PrivateLink case.
    pub(crate) fn token_host(&self, endpoint: &Endpoint, region: &str) -> String {
        match &self.amzn_cluster_id {
            Some(id) => format!("{id}.dsql.{region}.on.aws"),
            None => endpoint.host_in(region),
        }
    }
}

impl Endpoint {
    /// The endpoint host once the region is known (expands a bare cluster id).
    pub(crate) fn host_in(&self, region: &str) -> String {
        if is_cluster_id(&self.host) {
            format!("{}.dsql.{region}.on.aws", self.host)
        } else {
            self.host.clone()
        }
    }
}

/// Lowercases and checks a host name (or cluster id).
pub(super) fn validate_host(host: &str) -> Result<String, Error> {
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

pub(super) fn validate_region(field: &'static str, region: &str) -> Result<(), Error> {
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

/// The Region variable set in the environment, if any: `AWS_REGION`, then `AWS_DEFAULT_REGION`
/// (empty counts as unset). With the variable's name, for errors.
pub(super) fn region_variable(
    var: impl Fn(&str) -> Option<String>,
) -> Option<(&'static str, String)> {
    ["AWS_REGION", "AWS_DEFAULT_REGION"]
        .into_iter()
        .find_map(|name| var(name).filter(|v| !v.is_empty()).map(|v| (name, v)))
}

/// The Region tokens for `endpoint` are signed for, resolved in one place: the configuration's
/// (named by the endpoint, or set), else `AWS_REGION` / `AWS_DEFAULT_REGION`, else the AWS
/// profile's region (no instance-metadata look-up). Only a single endpoint can lack one: the
/// builder requires a Region for each of several.
pub(crate) async fn resolve_region(
    config: &DsqlConfig,
    endpoint: &Endpoint,
) -> Result<String, Error> {
    use aws_config::meta::region::ProvideRegion;
    if let Some(region) = &endpoint.region {
        return Ok(region.clone());
    }
    if let Some((name, region)) = region_variable(|name| std::env::var(name).ok()) {
        validate_region(name, &region)?;
        return Ok(region);
    }
    let mut profile = aws_config::profile::ProfileFileRegionProvider::builder();
    if let Some(name) = &config.profile {
        profile = profile.profile_name(name);
    }
    profile
        .build()
        .region()
        .await
        .map(|region| region.as_ref().to_owned())
        .ok_or_else(|| {
            Error::config(
                "region",
                format!(
                    "the endpoint `{}` does not name a region; set region (or ?region= / \
                     AWS_REGION / a profile region)",
                    endpoint.host
                ),
            )
        })
}
