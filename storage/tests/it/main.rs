//! The storage library's integration tests, as one test binary (one link instead of three).

#![allow(clippy::unwrap_used)]

mod backends;
mod faults;
mod parsers;
