//! [`UnreliableStore`]: an [`ObjectStore`] wrapper that injects failures, latency and torn
//! uploads, for testing that checkpoints still commit and are never read torn.

use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult, UploadPart,
};

/// What to inject, per request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Faults {
    /// Probability that a request fails. Half of the failures happen before the request
    /// reaches the store (a lost request), half after it succeeded (a lost reply).
    pub fail_rate: f64,
    /// Probability that an upload of shard data (a put or a multipart part) silently stores
    /// only a prefix of its bytes and reports success.
    pub truncate_rate: f64,
    /// Extra latency per request, drawn uniformly from this range.
    pub latency: Option<(Duration, Duration)>,
    /// Seed of the fault sequence.
    pub seed: u64,
    /// Refuse server-side copies of objects larger than this, as S3's CopyObject refuses
    /// sources over 5 GiB.
    pub copy_limit: Option<u64>,
    /// A store this client may only read (a read-only credential, a read-only mount): every
    /// write, copy and delete is refused.
    pub read_only: bool,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            fail_rate: 0.0,
            truncate_rate: 0.0,
            latency: None,
            seed: 1,
            copy_limit: None,
            read_only: false,
        }
    }
}

/// The environment variable that wraps every checkpoint store a process opens in an
/// [`UnreliableStore`]: `fail=0.1,truncate=0.05,latency_ms=5..50,seed=7` (each optional).
/// For soaks and drills (`benchmarks`' chaos run), never for real jobs; a process that uses it
/// says so in its log. A `lockstep run` passes it on to its workers.
pub const FAULTS_ENV: &str = "LOCKSTEP_STORE_FAULTS";

impl Faults {
    /// Parses [`FAULTS_ENV`]'s value: comma-separated `fail=P`, `truncate=P` (probabilities in
    /// 0..=1), `latency_ms=LO..HI` (milliseconds, at most 60000), `seed=N`, `read_only`.
    pub fn parse(spec: &str) -> Result<Faults, String> {
        let mut f = Faults::default();
        let rate = |key: &str, v: &str| -> Result<f64, String> {
            let p: f64 = v.parse().map_err(|_| format!("{key}={v}: not a number"))?;
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("{key}={v}: a probability is between 0 and 1"));
            }
            Ok(p)
        };
        let duration = |v: &str| -> Result<Duration, String> {
            let ms: u64 = v
                .trim()
                .parse()
                .map_err(|_| format!("latency_ms {v}: not a whole number of milliseconds"))?;
            if ms > 60_000 {
                return Err(format!("latency_ms {v}: at most 60000"));
            }
            Ok(Duration::from_millis(ms))
        };
        for item in spec.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (key, value) = item.split_once('=').unwrap_or((item, ""));
            match key.trim() {
                "fail" => f.fail_rate = rate("fail", value.trim())?,
                "truncate" => f.truncate_rate = rate("truncate", value.trim())?,
                "seed" => {
                    f.seed = value
                        .trim()
                        .parse()
                        .map_err(|_| format!("seed={value}: not a whole number"))?
                }
                "latency_ms" => {
                    let (lo, hi) = value.split_once("..").ok_or_else(|| {
                        format!("latency_ms={value}: expected LO..HI, e.g. 5..50")
                    })?;
                    let (lo, hi) = (duration(lo)?, duration(hi)?);
                    if lo > hi {
                        return Err(format!("latency_ms={value}: LO is above HI"));
                    }
                    f.latency = Some((lo, hi));
                }
                "read_only" => match value.trim() {
                    "" | "1" | "true" => f.read_only = true,
                    "0" | "false" => f.read_only = false,
                    v => return Err(format!("read_only={v}: expected no value, true or false")),
                },
                "" => return Err(format!("`{item}`: a fault needs a name")),
                other => {
                    return Err(format!(
                        "unknown fault `{other}` (known: fail=P, truncate=P, latency_ms=LO..HI, \
                         seed=N, read_only)"
                    ));
                }
            }
        }
        Ok(f)
    }
}

/// Counts of what was injected.
#[derive(Debug, Default)]
pub struct FaultCounts {
    /// Requests seen.
    pub requests: AtomicU64,
    /// Failures injected.
    pub failures: AtomicU64,
    /// Truncations injected.
    pub truncations: AtomicU64,
}

/// Wraps a store and injects [`Faults`]. Manifests are never truncated: a real store never
/// acknowledges a partial single put; shards model a writer whose upload was cut short.
#[derive(Debug, Clone)]
pub struct UnreliableStore {
    inner: Arc<dyn ObjectStore>,
    faults: Faults,
    rng: Arc<Mutex<u64>>,
    counts: Arc<FaultCounts>,
}

impl UnreliableStore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn ObjectStore>, faults: Faults) -> Self {
        UnreliableStore {
            inner,
            faults,
            // splitmix64 of the seed: xorshift started from a small seed (1, 2, …) gives tiny
            // numbers first, which would make the first requests fail for every such seed.
            rng: Arc::new(Mutex::new({
                let mut z = faults.seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                (z ^ (z >> 31)).max(1)
            })),
            counts: Arc::new(FaultCounts::default()),
        }
    }

    /// What has been injected so far.
    pub fn counts(&self) -> &FaultCounts {
        &self.counts
    }

    fn uniform(&self) -> f64 {
        let mut s = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        (*s >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Delays, then decides: `Some(before)` = fail (before or after reaching the store).
    async fn roll(&self) -> Option<bool> {
        self.counts.requests.fetch_add(1, Ordering::Relaxed);
        if let Some((lo, hi)) = self.faults.latency {
            let d = lo + (hi.saturating_sub(lo)).mul_f64(self.uniform());
            tokio::time::sleep(d).await;
        }
        if self.uniform() < self.faults.fail_rate {
            self.counts.failures.fetch_add(1, Ordering::Relaxed);
            Some(self.uniform() < 0.5)
        } else {
            None
        }
    }

    fn maybe_truncate(&self, location: &Path, payload: PutPayload) -> PutPayload {
        let is_shard = location.filename().is_some_and(|f| f.ends_with(".shard"));
        if !is_shard || payload.content_length() == 0 || self.uniform() >= self.faults.truncate_rate
        {
            return payload;
        }
        self.counts.truncations.fetch_add(1, Ordering::Relaxed);
        let bytes: Bytes = payload
            .iter()
            .flat_map(|b| b.iter().copied())
            .collect::<Vec<u8>>()
            .into();
        let keep = (bytes.len() as f64 * self.uniform()) as usize;
        PutPayload::from(bytes.slice(..keep))
    }
}

impl UnreliableStore {
    /// Refuses `op` on `location` when the store is read-only.
    fn writable(&self, op: &str, location: &Path) -> object_store::Result<()> {
        if !self.faults.read_only {
            return Ok(());
        }
        Err(object_store::Error::PermissionDenied {
            path: location.to_string(),
            source: format!("{op}: the store is read-only").into(),
        })
    }
}

fn injected(op: &str) -> object_store::Error {
    object_store::Error::Generic {
        store: "UnreliableStore",
        source: format!("injected failure of {op}").into(),
    }
}

impl fmt::Display for UnreliableStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Unreliable({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for UnreliableStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.writable("put", location)?;
        let fault = self.roll().await;
        if fault == Some(true) {
            return Err(injected("put"));
        }
        let payload = self.maybe_truncate(location, payload);
        let r = self.inner.put_opts(location, payload, opts).await?;
        if fault == Some(false) {
            return Err(injected("put (after storing)"));
        }
        Ok(r)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.writable("upload", location)?;
        if self.roll().await.is_some() {
            return Err(injected("create multipart upload"));
        }
        let inner = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(UnreliableUpload {
            store: self.clone(),
            location: location.clone(),
            inner,
        }))
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        if self.roll().await.is_some() {
            return Err(injected("get"));
        }
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        if self.roll().await.is_some() {
            return Err(injected("get ranges"));
        }
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let this = self.clone();
        let inner = self.inner.clone();
        locations
            .then(move |loc| {
                let this = this.clone();
                let inner = inner.clone();
                async move {
                    let loc = loc?;
                    this.writable("delete", &loc)?;
                    let fault = this.roll().await;
                    if fault == Some(true) {
                        return Err(injected("delete"));
                    }
                    let mut out =
                        inner.delete_stream(futures::stream::once(async { Ok(loc) }).boxed());
                    let r = out
                        .next()
                        .await
                        .unwrap_or_else(|| Err(injected("delete (no reply)")));
                    if fault == Some(false) && r.is_ok() {
                        return Err(injected("delete (after deleting)"));
                    }
                    r
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let this = self.clone();
        let inner = self.inner.list(prefix);
        futures::stream::once(async move { this.roll().await })
            .flat_map(move |fault| match fault {
                Some(_) => futures::stream::once(async { Err(injected("list")) }).boxed(),
                None => futures::stream::empty().boxed(),
            })
            .chain(inner)
            .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        if self.roll().await.is_some() {
            return Err(injected("list"));
        }
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.writable("copy", to)?;
        if self.roll().await.is_some() {
            return Err(injected("copy"));
        }
        if let Some(limit) = self.faults.copy_limit {
            let size = self.inner.head(from).await?.size;
            if size > limit {
                return Err(object_store::Error::NotSupported {
                    source: format!(
                        "the copy source is {size} bytes, over the {limit}-byte copy limit"
                    )
                    .into(),
                });
            }
        }
        self.inner.copy_opts(from, to, options).await
    }
}

#[derive(Debug)]
struct UnreliableUpload {
    store: UnreliableStore,
    location: Path,
    inner: Box<dyn MultipartUpload>,
}

#[async_trait]
impl MultipartUpload for UnreliableUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let store = self.store.clone();
        let data = self.store.maybe_truncate(&self.location, data);
        let part = self.inner.put_part(data);
        async move {
            match store.roll().await {
                Some(true) => Err(injected("upload part")),
                Some(false) => {
                    part.await?;
                    Err(injected("upload part (after storing)"))
                }
                None => part.await,
            }
        }
        .boxed()
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        let fault = self.store.roll().await;
        if fault == Some(true) {
            return Err(injected("complete multipart upload"));
        }
        let r = self.inner.complete().await?;
        if fault == Some(false) {
            return Err(injected("complete multipart upload (after completing)"));
        }
        Ok(r)
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.inner.abort().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_from_the_environment_variable_and_bad_ones_are_named() {
        let f = Faults::parse("fail=0.1, truncate=0.05,latency_ms=5..50,seed=7").unwrap();
        assert_eq!(f.fail_rate, 0.1);
        assert_eq!(f.truncate_rate, 0.05);
        assert_eq!(
            f.latency,
            Some((Duration::from_millis(5), Duration::from_millis(50)))
        );
        assert_eq!(f.seed, 7);
        assert!(Faults::parse("read_only").unwrap().read_only);
        assert!(Faults::parse("read_only=true").unwrap().read_only);
        assert!(
            Faults::parse("read_only=x")
                .unwrap_err()
                .contains("read_only=x")
        );
        assert!(Faults::parse("=1").unwrap_err().contains("needs a name"));
        assert_eq!(Faults::parse(",,,").unwrap(), Faults::default());
        assert_eq!(Faults::parse("").unwrap(), Faults::default());
        for (bad, says) in [
            ("fail=2", "between 0 and 1"),
            ("fail=x", "not a number"),
            ("latency_ms=5", "LO..HI"),
            ("latency_ms=9..1", "LO is above HI"),
            ("latency_ms=1..99999", "at most 60000"),
            ("drop=0.1", "unknown fault `drop`"),
        ] {
            let e = Faults::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
