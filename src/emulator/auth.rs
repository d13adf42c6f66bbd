//! Token verification as the service does it, from what the client sent.
//!
//! This deliberately shares nothing with [`TokenSigner`](crate::TokenSigner): it parses the
//! received query in any parameter order, canonicalizes it the way a SigV4 server does, derives
//! the key and HMACs with the `hmac` crate, and compares signatures in constant time.

use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_smithy_async::time::SharedTimeSource;
use hmac::{KeyInit, Mac};
use sha2::{Digest, Sha256};

use super::Rejection;

type HmacSha256 = hmac::Hmac<Sha256>;

/// DSQL's SQLSTATE for every token refusal (`connection_failure`).
pub(crate) const ACCESS_DENIED_CODE: &str = "08006";
/// DSQL's message for every token refusal; the reason goes in the HINT.
pub(crate) const ACCESS_DENIED_MESSAGE: &str = "unable to accept connection, access denied";

/// Why a token was refused: the counter it goes to and the HINT. The server sends every
/// refusal as `FATAL` [`ACCESS_DENIED_CODE`] [`ACCESS_DENIED_MESSAGE`] with this hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) reason: Rejection,
    pub(crate) hint: String,
}

fn refuse(reason: Rejection, hint: impl Into<String>) -> Refusal {
    Refusal {
        reason,
        hint: hint.into(),
    }
}

/// Checks tokens for one endpoint against a set of credentials.
#[derive(Debug)]
pub(crate) struct Verifier {
    pub(crate) endpoint: String,
    pub(crate) region: String,
    pub(crate) credentials: Vec<Credentials>,
    pub(crate) clock: SharedTimeSource,
    /// How far `X-Amz-Date` may be ahead of the server's clock.
    pub(crate) max_skew: Duration,
    /// Access keys whose IAM identity lost `dsql:DbConnect*` (see
    /// [`DsqlEmulator::revoke_access`](super::DsqlEmulator::revoke_access)).
    pub(crate) revoked: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// The IAM identity (ARN) behind an access key, where the emulator was told it: refusals
    /// name it, and a custom role must be `AWS IAM GRANT`ed to it.
    pub(crate) identities: std::collections::BTreeMap<String, String>,
}

impl Verifier {
    /// Verifies `token` for a session as `user`. The checks run in the service's order:
    /// structure, host, action, scope, expiry range, time, key, credentials' expiry (at the
    /// time of the connect, not of signing), signature.
    /// The ARN of `access_key`'s identity: the one configured, else an emulated IAM user.
    pub(crate) fn identity(&self, access_key: &str) -> String {
        self.identities
            .get(access_key)
            .cloned()
            .unwrap_or_else(|| format!("arn:aws:iam::{EMULATED_ACCOUNT}:user/{access_key}"))
    }

    /// Checks `token` for `user`; `Ok` holds the access key it was signed with.
    pub(crate) fn verify(&self, user: &str, token: &str) -> Result<String, Refusal> {
        let malformed =
            |what: &str| refuse(Rejection::TokenMalformed, format!("Invalid token: {what}"));
        let (host, query) = token
            .split_once("/?")
            .ok_or_else(|| malformed("expected <host>/?<query>"))?;
        if !host.eq_ignore_ascii_case(&self.endpoint) {
            return Err(refuse(
                Rejection::TokenHost,
                format!("Invalid token: signed for host {host}, not for this cluster endpoint"),
            ));
        }

        let mut params: Vec<(String, String)> = Vec::new();
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            if params.iter().any(|(k, _)| *k == key) {
                return Err(malformed(&format!("parameter {key} appears twice")));
            }
            params.push((key.into_owned(), value.into_owned()));
        }
        let get = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
                .ok_or_else(|| malformed(&format!("missing {name}")))
        };

        if get("X-Amz-Algorithm")? != "AWS4-HMAC-SHA256" {
            return Err(malformed("X-Amz-Algorithm must be AWS4-HMAC-SHA256"));
        }
        let action = get("Action")?;
        let expected_action = if user == "admin" {
            "DbConnectAdmin"
        } else {
            "DbConnect"
        };
        if action != "DbConnect" && action != "DbConnectAdmin" {
            return Err(malformed(&format!("unknown Action {action}")));
        }
        if action != expected_action {
            return Err(refuse(
                Rejection::TokenAction,
                format!("Wrong user to action mapping. user: {user}, action: {action}"),
            ));
        }

        let credential = get("X-Amz-Credential")?;
        let scope: Vec<&str> = credential.split('/').collect();
        let [access_key, day, region, service, terminator] = scope[..] else {
            return Err(malformed(
                "X-Amz-Credential must be <key>/<date>/<region>/<service>/aws4_request",
            ));
        };
        if terminator != "aws4_request" {
            return Err(malformed("X-Amz-Credential must end with aws4_request"));
        }
        if region != self.region {
            return Err(refuse(
                Rejection::TokenRegion,
                format!(
                    "Credential should be scoped to a valid region, not '{region}'. This \
                     endpoint is in '{}'",
                    self.region
                ),
            ));
        }
        if service != "dsql" {
            return Err(refuse(
                Rejection::TokenService,
                format!("Credential should be scoped to correct service: 'dsql', not '{service}'"),
            ));
        }

        let amz_date = get("X-Amz-Date")?;
        let signed_at = parse_amz_date(amz_date)
            .ok_or_else(|| malformed("X-Amz-Date must be yyyymmddTHHMMSSZ"))?;
        if !amz_date.starts_with(day) || day.len() != 8 {
            return Err(malformed(
                "the date in X-Amz-Credential does not match X-Amz-Date",
            ));
        }
        let expires: u64 = get("X-Amz-Expires")?
            .parse()
            .map_err(|_| malformed("X-Amz-Expires must be a number of seconds"))?;
        if !(1..=604_800).contains(&expires) {
            return Err(refuse(
                Rejection::TokenExpiresRange,
                "X-Amz-Expires must be between 1 and 604800 seconds",
            ));
        }
        if get("X-Amz-SignedHeaders")? != "host" {
            return Err(malformed("X-Amz-SignedHeaders must be host"));
        }
        let signature = get("X-Amz-Signature")?;

        let now = self.clock.now();
        if signed_at > now + self.max_skew {
            return Err(refuse(
                Rejection::TokenNotYetValid,
                format!(
                    "Signature not yet current: {amz_date} is later than the server's time plus {} s",
                    self.max_skew.as_secs()
                ),
            ));
        }
        let expires_at = signed_at + Duration::from_secs(expires);
        if now >= expires_at {
            return Err(refuse(
                Rejection::TokenExpired,
                format!(
                    "Signature expired: {amz_date} plus {expires} s is earlier than the server's time"
                ),
            ));
        }

        let unknown = || {
            refuse(
                Rejection::TokenUnknownKey,
                "The security token included in the request is invalid",
            )
        };
        let credentials = self
            .credentials
            .iter()
            .find(|c| c.access_key_id() == access_key)
            .ok_or_else(unknown)?;
        let session_token = params
            .iter()
            .find(|(k, _)| k == "X-Amz-Security-Token")
            .map(|(_, v)| v.as_str());
        if session_token != credentials.session_token() {
            return Err(unknown());
        }
        // Checked at connect time: temporary credentials that expired after signing no longer
        // vouch for the token, whatever its own expiry says.
        if credentials
            .expiry()
            .is_some_and(|expiry| expiry <= now || expiry <= signed_at)
        {
            return Err(refuse(
                Rejection::TokenExpired,
                "The security token included in the request is expired",
            ));
        }

        let expected = signature_mac(
            &self.endpoint,
            &params,
            amz_date,
            day,
            region,
            credentials.secret_access_key(),
        );
        let provided = hex::decode(signature).unwrap_or_default();
        // `verify_slice` compares in constant time.
        if expected.verify_slice(&provided).is_err() {
            return Err(refuse(
                Rejection::TokenSignature,
                "The request signature we calculated does not match the signature you provided",
            ));
        }
        // Authorization comes after authentication, as in IAM.
        if self
            .revoked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(access_key)
        {
            let cluster_id = self.endpoint.split('.').next().unwrap_or_default();
            return Err(refuse(
                Rejection::NotAuthorized,
                format!(
                    "User: {} is not authorized \
                     to perform: dsql:{action} on resource: \
                     arn:aws:dsql:{}:{EMULATED_ACCOUNT}:cluster/{cluster_id} because no \
                     identity-based policy allows the dsql:{action} action",
                    self.identity(access_key),
                    self.region
                ),
            ));
        }
        Ok(access_key.to_owned())
    }
}

/// The AWS account the emulator's IAM messages name.
const EMULATED_ACCOUNT: &str = "000000000000";

fn hmac_key(key: &[u8]) -> HmacSha256 {
    <HmacSha256 as KeyInit>::new_from_slice(key).expect("HMAC takes keys of any length")
}

fn hmac_of(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = hmac_key(key);
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// SigV4's URI encoding: everything but `A-Z a-z 0-9 - _ . ~`.
fn uri_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The HMAC the service computes over the received parameters (all but the signature), ready
/// to be compared with the provided signature.
fn signature_mac(
    host: &str,
    params: &[(String, String)],
    amz_date: &str,
    day: &str,
    region: &str,
    secret: &str,
) -> HmacSha256 {
    let mut encoded: Vec<(String, String)> = params
        .iter()
        .filter(|(k, _)| k != "X-Amz-Signature")
        .map(|(k, v)| (uri_encode(k), uri_encode(v)))
        .collect();
    encoded.sort();
    let query = encoded
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let empty_payload = hex::encode(Sha256::digest(b""));
    let canonical_request = format!(
        "GET\n/\n{query}\nhost:{}\n\nhost\n{empty_payload}",
        host.to_ascii_lowercase()
    );
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{day}/{region}/dsql/aws4_request\n{}",
        hex::encode(Sha256::digest(canonical_request.as_bytes()))
    );
    let k_date = hmac_of(format!("AWS4{secret}").as_bytes(), day.as_bytes());
    let k_region = hmac_of(&k_date, region.as_bytes());
    let k_service = hmac_of(&k_region, b"dsql");
    let k_signing = hmac_of(&k_service, b"aws4_request");
    let mut mac = hmac_key(&k_signing);
    mac.update(string_to_sign.as_bytes());
    mac
}

/// `yyyymmddTHHMMSSZ` to a time.
fn parse_amz_date(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<u64> {
        let digits = s.get(range)?;
        digits
            .bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| digits.parse().ok())?
    };
    let (year, month, day) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (hour, minute, second) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1970..=9999).contains(&year)
        || !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    // Days from civil (Howard Hinnant), for years >= 1970.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(
        SystemTime::UNIX_EPOCH
            + Duration::from_secs(days * 86_400 + hour * 3600 + minute * 60 + second),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_724_716_800;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn amz_dates() {
        assert_eq!(parse_amz_date("20240827T000000Z"), Some(at(T0)));
        assert_eq!(parse_amz_date("19700101T000000Z"), Some(at(0)));
        assert_eq!(parse_amz_date("20000301T010203Z"), Some(at(951_872_523)));
        assert_eq!(parse_amz_date("2024-08-27T00:00:00Z"), None);
        assert_eq!(parse_amz_date("20241327T000000Z"), None);
        assert_eq!(parse_amz_date("2024082+T000000Z"), None);
    }
}
