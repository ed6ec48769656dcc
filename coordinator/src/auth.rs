//! Tokens: the admin token of user calls, one token per job for its workers' calls. Every call
//! carries `authorization: Bearer TOKEN`; tokens are compared in constant time.

use std::sync::Arc;

use lockstep_api::proto;

use crate::Coordinator;
use crate::error::{Error, Result};
use crate::registry::{Job, lock};

/// The shortest token accepted, from a file, a flag or a caller: 128 bits in hex.
pub const MIN_TOKEN_LEN: usize = 32;

/// 128 random bits, hex.
pub fn new_token() -> String {
    let mut b = [0u8; 16];
    // getrandom fails only without an OS entropy source; fall back to time and pid mixing.
    if getrandom::fill(&mut b).is_err() {
        let seed = xxhash_rust::xxh3::xxh3_128(
            format!(
                "{}-{}-{:?}",
                crate::record::now_ms(),
                std::process::id(),
                std::time::Instant::now()
            )
            .as_bytes(),
        );
        b = seed.to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The bearer token `metadata` carries, if any.
pub fn bearer(metadata: &tonic::metadata::MetadataMap) -> Option<&str> {
    metadata
        .get(proto::AUTH_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// Checks that `metadata` carries `want` as its bearer token; `whose` names the token in the
/// error ("the coordinator's admin", "job `x`'s").
pub fn check(metadata: &tonic::metadata::MetadataMap, want: &str, whose: &str) -> Result<()> {
    let got = metadata
        .get(proto::AUTH_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match got {
        // A token too short to be one of ours authenticates nothing, even if it matches.
        _ if want.len() < MIN_TOKEN_LEN => Err(Error::PermissionDenied {
            whose: whose.to_string(),
        }),
        None => Err(Error::Unauthenticated {
            whose: whose.to_string(),
        }),
        Some(t) if constant_eq(t.as_bytes(), want.as_bytes()) => Ok(()),
        Some(_) => Err(Error::PermissionDenied {
            whose: whose.to_string(),
        }),
    }
}

/// Equal, in time that depends only on the lengths.
pub fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The coordinator's side of authentication: the gate in front of every gRPC call and the
/// checks its handlers make.
impl Coordinator {
    /// The gate in front of every call, before its body is decoded: the call must carry the
    /// admin token or a job's token. One answer for every wrong token, so nobody learns which
    /// jobs exist. The handlers then check the token against what the call is about.
    pub fn gate(
        &self,
        md: &tonic::metadata::MetadataMap,
    ) -> std::result::Result<(), tonic::Status> {
        let Some(token) = bearer(md) else {
            return Err(tonic::Status::unauthenticated(
                "this call needs a token (`authorization: Bearer TOKEN`)",
            ));
        };
        let admin = &self.inner.settings.admin_token;
        let is_admin =
            admin.len() >= MIN_TOKEN_LEN && constant_eq(admin.as_bytes(), token.as_bytes());
        if token.len() >= MIN_TOKEN_LEN
            && (is_admin
                || self
                    .inner
                    .registry
                    .any_job(|job| constant_eq(job.token.as_bytes(), token.as_bytes())))
        {
            Ok(())
        } else {
            Err(tonic::Status::permission_denied(
                "the token is not valid here",
            ))
        }
    }

    /// [`Coordinator::gate`] as a tonic interceptor.
    pub fn interceptor(
        &self,
    ) -> impl FnMut(tonic::Request<()>) -> std::result::Result<tonic::Request<()>, tonic::Status>
    + Clone
    + use<> {
        let c = self.clone();
        move |req: tonic::Request<()>| {
            c.gate(req.metadata())?;
            Ok(req)
        }
    }

    /// Checks a user call's admin token.
    pub(crate) fn authorize_admin(&self, md: &tonic::metadata::MetadataMap) -> Result<()> {
        check(
            md,
            &self.inner.settings.admin_token,
            "the coordinator's admin",
        )
    }

    /// Checks a worker call's token and attempt; returns the job.
    pub(crate) fn authorize_worker(
        &self,
        md: &tonic::metadata::MetadataMap,
        id: &str,
        attempt: u32,
    ) -> Result<Arc<Job>> {
        // An unknown job answers like a wrong token: callers cannot probe for job ids.
        let job = self
            .inner
            .registry
            .get(id)
            .map_err(|_| Error::PermissionDenied {
                whose: format!("job `{id}`'s"),
            })?;
        check(md, &job.token, &format!("job `{id}`'s"))?;
        job.live(&mut lock(&job.state), attempt)?;
        Ok(job)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(value: Option<&str>) -> tonic::metadata::MetadataMap {
        let mut m = tonic::metadata::MetadataMap::new();
        if let Some(v) = value {
            m.insert(proto::AUTH_HEADER, v.parse().expect("ascii"));
        }
        m
    }

    #[test]
    fn only_the_right_bearer_token_passes() {
        let t = new_token();
        assert_eq!(t.len(), 32);
        assert_ne!(t, new_token());
        assert!(check(&md(Some(&format!("Bearer {t}"))), &t, "x").is_ok());
        assert!(matches!(
            check(&md(None), &t, "x"),
            Err(Error::Unauthenticated { .. })
        ));
        assert!(matches!(
            check(&md(Some(&t)), &t, "x"),
            Err(Error::Unauthenticated { .. })
        ));
        assert!(matches!(
            check(&md(Some(&format!("Bearer {t}x"))), &t, "x"),
            Err(Error::PermissionDenied { .. })
        ));
    }

    #[test]
    fn an_empty_or_short_token_authenticates_nothing() {
        for want in ["", "short"] {
            assert!(matches!(
                check(&md(Some(&format!("Bearer {want}"))), want, "x"),
                Err(Error::PermissionDenied { .. })
            ));
        }
    }
}
