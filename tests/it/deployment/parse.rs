//! The deployment files parsed: `vernemq.conf` (cuttlefish) and `compose.yaml`.

use std::collections::{BTreeMap, BTreeSet};

use serde_yaml_ng::Value;

/// Where the official image reads the mounted configuration (ARCHITECTURE.md §8.3).
pub const VERNEMQ_CONF_TARGET: &str = "/vernemq/etc/vernemq.conf.local";

/// A cuttlefish file: `key = value` lines, `#` comments. Later lines win, as in cuttlefish.
#[derive(Debug, Clone)]
pub struct Conf {
    pub entries: Vec<(String, String)>,
}

impl Conf {
    pub fn parse(text: &str) -> Result<Self, String> {
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

    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// `vmq_webhooks.<name>.<field>` grouped by name.
    pub fn webhooks(&self) -> BTreeMap<String, BTreeMap<String, String>> {
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
    pub fn listeners(&self) -> Vec<(String, String, u16)> {
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
pub struct Compose(pub Value);

impl Compose {
    pub fn parse(text: &str) -> Result<Self, String> {
        serde_yaml_ng::from_str(text).map(Self).map_err(|e| format!("compose.yaml: {e}"))
    }

    pub fn services(&self) -> Vec<&str> {
        self.0["services"].as_mapping().map(|m| m.keys().filter_map(Value::as_str).collect()).unwrap_or_default()
    }

    pub fn service(&self, name: &str) -> Option<&Value> {
        self.0["services"].get(name)
    }

    /// `environment` in map or list form, values as strings.
    pub fn env(&self, service: &str) -> BTreeMap<String, String> {
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
    pub fn mounts(&self, service: &str) -> Vec<(String, String)> {
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
    pub fn volumes(&self) -> BTreeSet<String> {
        self.0["volumes"]
            .as_mapping()
            .map(|m| m.keys().filter_map(Value::as_str).map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// Short-syntax ports `host_ip:host_port:container_port` → (host ip, host port, container port).
    pub fn ports(&self, service: &str) -> Vec<(String, u16, u16)> {
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
    pub fn depends_on(&self, service: &str) -> BTreeMap<String, String> {
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
    pub fn broker(&self) -> Option<&str> {
        self.services().into_iter().find(|s| self.mounts(s).iter().any(|(_, target)| target == VERNEMQ_CONF_TARGET))
    }

    /// The service built from this repository's Dockerfile.
    pub fn agent(&self) -> Option<&str> {
        self.services().into_iter().find(|s| self.service(s).is_some_and(|v| v.get("build").is_some()))
    }

    /// The one-shot PKI step: the service whose entrypoint is `iotagent-mqtt pki`.
    pub fn pki(&self) -> Option<&str> {
        self.services().into_iter().find(|s| {
            self.service(s)
                .and_then(|v| v.get("entrypoint"))
                .and_then(|e| e.as_sequence())
                .is_some_and(|e| e.iter().filter_map(|a| a.as_str()).collect::<Vec<_>>() == ["iotagent-mqtt", "pki"])
        })
    }
}

/// `http://host:port/path` or `https://…` → (host, port, path).
pub fn parse_http_url(url: &str) -> Option<(String, u16, String)> {
    let rest = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"))?;
    let (authority, path) = rest.split_once('/').map(|(a, p)| (a, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => (host, port.parse().ok()?),
        None => (authority, 80),
    };
    Some((host.to_string(), port, path))
}

/// The port of the service's HTTPS webhook listener (IOTAGENT_TLS_LISTEN, default 8443).
pub fn tls_listen_port(compose: &Compose, service: &str) -> Option<u16> {
    port_of(compose, service, "IOTAGENT_TLS_LISTEN", 8443)
}

fn port_of(compose: &Compose, service: &str, variable: &str, default: u16) -> Option<u16> {
    match compose.env(service).get(variable) {
        Some(listen) => listen.rsplit_once(':').and_then(|(_, p)| p.parse().ok()),
        None => Some(default),
    }
}
