//! The emulator's token verifier against this crate's signer (feature `emulator`): the two share
//! no code, so agreement here means both read SigV4 the same way. The tests live on the
//! connector's side of the line, as the emulator must not use the connector.

use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_smithy_async::time::SharedTimeSource;

use crate::emulator::Rejection;
use crate::emulator::auth::{Refusal, Verifier};
use crate::{Action, TokenSigner};
use aws_smithy_async::time::StaticTimeSource;

const HOST: &str = "abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws";
const T0: u64 = 1_724_716_800;

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

fn verifier(now: u64) -> Verifier {
    Verifier {
        endpoint: HOST.into(),
        region: "us-east-1".into(),
        credentials: vec![
            Credentials::new("AK1", "secret/+=", None, None, "test"),
            Credentials::new("ASIA2", "other", Some("sess ion/+=".into()), None, "test"),
        ],
        clock: SharedTimeSource::new(StaticTimeSource::new(at(now))),
        max_skew: Duration::from_secs(300),
        revoked: Default::default(),
        identities: Default::default(),
    }
}

fn token(key: &str, secret: &str, session: Option<&str>, action: Action, expires: u64) -> String {
    let creds = Credentials::new(key, secret, session.map(str::to_owned), None, "test");
    TokenSigner::new(HOST, "us-east-1")
        .sign(&creds, action, Duration::from_secs(expires), at(T0))
        .as_str()
        .to_owned()
}

fn reason(result: Result<String, Refusal>) -> Rejection {
    result.unwrap_err().reason
}

#[test]
fn accepts_good_tokens_in_any_parameter_order() {
    let v = verifier(T0 + 10);
    let admin = token("AK1", "secret/+=", None, Action::DbConnectAdmin, 900);
    v.verify("admin", &admin).unwrap();
    let app = token(
        "ASIA2",
        "other",
        Some("sess ion/+="),
        Action::DbConnect,
        900,
    );
    v.verify("app", &app).unwrap();
    // Reverse the parameters, and form-encode the space as the AWS SDK does.
    let (host, query) = app.split_once("/?").unwrap();
    let mut parts: Vec<&str> = query.split('&').collect();
    parts.reverse();
    let reordered = format!("{host}/?{}", parts.join("&")).replace("%20", "+");
    v.verify("app", &reordered).unwrap();
}

#[test]
fn each_failure_has_its_reason() {
    let v = verifier(T0 + 10);
    let good = token("AK1", "secret/+=", None, Action::DbConnect, 900);
    assert_eq!(
        reason(v.verify("app", "garbage")),
        Rejection::TokenMalformed
    );
    assert_eq!(
        reason(v.verify("app", &good.replacen("abcdefghij", "zzzzzzzzzz", 1))),
        Rejection::TokenHost
    );
    let refusal = v.verify("admin", &good).unwrap_err();
    assert_eq!(refusal.reason, Rejection::TokenAction);
    assert_eq!(
        refusal.hint,
        "Wrong user to action mapping. user: admin, action: DbConnect"
    );
    let wrong_region = TokenSigner::new(HOST, "eu-west-1").sign(
        &Credentials::new("AK1", "secret/+=", None, None, "t"),
        Action::DbConnect,
        Duration::from_secs(900),
        at(T0),
    );
    assert_eq!(
        reason(v.verify("app", wrong_region.as_str())),
        Rejection::TokenRegion
    );
    assert_eq!(
        reason(v.verify("app", &good.replace("%2Fdsql%2F", "%2Frds-db%2F"))),
        Rejection::TokenService
    );
    assert_eq!(
        reason(v.verify(
            "app",
            &token("AK1", "secret/+=", None, Action::DbConnect, 604_801)
        )),
        Rejection::TokenExpiresRange
    );
    assert_eq!(
        reason(verifier(T0 + 900).verify("app", &good)),
        Rejection::TokenExpired
    );
    verifier(T0 + 899).verify("app", &good).unwrap();
    assert_eq!(
        reason(verifier(T0 - 301).verify("app", &good)),
        Rejection::TokenNotYetValid
    );
    verifier(T0 - 300).verify("app", &good).unwrap();
    assert_eq!(
        reason(v.verify(
            "app",
            &token("AK9", "secret/+=", None, Action::DbConnect, 900)
        )),
        Rejection::TokenUnknownKey
    );
    assert_eq!(
        reason(v.verify(
            "app",
            &token("ASIA2", "other", None, Action::DbConnect, 900)
        )),
        Rejection::TokenUnknownKey
    );
    assert_eq!(
        reason(v.verify("app", &token("AK1", "wrong", None, Action::DbConnect, 900))),
        Rejection::TokenSignature
    );
    let last = good.len() - 1;
    let flipped = if good.ends_with('0') { '1' } else { '0' };
    let tampered = format!("{}{flipped}", &good[..last]);
    assert_eq!(
        reason(v.verify("app", &tampered)),
        Rejection::TokenSignature
    );
    // A parameter added after signing changes the canonical query.
    assert_eq!(
        reason(v.verify("app", &format!("{good}&X-Extra=1"))),
        Rejection::TokenSignature
    );
    assert_eq!(
        reason(v.verify("app", &format!("{good}&Action=DbConnect"))),
        Rejection::TokenMalformed
    );
}

#[test]
fn a_revoked_identity_is_not_authorized() {
    let v = verifier(T0 + 10);
    let good = token("AK1", "secret/+=", None, Action::DbConnectAdmin, 900);
    v.verify("admin", &good).unwrap();
    v.revoked.lock().unwrap().insert("AK1".into());
    let refusal = v.verify("admin", &good).unwrap_err();
    assert_eq!(refusal.reason, Rejection::NotAuthorized);
    assert!(
        refusal.hint.starts_with(
            "User: arn:aws:iam::000000000000:user/AK1 is not authorized to perform: \
             dsql:DbConnectAdmin on resource: arn:aws:dsql:us-east-1:000000000000:cluster/\
             abcdefghijklmnopqrstuvwxyz"
        ),
        "{}",
        refusal.hint
    );
    // A bad signature is still a bad signature.
    let forged = token("AK1", "wrong", None, Action::DbConnectAdmin, 900);
    assert_eq!(
        reason(v.verify("admin", &forged)),
        Rejection::TokenSignature
    );
}

#[test]
fn expired_credentials_are_refused() {
    let mut v = verifier(T0 + 10);
    v.credentials = vec![Credentials::new("AK1", "s", None, Some(at(T0)), "test")];
    let t = token("AK1", "s", None, Action::DbConnect, 900);
    assert_eq!(reason(v.verify("app", &t)), Rejection::TokenExpired);
}

#[test]
fn credentials_that_expired_after_signing_are_refused_at_connect() {
    // Signed at T0 with credentials valid until T0 + 60, for 900 s: the token's own expiry
    // is later, but at T0 + 61 the credentials are gone.
    let mut v = verifier(T0 + 59);
    v.credentials = vec![Credentials::new(
        "AK1",
        "s",
        None,
        Some(at(T0 + 60)),
        "test",
    )];
    let t = token("AK1", "s", None, Action::DbConnect, 900);
    v.verify("app", &t).unwrap();
    let v = Verifier {
        clock: SharedTimeSource::new(StaticTimeSource::new(at(T0 + 61))),
        ..v
    };
    let refusal = v.verify("app", &t).unwrap_err();
    assert_eq!(refusal.reason, Rejection::TokenExpired);
    assert_eq!(
        refusal.hint,
        "The security token included in the request is expired"
    );
}
