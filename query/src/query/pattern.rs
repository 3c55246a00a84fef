//! Regular expressions of `$regex` (and of Extended JSON's `$regularExpression` literals).
//!
//! MongoDB uses PCRE; Nimbus uses the `regex` crate's engine, whose matching time is linear
//! in the input whatever the pattern. The syntax is PCRE's for everything but look-around
//! and back-references, which are refused with a clear error. Options: `i`
//! (case-insensitive), `m` (`^`/`$` at line breaks), `s` (`.` matches a line break), `x`
//! (whitespace and `#` comments ignored in the pattern).
//!
//! Compiling is what costs: a pattern such as `\w{12}` is over half a megabyte of automaton
//! and milliseconds of work. So every pattern of one filter (one projection, one update) is
//! compiled through its [`PatternBudget`], which refuses the 65th pattern before compiling
//! it and stops when the compiled patterns take more than 8 MiB in all.

use regex_automata::meta;
use regex_automata::util::syntax;
use serde_json::Value;

/// Longest pattern accepted (MongoDB's limit is 32 KiB; a pattern this size is a mistake).
pub const MAX_PATTERN_BYTES: usize = 16 * 1024;
/// Most regular expressions one filter, projection or update may hold.
pub const MAX_PATTERNS: usize = 64;
/// Most memory the compiled patterns of one filter, projection or update may take in all.
pub const MAX_TOTAL_COMPILED_BYTES: usize = 8 << 20;
/// Largest automaton one pattern may compile to.
const MAX_COMPILED_BYTES: usize = 1 << 20;
/// Memory of one pattern's matching cache (the states of its lazy DFA).
const MAX_CACHE_BYTES: usize = 1 << 20;

/// A compiled pattern with its source, compared by source.
#[derive(Clone)]
pub struct Pattern {
    pattern: String,
    options: String,
    re: meta::Regex,
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

/// What the patterns of one filter (or projection, or update) have taken so far: how many,
/// and how much memory compiled. Counted before each pattern is compiled, so that a request
/// with thousands of patterns is refused before it costs anything.
#[derive(Debug, Default)]
pub struct PatternBudget {
    patterns: usize,
    compiled_bytes: usize,
}

impl PatternBudget {
    /// Refuses `n` more patterns if they would be too many: a list of them (`$in`, `$all`)
    /// is refused before the first is compiled.
    pub fn ensure_room(&self, n: usize) -> Result<(), String> {
        if self.patterns.saturating_add(n) > MAX_PATTERNS {
            return Err(format!(
                "more than {MAX_PATTERNS} regular expressions in one filter: match fewer patterns, or combine them into one (a|b)"
            ));
        }
        Ok(())
    }

    /// Compiles `pattern` with `options`, counting it against the budget.
    pub fn compile(&mut self, pattern: &str, options: &str) -> Result<Pattern, String> {
        self.ensure_room(1)?;
        self.patterns += 1;
        if pattern.len() > MAX_PATTERN_BYTES {
            return Err(format!("$regex pattern longer than {MAX_PATTERN_BYTES} bytes"));
        }
        let total_exceeded = || {
            format!(
                "the regular expressions of one filter compile to more than {} MiB: use fewer or simpler patterns",
                MAX_TOTAL_COMPILED_BYTES >> 20
            )
        };
        let left = MAX_TOTAL_COMPILED_BYTES.saturating_sub(self.compiled_bytes);
        let limit = MAX_COMPILED_BYTES.min(left);
        let mut syn = syntax::Config::new();
        for o in options.chars() {
            syn = match o {
                'i' => syn.case_insensitive(true),
                'm' => syn.multi_line(true),
                's' => syn.dot_matches_new_line(true),
                'x' => syn.ignore_whitespace(true),
                'u' => syn,
                other => return Err(format!("unknown $regex option {other:?}: use i, m, s or x")),
            };
        }
        let config = meta::Config::new().nfa_size_limit(Some(limit)).hybrid_cache_capacity(MAX_CACHE_BYTES);
        let re = meta::Builder::new().configure(config).syntax(syn).build(pattern).map_err(|e| {
            match (e.size_limit(), e.syntax_error()) {
                (Some(_), _) if limit < MAX_COMPILED_BYTES => total_exceeded(),
                (Some(_), _) => "$regex pattern too complex".to_owned(),
                (None, Some(e)) => {
                    format!("invalid $regex (look-around and back-references are not supported): {e}")
                }
                (None, None) => format!("invalid $regex: {e}"),
            }
        })?;
        self.compiled_bytes += re.memory_usage();
        if self.compiled_bytes > MAX_TOTAL_COMPILED_BYTES {
            return Err(total_exceeded());
        }
        Ok(Pattern { pattern: pattern.to_owned(), options: options.to_owned(), re })
    }
}

impl Pattern {
    pub fn is_match(&self, s: &str) -> bool {
        self.re.is_match(s)
    }

    /// The pattern of `{"$regex": arg, "$options": options}`.
    pub fn from_operator(arg: &Value, options: Option<&Value>, budget: &mut PatternBudget) -> Result<Pattern, String> {
        let options = match options {
            None => "",
            Some(Value::String(o)) => o,
            Some(_) => return Err("$options must be a string".into()),
        };
        match arg {
            Value::String(p) => budget.compile(p, options),
            other => match literal_parts(other) {
                Some(Ok((p, o))) if options.is_empty() => budget.compile(p, o),
                Some(Ok((p, _))) => budget.compile(p, options),
                Some(Err(e)) => Err(e),
                None => Err("$regex needs a string".into()),
            },
        }
    }

    /// A `{"$regularExpression": {"pattern": ..., "options": ...}}` literal, if `v` is one.
    pub fn from_literal(v: &Value, budget: &mut PatternBudget) -> Option<Result<Pattern, String>> {
        literal_parts(v).map(|r| r.and_then(|(p, o)| budget.compile(p, o)))
    }

    /// Whether `v` is a `$regularExpression` literal (well formed or not).
    pub fn is_literal(v: &Value) -> bool {
        literal_parts(v).is_some()
    }
}

/// The pattern and options of a `$regularExpression` literal, if `v` is one.
fn literal_parts(v: &Value) -> Option<Result<(&str, &str), String>> {
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
    Some(Ok((p, o)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn new(pattern: &str, options: &str) -> Result<Pattern, String> {
        PatternBudget::default().compile(pattern, options)
    }

    #[test]
    fn options_change_matching() {
        assert!(new("^a.b$", "s").unwrap().is_match("a\nb"));
        assert!(!new("^a.b$", "").unwrap().is_match("a\nb"));
        assert!(new("^b", "m").unwrap().is_match("a\nb"));
        assert!(new("A B # comment", "xi").unwrap().is_match("ab"));
        assert!(new("^\\w$", "").unwrap().is_match("é"));
        assert!(new("x", "q").is_err());
    }

    #[test]
    fn hostile_patterns_are_refused_or_linear() {
        assert!(!new("(a+)+$", "").unwrap().is_match(&format!("{}b", "a".repeat(100_000))));
        assert!(new("(\\w)\\1", "").unwrap_err().contains("back-references"));
        assert!(new(&"a".repeat(MAX_PATTERN_BYTES + 1), "").is_err());
        assert_eq!(new("\\w{1000}{1000}", "").unwrap_err(), "$regex pattern too complex");
    }

    #[test]
    fn the_patterns_of_one_filter_are_counted_before_they_are_compiled() {
        let mut budget = PatternBudget::default();
        for i in 0..MAX_PATTERNS {
            budget.compile(&format!("^x{i}$"), "").unwrap();
        }
        let e = budget.compile("^y$", "").unwrap_err();
        assert!(e.contains("more than 64 regular expressions"), "{e}");
        // Refused for their number, not compiled: even an invalid one.
        assert_eq!(budget.compile("(", "").unwrap_err(), e);
    }

    #[test]
    fn the_patterns_of_one_filter_compile_to_8_mib_at_most() {
        // Each `\w{12}` is over half a megabyte of automaton (Unicode word characters).
        let mut budget = PatternBudget::default();
        let e = (0..MAX_PATTERNS).find_map(|i| budget.compile(&format!("\\w{{12}}{i}"), "").err()).unwrap();
        assert!(e.contains("compile to more than 8 MiB"), "{e}");
        assert!(
            budget.compiled_bytes <= MAX_TOTAL_COMPILED_BYTES + MAX_COMPILED_BYTES * 2,
            "{}",
            budget.compiled_bytes
        );
        // A fresh filter has its own budget.
        assert!(PatternBudget::default().compile("\\w{12}", "").is_ok());
    }

    #[test]
    fn literals_are_recognised() {
        let mut b = PatternBudget::default();
        assert!(
            Pattern::from_literal(&json!({"$regularExpression": {"pattern": "x", "options": "i"}}), &mut b)
                .unwrap()
                .is_ok()
        );
        assert!(Pattern::from_literal(&json!({"$regularExpression": "x"}), &mut b).unwrap().is_err());
        assert!(Pattern::from_literal(&json!({"pattern": "x"}), &mut b).is_none());
        let lit = json!({"$regularExpression": {"pattern": "^a", "options": ""}});
        assert!(Pattern::from_operator(&lit, Some(&json!("i")), &mut b).unwrap().is_match("AB"));
    }
}
