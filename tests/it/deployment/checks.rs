//! Each check is a function over parsed files returning the problems it found, so that
//! `compose::checks_catch_broken_inputs` can show that every one of them fails on a deliberately broken input.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use iotagent_mqtt::webhooks::Hook;

use super::parse::{Compose, Conf, VERNEMQ_CONF_TARGET, parse_http_url, tls_listen_port};

pub type Problems = Vec<String>;

pub fn result(problems: Problems) -> Result<(), Problems> {
    if problems.is_empty() { Ok(()) } else { Err(problems) }
}

/// Every `vmq_webhooks.<name>` has `.hook` and `.endpoint`, is named after its hook, is a hook the service serves, and
/// points at `/vmq/<hook>` on the compose service built from this repository, on the port of its IOTAGENT_LISTEN.
pub fn check_webhooks(conf: &Conf, compose: &Compose) -> Result<(), Problems> {
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
            problems.push(format!("vmq_webhooks.{name}: endpoint {endpoint} is not https://host:port/path"));
            continue;
        };
        if !endpoint.starts_with("https://") {
            problems.push(format!("vmq_webhooks.{name}: {endpoint} is not HTTPS: anyone on the network could call it"));
        }
        if &url_path != path {
            problems
                .push(format!("vmq_webhooks.{name}: endpoint path {url_path}, the service serves {hook} at {path}"));
        }
        if Some(host.as_str()) != agent {
            problems
                .push(format!("vmq_webhooks.{name}: host {host} is not the compose service built here ({agent:?})"));
        } else if tls_listen_port(compose, &host) != Some(port) {
            problems.push(format!(
                "vmq_webhooks.{name}: port {port}, but {host} serves HTTPS on {:?} (IOTAGENT_TLS_LISTEN)",
                tls_listen_port(compose, &host)
            ));
        }
    }
    problems.extend(https_problems(conf, compose, agent));
    result(problems)
}

/// VerneMQ's HTTPS client side and the service's HTTPS listener agree: the broker presents its certificate, checks
/// the server's against the PKI's CA with the version the service accepts, without CRL distribution points
/// (reference §9.1); the service requires the client certificate, and its own names the host VerneMQ calls.
fn https_problems(conf: &Conf, compose: &Compose, agent: Option<&str>) -> Vec<String> {
    let mut problems = Vec::new();
    for (key, wanted) in [("vmq_webhooks.use_crls", Some("off")), ("vmq_webhooks.tls_version", Some("tlsv1.2"))] {
        if conf.get(key) != wanted {
            problems.push(format!("{key} is {:?}, expected {wanted:?}", conf.get(key)));
        }
    }
    for key in ["vmq_webhooks.cafile", "vmq_webhooks.certfile", "vmq_webhooks.keyfile"] {
        if conf.get(key).is_none() {
            problems.push(format!("{key} is not set: VerneMQ would present no client certificate"));
        }
    }
    let Some(agent) = agent else { return problems };
    let env = compose.env(agent);
    for variable in ["IOTAGENT_TLS_CERT_FILE", "IOTAGENT_TLS_KEY_FILE", "IOTAGENT_TLS_CLIENT_CA_FILE"] {
        if !env.contains_key(variable) {
            problems.push(format!("{agent} has no {variable}: its webhooks are not HTTPS"));
        }
    }
    if env.get("IOTAGENT_LISTEN").is_some_and(|listen| !listen.starts_with("127.0.0.1:")) {
        problems.push(format!("{agent}'s plain IOTAGENT_LISTEN is not on loopback"));
    }
    let names = env.get("PKI_WEBHOOK_NAMES").cloned().unwrap_or_default();
    if !names.split([' ', ',']).any(|n| n == agent) {
        problems.push(format!("{agent}'s PKI_WEBHOOK_NAMES {names:?} lacks {agent}, the host VerneMQ calls"));
    }
    problems
}

/// Every line of each plugin fragment appears unchanged in vernemq.conf.
pub fn check_fragments(conf: &Conf, fragments: &[(String, Conf)]) -> Result<(), Problems> {
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
pub fn check_ports(conf: &Conf, compose: &Compose) -> Result<(), Problems> {
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
pub fn check_service_endpoints(conf: &Conf, compose: &Compose) -> Result<(), Problems> {
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
        let cn = compose.env(pki).get("MQTT_USERNAME").cloned();
        if cn.as_deref() != Some(username) {
            problems
                .push(format!("{pki}: MQTT_USERNAME {cn:?} (its CN) is not the service's MQTT_USERNAME {username}"));
        }
    }
    result(problems)
}

/// Start order: the broker and the service wait for the PKI step to finish; the service waits for Kafka and VerneMQ
/// to be healthy; what is waited on as healthy has a health check; every one-shot is waited on, so that
/// `docker compose up --wait` does not count its exit as a failure.
pub fn check_start_order(compose: &Compose) -> Result<(), Problems> {
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
pub fn check_tls_files(conf: &Conf, compose: &Compose, pki_output: &Path) -> Result<(), Problems> {
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
        if (var.starts_with("MQTT_") || var.starts_with("IOTAGENT_TLS_")) && var.ends_with("_FILE") {
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
            problems.push(format!("{key} = {path}: `iotagent-mqtt pki init` does not produce {}", file.display()));
        }
    }
    result(problems)
}

/// VerneMQ waits this long for a webhook reply when `response_timeout` is not set.
const VERNEMQ_RESPONSE_TIMEOUT_MS: u64 = 5000;

/// A setting of the service as compose runs it: its environment there, else the binary's default.
pub fn service_setting(compose: &Compose, variable: &str) -> Option<String> {
    let from_compose = compose.agent().and_then(|agent| compose.env(agent).get(variable).cloned());
    from_compose.or_else(|| {
        use clap::CommandFactory as _;
        let command = iotagent_mqtt::Config::command();
        let arg = command.get_arguments().find(|a| a.get_env().is_some_and(|e| e == variable))?;
        arg.get_default_values().first().map(|v| v.to_string_lossy().into_owned())
    })
}

/// vernemq.conf registers what the V2K mode needs and nothing more: strict mode (`auth_on_publish`) produces inside
/// `auth_on_publish(_m5)` and must not also pay for `on_publish(_m5)`; `on_publish` mode needs both of those; and the
/// hooks that wait for Kafka's ack give the service longer than `V2K_ACK_TIMEOUT_MS`, so VerneMQ does not refuse a
/// message the service is about to confirm.
pub fn check_v2k_hooks(conf: &Conf, mode: &str, ack_timeout_ms: u64) -> Result<(), Problems> {
    let mut problems = Vec::new();
    let hooks = conf.webhooks();
    let registered = |hook: &str| hooks.contains_key(hook);
    let (waiting, unwanted): (&[&str], &[&str]) = match mode {
        "auth_on_publish" => (&["auth_on_publish", "auth_on_publish_m5"], &["on_publish", "on_publish_m5"]),
        "on_publish" => (&["on_publish", "on_publish_m5"], &[]),
        "subscription" => (&[], &["on_publish", "on_publish_m5"]),
        other => return Err(vec![format!("unknown V2K_MODE {other:?}")]),
    };
    for hook in waiting {
        if !registered(hook) {
            problems.push(format!("V2K_MODE={mode} needs {hook}, which vernemq.conf does not register"));
            continue;
        }
        let timeout = hooks[*hook].get("response_timeout").map_or(Ok(VERNEMQ_RESPONSE_TIMEOUT_MS), |t| t.parse());
        match timeout {
            Ok(timeout) if timeout > ack_timeout_ms => {}
            Ok(timeout) => problems.push(format!(
                "vmq_webhooks.{hook}.response_timeout = {timeout} ms is not above V2K_ACK_TIMEOUT_MS = {ack_timeout_ms} \
                 ms: VerneMQ would give up on replies that wait for Kafka's ack"
            )),
            Err(e) => problems.push(format!("vmq_webhooks.{hook}.response_timeout: {e}")),
        }
    }
    for hook in unwanted {
        if registered(hook) {
            problems
                .push(format!("V2K_MODE={mode} does not use {hook}; registering it costs a webhook call per message"));
        }
    }
    result(problems)
}

/// The V2K mode and ack deadline compose runs the service with.
pub fn v2k_settings(compose: &Compose) -> (String, u64) {
    let mode = service_setting(compose, "V2K_MODE").expect("V2K_MODE has a default");
    let ack = service_setting(compose, "V2K_ACK_TIMEOUT_MS").and_then(|v| v.parse().ok()).expect("numeric ack timeout");
    (mode, ack)
}

/// Topic auto-creation is off on the service's Kafka, and a one-shot the service waits for (completed) creates the
/// admin tenant's data topic (`admin.<V2K_MESSENGER_PRODUCE_TOPIC_SUFFIX>`), its dead letters and the lease topic of
/// `V2K_SUBSCRIPTION=plain` (`V2K_LEASE_TOPIC`).
pub fn check_tenant_topics(compose: &Compose) -> Result<(), Problems> {
    let mut problems = Vec::new();
    let Some(agent) = compose.agent() else { return Err(vec!["compose needs a built service".into()]) };
    let env = compose.env(agent);
    let Some(kafka) = env.get("KAFKA_BROKERS").and_then(|b| b.split(':').next()) else {
        return Err(vec![format!("{agent}: KAFKA_BROKERS is not set")]);
    };
    if compose.env(kafka).get("KAFKA_AUTO_CREATE_TOPICS_ENABLE").map(String::as_str) != Some("false") {
        problems.push(format!("{kafka}: KAFKA_AUTO_CREATE_TOPICS_ENABLE must be \"false\" (as in production)"));
    }
    let suffix = env.get("V2K_MESSENGER_PRODUCE_TOPIC_SUFFIX").map_or("device-data", String::as_str);
    let lease = env.get("V2K_LEASE_TOPIC").map_or("iotagent.v2k-lease", String::as_str);
    let wanted = [format!("admin.{suffix}"), format!("admin.{suffix}.dead-letter"), lease.to_string()];
    // A topic in the one-shot's list: followed by a space or the `;` that ends the list.
    let names = |c: &str, t: &str| c.contains(&format!("{t} ")) || c.contains(&format!("{t};"));
    let creates = |service: &str| {
        let command = compose.service(service).map(|s| serde_json::to_string(&s["command"]).unwrap_or_default());
        command.is_some_and(|c| c.contains("kafka-topics.sh") && wanted.iter().all(|t| names(&c, t)))
    };
    let waited = compose
        .depends_on(agent)
        .into_iter()
        .any(|(dependency, condition)| condition == "service_completed_successfully" && creates(&dependency));
    if !waited {
        problems
            .push(format!("{agent} must wait (completed) for a one-shot that creates {wanted:?} with kafka-topics.sh"));
    }
    result(problems)
}
