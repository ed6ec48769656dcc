//! Where a job is: the phases of its lifecycle, one typed value for the coordinator's state
//! machine, its records, the gRPC status and the command line.

use serde::{Deserialize, Serialize};

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Accepted, not launched yet.
    Queued,
    /// Workers launched; waiting for all of them to join.
    Admitting,
    /// Every rank joined; training.
    Running,
    /// The gang was torn down; relaunching after the backoff.
    Restarting,
    /// Trained to the last step; the final checkpoint is committed.
    Succeeded,
    /// Trained; the final checkpoint is being exported (and promoted if it passes the gate).
    Exporting,
    /// Trained and exported (promoted or kept: the message says which).
    Exported,
    /// Gave up (restarts exhausted or an error no restart fixes).
    Failed,
    /// Stopped by a user.
    Cancelled,
}

impl Phase {
    /// No transition leaves this phase.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Phase::Succeeded | Phase::Exported | Phase::Failed | Phase::Cancelled
        )
    }

    /// Lower-case name (the wire and CLI spelling).
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Queued => "queued",
            Phase::Admitting => "admitting",
            Phase::Running => "running",
            Phase::Restarting => "restarting",
            Phase::Succeeded => "succeeded",
            Phase::Exporting => "exporting",
            Phase::Exported => "exported",
            Phase::Failed => "failed",
            Phase::Cancelled => "cancelled",
        }
    }

    /// The phase named `name` (the spelling of [`Phase::as_str`]).
    pub fn parse(name: &str) -> Option<Phase> {
        [
            Phase::Queued,
            Phase::Admitting,
            Phase::Running,
            Phase::Restarting,
            Phase::Succeeded,
            Phase::Exporting,
            Phase::Exported,
            Phase::Failed,
            Phase::Cancelled,
        ]
        .into_iter()
        .find(|phase| phase.as_str() == name)
    }
}
