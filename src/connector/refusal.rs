//! The refusal memory: a permanent refusal (access denied, an unknown role) is remembered per
//! endpoint and access key for a few seconds, so every connect and checkout in that time gets
//! it at once instead of a login of its own.

use std::time::Duration;
use tokio::time::Instant;

use super::Target;
use crate::Error;
use crate::token::AuthToken;

/// A permanent refusal is answered from memory for this long: every connect and checkout in
/// that time gets it at once, without a login of its own (a fixed IAM policy or role is seen
/// within this much).
pub(crate) const REFUSAL_MEMORY: Duration = Duration::from_secs(5);

impl Target {
    /// The permanent refusal this endpoint gave less than [`REFUSAL_MEMORY`] ago to a token
    /// signed with the same access key as `token`, if any (credentials rotated since are tried).
    pub(super) fn remembered_refusal(&self, token: &AuthToken) -> Option<Error> {
        let refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        match &*refused {
            Some((at, error, key))
                if at.elapsed() < REFUSAL_MEMORY && key == access_key_of(token) =>
            {
                error.shared_refusal()
            }
            _ => None,
        }
    }

    pub(super) fn remember_refusal(&self, error: &Error, token: &AuthToken) {
        if let Some(copy) = error.shared_refusal() {
            *self.refused.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((Instant::now(), copy, access_key_of(token).to_owned()));
        }
    }
}

/// The access key id a token was signed with (its `X-Amz-Credential`, up to the scope).
fn access_key_of(token: &AuthToken) -> &str {
    let text = token.as_str();
    text.split_once("X-Amz-Credential=")
        .map(|(_, rest)| rest.split(['%', '&']).next().unwrap_or_default())
        .unwrap_or_default()
}
