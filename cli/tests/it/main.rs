//! The `lockstep` binary's tests, as a user runs it: one test binary (each links lockstep's
//! libraries, Burn, kube and tonic, so one link instead of eight). Tests that start training
//! processes take [`common::one_gang`], so gangs never overlap on a 2-core machine.

#![allow(clippy::unwrap_used)]

mod common;

mod ckpt_cli;
mod data_cli;
mod data_parallel;
mod e2e;
mod export_cli;
mod gang32;
mod kubernetes;
mod plan_cli;
mod resume;
mod tls;
