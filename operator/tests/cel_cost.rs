//! The API server refuses a CRD whose CEL rules it estimates too costly ("estimated rule cost
//! exceeds budget"), and then `helm install` installs nothing. No API server runs here, so
//! this test estimates each rule's worst case the way the API server does, from the schema's
//! bounds, and fails where the API server would refuse:
//!
//! - every string and list a rule reads is bounded (`maxLength`, `maxItems`, or an enum):
//!   an unbounded one makes the estimate depend on the 3 MiB request limit alone;
//! - each rule's cost, times how many times it can run (the product of `maxItems` of the
//!   lists above it), is at most 10^7 (`StaticEstimatedCostLimit`);
//! - the sum over one CRD is at most 10^8 (`StaticEstimatedCRDCostLimit`).
//!
//! How close this is to the API server: the costs follow cel-go's `checker/cost.go` (ident
//! and select 1, literals 0, a call 1 plus its arguments, string or list equality 0.1 per
//! element of the shorter side, `matches` the text's traversal times a quarter of the
//! pattern's length, `&&`/`||` both sides, a comprehension its range, init and
//! result plus the range's size times its step and condition), and the sizes of unbounded
//! values follow the apiextensions server (3 MiB requests, smallest JSON of each type). It
//! models only the operators these CRDs use and fails on any other, so a new rule is either
//! estimated or refused here, never waved through; the figures are within a few units of
//! cel-go's for these rules (its list-literal and `has()` costs differ by small constants).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;

use cel::common::ast::{Expr, LiteralValue, operators};
use nimbus_operator::crd::crds;
use serde_json::{Value, json};

/// The API server's limit for one rule's estimated cost, times its cardinality.
const RULE_LIMIT: f64 = 1e7;
/// Its limit for the sum over one CRD.
const CRD_LIMIT: f64 = 1e8;
/// The largest request the API server reads, which bounds what a schema leaves unbounded.
const MAX_REQUEST_BYTES: f64 = 3.0 * 1024.0 * 1024.0;
/// cel-go's cost of traversing one element of a string or list.
const TRAVERSAL: f64 = 0.1;
/// cel-go's cost of a regular expression, per character of the pattern.
const REGEX: f64 = 0.25;

/// The smallest JSON a value of this schema can be (the API server's `estimateMinSizeJSON`).
fn min_json_size(schema: &Value) -> f64 {
    match schema.get("type").and_then(Value::as_str) {
        Some("boolean") => 4.0,
        Some("integer" | "number") => 1.0,
        _ => 2.0, // "" [] {}
    }
}

/// Worst-case size of a value: characters of a string, items of a list, properties of a map.
/// `None` when the schema gives no bound (the API server then derives one from the request
/// size, as `size_or_derived` does).
fn declared_size(schema: &Value) -> Option<f64> {
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        return Some(options.iter().filter_map(Value::as_str).map(str::len).max().unwrap_or(0) as f64);
    }
    let key = match schema.get("type").and_then(Value::as_str) {
        Some("string") => "maxLength",
        Some("array") => "maxItems",
        Some("object") if schema.get("additionalProperties").is_some() => "maxProperties",
        _ => return Some(1.0),
    };
    schema.get(key).and_then(Value::as_f64)
}

fn size_or_derived(schema: &Value) -> f64 {
    declared_size(schema).unwrap_or_else(|| match schema.get("type").and_then(Value::as_str) {
        Some("string") => MAX_REQUEST_BYTES - 2.0,
        Some("array") => {
            let item = schema.get("items").map(min_json_size).unwrap_or(2.0);
            ((MAX_REQUEST_BYTES - 2.0) / (item + 1.0)).floor()
        }
        _ => ((MAX_REQUEST_BYTES - 2.0) / 4.0).floor(),
    })
}

/// The metadata a root rule sees: `name` and `generateName`. The cost estimator knows no
/// bound for them (name validation runs, but its 253 characters are not in the schema it
/// reads), so they count as strings as long as a request: `x-kubernetes-nimbus-metadata`
/// marks them so the bounded-inputs check lets them through (no schema can bound them).
fn root_metadata() -> Value {
    json!({"type": "object", "properties": {
        "name": {"type": "string", "x-kubernetes-nimbus-metadata": true},
        "generateName": {"type": "string", "x-kubernetes-nimbus-metadata": true}
    }})
}

/// One estimated expression: its cost, and the schema of its value when known.
struct Estimate {
    cost: f64,
    schema: Option<Value>,
}

struct Estimator {
    /// Variables in scope (`self`, `oldSelf`, comprehension variables) and their schemas.
    vars: HashMap<String, Value>,
    /// Strings and lists read by the rule without a bound.
    unbounded: Vec<String>,
    /// Operators this model does not know.
    unknown: Vec<String>,
}

impl Estimator {
    fn size(&mut self, e: &Estimate, what: &str) -> f64 {
        match &e.schema {
            Some(s) => {
                if declared_size(s).is_none() && s.get("x-kubernetes-nimbus-metadata").is_none() {
                    self.unbounded.push(what.to_string());
                }
                size_or_derived(s)
            }
            // A literal or a computed value: small and fixed in these rules.
            None => 1.0,
        }
    }

    fn cost(&mut self, expr: &Expr) -> Estimate {
        match expr {
            Expr::Literal(_) => Estimate { cost: 0.0, schema: None },
            Expr::Ident(name) => Estimate { cost: 1.0, schema: self.vars.get(name).cloned() },
            Expr::Select(sel) => {
                let operand = self.cost(&sel.operand.expr);
                let schema = operand.schema.as_ref().and_then(|s| {
                    let field = s.get("properties").and_then(|p| p.get(&sel.field)).cloned();
                    field.or_else(|| (sel.field == "metadata").then(root_metadata))
                });
                Estimate { cost: operand.cost + 1.0, schema: if sel.test { None } else { schema } }
            }
            Expr::List(list) => {
                let cost = 10.0 + list.elements.iter().map(|e| self.cost(&e.expr).cost).sum::<f64>();
                Estimate { cost, schema: None }
            }
            Expr::Call(call) => {
                let target = call.target.as_ref().map(|t| self.cost(&t.expr));
                let args: Vec<Estimate> = call.args.iter().map(|a| self.cost(&a.expr)).collect();
                let inputs = target.as_ref().map_or(0.0, |t| t.cost) + args.iter().map(|a| a.cost).sum::<f64>();
                let cost = match call.func_name.as_str() {
                    operators::EQUALS | operators::NOT_EQUALS => {
                        let (l, r) = (self.size(&args[0], "=="), self.size(&args[1], "=="));
                        (l.min(r).max(1.0) * TRAVERSAL).ceil() + inputs
                    }
                    // cel-go: ⌈0.1 × (1 + string length)⌉ × ⌈0.25 × pattern length⌉.
                    "matches" => {
                        let text = match &target {
                            Some(t) => self.size(t, "matches"),
                            None => f64::INFINITY,
                        };
                        let pattern = match call.args.first().map(|a| &a.expr) {
                            Some(Expr::Literal(LiteralValue::String(p))) => p.inner().len() as f64,
                            _ => {
                                self.unknown.push("matches with a computed pattern".into());
                                f64::INFINITY
                            }
                        };
                        ((1.0 + text) * TRAVERSAL).ceil() * (pattern * REGEX).ceil() + inputs
                    }
                    operators::LOGICAL_AND | operators::LOGICAL_OR => inputs,
                    operators::CONDITIONAL => args[0].cost + args[1].cost.max(args[2].cost),
                    // `oldSelf.hasValue()` on an optional `oldSelf` (`optionalOldSelf`).
                    "hasValue" => 1.0 + inputs,
                    operators::LOGICAL_NOT
                    | operators::NOT_STRICTLY_FALSE
                    | operators::LESS
                    | operators::LESS_EQUALS
                    | operators::GREATER
                    | operators::GREATER_EQUALS
                    | operators::ADD
                    | operators::SUBSTRACT
                    | "size" => 1.0 + inputs,
                    other => {
                        self.unknown.push(other.to_string());
                        f64::INFINITY
                    }
                };
                Estimate { cost, schema: None }
            }
            Expr::Comprehension(c) => {
                let range = self.cost(&c.iter_range.expr);
                let count = self.size(&range, "a comprehension's range");
                let init = self.cost(&c.accu_init.expr);
                let item = range.schema.as_ref().and_then(|s| s.get("items")).cloned().unwrap_or(Value::Null);
                let shadowed = self.vars.insert(c.iter_var.clone(), item);
                let cond = self.cost(&c.loop_cond.expr);
                let step = self.cost(&c.loop_step.expr);
                match shadowed {
                    Some(s) => self.vars.insert(c.iter_var.clone(), s),
                    None => self.vars.remove(&c.iter_var),
                };
                let result = self.cost(&c.result.expr);
                Estimate { cost: range.cost + init.cost + result.cost + count * (step.cost + cond.cost), schema: None }
            }
            Expr::Map(_) | Expr::Struct(_) | Expr::Unspecified => {
                self.unknown.push(format!("{expr:?}"));
                Estimate { cost: f64::INFINITY, schema: None }
            }
        }
    }
}

/// One rule's estimate.
struct RuleCost {
    path: String,
    rule: String,
    /// Cost of one evaluation.
    cost: f64,
    /// How many times it can run in one object.
    cardinality: f64,
    unbounded: Vec<String>,
    unknown: Vec<String>,
}

fn estimate(rule: &str, node: &Value, path: &str, cardinality: f64) -> RuleCost {
    let program = cel::Program::compile(rule).unwrap_or_else(|e| panic!("{path}: `{rule}` does not parse: {e:?}"));
    let vars = HashMap::from([("self".to_string(), node.clone()), ("oldSelf".to_string(), node.clone())]);
    let mut est = Estimator { vars, unbounded: Vec::new(), unknown: Vec::new() };
    let cost = est.cost(&program.expression().expr).cost;
    RuleCost { path: path.into(), rule: rule.into(), cost, cardinality, unbounded: est.unbounded, unknown: est.unknown }
}

/// Every rule in a schema, with the number of times it can run (the lists and maps above it).
fn rules(schema: &Value, path: &str, cardinality: f64, out: &mut Vec<RuleCost>) {
    for r in schema.get("x-kubernetes-validations").and_then(Value::as_array).into_iter().flatten() {
        out.push(estimate(r["rule"].as_str().unwrap(), schema, path, cardinality));
    }
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (name, child) in props {
            rules(child, &format!("{path}.{name}"), cardinality, out);
        }
    }
    if let Some(items) = schema.get("items") {
        rules(items, &format!("{path}[*]"), cardinality * size_or_derived(schema), out);
    }
    if let Some(values) = schema.get("additionalProperties").filter(|v| v.is_object()) {
        rules(values, &format!("{path}{{*}}"), cardinality * size_or_derived(schema), out);
    }
}

fn crd_schema(kind: &str) -> Value {
    let crd = crds().into_iter().find(|c| c.spec.names.kind == kind).unwrap();
    serde_json::to_value(crd.spec.versions[0].schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap()).unwrap()
}

fn check(schema: &Value) -> (f64, Vec<String>) {
    let mut all = Vec::new();
    rules(schema, "", 1.0, &mut all);
    let mut problems = Vec::new();
    let mut total = 0.0;
    for r in &all {
        let cost = r.cost * r.cardinality;
        total += cost;
        if !r.unknown.is_empty() {
            problems.push(format!("{}: `{}` uses {:?}, which this estimate does not model", r.path, r.rule, r.unknown));
        }
        if !r.unbounded.is_empty() {
            problems.push(format!("{}: `{}` reads unbounded values ({:?})", r.path, r.rule, r.unbounded));
        }
        if cost > RULE_LIMIT {
            problems.push(format!("{}: `{}` costs {cost:e} (over 1e7)", r.path, r.rule));
        }
    }
    if total > CRD_LIMIT {
        problems.push(format!("the rules cost {total:e} in all (over 1e8)"));
    }
    (total, problems)
}

#[test]
fn every_rule_is_within_the_api_servers_cost_budget() {
    for kind in ["DatabaseInstance", "ResourcePool", "DatabaseRestore"] {
        let (total, problems) = check(&crd_schema(kind));
        assert!(problems.is_empty(), "{kind}'s CRD would be refused:\n{}", problems.join("\n"));
        eprintln!("{kind}: estimated cost of all rules {total}");
        // Well below the limit, not just under it: a rule added later has room. (The name
        // rules dominate: a regular expression over a name as long as a request.)
        assert!(total < CRD_LIMIT / 10.0, "{kind}: {total}");
    }
}

/// The rule that made the API server refuse the CRD, over the schema it had (an unbounded
/// list of unbounded names), is refused here too: this check can fail.
#[test]
fn the_quadratic_rule_over_unbounded_users_is_refused() {
    let users = json!({"type": "array", "items": {"type": "object", "required": ["name"],
        "properties": {"name": {"type": "string"}}}});
    let spec = json!({"type": "object", "properties": {"users": users},
        "x-kubernetes-validations": [{"rule": "!has(self.users) || self.users.all(u, self.users.exists_one(v, v.name == u.name))"}]});
    let (total, problems) = check(&spec);
    assert!(total > RULE_LIMIT, "{total}");
    assert!(problems.iter().any(|p| p.contains("over 1e7")), "{problems:?}");
    assert!(problems.iter().any(|p| p.contains("unbounded")), "{problems:?}");

    // Bounded, the same rule is affordable: the estimate follows the bounds.
    let mut bounded = spec.clone();
    bounded["properties"]["users"]["maxItems"] = json!(32);
    bounded["properties"]["users"]["items"]["properties"]["name"]["maxLength"] = json!(64);
    let (total, problems) = check(&bounded);
    assert!(problems.is_empty(), "{problems:?}");
    // 32 × (32 × (⌈6.4⌉ + 2 selects + the step) + …): thousands, not billions.
    assert!((1e3..1e5).contains(&total), "{total}");
}

/// A rule under a list runs once per item: its cost is multiplied by the list's bound.
#[test]
fn a_rule_under_a_list_costs_once_per_item() {
    let item = json!({"type": "object", "properties": {"a": {"type": "string", "maxLength": 100}},
        "x-kubernetes-validations": [{"rule": "self.a == 'x'"}]});
    let list = json!({"type": "array", "maxItems": 50, "items": item});
    let mut all = Vec::new();
    rules(&json!({"type": "object", "properties": {"list": list}}), "", 1.0, &mut all);
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].cardinality, 50.0);
    // Two selects, ⌈0.1 × min(100, 1)⌉ for the comparison with a literal.
    assert_eq!(all[0].cost, 3.0);
}

/// DatabaseRestore's spec is immutable by `self == oldSelf`: an equality over the whole
/// spec, whose cost follows the sizes of what it holds. Every string and list in it is
/// bounded, so the API server estimates it as cheap; an unbounded one would be refused.
#[test]
fn the_restores_immutable_spec_is_bounded_and_cheap() {
    let schema = crd_schema("DatabaseRestore");
    let spec = &schema["properties"]["spec"];
    let rules: Vec<&str> =
        spec["x-kubernetes-validations"].as_array().unwrap().iter().map(|r| r["rule"].as_str().unwrap()).collect();
    assert!(rules.contains(&"self == oldSelf"), "{rules:?}");
    // Every string and list under the spec has a bound (or is an enum).
    fn unbounded(node: &Value, path: &str, out: &mut Vec<String>) {
        if matches!(node.get("type").and_then(Value::as_str), Some("string" | "array")) && declared_size(node).is_none()
        {
            out.push(path.to_owned());
        }
        for (k, v) in node.get("properties").and_then(Value::as_object).into_iter().flatten() {
            unbounded(v, &format!("{path}.{k}"), out);
        }
        if let Some(items) = node.get("items") {
            unbounded(items, &format!("{path}[*]"), out);
        }
    }
    let mut open = Vec::new();
    unbounded(spec, "spec", &mut open);
    assert!(open.is_empty(), "unbounded under spec: {open:?}");
    let (total, problems) = check(&schema);
    assert!(problems.is_empty(), "{problems:?}");
    assert!(total < 1e5, "{total}");
    // The check can fail: the same rule over an unbounded string list is refused.
    let open_spec = json!({"type": "object", "properties": {"to": {"type": "array", "items": {"type": "string"}}},
        "x-kubernetes-validations": [{"rule": "self.to == oldSelf.to"}]});
    let (_, problems) = check(&open_spec);
    assert!(problems.iter().any(|p| p.contains("unbounded")), "{problems:?}");
}
