//! The lease a live job holds on its checkpoint URL ([`lockstep_storage::lease`]): taken when
//! the job is accepted or adopted, renewed while it lives, given up when it ends. A second
//! live job on the same URL (in this coordinator or another: two `lockstep run`s) is refused,
//! naming the holder; a job that loses its lease (its coordinator stalled past the lease's
//! time to live and another job took it) fails rather than write beside that job.

use std::sync::Arc;
use std::time::Duration;

use lockstep_storage::lease::Lease;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::launcher::{Refused, parent_is_lockstep, reap_leftovers};
use crate::registry::Job;
use crate::state::Input;

/// How long a lease holds without renewal: a dead coordinator's jobs block their checkpoint
/// URLs this long at most.
pub const LEASE_TTL: Duration = Duration::from_secs(60);

/// Who holds the leases of this process's jobs: "coordinator pid N on HOST (boot B, pid
/// namespace P)" — for people, and for a later coordinator to tell whether this one is gone: the
/// boot and the pid namespace say whose pid N is (two containers share a host name, a reboot
/// reuses pids).
fn by() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "an unknown host".into());
    let mut by = format!("coordinator pid {} on {host}", std::process::id());
    if let Some((boot, ns)) = machine() {
        by.push_str(&format!(" (boot {boot}, pid namespace {ns})"));
    }
    by
}

/// This boot's id and this process's pid namespace, where the kernel says.
fn machine() -> Option<(String, String)> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let ns = std::fs::read_link("/proc/self/ns/pid").ok()?;
    Some((boot.trim().to_string(), ns.display().to_string()))
}

/// Takes job `id`'s lease on `checkpoint_url` (`None` for `memory://`). Another live job's is
/// [`Error::Refused`], naming it — unless its coordinator ran on this machine and is gone (a
/// `lockstep run` killed): its workers are checkpointing the step they were at, so they are
/// waited for (up to [`LEFTOVER_GRACE`], then killed) and the lease is taken over, for the
/// new job to resume from that step at once instead of when the lease expires.
pub async fn take(checkpoint_url: &str, id: &str) -> Result<Option<Lease>> {
    let refused = match Lease::acquire(checkpoint_url, id, &by(), LEASE_TTL).await {
        Ok(l) => return Ok(l),
        Err(lockstep_storage::Error::Refused { reason }) => reason,
        Err(e) => return Err(Error::Storage(e)),
    };
    let Ok(Some(gone)) = lockstep_storage::lease::holder(checkpoint_url).await else {
        return Err(Error::Refused(Refused(refused)));
    };
    let Some(pid) = dead_here(&gone.by) else {
        return Err(Error::Refused(Refused(refused)));
    };
    tracing::warn!(holder = %gone.describe(), pid, "the job holding the checkpoint URL lost its coordinator: waiting for its workers to checkpoint and exit, then taking the URL over");
    let job = gone.job.clone();
    // Only that job's workers that lost their coordinator: a worker whose parent is still a
    // lockstep process belongs to a live coordinator (a lease naming a live job is someone
    // else's doing).
    let waited =
        tokio::task::spawn_blocking(move || reap_leftovers(&job, |pid| !parent_is_lockstep(pid)));
    if let Err(e) = waited.await {
        tracing::error!(error = %e, "cannot wait for the workers of the job whose coordinator died");
    }
    match Lease::take_over(checkpoint_url, id, &by(), LEASE_TTL, &gone).await {
        Ok(l) => Ok(l),
        Err(lockstep_storage::Error::Refused { reason }) => Err(Error::Refused(Refused(reason))),
        Err(e) => Err(Error::Storage(e)),
    }
}

/// The pid of the coordinator a lease holder names (see [`by`]), when it ran in this boot of
/// this machine, in this pid namespace, and is not running any more. A holder without the boot
/// and namespace (another version, hand-written) is never taken for gone.
fn dead_here(by: &str) -> Option<u32> {
    let (boot, ns) = machine()?;
    let here = nix::unistd::gethostname().ok()?.into_string().ok()?;
    let rest = by.strip_prefix("coordinator pid ")?;
    let (pid, rest) = rest.split_once(" on ")?;
    let pid: u32 = pid.parse().ok()?;
    let expected = format!("{here} (boot {boot}, pid namespace {ns})");
    (rest == expected
        && pid != std::process::id()
        && !std::path::Path::new(&format!("/proc/{pid}")).exists())
    .then_some(pid)
}

/// Gives up `job`'s lease (when it ended: before its final state is published, so that a
/// run that waits for the end can start the next job on the URL at once).
pub async fn release(job: &Job) {
    if let Some(l) = job.lease.lock().await.take()
        && let Err(e) = l.release().await
    {
        tracing::warn!(job = %job.id, error = %e, "cannot release the checkpoint URL's lease (it expires by itself)");
    }
}

/// Renews `job`'s lease while it lives (until [`release`] takes it). Losing it fails the job.
pub fn hold(job: Arc<Job>) {
    tokio::spawn(async move {
        let Some(ttl) = job.lease.lock().await.as_ref().map(Lease::ttl) else {
            return;
        };
        let every = ttl / 4;
        let mut valid_until = Instant::now() + ttl;
        loop {
            tokio::time::sleep(every).await;
            // A job that ended (however) holds nothing.
            if job
                .state
                .lock()
                .is_ok_and(|st| st.record.phase().is_final())
            {
                release(&job).await;
                return;
            }
            let renewed = {
                let mut held = job.lease.lock().await;
                let Some(lease) = held.as_mut() else { return };
                match lease.renew().await {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(lease
                        .holder()
                        .await
                        .map_or_else(|| "another job".into(), |h| h.describe())),
                    Err(e) => {
                        if Instant::now() < valid_until {
                            tracing::warn!(job = %job.id, error = %e, "cannot renew the checkpoint URL's lease; trying again");
                            continue;
                        }
                        return fail(
                            &job,
                            format!(
                                "cannot renew the lease on checkpoint.url `{}` within {} s: {e}",
                                job.store.url(),
                                ttl.as_secs()
                            ),
                        );
                    }
                }
            };
            match renewed {
                Ok(()) => valid_until = Instant::now() + ttl,
                Err(who) => {
                    return fail(
                        &job,
                        format!(
                            "lost the lease on checkpoint.url `{}` to {who} (this coordinator did \
                             not renew it within {} s); stopped so that two jobs do not write \
                             there",
                            job.store.url(),
                            ttl.as_secs()
                        ),
                    );
                }
            }
        }
    });
}

fn fail(job: &Job, why: String) {
    tracing::error!(job = %job.id, %why, "failing the job");
    job.send(Input::Fail { why });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_gone_coordinator_of_this_boot_and_pid_namespace_is_taken_for_gone() {
        let Some((boot, ns)) = machine() else {
            return; // no /proc here: nothing is ever taken for gone
        };
        let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
        // A pid that cannot be running (above the kernel's pid_max).
        let gone = 4_194_305u32;
        let named = |pid: u32, boot: &str, ns: &str| {
            format!("coordinator pid {pid} on {host} (boot {boot}, pid namespace {ns})")
        };
        assert_eq!(dead_here(&named(gone, &boot, &ns)), Some(gone));
        assert_eq!(dead_here(&by()), None, "this very process");
        assert_eq!(dead_here(&named(1, &boot, &ns)), None, "a running pid");
        assert_eq!(dead_here(&named(gone, "another-boot", &ns)), None);
        assert_eq!(
            dead_here(&named(gone, &boot, "pid:[1]")),
            None,
            "another container"
        );
        assert_eq!(
            dead_here(&format!("coordinator pid {gone} on {host}")),
            None,
            "a holder that does not say its boot and namespace"
        );
    }
}
