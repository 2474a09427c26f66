//! The deployment files agree with each other and with the service, without Docker: `compose.yaml` and
//! `vernemq.conf` are parsed (`parse`) and cross-checked (`checks`, tests in `compose`), `iotagent-mqtt pki init`
//! (the built binary) runs into a temporary directory (`pki`), and the webhook endpoints and the
//! binary's `healthcheck` mode are called on a running service (`service`).

mod checks;
mod compose;
mod parse;
mod pki;
mod service;

use std::path::{Path, PathBuf};
use std::process::Command;

use parse::{Compose, Conf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn conf() -> Conf {
    Conf::parse(&read("vernemq.conf")).unwrap()
}

fn compose() -> Compose {
    Compose::parse(&read("compose.yaml")).unwrap()
}

/// The plugin fragments that the shipped vernemq.conf contains.
fn fragments() -> Vec<(String, Conf)> {
    plugin_fragments(&["acl", "lifetime"])
}

/// Fragments an operator adds by choice: `v2k` (the `on_publish` mode).
fn opt_in_fragments() -> Vec<(String, Conf)> {
    plugin_fragments(&["v2k"])
}

fn plugin_fragments(plugins: &[&str]) -> Vec<(String, Conf)> {
    plugins
        .iter()
        .map(|p| {
            let file = format!("plugins-http/{p}/vernemq.conf");
            let conf = Conf::parse(&read(&file)).unwrap();
            (file, conf)
        })
        .collect()
}

/// Runs `iotagent-mqtt pki <args>` (the built binary, as the compose step does) with the PKI step's compose
/// environment, its PKI_DIR moved to `dir/pki`.
fn run_pki(compose: &Compose, dir: &Path, args: &[&str]) -> std::process::Output {
    let output = pki_command(compose, dir, args).output().expect("run iotagent-mqtt pki");
    assert!(output.status.success(), "pki {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    output
}

fn pki_command(compose: &Compose, dir: &Path, args: &[&str]) -> Command {
    let pki = compose.pki().expect("pki step");
    let mut command = Command::new(env!("CARGO_BIN_EXE_iotagent-mqtt"));
    command.arg("pki").args(args).env_clear().envs(compose.env(pki)).env("PKI_DIR", dir.join("pki"));
    command
}
