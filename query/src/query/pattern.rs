//! Regular expressions of `$regex` (and of Extended JSON's `$regularExpression` literals).
//!
//! MongoDB uses PCRE; Nimbus uses the `regex` crate, whose matching time is linear in the
//! input whatever the pattern, so a tenant's pattern cannot stall a datanode. The syntax is
//! PCRE's for everything but look-around and back-references, which are refused with a
//! clear error. Options: `i` (case-insensitive), `m` (`^`/`$` at line breaks), `s` (`.`
//! matches a line break), `x` (whitespace and `#` comments ignored in the pattern).

use serde_json::Value;

/// Longest pattern accepted (MongoDB's limit is 32 KiB; a pattern this size is a mistake).
pub const MAX_PATTERN_BYTES: usize = 16 * 1024;
/// Largest compiled program (memory) one pattern may take.
const MAX_COMPILED_BYTES: usize = 1 << 20;

/// A compiled pattern with its source, compared by source.
#[derive(Clone)]
pub struct Pattern {
    pattern: String,
    options: String,
    re: regex::Regex,
}

impl std::fmt::Debug for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "/{}/{}", self.pattern, self.options)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.pattern == other.pattern && self.options == other.options
    }
}

impl Pattern {
    pub fn new(pattern: &str, options: &str) -> Result<Pattern, String> {
        if pattern.len() > MAX_PATTERN_BYTES {
            return Err(format!("$regex pattern longer than {MAX_PATTERN_BYTES} bytes"));
        }
        let mut b = regex::RegexBuilder::new(pattern);
        b.size_limit(MAX_COMPILED_BYTES).dfa_size_limit(MAX_COMPILED_BYTES);
        for o in options.chars() {
            match o {
                'i' => b.case_insensitive(true),
                'm' => b.multi_line(true),
                's' => b.dot_matches_new_line(true),
                'x' => b.ignore_whitespace(true),
                'u' => &mut b,
                other => return Err(format!("unknown $regex option {other:?}: use i, m, s or x")),
            };
        }
        let re = b.build().map_err(|e| match e {
            regex::Error::CompiledTooBig(_) => "$regex pattern too complex".to_owned(),
            e => format!("invalid $regex (look-around and back-references are not supported): {e}"),
        })?;
        Ok(Pattern { pattern: pattern.to_owned(), options: options.to_owned(), re })
    }

    pub fn is_match(&self, s: &str) -> bool {
        self.re.is_match(s)
    }

    /// The pattern of `{"$regex": arg, "$options": options}`.
    pub fn from_operator(arg: &Value, options: Option<&Value>) -> Result<Pattern, String> {
        let options = match options {
            None => "",
            Some(Value::String(o)) => o,
            Some(_) => return Err("$options must be a string".into()),
        };
        match arg {
            Value::String(p) => Pattern::new(p, options),
            other => match Pattern::from_literal(other) {
                Some(Ok(p)) if options.is_empty() => Ok(p),
                Some(Ok(p)) => Pattern::new(&p.pattern, options),
                Some(Err(e)) => Err(e),
                None => Err("$regex needs a string".into()),
            },
        }
    }

    /// A `{"$regularExpression": {"pattern": ..., "options": ...}}` literal, if `v` is one.
    pub fn from_literal(v: &Value) -> Option<Result<Pattern, String>> {
        let Value::Object(m) = v else { return None };
        if m.len() != 1 {
            return None;
        }
        let inner = m.get("$regularExpression")?;
        let bad = || Err("$regularExpression needs {\"pattern\": \"...\", \"options\": \"...\"}".to_owned());
        let Value::Object(fields) = inner else { return Some(bad()) };
        let (Some(Value::String(p)), opts) = (fields.get("pattern"), fields.get("options")) else {
            return Some(bad());
        };
        let o = match opts {
            None => "",
            Some(Value::String(o)) => o,
            Some(_) => return Some(bad()),
        };
        if fields.len() > 2 || (fields.len() == 2 && opts.is_none()) {
            return Some(bad());
        }
        Some(Pattern::new(p, o))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn options_change_matching() {
        assert!(Pattern::new("^a.b$", "s").unwrap().is_match("a\nb"));
        assert!(!Pattern::new("^a.b$", "").unwrap().is_match("a\nb"));
        assert!(Pattern::new("^b", "m").unwrap().is_match("a\nb"));
        assert!(Pattern::new("A B # comment", "xi").unwrap().is_match("ab"));
    }

    #[test]
    fn hostile_patterns_are_refused_or_linear() {
        assert!(!Pattern::new("(a+)+$", "").unwrap().is_match(&format!("{}b", "a".repeat(100_000))));
        assert!(Pattern::new("(\\w)\\1", "").is_err());
        assert!(Pattern::new(&"a".repeat(MAX_PATTERN_BYTES + 1), "").is_err());
        assert!(Pattern::new("\\w{1000}{1000}", "").is_err());
    }

    #[test]
    fn literals_are_recognised() {
        assert!(
            Pattern::from_literal(&json!({"$regularExpression": {"pattern": "x", "options": "i"}})).unwrap().is_ok()
        );
        assert!(Pattern::from_literal(&json!({"$regularExpression": "x"})).unwrap().is_err());
        assert!(Pattern::from_literal(&json!({"pattern": "x"})).is_none());
    }
}
