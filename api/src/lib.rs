//! lockstep-api: the types every lockstep process agrees on. No IO.
//!
//! # Layout
//! - [`base`]: `model.base` — what a job starts from — parsed once.
//! - [`config`]: the job configuration schema (TOML; the same schema is embedded in the
//!   Kubernetes LockstepJob), with named defaults, `--set key=value` overrides and validation
//!   errors that name the field.
//! - [`phase`]: where a job is ([`Phase`]), typed, with its wire spelling.
//! - [`proto`]: the gRPC control protocol between the coordinator, its users and trainers.
//! - `testing` (feature `testing`): the `TestJob` config builder shared by every crate's tests.

pub mod base;
pub mod config;
pub mod date;
pub mod memory;
pub mod phase;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use base::BaseModel;
pub use config::{
    ConfigError, JobConfig, LORA_TARGETS, LoraSection, Precision, RECORD_FIELDS, Recovery, Resume,
    Schedule,
};
pub use phase::Phase;

/// Exit status of `lockstep train` for an error that a restart cannot fix (the config, the
/// base model, the data, a checkpoint of another architecture, a non-finite loss, which a
/// bit-identical rerun reproduces). A coordinator fails the job at once instead of retrying.
pub const EXIT_PERMANENT: u8 = 3;

/// `lockstep train`'s exit status when it failed only because another rank of its gang went
/// away (the ring broke or stalled): the other rank's failure is the cause worth reporting.
pub const EXIT_PEER_LOST: u8 = 4;

/// The gRPC protocol (`proto/lockstep.proto`), generated at build time.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("lockstep.v1");

    /// The metadata key that carries `Bearer <token>` on every call.
    pub const AUTH_HEADER: &str = "authorization";
    /// Metadata on a refused `CommitShard`: the gang is re-forming in place (a rank was lost),
    /// so the checkpoint in flight will not be committed and the caller must regroup.
    pub const REGROUPING: &str = "lockstep-regrouping";

    /// A client interceptor that adds `authorization: Bearer TOKEN` to every call.
    #[derive(Debug, Clone)]
    pub struct BearerToken(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

    impl BearerToken {
        /// `None` when the token has characters a header cannot carry.
        pub fn new(token: &str) -> Option<BearerToken> {
            format!("Bearer {token}").parse().ok().map(BearerToken)
        }
    }

    impl tonic::service::Interceptor for BearerToken {
        fn call(
            &mut self,
            mut req: tonic::Request<()>,
        ) -> Result<tonic::Request<()>, tonic::Status> {
            req.metadata_mut().insert(AUTH_HEADER, self.0.clone());
            Ok(req)
        }
    }

    /// A client of the coordinator that authenticates with a token.
    pub type Client = coordinator_client::CoordinatorClient<
        tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerToken>,
    >;
}
