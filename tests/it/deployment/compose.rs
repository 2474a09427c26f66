//! `compose.yaml`, `vernemq.conf` and the plugin fragments agree, and every check fails on a broken copy of them.

use super::checks::{
    check_fragments, check_ports, check_service_endpoints, check_start_order, check_tls_files, check_webhooks,
};
use super::parse::{Compose, Conf};
use super::{compose, conf, fragments, read, run_pki};

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
