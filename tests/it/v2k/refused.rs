//! A record Kafka refuses for good (a final error: too large, not authorised) in the webhook modes: dead-lettered
//! (`reason=refused`) and answered ok, not refused at every resend (an MQTT 3.1.1 device is disconnected by a refusal
//! and sends the same message first again, for ever); given up and counted lost when the dead letter is refused too.
//!
//! tansu answers a record its topic's schema refuses with INVALID_RECORD, but the idempotent producer then needs the
//! epoch bump tansu does not implement (KIP-360: it answers InitProducerId with UNKNOWN_SERVER_ERROR, every later
//! record is PRODUCER_FENCED), so nothing, dead letter included, gets through after it. The final errors used here
//! need no bump: a record over the producer's own `message.max.bytes` (refused before it is sent, against tansu),
//! and a topic whose metadata says TOPIC_AUTHORIZATION_FAILED (librdkafka's mock cluster, which tansu cannot play).

use rdkafka::mocking::MockCluster;
use rdkafka::types::RDKafkaRespErr;

use super::*;
use crate::common::brokers::read_partition;
use crate::common::{metric, metrics_text};

/// Strict mode, a payload within V2K_MAX_PAYLOAD_BYTES (raised here) whose record is over the producer's 4 MiB
/// `message.max.bytes`: librdkafka refuses it for good (MSG_SIZE_TOO_LARGE). It was answered `unavailable` at every
/// resend; it is dead-lettered once (cut to V2K_DEAD_LETTER_MAX_BYTES) and answered ok, and data keeps flowing.
#[tokio::test]
async fn strict_mode_a_record_over_the_producer_limit_is_dead_lettered_not_refused_for_ever() {
    let kafka = Tansu::start(Storage::Memory);
    create_topics(&kafka, &["admin"]).await;
    let app = v2k_app(
        &kafka,
        &[
            ("V2K_MODE", "auth_on_publish"),
            ("V2K_MAX_PAYLOAD_BYTES", "8388608"),
            ("WEBHOOK_MAX_BODY_BYTES", "16777216"),
        ],
    )
    .await;
    let mut client = app.client().await;
    let big = format!(r#"{{"pad": "{}"}}"#, "x".repeat(4_500_000));
    let reply =
        client.hook("auth_on_publish", publish_body(DEV, "admin:a1998e/attrs", big.as_bytes(), 1).as_bytes()).await;
    assert_eq!(reply.json(), json!({"result": "ok"}), "refused for good, yet answered unavailable");

    let letters = kafka.read("admin.device-data.dead-letter", 1, Duration::from_secs(10)).await;
    assert_eq!(letters.len(), 1, "the refused record is dead-lettered");
    assert_eq!(letters[0].header("reason"), Some("refused"));
    assert_eq!(letters[0].header("kafka_error"), Some("MessageSizeTooLarge"));
    assert_eq!(letters[0].header("original_size"), Some(big.len().to_string().as_str()));
    assert_eq!(letters[0].value, big.as_bytes()[..256 * 1024], "the payload as sent, cut to the dead-letter size");
    let text = metrics_text(&app.url("")).await;
    assert_eq!(metric(&text, r#"iotagent_v2k_dead_lettered_total{reason="refused"}"#), Some(1.0), "{text}");
    assert_eq!(metric(&text, r#"iotagent_v2k_failed_total{class="final"}"#), Some(1.0));
    assert_eq!(metric(&text, r#"iotagent_v2k_failed_total{class="lost"}"#), Some(0.0));

    let data = publish_body(DEV, "admin:a1998e/attrs", br#"{"n": 0}"#, 1);
    assert_eq!(client.hook("auth_on_publish", data.as_bytes()).await.json()["result"], "ok");
    assert_eq!(kafka.read("admin.device-data", 1, Duration::from_secs(10)).await.len(), 1);
}

/// A Kafka broker (librdkafka's mock cluster) that refuses to write `admin.device-data` and both of `acme`'s topics
/// (TOPIC_AUTHORIZATION_FAILED in their metadata: the first record's delivery report says so, later ones are refused
/// when queued); `admin`'s dead-letter topic takes records.
fn refusing_cluster() -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
    let mock = MockCluster::new(1).expect("mock cluster");
    for tenant in ["admin", "acme"] {
        mock.create_topic(&format!("{tenant}.device-data"), 1, 1).expect("topic");
        mock.create_topic(&format!("{tenant}.device-data.dead-letter"), 1, 1).expect("topic");
    }
    for topic in ["admin.device-data", "acme.device-data", "acme.device-data.dead-letter"] {
        mock.topic_error(topic, RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED).expect("topic error");
    }
    mock
}

/// Each webhook mode against the refusing cluster: `admin`'s record is dead-lettered (reason and Kafka error named),
/// `acme`'s is given up (its dead letter is refused too) and counted lost; both answered as forwarded. Before:
/// strict answered `unavailable` at every resend, on_publish 500, and nothing reached the dead-letter topic.
async fn refused_for_good_in(mode: &str, hook: &'static str) {
    let mock = refusing_cluster();
    let brokers = mock.bootstrap_servers();
    let app = start_app(&[
        ("KAFKA_BROKERS", brokers.clone()),
        ("V2K_MODE", mode.to_string()),
        // A refused topic is not listed in the metadata as existing: its tenant would be unknown.
        ("V2K_REQUIRE_TENANT_TOPIC", "false".to_string()),
    ])
    .await;
    let mut client = app.client().await;
    let answered_ok = |reply: &crate::common::RawResponse| {
        reply.status == 200 && (hook == "on_publish" || reply.json() == json!({"result": "ok"}))
    };
    let admin = publish_body(DEV, "admin:a1998e/attrs", br#"{"n": 1}"#, 1);
    let reply = client.hook(hook, admin.as_bytes()).await;
    assert!(answered_ok(&reply), "{mode}: refused for good, answered {} {:?}", reply.status, reply.json());
    let acme = publish_body("acme:x-1", "acme:x-1/attrs", br#"{"n": 1}"#, 1);
    let reply = client.hook(hook, acme.as_bytes()).await;
    assert!(answered_ok(&reply), "{mode}: dead letter refused too, answered {} {:?}", reply.status, reply.json());

    let letters = read_partition(&brokers, "admin.device-data.dead-letter", 1, Duration::from_secs(10)).await;
    assert_eq!(letters.len(), 1, "{mode}: the refused record is dead-lettered");
    assert_eq!(letters[0].header("reason"), Some("refused"));
    assert_eq!(letters[0].header("kafka_error"), Some("TopicAuthorizationFailed"));
    assert_eq!(letters[0].value, br#"{"n": 1}"#);
    let text = metrics_text(&app.url("")).await;
    assert_eq!(metric(&text, r#"iotagent_v2k_dead_lettered_total{reason="refused"}"#), Some(1.0), "{mode}: {text}");
    assert_eq!(metric(&text, r#"iotagent_v2k_failed_total{class="lost"}"#), Some(1.0), "{mode}: acme's is lost");
    drop(mock);
}

#[tokio::test]
async fn strict_mode_a_record_kafka_refuses_for_good_is_dead_lettered_or_given_up() {
    refused_for_good_in("auth_on_publish", "auth_on_publish").await;
}

#[tokio::test]
async fn on_publish_mode_a_record_kafka_refuses_for_good_is_dead_lettered_or_given_up() {
    refused_for_good_in("on_publish", "on_publish").await;
}
