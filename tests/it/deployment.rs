//! The deployment files agree with each other and with the service, without Docker: `compose.yaml` and
//! `vernemq.conf` are parsed, `deploy/pki-bootstrap.sh` runs into a temporary directory, the webhook endpoints are
//! called on a running service, and the binary's `healthcheck` mode runs against it.
//!
//! Each check is a function over parsed files returning the problems it found, so `checks_catch_broken_inputs`
//! can show that every one of them fails on a deliberately broken input.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use iotagent_mqtt::webhooks::Hook;
use openssl::x509::{X509, X509Crl};
use serde_yaml_ng::Value;

use crate::common::spawn_app;

/// The service's default `IOTAGENT_LISTEN` port.
const DEFAULT_LISTEN_PORT: u16 = 8080;
/// Where the official image reads the mounted configuration (reference §6.8).
const VERNEMQ_CONF_TARGET: &str = "/vernemq/etc/vernemq.conf.local";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

// ---------------------------------------------------------------------------------------------------- parsed files

/// A cuttlefish file: `key = value` lines, `#` comments. Later lines win, as in cuttlefish.
#[derive(Debug, Clone)]
struct Conf {
    entries: Vec<(String, String)>,
}

impl Conf {
    fn parse(text: &str) -> Result<Self, String> {
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = line.split_once('=').ok_or_else(|| format!("line {}: no '=' in {line:?}", n + 1))?;
            entries.push((key.trim().to_string(), value.trim().to_string()));
        }
        Ok(Self { entries })
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.entries.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// `vmq_webhooks.<name>.<field>` grouped by name.
    fn webhooks(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        let mut hooks: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for (key, value) in &self.entries {
            let Some(rest) = key.strip_prefix("vmq_webhooks.") else { continue };
            // Global settings (vmq_webhooks.pool_max_connections, ...) have no field part.
            let Some((name, field)) = rest.split_once('.') else { continue };
            hooks.entry(name.to_string()).or_default().insert(field.to_string(), value.clone());
        }
        hooks
    }

    /// MQTT and HTTP listeners: `listener.<type>.<name> = ip:port` → (type, name, port).
    fn listeners(&self) -> Vec<(String, String, u16)> {
        let mut out = Vec::new();
        for (key, value) in &self.entries {
            let parts: Vec<&str> = key.split('.').collect();
            if parts.len() != 3 || parts[0] != "listener" {
                continue;
            }
            if let Some(port) = value.rsplit_once(':').and_then(|(_, p)| p.parse().ok()) {
                out.push((parts[1].to_string(), parts[2].to_string(), port));
            }
        }
        out
    }
}

#[derive(Debug, Clone)]
struct Compose(Value);

impl Compose {
    fn parse(text: &str) -> Result<Self, String> {
        serde_yaml_ng::from_str(text).map(Self).map_err(|e| format!("compose.yaml: {e}"))
    }

    fn services(&self) -> Vec<&str> {
        self.0["services"].as_mapping().map(|m| m.keys().filter_map(Value::as_str).collect()).unwrap_or_default()
    }

    fn service(&self, name: &str) -> Option<&Value> {
        self.0["services"].get(name)
    }

    /// `environment` in map or list form, values as strings.
    fn env(&self, service: &str) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        match self.service(service).map(|s| &s["environment"]) {
            Some(Value::Mapping(map)) => {
                for (k, v) in map {
                    let value = match v {
                        Value::String(s) => s.clone(),
                        Value::Number(n) => n.to_string(),
                        Value::Bool(b) => b.to_string(),
                        _ => String::new(),
                    };
                    out.insert(k.as_str().unwrap_or_default().to_string(), value);
                }
            }
            Some(Value::Sequence(items)) => {
                for item in items.iter().filter_map(Value::as_str) {
                    let (k, v) = item.split_once('=').unwrap_or((item, ""));
                    out.insert(k.to_string(), v.to_string());
                }
            }
            _ => {}
        }
        out
    }

    /// Short-syntax mounts `source:target[:mode]` → (source, target).
    fn mounts(&self, service: &str) -> Vec<(String, String)> {
        let Some(Value::Sequence(items)) = self.service(service).map(|s| &s["volumes"]) else { return Vec::new() };
        items
            .iter()
            .filter_map(Value::as_str)
            .filter_map(|m| {
                let mut parts = m.split(':');
                Some((parts.next()?.to_string(), parts.next()?.to_string()))
            })
            .collect()
    }

    /// Named volumes declared at the top level.
    fn volumes(&self) -> BTreeSet<String> {
        self.0["volumes"]
            .as_mapping()
            .map(|m| m.keys().filter_map(Value::as_str).map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// Short-syntax ports `host_ip:host_port:container_port` → (host ip, host port, container port).
    fn ports(&self, service: &str) -> Vec<(String, u16, u16)> {
        let Some(Value::Sequence(items)) = self.service(service).map(|s| &s["ports"]) else { return Vec::new() };
        items
            .iter()
            .filter_map(Value::as_str)
            .map(|p| {
                let parts: Vec<&str> = p.split(':').collect();
                let (ip, host, container) = match parts.as_slice() {
                    [ip, host, container] => (ip.to_string(), *host, *container),
                    [host, container] => (String::new(), *host, *container),
                    [container] => (String::new(), *container, *container),
                    _ => (String::new(), "0", "0"),
                };
                (ip, host.parse().unwrap_or(0), container.split('/').next().unwrap_or("0").parse().unwrap_or(0))
            })
            .collect()
    }

    /// `depends_on` in long form: dependency → condition.
    fn depends_on(&self, service: &str) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        match self.service(service).map(|s| &s["depends_on"]) {
            Some(Value::Mapping(map)) => {
                for (k, v) in map {
                    let condition = v["condition"].as_str().unwrap_or("service_started");
                    out.insert(k.as_str().unwrap_or_default().to_string(), condition.to_string());
                }
            }
            Some(Value::Sequence(items)) => {
                for k in items.iter().filter_map(Value::as_str) {
                    out.insert(k.to_string(), "service_started".into());
                }
            }
            _ => {}
        }
        out
    }

    /// The service that mounts vernemq.conf as the broker's configuration.
    fn broker(&self) -> Option<&str> {
        self.services().into_iter().find(|s| self.mounts(s).iter().any(|(_, target)| target == VERNEMQ_CONF_TARGET))
    }

    /// The service built from this repository's Dockerfile.
    fn agent(&self) -> Option<&str> {
        self.services().into_iter().find(|s| self.service(s).is_some_and(|v| v.get("build").is_some()))
    }

    /// The one-shot PKI step: the service that runs deploy/pki-bootstrap.sh.
    fn pki(&self) -> Option<&str> {
        self.services()
            .into_iter()
            .find(|s| self.mounts(s).iter().any(|(source, _)| source.ends_with("deploy/pki-bootstrap.sh")))
    }
}

/// `http://host:port/path` → (host, port, path).
fn parse_http_url(url: &str) -> Option<(String, u16, String)> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = rest.split_once('/').map(|(a, p)| (a, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => (host, port.parse().ok()?),
        None => (authority, 80),
    };
    Some((host.to_string(), port, path))
}

fn listen_port(compose: &Compose, service: &str) -> Option<u16> {
    match compose.env(service).get("IOTAGENT_LISTEN") {
        Some(listen) => listen.rsplit_once(':').and_then(|(_, p)| p.parse().ok()),
        None => Some(DEFAULT_LISTEN_PORT),
    }
}

// ---------------------------------------------------------------------------------------------------------- checks

type Problems = Vec<String>;

fn result(problems: Problems) -> Result<(), Problems> {
    if problems.is_empty() { Ok(()) } else { Err(problems) }
}

/// Every `vmq_webhooks.<name>` has `.hook` and `.endpoint`, is named after its hook, is a hook the service serves, and
/// points at `/vmq/<hook>` on the compose service built from this repository, on the port of its IOTAGENT_LISTEN.
fn check_webhooks(conf: &Conf, compose: &Compose) -> Result<(), Problems> {
    let mut problems = Vec::new();
    if conf.get("plugins.vmq_webhooks") != Some("on") {
        problems.push("plugins.vmq_webhooks is not on".into());
    }
    let served: BTreeMap<&str, String> = Hook::ALL.iter().map(|h| (h.name(), h.path())).collect();
    let agent = compose.agent();
    let hooks = conf.webhooks();
    if hooks.is_empty() {
        problems.push("no vmq_webhooks registrations".into());
    }
    for (name, fields) in &hooks {
        let (Some(hook), Some(endpoint)) = (fields.get("hook"), fields.get("endpoint")) else {
            problems.push(format!("vmq_webhooks.{name} needs both .hook and .endpoint (has {:?})", fields.keys()));
            continue;
        };
        if hook != name {
            problems.push(format!("vmq_webhooks.{name} registers {hook}: the name must be the hook name"));
        }
        let Some(path) = served.get(hook.as_str()) else {
            problems.push(format!("vmq_webhooks.{name}: the service does not serve {hook}"));
            continue;
        };
        let Some((host, port, url_path)) = parse_http_url(endpoint) else {
            problems.push(format!("vmq_webhooks.{name}: endpoint {endpoint} is not http://host:port/path"));
            continue;
        };
        if &url_path != path {
            problems
                .push(format!("vmq_webhooks.{name}: endpoint path {url_path}, the service serves {hook} at {path}"));
        }
        if Some(host.as_str()) != agent {
            problems
                .push(format!("vmq_webhooks.{name}: host {host} is not the compose service built here ({agent:?})"));
        } else if listen_port(compose, &host) != Some(port) {
            problems.push(format!(
                "vmq_webhooks.{name}: port {port}, but {host} listens on {:?} (IOTAGENT_LISTEN)",
                listen_port(compose, &host)
            ));
        }
    }
    result(problems)
}

/// Every line of each plugin fragment appears unchanged in vernemq.conf.
fn check_fragments(conf: &Conf, fragments: &[(String, Conf)]) -> Result<(), Problems> {
    let mut problems = Vec::new();
    for (file, fragment) in fragments {
        for (key, value) in &fragment.entries {
            if conf.get(key) != Some(value.as_str()) {
                problems.push(format!("{file}: {key} = {value} is not in vernemq.conf (has {:?})", conf.get(key)));
            }
        }
    }
    result(problems)
}

/// The broker publishes exactly the ports of vernemq.conf's listeners, and only on the host's loopback.
fn check_ports(conf: &Conf, compose: &Compose) -> Result<(), Problems> {
    let mut problems = Vec::new();
    let Some(broker) = compose.broker() else {
        return Err(vec![format!("no compose service mounts vernemq.conf at {VERNEMQ_CONF_TARGET}")]);
    };
    let listening: BTreeSet<u16> = conf.listeners().iter().map(|(_, _, port)| *port).collect();
    let published: BTreeSet<u16> = compose.ports(broker).iter().map(|(_, _, container)| *container).collect();
    if listening != published {
        problems.push(format!("vernemq.conf listens on {listening:?}, compose publishes {published:?}"));
    }
    for (ip, host, container) in compose.ports(broker) {
        if ip != "127.0.0.1" {
            problems.push(format!("{broker} port {host}:{container} is published on {ip:?}, not 127.0.0.1"));
        }
    }
    result(problems)
}

/// KAFKA_BROKERS and MQTT_URL of the service name compose services and ports that exist, and the service identity's
/// certificate is issued for the service's MQTT_USERNAME.
fn check_service_endpoints(conf: &Conf, compose: &Compose) -> Result<(), Problems> {
    let mut problems = Vec::new();
    let Some(agent) = compose.agent() else { return Err(vec!["no compose service has build:".into()]) };
    let env = compose.env(agent);
    let services = compose.services();
    match env.get("KAFKA_BROKERS") {
        None => problems.push(format!("{agent}: KAFKA_BROKERS is not set")),
        Some(brokers) => {
            for broker in brokers.split(',') {
                let Some((host, port)) = broker.trim().rsplit_once(':') else {
                    problems.push(format!("KAFKA_BROKERS: {broker} is not host:port"));
                    continue;
                };
                if !services.contains(&host) {
                    problems.push(format!("KAFKA_BROKERS: {host} is not a compose service"));
                    continue;
                }
                let kafka = compose.env(host);
                let advertised = kafka.get("KAFKA_ADVERTISED_LISTENERS").cloned().unwrap_or_default();
                if !advertised.split(',').any(|l| l.ends_with(&format!("://{host}:{port}"))) {
                    problems.push(format!("KAFKA_BROKERS: {host} does not advertise {host}:{port} ({advertised})"));
                }
                let listeners = kafka.get("KAFKA_LISTENERS").cloned().unwrap_or_default();
                if !listeners.split(',').any(|l| l.ends_with(&format!(":{port}"))) {
                    problems.push(format!("KAFKA_BROKERS: {host} does not listen on {port} ({listeners})"));
                }
            }
        }
    }
    match env.get("MQTT_URL") {
        None => problems.push(format!("{agent}: MQTT_URL is not set")),
        Some(url) => {
            let parsed = url.split_once("://").and_then(|(scheme, rest)| {
                let (host, port) = rest.trim_end_matches('/').rsplit_once(':')?;
                Some((scheme, host, port.parse::<u16>().ok()?))
            });
            match parsed {
                None => problems.push(format!("MQTT_URL {url} is not scheme://host:port")),
                Some((scheme, host, port)) => {
                    if Some(host) != compose.broker() {
                        problems.push(format!("MQTT_URL: {host} is not the VerneMQ service ({:?})", compose.broker()));
                    }
                    let kind = match scheme {
                        "mqtt" => "tcp",
                        "mqtts" => "ssl",
                        other => {
                            problems.push(format!("MQTT_URL: unknown scheme {other}"));
                            ""
                        }
                    };
                    if !conf.listeners().iter().any(|(t, _, p)| t == kind && *p == port) {
                        problems.push(format!("MQTT_URL: vernemq.conf has no {kind} listener on port {port}"));
                    }
                    if scheme == "mqtts" {
                        for var in ["MQTT_CA_FILE", "MQTT_CERT_FILE", "MQTT_KEY_FILE"] {
                            if !env.contains_key(var) {
                                problems.push(format!("MQTT_URL is mqtts:// but {var} is not set"));
                            }
                        }
                    }
                }
            }
        }
    }
    let username = env.get("MQTT_USERNAME").map_or("k2v-bridge", String::as_str);
    if let Some(pki) = compose.pki() {
        let cn = compose.env(pki).get("SERVICE_CN").cloned();
        if cn.as_deref() != Some(username) {
            problems.push(format!("{pki}: SERVICE_CN {cn:?} is not the service's MQTT_USERNAME {username}"));
        }
    }
    result(problems)
}

/// Start order: the broker and the service wait for the PKI step to finish; the service waits for Kafka and VerneMQ
/// to be healthy; what is waited on as healthy has a health check; every one-shot is waited on, so that
/// `docker compose up --wait` does not count its exit as a failure.
fn check_start_order(compose: &Compose) -> Result<(), Problems> {
    let mut problems = Vec::new();
    let (Some(broker), Some(agent), Some(pki)) = (compose.broker(), compose.agent(), compose.pki()) else {
        return Err(vec!["compose needs a broker (vernemq.conf), a built service and a pki step".into()]);
    };
    let completed = "service_completed_successfully";
    let healthy = "service_healthy";
    let mut wanted = vec![(broker, pki, completed), (agent, pki, completed), (agent, broker, healthy)];
    let kafka = compose.env(agent).get("KAFKA_BROKERS").and_then(|b| b.split(':').next().map(str::to_string));
    if let Some(kafka) = kafka.as_deref() {
        wanted.push((agent, kafka, healthy));
    }
    for (service, dependency, condition) in wanted {
        let actual = compose.depends_on(service).get(dependency).cloned();
        if actual.as_deref() != Some(condition) {
            problems.push(format!("{service} must depend on {dependency} with {condition} (has {actual:?})"));
        }
    }
    for service in compose.services() {
        for (dependency, condition) in compose.depends_on(service) {
            let has_check = compose.service(&dependency).is_some_and(|s| s.get("healthcheck").is_some());
            if condition == healthy && !has_check {
                problems.push(format!("{service} waits for {dependency} to be healthy, which has no healthcheck"));
            }
        }
    }
    for service in [broker, agent] {
        if compose.service(service).is_none_or(|s| s.get("healthcheck").is_none()) {
            problems.push(format!("{service} has no healthcheck"));
        }
    }
    let adopted = compose.services().iter().any(|s| compose.depends_on(s).get(pki).is_some_and(|c| c == completed));
    if !adopted {
        problems.push(format!("nothing waits for the one-shot {pki} with {completed}"));
    }
    result(problems)
}

/// Every TLS file vernemq.conf names, and every MQTT_*_FILE of the service, lies in a named volume that the PKI step
/// mounts at its PKI_DIR, and the bootstrap script (already run into `pki_output`) produced it.
fn check_tls_files(conf: &Conf, compose: &Compose, pki_output: &Path) -> Result<(), Problems> {
    let mut problems = Vec::new();
    let (Some(broker), Some(agent), Some(pki)) = (compose.broker(), compose.agent(), compose.pki()) else {
        return Err(vec!["compose needs a broker (vernemq.conf), a built service and a pki step".into()]);
    };
    let pki_dir = compose.env(pki).get("PKI_DIR").cloned().unwrap_or_else(|| "/pki".into());
    let Some((volume, _)) = compose.mounts(pki).into_iter().find(|(_, target)| *target == pki_dir) else {
        return Err(vec![format!("{pki} mounts nothing at its PKI_DIR {pki_dir}")]);
    };
    if !compose.volumes().contains(&volume) {
        problems.push(format!("{pki} writes into {volume}, which is not a named volume"));
    }
    let mut wanted: Vec<(&str, String, String)> = conf
        .entries
        .iter()
        .filter(|(key, _)| [".cafile", ".certfile", ".keyfile", ".crlfile"].iter().any(|s| key.ends_with(s)))
        .map(|(key, path)| (broker, key.clone(), path.clone()))
        .collect();
    if wanted.len() < 4 {
        problems.push(format!(
            "vernemq.conf names {} TLS files, expected cafile, certfile, keyfile, crlfile",
            wanted.len()
        ));
    }
    for (var, path) in compose.env(agent) {
        if var.starts_with("MQTT_") && var.ends_with("_FILE") {
            wanted.push((agent, var, path));
        }
    }
    for (service, key, path) in wanted {
        let mount = compose.mounts(service).into_iter().find(|(source, target)| {
            *source == volume && Path::new(&path).parent().is_some_and(|dir| dir == Path::new(target))
        });
        if mount.is_none() {
            problems.push(format!("{key} = {path}: {service} does not mount the volume {volume} at its folder"));
            continue;
        }
        let file = Path::new(&path).file_name().map(PathBuf::from).unwrap_or_default();
        if !pki_output.join(&file).is_file() {
            problems.push(format!("{key} = {path}: deploy/pki-bootstrap.sh does not produce {}", file.display()));
        }
    }
    result(problems)
}

// ------------------------------------------------------------------------------------------------------ the files

fn conf() -> Conf {
    Conf::parse(&read("vernemq.conf")).unwrap()
}

fn compose() -> Compose {
    Compose::parse(&read("compose.yaml")).unwrap()
}

fn fragments() -> Vec<(String, Conf)> {
    ["acl", "lifetime", "v2k"]
        .iter()
        .map(|p| {
            let file = format!("plugins-http/{p}/vernemq.conf");
            let conf = Conf::parse(&read(&file)).unwrap();
            (file, conf)
        })
        .collect()
}

/// Runs deploy/pki-bootstrap.sh with the PKI step's compose environment, its folders moved under `dir`.
fn run_pki(compose: &Compose, dir: &Path, args: &[&str]) -> std::process::Output {
    let pki = compose.pki().expect("pki step");
    let mut command = Command::new("sh");
    command.arg(repo().join("deploy/pki-bootstrap.sh")).args(args);
    command.envs(compose.env(pki));
    command.env("PKI_DIR", dir.join("pki")).env("CA_DIR", dir.join("ca"));
    let output = command.output().expect("run sh deploy/pki-bootstrap.sh (needs the openssl command)");
    assert!(output.status.success(), "pki-bootstrap.sh {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    output
}

// ---------------------------------------------------------------------------------------------------------- tests

#[test]
fn compose_and_vernemq_conf_agree() {
    let (conf, compose) = (conf(), compose());
    let mut problems = Vec::new();
    for check in [
        check_webhooks(&conf, &compose),
        check_fragments(&conf, &fragments()),
        check_ports(&conf, &compose),
        check_service_endpoints(&conf, &compose),
        check_start_order(&compose),
    ] {
        problems.extend(check.err().unwrap_or_default());
    }
    assert!(problems.is_empty(), "deployment files disagree:\n{}", problems.join("\n"));
}

#[test]
fn pki_bootstrap_produces_what_broker_and_service_read() {
    let (conf, compose) = (conf(), compose());
    let dir = tempfile::tempdir().unwrap();
    run_pki(&compose, dir.path(), &["init"]);
    let out = dir.path().join("pki");
    if let Err(problems) = check_tls_files(&conf, &compose, &out) {
        panic!("TLS files:\n{}", problems.join("\n"));
    }

    let load = |name: &str| X509::from_pem(&std::fs::read(out.join(name)).unwrap()).unwrap();
    let (ca, server, service) = (load("ca.crt"), load("server.crt"), load("service.crt"));
    let ca_key = ca.public_key().unwrap();
    assert!(server.verify(&ca_key).unwrap() && service.verify(&ca_key).unwrap(), "signed by the CA");
    let cn = |cert: &X509| {
        let entry = cert.subject_name().entries_by_nid(openssl::nid::Nid::COMMONNAME).next().unwrap();
        String::from_utf8_lossy(entry.data().as_slice()).to_string()
    };
    let agent = compose.agent().unwrap();
    let username = compose.env(agent).get("MQTT_USERNAME").cloned().unwrap_or_else(|| "k2v-bridge".into());
    assert_eq!(cn(&service), username);
    // The service connects to the broker by its compose name; the README's devices use localhost and 127.0.0.1.
    let names: Vec<String> = server
        .subject_alt_names()
        .unwrap()
        .iter()
        .filter_map(|n| {
            n.dnsname()
                .map(str::to_string)
                .or_else(|| n.ipaddress().map(|ip| ip.iter().map(u8::to_string).collect::<Vec<_>>().join(".")))
        })
        .collect();
    for wanted in [compose.broker().unwrap(), "localhost", "127.0.0.1"] {
        assert!(names.iter().any(|n| n == wanted), "server.crt SAN {names:?} lacks {wanted}");
    }
    let crl = X509Crl::from_pem(&std::fs::read(out.join("crl.pem")).unwrap()).unwrap();
    assert!(crl.verify(&ca_key).unwrap(), "CRL signed by the CA");
    assert!(crl.get_revoked().is_none_or(|r| r.is_empty()), "nothing revoked yet");

    // A second run keeps keys and certificates.
    let before: Vec<Vec<u8>> = ["ca.crt", "server.crt", "server.key", "service.key"]
        .iter()
        .map(|f| std::fs::read(out.join(f)).unwrap())
        .collect();
    run_pki(&compose, dir.path(), &["init"]);
    let after: Vec<Vec<u8>> = ["ca.crt", "server.crt", "server.key", "service.key"]
        .iter()
        .map(|f| std::fs::read(out.join(f)).unwrap())
        .collect();
    assert!(before == after, "re-running init replaced keys or certificates");
}

#[test]
fn pki_signs_and_revokes_a_device_as_the_readme_does() {
    let compose = compose();
    let dir = tempfile::tempdir().unwrap();
    run_pki(&compose, dir.path(), &["init"]);
    // The device makes its own key and CSR; only the CSR goes to the PKI step (on stdin, as with docker compose run).
    let key = openssl::pkey::PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap();
    let mut name = openssl::x509::X509NameBuilder::new().unwrap();
    name.append_entry_by_nid(openssl::nid::Nid::COMMONNAME, "admin:a1998e").unwrap();
    let mut csr = openssl::x509::X509ReqBuilder::new().unwrap();
    csr.set_subject_name(&name.build()).unwrap();
    csr.set_pubkey(&key).unwrap();
    csr.sign(&key, openssl::hash::MessageDigest::sha256()).unwrap();
    let csr_pem = csr.build().to_pem().unwrap();

    let with_stdin = |args: &[&str], input: &[u8]| {
        use std::io::Write as _;
        let pki = compose.pki().unwrap();
        let mut child = Command::new("sh")
            .arg(repo().join("deploy/pki-bootstrap.sh"))
            .args(args)
            .envs(compose.env(pki))
            .env("PKI_DIR", dir.path().join("pki"))
            .env("CA_DIR", dir.path().join("ca"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
        output.stdout
    };
    let device = X509::from_pem(&with_stdin(&["sign"], &csr_pem)).expect("sign prints a PEM certificate");
    let ca = X509::from_pem(&run_pki(&compose, dir.path(), &["ca"]).stdout).expect("ca prints the CA");
    assert!(device.verify(&ca.public_key().unwrap()).unwrap());
    let cn = device.subject_name().entries_by_nid(openssl::nid::Nid::COMMONNAME).next().unwrap();
    assert_eq!(String::from_utf8_lossy(cn.data().as_slice()).to_string(), "admin:a1998e");
    assert!(device.public_key().unwrap().public_eq(&key), "the device keeps its own key");

    with_stdin(&["revoke"], &device.to_pem().unwrap());
    let crl = X509Crl::from_pem(&std::fs::read(dir.path().join("pki/crl.pem")).unwrap()).unwrap();
    let revoked: Vec<_> =
        crl.get_revoked().unwrap().iter().map(|r| r.serial_number().to_bn().unwrap().to_vec()).collect();
    assert_eq!(revoked, vec![device.serial_number().to_bn().unwrap().to_vec()]);
}

/// The first recorded body of each hook (`../shared/vernemq-captures`), as VerneMQ sent it.
fn captured_bodies() -> BTreeMap<String, Vec<u8>> {
    let dir = crate::common::shared_dir().join("vernemq-captures");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    let mut bodies = BTreeMap::new();
    for path in files {
        for line in std::fs::read_to_string(&path).unwrap().lines().filter(|l| !l.trim().is_empty()) {
            let record: serde_json::Value = serde_json::from_str(line).unwrap();
            let hook = record["hook"].as_str().map(str::to_string).or_else(|| {
                record["headers"]
                    .as_array()?
                    .iter()
                    .find(|p| p[0] == "vernemq-hook")
                    .and_then(|p| p[1].as_str())
                    .map(str::to_string)
            });
            let body = record["body_raw"].as_str().or_else(|| record["body"].as_str());
            if let (Some(hook), Some(body)) = (hook, body) {
                bodies.entry(hook).or_insert_with(|| body.as_bytes().to_vec());
            }
        }
    }
    bodies
}

#[tokio::test]
async fn every_registered_endpoint_answers_200() {
    let conf = conf();
    let bodies = captured_bodies();
    let app = spawn_app(&[]).await;
    let mut client = app.client().await;
    for (name, fields) in conf.webhooks() {
        let (_, _, path) = parse_http_url(&fields["endpoint"]).unwrap();
        let hook = &fields["hook"];
        let body = bodies.get(hook).unwrap_or_else(|| panic!("no captured {hook} request"));
        let headers = [
            ("vernemq-hook".to_string(), hook.clone()),
            ("Host".into(), "iotagent-mqtt:8080".into()),
            ("Content-Type".into(), "application/json".into()),
            ("Content-Length".into(), body.len().to_string()),
        ];
        let reply = client.send("POST", &path, &headers, body).await;
        assert_eq!(reply.status, 200, "vmq_webhooks.{name} → POST {path}: {:?}", String::from_utf8_lossy(&reply.body));
    }
    app.stop().await.unwrap();
}

/// Runs `iotagent-mqtt healthcheck` with this IOTAGENT_LISTEN.
fn healthcheck(listen: &str) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_iotagent-mqtt"))
        .arg("healthcheck")
        .env("IOTAGENT_LISTEN", listen)
        .output()
        .expect("run the binary");
    (output.status.success(), String::from_utf8_lossy(&output.stdout).to_string())
}

#[tokio::test]
async fn healthcheck_mode_of_the_binary() {
    let app = spawn_app(&[]).await;
    let listen = app.addr.to_string();
    let (ok, out) = tokio::task::spawn_blocking(move || healthcheck(&listen)).await.unwrap();
    assert!(ok && out.starts_with("ready: {"), "{out}");
    app.stop().await.unwrap();

    // Kafka configured but unreachable: the readiness report says so, and the check fails with it.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let app = spawn_app(&["--kafka-brokers".into(), closed.to_string()]).await;
    let listen = app.addr.to_string();
    let (ok, out) = tokio::task::spawn_blocking(move || healthcheck(&listen)).await.unwrap();
    assert!(!ok && out.contains("503") && out.contains("kafka"), "{out}");
    drop(app);

    // Nothing listening.
    let (ok, out) = tokio::task::spawn_blocking(move || healthcheck(&closed.to_string())).await.unwrap();
    assert!(!ok && out.contains("cannot connect"), "{out}");
    let (ok, out) = tokio::task::spawn_blocking(|| healthcheck("not-an-address")).await.unwrap();
    assert!(!ok && out.contains("IOTAGENT_LISTEN"), "{out}");
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// Each check fails on a broken copy of the real files.
#[test]
fn checks_catch_broken_inputs() {
    let (conf_text, compose_text) = (read("vernemq.conf"), read("compose.yaml"));
    let (conf, compose) = (conf(), compose());
    let broken_conf = |extra: &str| Conf::parse(&format!("{conf_text}\n{extra}\n")).unwrap();
    let broken_compose = |from: &str, to: &str| {
        assert!(compose_text.contains(from), "compose.yaml no longer contains {from:?}");
        Compose::parse(&compose_text.replace(from, to)).unwrap()
    };

    for extra in [
        // A hook the service does not serve.
        "vmq_webhooks.on_deliver.hook = on_deliver\nvmq_webhooks.on_deliver.endpoint = http://iotagent-mqtt:8080/vmq/on_deliver",
        // Name and hook differ.
        "vmq_webhooks.a_pub.hook = auth_on_publish\nvmq_webhooks.a_pub.endpoint = http://iotagent-mqtt:8080/vmq/auth_on_publish",
        // No endpoint.
        "vmq_webhooks.on_client_wakeup.hook = on_client_wakeup",
        // Wrong host, wrong port, wrong path.
        "vmq_webhooks.on_publish.endpoint = http://localhost:8080/vmq/on_publish",
        "vmq_webhooks.on_publish.endpoint = http://iotagent-mqtt:9090/vmq/on_publish",
        "vmq_webhooks.on_publish.endpoint = http://iotagent-mqtt:8080/vmq/on_publish_m5",
        "plugins.vmq_webhooks = off",
    ] {
        assert!(check_webhooks(&broken_conf(extra), &compose).is_err(), "check_webhooks passed with {extra:?}");
    }
    let moved = broken_compose("IOTAGENT_LISTEN: 0.0.0.0:8080", "IOTAGENT_LISTEN: 0.0.0.0:8081");
    assert!(check_webhooks(&conf, &moved).is_err());

    let mut fragment = fragments();
    fragment[0].1.entries.push(("vmq_webhooks.auth_on_register.response_timeout".into(), "9000".into()));
    assert!(check_fragments(&conf, &fragment).is_err());

    assert!(check_ports(&broken_conf("listener.ws.default = 0.0.0.0:8080"), &compose).is_err());
    assert!(check_ports(&conf, &broken_compose("\"127.0.0.1:8883:8883\"", "\"8883:8883\"")).is_err());
    assert!(check_ports(&conf, &broken_compose("      - \"127.0.0.1:8888:8888\"\n", "")).is_err());

    for (from, to) in [
        ("KAFKA_BROKERS: kafka:9092", "KAFKA_BROKERS: kafka:9093"),
        ("KAFKA_BROKERS: kafka:9092", "KAFKA_BROKERS: broker:9092"),
        ("MQTT_URL: mqtts://vernemq:8883", "MQTT_URL: mqtts://vernemq:1883"),
        ("MQTT_URL: mqtts://vernemq:8883", "MQTT_URL: mqtt://vernemq:8883"),
        ("MQTT_URL: mqtts://vernemq:8883", "MQTT_URL: mqtts://broker:8883"),
        ("SERVICE_CN: k2v-bridge", "SERVICE_CN: other"),
        ("      MQTT_KEY_FILE: /tls/service.key\n", ""),
    ] {
        assert!(check_service_endpoints(&conf, &broken_compose(from, to)).is_err(), "passed with {to:?}");
    }

    for (from, to) in [
        (
            "        condition: service_completed_successfully\n    environment:\n      # The image's",
            "        condition: service_started\n    environment:\n      # The image's",
        ),
        ("      kafka:\n        condition: service_healthy", "      kafka:\n        condition: service_started"),
        (
            "    healthcheck:\n      test: [\"CMD-SHELL\", \"vernemq ping | grep -q pong\"]",
            "    x-no-healthcheck:\n      test: [\"CMD-SHELL\", \"vernemq ping | grep -q pong\"]",
        ),
    ] {
        assert!(check_start_order(&broken_compose(from, to)).is_err(), "passed with {to:?}");
    }

    let dir = tempfile::tempdir().unwrap();
    run_pki(&compose, dir.path(), &["init"]);
    let out = dir.path().join("pki");
    assert!(check_tls_files(&conf, &compose, &out).is_ok());
    let renamed = broken_conf("listener.ssl.mtls.crlfile = /vernemq/etc/tls/revoked.pem");
    assert!(check_tls_files(&renamed, &compose, &out).is_err());
    let elsewhere = broken_conf("listener.ssl.mtls.cafile = /vernemq/etc/ca.crt");
    assert!(check_tls_files(&elsewhere, &compose, &out).is_err());
    assert!(
        check_tls_files(
            &conf,
            &broken_compose("      - tls:/vernemq/etc/tls:ro", "      - ca:/vernemq/etc/tls:ro"),
            &out
        )
        .is_err()
    );
    assert!(
        check_tls_files(
            &conf,
            &broken_compose("MQTT_CERT_FILE: /tls/service.crt", "MQTT_CERT_FILE: /tls/k2v.crt"),
            &out
        )
        .is_err()
    );
    std::fs::remove_file(out.join("server.key")).unwrap();
    assert!(check_tls_files(&conf, &compose, &out).is_err());
}
