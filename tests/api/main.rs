//! The one integration-test binary: the gateway spawned in-process (or as the real binary)
//! on port 0, in front of the real mock upstream, driven over HTTP.
#![allow(
    clippy::disallowed_methods,
    reason = "tests build their own HTTP clients"
)]
#![allow(clippy::unwrap_used, reason = "a failed unwrap is a failed test")]

mod browser;
mod helpers;
mod process;

mod admin;
mod bad_input;
mod cache;
mod cli;
mod dashboard;
mod deploy;
mod generations;
mod hygiene;
mod limits;
mod logs;
mod metrics;
mod quota;
mod reload;
mod secrets;
mod tasks;
mod upstream_faults;
mod upstreams;
