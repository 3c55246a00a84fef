//! Limits and name rules every component enforces the same way (`API.md` section 1).

use crate::error::ApiError;

/// Largest document, as its JSON encoding: 16 MiB, as in MongoDB.
pub const MAX_DOCUMENT_BYTES: usize = 16 * 1024 * 1024;
/// Deepest nesting of objects and arrays in a document, filter or update.
pub const MAX_NESTING_DEPTH: usize = 100;
/// Longest database or collection name.
pub const MAX_NAME_LEN: usize = 64;
/// Longest index name.
pub const MAX_INDEX_NAME_LEN: usize = 128;
/// Most documents one `find` returns; also the default `limit`.
pub const MAX_FIND_LIMIT: u64 = 10_000;
/// Most fields in one index.
pub const MAX_INDEX_FIELDS: usize = 16;
/// Longest `_id` string, in bytes.
pub const MAX_ID_BYTES: usize = 1024;
/// Most documents one update or delete may examine. Writes run in the replica set's apply
/// loop, which every database on the replica set shares: past this, the write is refused
/// (nothing changes) and the client narrows it (`{"_id": {"$in": [...]}}` batches are point
/// lookups).
pub const MAX_WRITE_EXAMINED_DOCS: u64 = 1_000;
/// Most bytes of documents one update or delete may examine.
pub const MAX_WRITE_EXAMINED_BYTES: u64 = 16 * 1024 * 1024;
/// Most documents one `find` or `count` may examine (an index on the filter's fields keeps
/// a query far below it).
pub const MAX_READ_EXAMINED_DOCS: u64 = 100_000;
/// Most bytes of documents one `find` or `count` may examine.
pub const MAX_READ_EXAMINED_BYTES: u64 = 256 * 1024 * 1024;
/// Largest `skip`: deeper pages are read with a range on the sort key (`{"_id": {"$gt": last}}`).
pub const MAX_SKIP: u64 = 10_000;
/// Most memory a sort without an index may hold, in bytes of parsed documents (MongoDB's
/// limit for a blocking sort too).
pub const MAX_SORT_BYTES: u64 = 100 * 1024 * 1024;
/// Most bytes one write may produce: its new documents and their oplog copies. A committed
/// entry is applied by every member and again after each restart, so a write whose batch
/// would not fit in memory must be refused before it is (a `multi` update setting a large
/// field on a thousand documents, say).
pub const MAX_WRITE_PRODUCED_BYTES: usize = 128 * 1024 * 1024;
/// Largest `find` answer, in bytes of documents.
pub const MAX_FIND_ANSWER_BYTES: u64 = 64 * 1024 * 1024;
/// Longest `Idempotency-Key`.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;

/// A database or collection name: 1..=64 characters of `[A-Za-z0-9_-]`, not starting with
/// `-`. Names appear in URLs, storage keys and metrics labels, so the rule is strict.
pub fn validate_name(kind: &str, name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('-')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "invalid {kind} name {name:?}: use 1 to {MAX_NAME_LEN} characters of A-Z a-z 0-9 _ -, not starting with -"
        )))
    }
}

/// An index name: like a collection name but up to 128 characters and `.` allowed, though
/// not dots alone (`.` and `..` are path segments of their own).
pub fn validate_index_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_INDEX_NAME_LEN
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        && !name.bytes().all(|b| b == b'.');
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "invalid index name {name:?}: use 1 to {MAX_INDEX_NAME_LEN} characters of A-Z a-z 0-9 _ - ., not dots alone"
        )))
    }
}

/// An `Idempotency-Key` header value: 1..=128 visible ASCII characters.
pub fn validate_idempotency_key(key: &str) -> Result<(), ApiError> {
    if !key.is_empty() && key.len() <= MAX_IDEMPOTENCY_KEY_LEN && key.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "invalid Idempotency-Key: use 1 to {MAX_IDEMPOTENCY_KEY_LEN} visible ASCII characters"
        )))
    }
}

/// The nesting depth of a JSON value: a scalar is 0, `{}` and `[]` are 1.
pub fn nesting_depth(value: &serde_json::Value) -> usize {
    // Iterative, so a hostile document cannot overflow the stack while being measured.
    let mut max = 0;
    let mut stack = vec![(value, 0usize)];
    while let Some((v, depth)) = stack.pop() {
        match v {
            serde_json::Value::Object(map) => {
                max = max.max(depth + 1);
                stack.extend(map.values().map(|c| (c, depth + 1)));
            }
            serde_json::Value::Array(items) => {
                max = max.max(depth + 1);
                stack.extend(items.iter().map(|c| (c, depth + 1)));
            }
            _ => max = max.max(depth),
        }
    }
    max
}

/// The nesting depth of a JSON text, scanned without parsing it (strings skipped), fed in
/// pieces as they arrive: what a parse would give as [`nesting_depth`], for a text that
/// parses. The gateway refuses a body nested too deep with it before anything parses it.
#[derive(Debug, Clone, Default)]
pub struct DepthScan {
    depth: usize,
    max: usize,
    in_str: bool,
    escaped: bool,
}

impl DepthScan {
    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.in_str {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_str = false;
                }
                continue;
            }
            match b {
                b'"' => self.in_str = true,
                b'{' | b'[' => {
                    self.depth += 1;
                    self.max = self.max.max(self.depth);
                }
                b'}' | b']' => self.depth = self.depth.saturating_sub(1),
                _ => {}
            }
        }
    }

    /// The deepest nesting seen so far.
    pub fn max(&self) -> usize {
        self.max
    }
}

/// [`DepthScan`] of a whole text.
pub fn text_nesting_depth(bytes: &[u8]) -> usize {
    let mut scan = DepthScan::default();
    scan.feed(bytes);
    scan.max()
}

/// Rejects a value nested deeper than [`MAX_NESTING_DEPTH`].
pub fn check_depth(what: &str, value: &serde_json::Value) -> Result<(), ApiError> {
    let depth = nesting_depth(value);
    if depth > MAX_NESTING_DEPTH {
        Err(ApiError::bad_request(format!("{what} is nested {depth} levels deep; the limit is {MAX_NESTING_DEPTH}")))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_follow_the_rule() {
        for good in ["a", "app_1", "A-b", &"x".repeat(64)] {
            assert!(validate_name("database", good).is_ok(), "{good}");
        }
        for bad in ["", "-a", "a.b", "a b", "a/b", "é", &"x".repeat(65), "a\0"] {
            assert!(validate_name("database", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn index_names_follow_the_rule() {
        for good in ["a_1", "a.b_1", "x.", ".x", &"i".repeat(128)] {
            assert!(validate_index_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", "...", "a/b", "a b", &"i".repeat(129)] {
            assert!(validate_index_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn depth_counts_containers() {
        assert_eq!(nesting_depth(&json!(1)), 0);
        assert_eq!(nesting_depth(&json!({"a": 1})), 1);
        assert_eq!(nesting_depth(&json!({"a": [{"b": []}]})), 4);
    }

    #[test]
    fn the_text_scan_agrees_with_the_parsed_depth_and_skips_strings() {
        for text in [r#"{"a": [1, {"b": "[[[{{{"}]}"#, r#""\"[" "#, "[[[]], {}]", r#"{"a\\": ["]"]}"#] {
            let v: serde_json::Value = serde_json::from_str(text).unwrap();
            assert_eq!(text_nesting_depth(text.as_bytes()), nesting_depth(&v), "{text}");
        }
        assert_eq!(text_nesting_depth(&vec![b'['; 500]), 500);
        // Fed in pieces split anywhere, even inside a string or an escape.
        let text = br#"{"a\"[": [{"b": "}}\\"}]}"#;
        for cut in 0..text.len() {
            let mut scan = DepthScan::default();
            scan.feed(&text[..cut]);
            scan.feed(&text[cut..]);
            assert_eq!(scan.max(), text_nesting_depth(text), "cut at {cut}");
        }
    }

    #[test]
    fn too_deep_is_rejected() {
        let mut v = json!(1);
        for _ in 0..=MAX_NESTING_DEPTH {
            v = json!([v]);
        }
        assert!(check_depth("document", &v).is_err());
    }
}
