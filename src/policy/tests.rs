use super::*;

const DEV: &str = "admin:a1998e";

fn policy() -> Policy {
    Policy::new(PolicyConfig { service_password: Some(Secret::new("svc-pass")), ..PolicyConfig::default() })
}

fn policy_with(f: impl FnOnce(&mut PolicyConfig)) -> Policy {
    let mut config = policy().config;
    f(&mut config);
    Policy::new(config)
}

fn register<'a>(username: Option<&'a str>, client_id: &'a str) -> RegisterRequest<'a> {
    RegisterRequest {
        username,
        password: None,
        mountpoint: "",
        client_id,
        certificate_cn: None,
        certificate_fingerprint: None,
        service_certificates: &SERVICE_CERTIFICATES,
    }
}

/// The service's own certificates in these tests; [`FORGED`] has the service's CN but is not one of them.
static SERVICE_CERTIFICATES: [Fingerprint; 2] = [Fingerprint([1; 32]), Fingerprint([2; 32])];
const FORGED: Fingerprint = Fingerprint([3; 32]);

fn allowed_modifiers(decision: RegisterDecision<'_>) -> RegisterModifiers {
    match decision {
        RegisterDecision::Allow { modifiers, .. } => modifiers,
        RegisterDecision::Deny(reason) => panic!("denied: {reason}"),
    }
}

fn denied(decision: RegisterDecision<'_>) -> DenyReason {
    match decision {
        RegisterDecision::Deny(reason) => reason,
        RegisterDecision::Allow { .. } => panic!("allowed"),
    }
}

#[test]
fn device_register_gets_scoped_client_id_and_lifetime() {
    let decision = policy().register(&register(Some(DEV), "sensor-7"), 0.5);
    let RegisterDecision::Allow { principal, modifiers } = decision else { panic!("denied") };
    assert_eq!(principal, Principal::Device(DeviceId { tenant: "admin", device: "a1998e" }));
    assert_eq!(modifiers.max_connection_lifetime, Some(1800));
    assert_eq!(modifiers.subscriber_id, Some(("".into(), "admin:a1998e|sensor-7".into())));
    assert_eq!(modifiers.max_message_size, None);
}

#[test]
fn scoped_keeps_the_mountpoint() {
    let mut req = register(Some(DEV), "c");
    req.mountpoint = "site-a";
    let modifiers = allowed_modifiers(policy().register(&req, 0.0));
    assert_eq!(modifiers.subscriber_id, Some(("site-a".into(), "admin:a1998e|c".into())));
}

#[test]
fn anonymous_and_malformed_usernames_are_denied() {
    let p = policy();
    assert_eq!(denied(p.register(&register(None, "x"), 0.5)), DenyReason::Anonymous);
    for bad in ["", "admin", "admin:a:b", "admin:", ":a", "admin:a/b", "admin:+", "admin:#", "admin:a\0", "k2v-bridge2"]
    {
        assert!(
            matches!(denied(p.register(&register(Some(bad), "x"), 0.5)), DenyReason::InvalidIdentity(_)),
            "{bad:?}"
        );
    }
}

#[test]
fn client_id_policies() {
    let any = policy_with(|c| c.client_id_policy = ClientIdPolicy::Any);
    assert_eq!(allowed_modifiers(any.register(&register(Some(DEV), "whatever"), 0.5)).subscriber_id, None);

    let equal = policy_with(|c| c.client_id_policy = ClientIdPolicy::Equal);
    assert!(matches!(equal.register(&register(Some(DEV), DEV), 0.5), RegisterDecision::Allow { .. }));
    assert_eq!(denied(equal.register(&register(Some(DEV), "admin:a1998e-2"), 0.5)), DenyReason::ClientId);
    assert_eq!(denied(equal.register(&register(Some(DEV), "anon-xyz"), 0.5)), DenyReason::ClientId);

    let prefix = policy_with(|c| c.client_id_policy = ClientIdPolicy::Prefix);
    for own in [DEV, "admin:a1998e@42", "admin:a1998e/x", "admin:a1998e|x", "admin:a1998e#"] {
        assert!(matches!(prefix.register(&register(Some(DEV), own), 0.5), RegisterDecision::Allow { .. }), "{own}");
    }
    assert_eq!(denied(prefix.register(&register(Some(DEV), "admin:a1998"), 0.5)), DenyReason::ClientId);
    // A device id that extends this one belongs to another device.
    assert_eq!(denied(prefix.register(&register(Some("admin:a1"), "admin:a1998e"), 0.5)), DenyReason::ClientId);
    assert_eq!(denied(prefix.register(&register(Some(DEV), "admin:a1998e-42"), 0.5)), DenyReason::ClientId);
    assert_eq!(denied(prefix.register(&register(Some(DEV), "x-admin:a1998e"), 0.5)), DenyReason::ClientId);
}

#[test]
fn lifetime_jitter_stays_within_ten_percent() {
    let p = policy();
    let at = |u| allowed_modifiers(p.register(&register(Some(DEV), "c"), u)).max_connection_lifetime;
    assert_eq!(at(0.0), Some(1620));
    assert_eq!(at(0.5), Some(1800));
    assert_eq!(at(0.999_999), Some(1980));
    assert_eq!(at(-3.0), Some(1620), "out-of-range samples are clamped");
    assert_eq!(at(7.0), Some(1980));
}

#[test]
fn lifetime_zero_disables_and_short_ones_never_round_to_zero() {
    let off = policy_with(|c| c.lifetime.base = Duration::ZERO);
    assert_eq!(allowed_modifiers(off.register(&register(Some(DEV), "c"), 0.5)).max_connection_lifetime, None);
    let short = Lifetime { base: Duration::from_millis(200), jitter_percent: 10 };
    assert_eq!(short.seconds(0.0), Some(1));
    let exact = Lifetime { base: Duration::from_secs(60), jitter_percent: 0 };
    assert_eq!(exact.seconds(0.9), Some(60));
}

#[test]
fn max_message_size_is_passed_through() {
    let p = policy_with(|c| c.max_message_size = Some(4096));
    assert_eq!(allowed_modifiers(p.register(&register(Some(DEV), "c"), 0.5)).max_message_size, Some(4096));
}

#[test]
fn certificate_common_name_must_equal_username() {
    let p = policy();
    let mut req = register(Some(DEV), "c");
    req.certificate_cn = Some(Some(DEV));
    assert!(matches!(p.register(&req, 0.5), RegisterDecision::Allow { .. }));
    req.certificate_cn = Some(Some("admin:b2c3d4"));
    assert_eq!(denied(p.register(&req, 0.5)), DenyReason::CertificateMismatch);
    req.certificate_cn = Some(None);
    assert_eq!(denied(p.register(&req, 0.5)), DenyReason::CertificateMismatch);
}

#[test]
fn client_certificate_can_be_required_for_devices() {
    let p = policy_with(|c| c.require_client_cert = true);
    assert_eq!(denied(p.register(&register(Some(DEV), "c"), 0.5)), DenyReason::CertificateRequired);
    let mut req = register(Some(DEV), "c");
    req.certificate_cn = Some(Some(DEV));
    assert!(matches!(p.register(&req, 0.5), RegisterDecision::Allow { .. }));
}

#[test]
fn service_identity_needs_exact_name_and_password_or_certificate() {
    let p = policy();
    let mut req = register(Some("k2v-bridge"), "k2v-bridge");
    assert_eq!(denied(p.register(&req, 0.5)), DenyReason::ServiceCredentials);
    req.password = Some("wrong");
    assert_eq!(denied(p.register(&req, 0.5)), DenyReason::ServiceCredentials);
    req.password = Some("svc-pass");
    let RegisterDecision::Allow { principal, modifiers } = p.register(&req, 0.5) else { panic!("denied") };
    assert_eq!(principal, Principal::Service);
    assert!(modifiers.is_empty(), "the service keeps its session: no lifetime, no client id rewrite");
    let window = policy_with(|c| c.service_max_inflight = Some(1000));
    let RegisterDecision::Allow { modifiers, .. } = window.register(&req, 0.5) else { panic!("denied") };
    assert_eq!(modifiers, RegisterModifiers { max_inflight_messages: Some(1000), ..Default::default() });
    let queued = policy_with(|c| c.service_max_queued = Some(500_000));
    let RegisterDecision::Allow { modifiers, .. } = queued.register(&req, 0.5) else { panic!("denied") };
    assert_eq!((modifiers.max_online_messages, modifiers.max_offline_messages), (Some(500_000), Some(500_000)));

    let mut by_cert = register(Some("k2v-bridge"), "any-id");
    by_cert.certificate_cn = Some(Some("k2v-bridge"));
    for own in SERVICE_CERTIFICATES {
        by_cert.certificate_fingerprint = Some(own);
        assert!(matches!(p.register(&by_cert, 0.5), RegisterDecision::Allow { principal: Principal::Service, .. }));
    }
    by_cert.certificate_cn = Some(Some("admin:a1998e"));
    assert_eq!(denied(p.register(&by_cert, 0.5)), DenyReason::CertificateMismatch);

    // Substrings of the service name are not the service (dojot matched substrings).
    for near in ["k2v-bridge-1", "xk2v-bridge", "K2V-BRIDGE"] {
        let mut r = register(Some(near), "c");
        r.password = Some("svc-pass");
        assert!(matches!(p.register(&r, 0.5), RegisterDecision::Deny(_)), "{near}");
    }
}

#[test]
fn a_certificate_with_the_service_cn_is_the_service_only_if_pinned() {
    let p = Policy::new(PolicyConfig::default());
    let mut forged = register(Some("k2v-bridge"), "k2v-bridge-k2v");
    forged.certificate_cn = Some(Some("k2v-bridge"));
    forged.certificate_fingerprint = Some(FORGED);
    assert_eq!(denied(p.register(&forged, 0.5)), DenyReason::ServiceCertificate);
    forged.service_certificates = &[];
    forged.certificate_fingerprint = Some(SERVICE_CERTIFICATES[0]);
    assert_eq!(denied(p.register(&forged, 0.5)), DenyReason::ServiceCertificate, "nothing pinned: nobody");
    // A pinned certificate whose CN is not the service's name stays a mismatch.
    let mut renamed = register(Some("k2v-bridge"), "c");
    renamed.certificate_cn = Some(Some("other"));
    renamed.certificate_fingerprint = Some(SERVICE_CERTIFICATES[0]);
    assert_eq!(denied(p.register(&renamed, 0.5)), DenyReason::CertificateMismatch);
    // The password still works over a forged certificate (it is the credential there).
    let p = policy();
    let mut with_password = register(Some("k2v-bridge"), "c");
    with_password.certificate_cn = Some(Some("k2v-bridge"));
    with_password.certificate_fingerprint = Some(FORGED);
    with_password.password = Some("svc-pass");
    assert!(matches!(p.register(&with_password, 0.5), RegisterDecision::Allow { principal: Principal::Service, .. }));
}

#[test]
fn devices_never_get_the_services_client_ids() {
    for client_id_policy in [ClientIdPolicy::Any, ClientIdPolicy::Equal, ClientIdPolicy::Prefix, ClientIdPolicy::Scoped]
    {
        let p = policy_with(|c| {
            c.client_id_policy = client_id_policy;
            c.service_client_id = Some("gw1".into());
        });
        for id in ["gw1", "gw1-k2v", "gw1-v2k", "gw1x"] {
            assert_eq!(denied(p.register(&register(Some(DEV), id), 0.5)), DenyReason::ServiceClientId, "{id}");
        }
        assert!(matches!(p.register(&register(Some(DEV), DEV), 0.5), RegisterDecision::Allow { .. }));
        // The service itself connects with them.
        let mut service = register(Some("k2v-bridge"), "gw1-k2v");
        service.password = Some("svc-pass");
        assert!(matches!(p.register(&service, 0.5), RegisterDecision::Allow { principal: Principal::Service, .. }));
    }
    // A base id that is the start of a scoped session key (`<username>|<id>`) is refused after the rewrite too.
    let p = policy_with(|c| c.service_client_id = Some("admin:a1998e|svc".into()));
    assert_eq!(denied(p.register(&register(Some(DEV), "svc-k2v"), 0.5)), DenyReason::ServiceClientId);
    let p = policy_with(|c| c.service_client_id = Some(String::new()));
    assert!(matches!(p.register(&register(Some(DEV), "x"), 0.5), RegisterDecision::Allow { .. }));
    // The plain V2K session's id is the cluster's, not under the base: reserved as well.
    let p = policy_with(|c| {
        c.client_id_policy = ClientIdPolicy::Any;
        c.service_client_id = Some("node-1".into());
        c.service_plain_client_id = Some("cluster-v2k".into());
    });
    assert_eq!(denied(p.register(&register(Some(DEV), "cluster-v2k"), 0.5)), DenyReason::ServiceClientId);
}

#[test]
fn another_instances_sessions_are_reserved_through_the_shared_prefix() {
    // Instance 1 answers the CONNECT; the ids tried are instance 2's sessions.
    let p = policy_with(|c| {
        c.client_id_policy = ClientIdPolicy::Any;
        c.service_client_id = Some("iotagent-mqtt-1".into());
        c.reserved_client_id_prefix = Some("iotagent-mqtt".into());
    });
    for id in ["iotagent-mqtt-2-v2k", "iotagent-mqtt-2-k2v", "iotagent-mqtt-plain-v2k", "iotagent-mqtt"] {
        assert_eq!(denied(p.register(&register(Some(DEV), id), 0.5)), DenyReason::ServiceClientId, "{id}");
    }
    assert!(matches!(p.register(&register(Some(DEV), "iotagent-mq"), 0.5), RegisterDecision::Allow { .. }));
    // Without the shared prefix, instance 2's ids were open to a device that instance 1 answers.
    let p = policy_with(|c| {
        c.client_id_policy = ClientIdPolicy::Any;
        c.service_client_id = Some("iotagent-mqtt-1".into());
    });
    assert!(matches!(p.register(&register(Some(DEV), "iotagent-mqtt-2-v2k"), 0.5), RegisterDecision::Allow { .. }));
}

#[test]
fn service_without_configured_password_needs_certificate() {
    let p = Policy::new(PolicyConfig::default());
    let mut req = register(Some("k2v-bridge"), "k");
    req.password = Some("");
    assert_eq!(denied(p.register(&req, 0.5)), DenyReason::ServiceCredentials);
}

#[test]
fn device_publishes_only_its_own_attrs() {
    let p = policy();
    assert_eq!(p.publish(Some(DEV), "admin:a1998e/attrs", false), Ok(()));
    for topic in [
        "admin:a1998e/config",
        "admin:b2c3d4/attrs",
        "admin:a1998e/attrs/x",
        "admin:a1998e/attrs/",
        "admin:a1998e//attrs",
        "/admin:a1998e/attrs",
        "admin:a1998e/+",
        "admin:a1998e/#",
        "+/attrs",
        "#",
        "$share/g/admin:a1998e/attrs",
        "$SYS/broker",
        "admin:a1998e",
        "admin:a1998e/attrs\0",
        "admin:a1998e/ATTRS",
        "",
    ] {
        assert_eq!(p.publish(Some(DEV), topic, false), Err(DenyReason::Topic), "{topic:?}");
    }
}

#[test]
fn retained_device_publish_is_denied_unless_allowed() {
    assert_eq!(policy().publish(Some(DEV), "admin:a1998e/attrs", true), Err(DenyReason::Retain));
    let p = policy_with(|c| c.device_retain_allowed = true);
    assert_eq!(p.publish(Some(DEV), "admin:a1998e/attrs", true), Ok(()));
}

#[test]
fn service_publishes_only_config_of_valid_devices() {
    let p = policy();
    assert_eq!(p.publish(Some("k2v-bridge"), "admin:a1998e/config", false), Ok(()));
    assert_eq!(p.publish(Some("k2v-bridge"), "tenant2:dev.x_y-z/config", true), Ok(()));
    assert_eq!(p.publish(Some("k2v-bridge"), "admin.x:a1/config", false), Err(DenyReason::Topic), "dotted tenant");
    for topic in [
        "admin:a1998e/attrs",
        "admin/config",
        "admin:a:b/config",
        "admin:+/config",
        "+/config",
        "#",
        "admin:a1998e/config/x",
        ":a/config",
        "admin:a1998e/",
    ] {
        assert_eq!(p.publish(Some("k2v-bridge"), topic, false), Err(DenyReason::Topic), "{topic:?}");
    }
}

#[test]
fn only_device_publishes_are_cacheable() {
    let p = policy();
    let attrs = "admin:a1998e/attrs";
    assert!(p.authorize_publish(Some(DEV), attrs, false).unwrap().publish_cacheable());
    assert!(!p.authorize_publish(Some("k2v-bridge"), "admin:a1998e/config", false).unwrap().publish_cacheable());
    assert!(p.authorize_publish(None, attrs, false).is_err(), "nothing to cache for an unknown publisher");
}

#[test]
fn publish_by_unknown_identity_is_denied() {
    let p = policy();
    assert_eq!(p.publish(None, "admin:a1998e/attrs", false), Err(DenyReason::Anonymous));
    assert!(matches!(
        p.publish(Some("admin:a1998e:x"), "admin:a1998e/attrs", false),
        Err(DenyReason::InvalidIdentity(_))
    ));
}

#[test]
fn device_subscribes_only_its_own_config_filter_per_filter_in_order() {
    let p = policy();
    let decisions = p.subscribe(
        Some(DEV),
        [
            ("other/#", 1),
            ("admin:a1998e/config", 1),
            ("admin:a1998e/attrs", 0),
            ("admin:a1998e/config", 2),
            ("admin:a1998e/+", 1),
            ("admin:a1998e/#", 1),
            ("+/config", 1),
            ("$share/g/admin:a1998e/config", 1),
            ("$SYS/#", 0),
            ("admin:b2c3d4/config", 1),
            ("admin:a1998e/config/x", 1),
            ("admin:a1998e/config", 3),
        ],
    );
    use FilterDecision::{Deny, Grant};
    let topic = Deny(DenyReason::Topic);
    assert_eq!(
        decisions,
        vec![topic, Grant(1), topic, Grant(2), topic, topic, topic, topic, topic, topic, topic, topic]
    );
}

#[test]
fn service_subscribes_only_its_shared_subscription() {
    let p = policy();
    assert_eq!(
        p.subscribe(Some("k2v-bridge"), [("$share/v2k/+/attrs", 1)]),
        vec![FilterDecision::Deny(DenyReason::Topic)]
    );
    let p = policy_with(|c| c.service_subscription = Some("$share/v2k/+/attrs".into()));
    assert_eq!(p.subscribe(Some("k2v-bridge"), [("$share/v2k/+/attrs", 1)]), vec![FilterDecision::Grant(1)]);
    assert_eq!(p.subscribe(Some("k2v-bridge"), [("+/attrs", 1)]), vec![FilterDecision::Deny(DenyReason::Topic)]);
    assert_eq!(p.subscribe(Some(DEV), [("$share/v2k/+/attrs", 1)]), vec![FilterDecision::Deny(DenyReason::Topic)]);
}

#[test]
fn anonymous_subscribe_denies_every_filter() {
    let decisions = policy().subscribe(None, [("a", 0), ("admin:a1998e/config", 1)]);
    assert_eq!(decisions, vec![FilterDecision::Deny(DenyReason::Anonymous); 2]);
}

#[test]
fn custom_suffixes() {
    let p = policy_with(|c| {
        c.attrs_suffix = "up".into();
        c.config_suffix = "down".into();
    });
    assert_eq!(p.publish(Some(DEV), "admin:a1998e/up", false), Ok(()));
    assert_eq!(p.publish(Some(DEV), "admin:a1998e/attrs", false), Err(DenyReason::Topic));
    assert_eq!(p.subscribe(Some(DEV), [("admin:a1998e/down", 1)]), vec![FilterDecision::Grant(1)]);
    assert_eq!(p.config_topic_device("admin:a1998e/down"), Some(DeviceId { tenant: "admin", device: "a1998e" }));
    assert_eq!(p.config_topic_device("admin:a1998e/config"), None);
}

#[test]
fn device_data_sources() {
    let p = policy();
    let dev = DeviceId { tenant: "admin", device: "a1998e" };
    assert_eq!(p.device_data_source(Some(DEV), "admin:a1998e/attrs"), Some(dev));
    assert_eq!(p.device_data_source(Some(DEV), "admin:b/attrs"), None);
    assert_eq!(p.device_data_source(Some("k2v-bridge"), "admin:a1998e/config"), None);
    assert_eq!(p.device_data_source(None, "admin:a1998e/attrs"), None);
    assert_eq!(p.attrs_topic_device("admin:a1998e/attrs"), Some(dev));
    assert_eq!(p.attrs_topic_device("admin:a1998e/attrs/x"), None);
    assert_eq!(p.attrs_topic_device("admin:a:b/attrs"), None);
}

#[test]
fn client_ids_that_would_widen_a_disconnect_are_refused_in_every_policy() {
    for client_id_policy in [ClientIdPolicy::Any, ClientIdPolicy::Equal, ClientIdPolicy::Prefix, ClientIdPolicy::Scoped]
    {
        let p = policy_with(|c| c.client_id_policy = client_id_policy);
        for id in [r#"x" OR client_id <> ""#, "admin:a1998e\"", "admin:a1998e\\", "admin:a1998e\n"] {
            assert_eq!(denied(p.register(&register(Some(DEV), id), 0.5)), DenyReason::UnsafeClientId, "{id:?}");
        }
        assert!(matches!(p.register(&register(Some(DEV), DEV), 0.5), RegisterDecision::Allow { .. }));
    }
}
