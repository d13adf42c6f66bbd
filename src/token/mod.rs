//! IAM auth tokens: the [`Action`], the [`AuthToken`] and the pure [`TokenSigner`].
//!
//! A DSQL auth token is a SigV4 presigned URL for `GET https://<host>/?Action=<action>` with the
//! scheme removed. [`TokenSigner::sign`] builds DSQL's fixed canonical request directly (the query
//! parameters always sort the same way) and keeps the derived signing key per (secret, day), so a
//! fresh token costs one SHA-256 of the canonical request and one HMAC. The key derivation and the
//! signature are `aws-sigv4`'s own primitives.
//!
//! The cache that hands one token to many connections lives in the private `cache` module, used
//! through [`DsqlConnector::token`](crate::DsqlConnector::token).

pub(crate) mod cache;
pub(crate) mod credentials;
mod date;
#[cfg(all(test, feature = "emulator"))]
mod emulator_agreement;

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use sha2::{Digest, Sha256};

/// The default token life, as in the AWS SDKs and CLI: 15 minutes.
pub const DEFAULT_TOKEN_DURATION: Duration = Duration::from_secs(900);

/// The longest token life DSQL accepts: one week.
pub const MAX_TOKEN_DURATION: Duration = Duration::from_secs(604_800);

/// SHA-256 of the empty payload (DSQL tokens sign an empty body, not `UNSIGNED-PAYLOAD`).
const EMPTY_PAYLOAD_SHA256: &str =
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// SigV4's unreserved characters are `A-Z a-z 0-9 - _ . ~`; everything else is percent-encoded.
const SIGV4_ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// The IAM action a token is signed for.
///
/// DSQL's built-in `admin` role must connect with [`Action::DbConnectAdmin`]; every other role
/// with [`Action::DbConnect`]. The server refuses a mismatch with
/// `Wrong user to action mapping`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// `dsql:DbConnect`, for custom database roles.
    DbConnect,
    /// `dsql:DbConnectAdmin`, for the built-in `admin` role.
    DbConnectAdmin,
}

impl Action {
    /// The action a database user must sign with: `admin` → [`Action::DbConnectAdmin`], any other
    /// user → [`Action::DbConnect`].
    pub fn for_user(user: &str) -> Action {
        if user == "admin" {
            Action::DbConnectAdmin
        } else {
            Action::DbConnect
        }
    }

    /// The action's name as it appears in the token's `Action` parameter.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::DbConnect => "DbConnect",
            Action::DbConnectAdmin => "DbConnectAdmin",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A signed DSQL auth token: the password for one or many connections while it is valid.
///
/// Cloning is cheap (the text is shared). `Debug` shows when it expires, never its text.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthToken {
    value: Arc<str>,
    expires_at: SystemTime,
}

impl AuthToken {
    /// The token text, to be sent as the connection password.
    pub fn as_str(&self) -> &str {
        &self.value
    }

    /// When the server stops accepting the token for new connections (`X-Amz-Date` plus
    /// `X-Amz-Expires`). Connections opened before then stay open.
    pub fn expires_at(&self) -> SystemTime {
        self.expires_at
    }
}

impl fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthToken")
            .field("value", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// Signs DSQL auth tokens for one host and region. Pure and synchronous.
///
/// The signer remembers the last derived SigV4 signing key (per secret key and UTC day), which
/// makes signing many tokens with the same credentials cheap. It is `Send + Sync`; share it
/// freely.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use aws_credential_types::Credentials;
/// use tokio_postgres_dsql::{Action, TokenSigner};
///
/// let signer = TokenSigner::new("peccy.dsql.us-east-1.on.aws", "us-east-1");
/// let credentials = Credentials::from_keys("akid", "secret", None);
/// let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_724_716_800);
/// let token = signer.sign(&credentials, Action::DbConnect, Duration::from_secs(450), at);
/// assert!(token.as_str().starts_with("peccy.dsql.us-east-1.on.aws/?Action=DbConnect&"));
/// assert!(token.as_str().ends_with(
///     "X-Amz-Signature=f5f2ad764ca5df44045d4ab6ccecba0eef941b0007e5765885a0b6ed3702a3f8"));
/// ```
pub struct TokenSigner {
    host: String,
    region: String,
    /// The last signing key. A mutex held for a comparison and a 32-byte copy; uncontended in
    /// practice, since the token cache signs one token at a time.
    key: Mutex<Option<SigningKey>>,
    /// The last session token and its percent-encoding (session tokens run to a kilobyte, and
    /// encoding them dominated signing with temporary credentials).
    session_token: Mutex<Option<(String, String)>>,
}

/// A derived SigV4 key and what it was derived from (the region is the signer's).
struct SigningKey {
    secret: String,
    day: [u8; 8],
    key: [u8; 32],
}

impl fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSigner")
            .field("host", &self.host)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl Clone for TokenSigner {
    fn clone(&self) -> Self {
        TokenSigner::new(self.host.clone(), self.region.clone())
    }
}

impl TokenSigner {
    /// A signer for tokens to `host` (the DSQL endpoint, without a port) in `region`.
    pub fn new(host: impl Into<String>, region: impl Into<String>) -> Self {
        TokenSigner {
            host: host.into(),
            region: region.into(),
            key: Mutex::new(None),
            session_token: Mutex::new(None),
        }
    }

    /// The host tokens are signed for.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The region tokens are signed for.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// Signs a token for `action`, valid for `expires_in` from `at`.
    ///
    /// `expires_in` is written in whole seconds, at least 1; DSQL refuses more than
    /// [`MAX_TOKEN_DURATION`] (the configuration rejects such values before they get here).
    pub fn sign(
        &self,
        credentials: &Credentials,
        action: Action,
        expires_in: Duration,
        at: SystemTime,
    ) -> AuthToken {
        let expires_secs = expires_in.as_secs().max(1);
        let stamp = date::Stamp::new(at);
        let amz_date = stamp.date_time();
        let day = stamp.date();
        let day_str = std::str::from_utf8(&day).expect("date stamp is ASCII");

        // Canonical query: parameter names in byte order, which for DSQL's fixed set is:
        // Action, X-Amz-Algorithm, X-Amz-Credential, X-Amz-Date, X-Amz-Expires,
        // [X-Amz-Security-Token,] X-Amz-SignedHeaders.
        let session_token = credentials.session_token();
        let mut query = String::with_capacity(
            256 + self.region.len() + session_token.map_or(0, |t| t.len() * 3),
        );
        query.push_str("Action=");
        query.push_str(action.as_str());
        query.push_str("&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=");
        push_encoded(&mut query, credentials.access_key_id());
        query.push_str("%2F");
        query.push_str(day_str);
        query.push_str("%2F");
        push_encoded(&mut query, &self.region);
        query.push_str("%2Fdsql%2Faws4_request&X-Amz-Date=");
        query.push_str(std::str::from_utf8(&amz_date).expect("date stamp is ASCII"));
        query.push_str("&X-Amz-Expires=");
        query.push_str(itoa_u64(expires_secs, &mut [0; 20]));
        if let Some(token) = session_token {
            query.push_str("&X-Amz-Security-Token=");
            self.push_encoded_session_token(&mut query, token);
        }
        query.push_str("&X-Amz-SignedHeaders=host");

        let mut hasher = Sha256::new();
        hasher.update(b"GET\n/\n");
        hasher.update(query.as_bytes());
        hasher.update(b"\nhost:");
        hasher.update(self.host.as_bytes());
        hasher.update(b"\n\nhost\n");
        hasher.update(EMPTY_PAYLOAD_SHA256.as_bytes());
        let canonical_hash = hasher.finalize();

        let mut string_to_sign = Vec::with_capacity(160 + self.region.len());
        string_to_sign.extend_from_slice(b"AWS4-HMAC-SHA256\n");
        string_to_sign.extend_from_slice(&amz_date);
        string_to_sign.push(b'\n');
        string_to_sign.extend_from_slice(&day);
        string_to_sign.push(b'/');
        string_to_sign.extend_from_slice(self.region.as_bytes());
        string_to_sign.extend_from_slice(b"/dsql/aws4_request\n");
        let mut hex_hash = [0u8; 64];
        hex::encode_to_slice(canonical_hash, &mut hex_hash).expect("64 hex digits");
        string_to_sign.extend_from_slice(&hex_hash);

        let key = self.signing_key(credentials.secret_access_key(), day, at);
        let signature = aws_sigv4::sign::v4::calculate_signature(key, &string_to_sign);

        let mut value =
            String::with_capacity(self.host.len() + 2 + query.len() + 17 + signature.len());
        value.push_str(&self.host);
        value.push_str("/?");
        value.push_str(&query);
        value.push_str("&X-Amz-Signature=");
        value.push_str(&signature);

        AuthToken {
            value: value.into(),
            expires_at: stamp.whole_seconds() + Duration::from_secs(expires_secs),
        }
    }

    /// The SigV4 signing key for (secret, day, this region), derived once and then reused.
    fn signing_key(&self, secret: &str, day: [u8; 8], at: SystemTime) -> [u8; 32] {
        let mut slot = self
            .key
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(cached) = slot.as_ref()
            && cached.day == day
            && cached.secret == secret
        {
            return cached.key;
        }
        let derived = aws_sigv4::sign::v4::generate_signing_key(secret, at, &self.region, "dsql");
        let mut key = [0u8; 32];
        key.copy_from_slice(derived.as_ref());
        *slot = Some(SigningKey {
            secret: secret.to_owned(),
            day,
            key,
        });
        key
    }
}

impl TokenSigner {
    /// Appends the encoded session token, encoding it only when it changed.
    fn push_encoded_session_token(&self, out: &mut String, token: &str) {
        let mut slot = self
            .session_token
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match slot.as_ref() {
            Some((raw, encoded)) if raw == token => out.push_str(encoded),
            _ => {
                let mut encoded = String::with_capacity(token.len() * 3 / 2);
                push_encoded(&mut encoded, token);
                out.push_str(&encoded);
                *slot = Some((token.to_owned(), encoded));
            }
        }
    }
}

fn push_encoded(out: &mut String, value: &str) {
    out.extend(utf8_percent_encode(value, SIGV4_ENCODE));
}

/// Formats `n` in decimal into `buf` without allocating.
fn itoa_u64(mut n: u64, buf: &mut [u8; 20]) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[i..]).expect("digits are ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const T0: u64 = 1_724_716_800;

    fn vector_signer() -> TokenSigner {
        TokenSigner::new("peccy.dsql.us-east-1.on.aws", "us-east-1")
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn params(token: &str) -> BTreeMap<String, String> {
        let (_, query) = token.split_once("/?").unwrap();
        url::form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect()
    }

    #[test]
    fn public_vector_db_connect() {
        let creds = Credentials::from_keys("akid", "secret", None);
        let token =
            vector_signer().sign(&creds, Action::DbConnect, Duration::from_secs(450), at(T0));
        assert_eq!(
            token.as_str(),
            "peccy.dsql.us-east-1.on.aws/?Action=DbConnect&X-Amz-Algorithm=AWS4-HMAC-SHA256\
             &X-Amz-Credential=akid%2F20240827%2Fus-east-1%2Fdsql%2Faws4_request\
             &X-Amz-Date=20240827T000000Z&X-Amz-Expires=450&X-Amz-SignedHeaders=host\
             &X-Amz-Signature=f5f2ad764ca5df44045d4ab6ccecba0eef941b0007e5765885a0b6ed3702a3f8"
        );
        assert_eq!(token.expires_at(), at(T0 + 450));
    }

    #[test]
    fn public_vector_db_connect_admin() {
        let creds = Credentials::from_keys("akid", "secret", None);
        let token = vector_signer().sign(
            &creds,
            Action::DbConnectAdmin,
            Duration::from_secs(450),
            at(T0),
        );
        assert_eq!(
            params(token.as_str())["X-Amz-Signature"],
            "267cf8d04d84444f7a62d5bdb40c44bfc6cb13dd6c64fa7f772df6bbaa90fff1"
        );
        assert_eq!(params(token.as_str())["Action"], "DbConnectAdmin");
    }

    #[test]
    fn cached_key_is_not_reused_across_days_or_secrets() {
        let signer = vector_signer();
        let a = Credentials::from_keys("akid", "secret", None);
        let b = Credentials::from_keys("akid", "other", None);
        let d = Duration::from_secs(450);
        let first = signer.sign(&a, Action::DbConnect, d, at(T0));
        // Another secret on the same day, then the first again: each must match a fresh signer.
        let other = signer.sign(&b, Action::DbConnect, d, at(T0));
        assert_eq!(
            other,
            vector_signer().sign(&b, Action::DbConnect, d, at(T0))
        );
        assert_eq!(first, signer.sign(&a, Action::DbConnect, d, at(T0)));
        // The next day, same secret.
        let next_day = signer.sign(&a, Action::DbConnect, d, at(T0 + 86_400));
        assert_eq!(
            next_day,
            vector_signer().sign(&a, Action::DbConnect, d, at(T0 + 86_400))
        );
        assert_ne!(
            params(first.as_str())["X-Amz-Signature"],
            params(next_day.as_str())["X-Amz-Signature"]
        );
    }

    #[test]
    fn session_token_is_encoded_and_signed() {
        let creds = Credentials::from_keys("AKID", "secret", Some("a/b+c=d e&f".into()));
        let token =
            vector_signer().sign(&creds, Action::DbConnect, Duration::from_secs(900), at(T0));
        assert!(
            token
                .as_str()
                .contains("&X-Amz-Security-Token=a%2Fb%2Bc%3Dd%20e%26f&X-Amz-SignedHeaders=host&")
        );
        let without = vector_signer().sign(
            &Credentials::from_keys("AKID", "secret", None),
            Action::DbConnect,
            Duration::from_secs(900),
            at(T0),
        );
        assert_ne!(
            params(token.as_str())["X-Amz-Signature"],
            params(without.as_str())["X-Amz-Signature"]
        );
    }

    #[test]
    fn sub_second_times_sign_the_whole_second() {
        let creds = Credentials::from_keys("akid", "secret", None);
        let signer = vector_signer();
        let exact = signer.sign(&creds, Action::DbConnect, Duration::from_secs(450), at(T0));
        let later = signer.sign(
            &creds,
            Action::DbConnect,
            Duration::from_secs(450),
            at(T0) + Duration::from_millis(999),
        );
        assert_eq!(exact, later);
    }

    #[test]
    fn debug_hides_the_token() {
        let creds = Credentials::from_keys("akid", "secret", Some("session".into()));
        let token = vector_signer().sign(&creds, Action::DbConnect, Duration::from_secs(1), at(T0));
        let shown = format!("{token:?}");
        assert!(shown.contains("<redacted>"));
        assert!(!shown.contains("X-Amz"));
        assert!(!shown.contains("session"));
        let signer = vector_signer();
        signer.sign(&creds, Action::DbConnect, Duration::from_secs(1), at(T0));
        assert!(!format!("{signer:?}").contains("secret"));
    }

    #[test]
    fn action_for_user() {
        assert_eq!(Action::for_user("admin"), Action::DbConnectAdmin);
        assert_eq!(Action::for_user("Admin"), Action::DbConnect);
        assert_eq!(Action::for_user("app"), Action::DbConnect);
        assert_eq!(Action::DbConnectAdmin.to_string(), "DbConnectAdmin");
    }

    #[test]
    fn itoa() {
        for n in [0, 1, 9, 10, 450, 604_800, u64::MAX] {
            assert_eq!(itoa_u64(n, &mut [0; 20]), n.to_string());
        }
    }
}
