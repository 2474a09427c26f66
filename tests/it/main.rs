//! Integration tests: the service over real sockets.

mod captures;
mod common;
mod seed_cases;
