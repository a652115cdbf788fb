//! Integration tests: the real oboe (the library's `run`, or the binary) on
//! loopback port 0, real HTTP, and upstreams started by each test.
#![allow(clippy::unwrap_used)]

mod harness;

mod admin;
mod cli;
mod errors;
mod logs;
mod proxy;
mod shutdown;
mod streaming;
