//! `compose.yaml`, `vernemq.conf` and the plugin fragments agree, and every check fails on a broken copy of them.

use super::checks::{
    check_fragments, check_ports, check_service_endpoints, check_start_order, check_tenant_topics, check_tls_files,
    check_v2k_hooks, check_webhooks, v2k_settings,
};
use super::parse::{Compose, Conf};
use super::{compose, conf, fragments, opt_in_fragments, read, run_pki};

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
        {
            let (mode, ack_timeout_ms) = v2k_settings(&compose);
            check_v2k_hooks(&conf, &mode, ack_timeout_ms)
        },
    ] {
        problems.extend(check.err().unwrap_or_default());
    }
    assert!(problems.is_empty(), "deployment files disagree:\n{}", problems.join("\n"));
}

/// Strict mode is what ships; the opt-in on_publish fragment is what that mode needs on top of the shipped file.
#[test]
fn strict_mode_ships_and_on_publish_is_opt_in() {
    let (conf_text, compose) = (read("vernemq.conf"), compose());
    let (mode, ack_timeout_ms) = v2k_settings(&compose);
    assert_eq!(mode, "auth_on_publish", "compose runs the strict mode (V2K_MODE or the binary's default)");
    let (file, _) = &opt_in_fragments()[0];
    let with_on_publish = Conf::parse(&format!("{conf_text}\n{}", read(file))).unwrap();
    assert!(check_webhooks(&with_on_publish, &compose).is_ok(), "{file} registers hooks the service serves");
    assert!(check_v2k_hooks(&with_on_publish, "on_publish", ack_timeout_ms).is_ok(), "{file} fits on_publish mode");
    assert!(check_v2k_hooks(&with_on_publish, "auth_on_publish", ack_timeout_ms).is_err(), "strict pays once");
    assert!(check_v2k_hooks(&conf(), "on_publish", ack_timeout_ms).is_err(), "on_publish mode needs the fragment");
}

/// Kafka runs as production does (no topic created on first use), and a one-shot step creates the admin tenant's
/// topics (and the plain subscription's lease topic) before the service starts, so that the service accepts the
/// walkthrough's admin devices and V2K_SUBSCRIPTION=plain finds its lease.
#[test]
fn kafka_creates_no_topics_and_the_admin_tenant_has_its_own() {
    let compose = compose();
    assert!(check_tenant_topics(&compose).is_ok(), "{:?}", check_tenant_topics(&compose));
    let text = read("compose.yaml");
    for (from, to) in [
        ("KAFKA_AUTO_CREATE_TOPICS_ENABLE: \"false\"", "KAFKA_AUTO_CREATE_TOPICS_ENABLE: \"true\""),
        ("admin.device-data admin", "admin.other admin"),
        ("iotagent.v2k-lease;", "iotagent.other;"),
        ("      kafka-topics:\n        condition: service_completed_successfully\n", ""),
    ] {
        assert!(text.contains(from), "compose.yaml no longer contains {from:?}");
        let broken = Compose::parse(&text.replace(from, to)).unwrap();
        assert!(check_tenant_topics(&broken).is_err(), "passed with {from:?} -> {to:?}");
    }
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
        "vmq_webhooks.on_deliver.hook = on_deliver\nvmq_webhooks.on_deliver.endpoint = https://iotagent-mqtt:8443/vmq/on_deliver",
        // Name and hook differ.
        "vmq_webhooks.a_pub.hook = auth_on_publish\nvmq_webhooks.a_pub.endpoint = https://iotagent-mqtt:8443/vmq/auth_on_publish",
        // No endpoint.
        "vmq_webhooks.on_client_wakeup.hook = on_client_wakeup",
        // Wrong host, wrong port, wrong path.
        "vmq_webhooks.on_publish.endpoint = http://localhost:8080/vmq/on_publish",
        "vmq_webhooks.on_publish.endpoint = http://iotagent-mqtt:9090/vmq/on_publish",
        "vmq_webhooks.on_publish.endpoint = https://iotagent-mqtt:8443/vmq/on_publish_m5",
        "plugins.vmq_webhooks = off",
    ] {
        assert!(check_webhooks(&broken_conf(extra), &compose).is_err(), "check_webhooks passed with {extra:?}");
    }
    let (mode, ack_timeout_ms) = v2k_settings(&compose);
    for extra in [
        "vmq_webhooks.auth_on_publish.response_timeout = 2000",
        "vmq_webhooks.auth_on_publish_m5.response_timeout = 4000",
        "vmq_webhooks.on_publish_m5.hook = on_publish_m5\nvmq_webhooks.on_publish_m5.endpoint = https://iotagent-mqtt:8443/vmq/on_publish_m5",
    ] {
        assert!(check_v2k_hooks(&broken_conf(extra), &mode, ack_timeout_ms).is_err(), "passed with {extra:?}");
    }
    let slower =
        broken_compose("KAFKA_BROKERS: kafka:9092", "KAFKA_BROKERS: kafka:9092\n      V2K_ACK_TIMEOUT_MS: \"4900\"");
    let (_, slower_ack) = v2k_settings(&slower);
    assert!(check_v2k_hooks(&conf, &mode, slower_ack).is_ok(), "4900 ms is still under 5000 ms");
    assert!(check_v2k_hooks(&conf, &mode, 5000).is_err());

    let moved = broken_compose("IOTAGENT_TLS_LISTEN: 0.0.0.0:8443", "IOTAGENT_TLS_LISTEN: 0.0.0.0:8444");
    assert!(check_webhooks(&conf, &moved).is_err());
    // HTTPS is the boundary: a plain endpoint, CRL checks VerneMQ cannot pass, no client certificate, a plain
    // listener on the network, or a server certificate without the host's name all fail.
    for extra in [
        "vmq_webhooks.auth_on_register.endpoint = http://iotagent-mqtt:8443/vmq/auth_on_register",
        "vmq_webhooks.use_crls = on",
        "vmq_webhooks.tls_version = tlsv1.3",
    ] {
        assert!(check_webhooks(&broken_conf(extra), &compose).is_err(), "check_webhooks passed with {extra:?}");
    }
    for (from, to) in [
        ("IOTAGENT_LISTEN: 127.0.0.1:8080", "IOTAGENT_LISTEN: 0.0.0.0:8080"),
        ("      IOTAGENT_TLS_CLIENT_CA_FILE: /tls/ca.crt\n", ""),
        ("      PKI_WEBHOOK_NAMES: iotagent-mqtt\n      PKI_USERS", "      PKI_USERS"),
    ] {
        assert!(check_webhooks(&conf, &broken_compose(from, to)).is_err(), "check_webhooks passed with {to:?}");
    }

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
        (
            "its MQTT_USERNAME below.\n      MQTT_USERNAME: k2v-bridge",
            "its MQTT_USERNAME below.\n      MQTT_USERNAME: other",
        ),
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

/// The service renews the broker's key (0640, group PKI_BROKER_GID): it must belong to that group, or VerneMQ could
/// not read a key the service renewed. The PKI step gives the first key the same group.
#[test]
fn the_service_can_hand_a_renewed_broker_key_to_the_broker() {
    let compose = compose();
    let (agent, pki) = (compose.agent().expect("the service"), compose.pki().expect("the pki step"));
    let gid = compose.env(agent).get("PKI_BROKER_GID").cloned().expect("PKI_BROKER_GID on the service");
    assert_eq!(compose.env(pki).get("PKI_BROKER_GID"), Some(&gid), "pki step and service agree");
    let groups: Vec<String> = compose
        .service(agent)
        .and_then(|s| s.get("group_add"))
        .and_then(|g| g.as_sequence())
        .map(|g| {
            g.iter()
                .filter_map(|v| v.as_str().map(str::to_string).or_else(|| v.as_u64().map(|n| n.to_string())))
                .collect()
        })
        .unwrap_or_default();
    assert!(groups.contains(&gid), "the service's group_add {groups:?} lacks {gid}");
}
