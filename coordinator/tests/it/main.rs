//! The coordinator library's integration tests, as one test binary (one link instead of four).

#![allow(clippy::unwrap_used)]

mod k8s_manifests;
mod k8s_mock;
mod launcher;
mod supervisor;
