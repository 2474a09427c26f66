//! Integration tests: the service over real sockets.

mod captures;
mod common;
mod deployment;
mod examples;
mod k2v;
mod operations;
mod pki;
mod robustness;
mod seed_cases;
mod sessions;
mod trust;
mod v2k;
