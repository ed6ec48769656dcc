//! An S3 server speaking the real S3 HTTP protocol on 127.0.0.1, backed by a directory
//! (`s3s` + `s3s-fs`), for tests of this crate and its users. Enabled by the
//! `s3-test-server` feature.

use std::path::Path;
use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo};
use object_store::aws::AmazonS3Builder;

use crate::CheckpointStore;

/// Access key the server accepts.
pub const ACCESS_KEY: &str = "lockstep-test-access";
/// Secret key the server accepts.
pub const SECRET_KEY: &str = "lockstep-test-secret-do-not-print";
/// Region the store is configured with.
pub const REGION: &str = "us-east-1";

/// A running server; it stops when dropped.
#[derive(Debug)]
pub struct S3Server {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl S3Server {
    /// Starts a server storing buckets as directories under `root`; each bucket named in
    /// `buckets` is created.
    pub async fn start(root: &Path, buckets: &[&str]) -> std::io::Result<S3Server> {
        for b in buckets {
            std::fs::create_dir_all(root.join(b))?;
        }
        let fs =
            s3s_fs::FileSystem::new(root).map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        let service = {
            let mut b = s3s::service::S3ServiceBuilder::new(fs);
            b.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
            b.build()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let task = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let service = service.clone();
                tokio::spawn(async move {
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = builder
                        .serve_connection(TokioIo::new(socket), service)
                        .await;
                });
            }
        });
        Ok(S3Server { endpoint, task })
    }

    /// The `AWS_*` environment that points `lockstep` (or any S3 client) at this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
            ("AWS_REGION", REGION.into()),
            ("AWS_ENDPOINT", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "false".into()),
        ]
    }

    /// A checkpoint store on `bucket` under `prefix`, talking to this server over HTTP.
    pub fn store(&self, bucket: &str, prefix: &str) -> object_store::Result<CheckpointStore> {
        let s3 = self.object_store(bucket, ACCESS_KEY, SECRET_KEY)?;
        Ok(CheckpointStore::new(
            Arc::new(s3),
            object_store::path::Path::from(prefix),
            format!("s3://{bucket}/{prefix}"),
        ))
    }

    /// A raw S3 object store with the given credentials (for auth tests).
    pub fn object_store(
        &self,
        bucket: &str,
        access_key: &str,
        secret_key: &str,
    ) -> object_store::Result<object_store::aws::AmazonS3> {
        AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(REGION)
            .with_endpoint(&self.endpoint)
            .with_access_key_id(access_key)
            .with_secret_access_key(secret_key)
            .with_allow_http(true)
            .with_virtual_hosted_style_request(false)
            .build()
    }
}
