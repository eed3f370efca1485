//! imagegate: an OpenAI-compatible image-generation gateway.
//!
//! Apps point an OpenAI SDK at imagegate with their own client keys; imagegate holds the real
//! upstream keys, validates, limits, meters, and forwards. See `ARCHITECTURE.md` for the map of
//! modules and the invariants they keep, and `README.md` for running it.

pub mod api;
pub mod app;
pub mod auth;
pub mod cache;
pub mod config;
pub mod demo;
pub mod error;
pub mod generate;
pub mod mock_upstream;
pub mod rate_limit;
pub mod router;
pub mod storage;
pub mod tasks;
pub mod telemetry;
pub mod upstream;
pub mod usage;
pub mod validate;

pub use app::{App, Gateway};
pub use config::{Config, Env};
