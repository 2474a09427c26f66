//! Which client ids may reach VerneMQ's disconnect command: it splices the id into a VMQL query between `"` (reference
//! §9.2), so `"`, `\` and control characters are refused at connect, whatever the client-id policy.

/// Whether `client_id` can be named in a disconnect without changing the query VerneMQ builds from it.
pub fn is_disconnect_safe(client_id: &str) -> bool {
    !client_id.chars().any(|c| c == '"' || c == '\\' || c.is_control())
}

#[cfg(test)]
mod tests {
    use super::is_disconnect_safe;

    #[test]
    fn ordinary_ids_pass() {
        for id in ["admin:a1998e", "admin:a1998e@sensor-1", "anon-rbnbI/caGSCwsLn/zOTuc7MQ6gKq", "dev-é", "", "a b'c"]
        {
            assert!(is_disconnect_safe(id), "{id:?}");
        }
    }

    #[test]
    fn query_breaking_ids_are_refused() {
        for id in
            [r#"x" OR client_id <> ""#, r#"x\"#, "x\"", "x\\\"", "x\0", "x\n", "x\r\ny", "\t", "x\u{7f}", "x\u{85}"]
        {
            assert!(!is_disconnect_safe(id), "{id:?}");
        }
    }
}
