//! Integration tests: the real oboe (the library's `run`, or the binary) on
//! loopback port 0, real HTTP, and upstreams started by each test.
#![allow(clippy::unwrap_used)]

mod fixtures;
mod harness;

mod admin;
mod auth;
mod cli;
mod deploy;
mod errors;
mod exchange;
mod logs;
mod proxy;
mod reload;
mod shared_cache;
mod shared_topologies;
mod shutdown;
mod streaming;
