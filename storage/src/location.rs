//! Checkpoint URLs: `file://PATH` (absolute or relative to the working directory; NFS is a
//! path), `s3://BUCKET[/PREFIX]` (credentials and endpoint from the usual `AWS_*` environment),
//! and `memory://[NAME]` (process-local, for tests and experiments).

use std::path::PathBuf;

use crate::{Error, Result};

/// A parsed checkpoint URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A local (or NFS) directory.
    File(PathBuf),
    /// An S3 bucket and key prefix (no leading or trailing `/`).
    S3 {
        /// Bucket name.
        bucket: String,
        /// Key prefix, possibly empty.
        prefix: String,
    },
    /// A process-local in-memory store.
    Memory,
}

impl Location {
    /// Parses `url`; relative `file://` paths resolve against the working directory.
    pub fn parse(url: &str) -> Result<Location> {
        let bad = |reason: &str| Error::InvalidUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        if let Some(path) = url.strip_prefix("file://") {
            if path.is_empty() {
                return Err(bad("the path is empty"));
            }
            let path = PathBuf::from(path);
            let path = if path.is_absolute() {
                path
            } else {
                std::env::current_dir()
                    .map_err(|e| bad(&format!("cannot resolve a relative path: {e}")))?
                    .join(path)
            };
            Ok(Location::File(path))
        } else if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("the bucket name is empty"));
            }
            Ok(Location::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.trim_matches('/').to_string(),
            })
        } else if url.starts_with("memory://") {
            Ok(Location::Memory)
        } else {
            Err(bad("expected file://PATH, s3://BUCKET/PREFIX or memory://"))
        }
    }
}

/// An S3 client for `bucket` with credentials, region and endpoint from the `AWS_*` environment.
pub(crate) fn s3_from_env(bucket: &str) -> object_store::Result<object_store::aws::AmazonS3> {
    object_store::aws::AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_scheme() {
        assert_eq!(
            Location::parse("file:///tmp/x").unwrap(),
            Location::File("/tmp/x".into())
        );
        let rel = Location::parse("file://runs/q").unwrap();
        assert_eq!(
            rel,
            Location::File(std::env::current_dir().unwrap().join("runs/q"))
        );
        assert_eq!(
            Location::parse("s3://b/a/b/").unwrap(),
            Location::S3 {
                bucket: "b".into(),
                prefix: "a/b".into()
            }
        );
        assert_eq!(Location::parse("memory://").unwrap(), Location::Memory);
        for bad in ["", "/tmp/x", "file://", "s3://", "gs://b"] {
            let e = Location::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }
}
