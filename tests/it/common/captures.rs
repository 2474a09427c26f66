//! The webhook requests recorded from a real VerneMQ 2.1.2, in `tests/data/vernemq-2.1.2/` (its README says how they
//! were recorded and what each file holds).

use std::path::PathBuf;

use serde_json::Value;

/// One recorded request: the exact headers and body bytes VerneMQ sent.
pub struct Captured {
    pub file: String,
    pub seq: u64,
    pub hook: String,
    pub headers: Vec<(String, String)>,
    pub body_raw: String,
}

/// `tests/data/vernemq-2.1.2/`.
pub fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/vernemq-2.1.2")
}

/// Every request of every `*.jsonl` file, files in name order, requests in recorded order.
pub fn load() -> Vec<Captured> {
    let dir = dir();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let file = path.file_name().unwrap().to_string_lossy().to_string();
        for line in std::fs::read_to_string(&path).expect("read capture").lines().filter(|l| !l.trim().is_empty()) {
            let record: Value = serde_json::from_str(line).expect("capture line is JSON");
            // Two recorder formats: the first run (0a/0b) kept headers as pairs and the body as a string.
            let headers: Vec<(String, String)> = match &record["headers"] {
                Value::Object(map) => map.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string())).collect(),
                Value::Array(pairs) => pairs
                    .iter()
                    .map(|p| (p[0].as_str().unwrap().to_string(), p[1].as_str().unwrap().to_string()))
                    .collect(),
                other => panic!("{file}: unexpected headers {other}"),
            };
            let hook = headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("vernemq-hook"))
                .map(|(_, v)| v.clone())
                .expect("every capture has a vernemq-hook header");
            let body_raw = record
                .get("body_raw")
                .and_then(Value::as_str)
                .or_else(|| record["body"].as_str())
                .expect("raw body")
                .to_string();
            out.push(Captured {
                file: file.clone(),
                seq: record["seq"].as_u64().unwrap_or_default(),
                hook,
                headers,
                body_raw,
            });
        }
    }
    out
}
