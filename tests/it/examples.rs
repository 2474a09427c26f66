//! The request/response pairs documented in `plugins-http/*/examples/` are what the service really answers.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::common::{args_from_env, shape, spawn_app};

#[tokio::test]
async fn documented_examples_match_the_service() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins-http");
    let mut files: Vec<_> = std::fs::read_dir(&root)
        .expect("plugins-http")
        .flat_map(|plugin| std::fs::read_dir(plugin.expect("entry").path().join("examples")).into_iter().flatten())
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 30, "expected the documented examples, found {}", files.len());

    for path in files {
        let name = path.strip_prefix(&root).unwrap().display().to_string();
        let example: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).expect("example is JSON");
        let env: BTreeMap<String, String> = serde_json::from_value(example["env"].clone()).unwrap_or_default();
        let app = spawn_app(&args_from_env(&env)).await;
        let mut client = app.client().await;
        let hook = example["hook"].as_str().expect("hook");
        let body = match example.get("request_raw") {
            Some(raw) => raw.as_str().expect("request_raw is a string").to_string(),
            None => example["request"].to_string(),
        };
        let response = client.hook(hook, body.as_bytes()).await;
        let expected = &example["response"];
        assert_eq!(u64::from(response.status), expected["status"].as_u64().unwrap(), "{name}");
        if response.status == 200 {
            shape::check(hook, &example["request"], &response).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(response.json(), expected["body"], "{name}");
            assert_eq!(response.header("cache-control"), expected["cache_control"].as_str(), "{name}");
        } else {
            // Error messages may be reworded; the error kind is the contract.
            assert_eq!(response.json()["error"], expected["body"]["error"], "{name}");
        }
    }
}
