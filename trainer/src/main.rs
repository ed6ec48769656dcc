//! `lockstep-trainer`: one rank of a lockstep job.
fn main() {}
