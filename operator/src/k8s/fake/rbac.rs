//! The chart's RBAC, as the fake API server enforces it on the operator's requests.
//!
//! The rules come from `charts/nimbus/templates/rbac.yaml` itself, rendered here for release
//! `nimbus` in `nimbus-system` (what `scripts/check-chart.sh` renders with helm). The
//! template is data with three kinds of actions: `{{ .Release.Name }}`,
//! `{{ .Release.Namespace }}` and the labels `include`. Anything else panics rather than
//! being guessed at, and `scripts/check-chart-objects.py` checks that this reading and
//! helm's agree, so the rules a test enforces are the rules a cluster gets.

use std::collections::BTreeSet;

use serde_json::Value;

pub const RELEASE: &str = "nimbus";
pub const RELEASE_NAMESPACE: &str = "nimbus-system";
/// The operator's ServiceAccount, as the API server names the user in a refusal.
pub const OPERATOR_USER: &str = "system:serviceaccount:nimbus-system:nimbus-operator";
const TEMPLATE: &str = include_str!("../../../../charts/nimbus/templates/rbac.yaml");
const LABELS_INCLUDE: &str = r#"{{- include "nimbus.labels" . | nindent 4 }}"#;

/// One request as the authorizer sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Attributes {
    pub verb: String,
    pub group: String,
    /// `pods`, or `databaseinstances/status` for a subresource.
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

#[derive(Debug, Clone)]
struct Rule {
    groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
    names: Vec<String>,
    /// A Role's rules hold in its namespace only; a ClusterRole's everywhere.
    namespace: Option<String>,
}

impl Rule {
    fn allows(&self, a: &Attributes) -> bool {
        let any = |list: &[String], x: &str| list.iter().any(|v| v == "*" || v == x);
        self.namespace.as_ref().is_none_or(|ns| a.namespace.as_ref() == Some(ns))
            && any(&self.verbs, &a.verb)
            && any(&self.groups, &a.group)
            && any(&self.resources, &a.resource)
            && (self.names.is_empty() || a.name.as_ref().is_some_and(|n| self.names.contains(n)))
    }
}

/// The rules bound to the operator's ServiceAccount.
#[derive(Debug, Clone)]
pub struct Rbac {
    rules: Vec<Rule>,
}

/// The chart's `rbac.yaml` as YAML documents, rendered for the test release.
pub fn render(template: &str) -> Vec<Value> {
    let mut text = String::new();
    for line in template.lines() {
        if line.trim() == LABELS_INCLUDE {
            continue;
        }
        let line = line.replace("{{ .Release.Name }}", RELEASE).replace("{{ .Release.Namespace }}", RELEASE_NAMESPACE);
        assert!(!line.contains("{{"), "rbac.yaml has templating the fake API cannot render: {line}");
        text.push_str(&line);
        text.push('\n');
    }
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| <Value as serde::Deserialize>::deserialize(doc).expect("rbac.yaml is YAML"))
        .filter(|d| !d.is_null())
        .collect()
}

impl Rbac {
    /// What the chart grants the operator.
    pub fn chart() -> Rbac {
        Rbac::from_documents(&render(TEMPLATE))
    }

    pub fn from_documents(docs: &[Value]) -> Rbac {
        let sa = format!("{RELEASE}-operator");
        let bound: BTreeSet<(String, String)> = docs
            .iter()
            .filter(|d| matches!(d["kind"].as_str(), Some("RoleBinding" | "ClusterRoleBinding")))
            .filter(|d| {
                d["subjects"].as_array().into_iter().flatten().any(|s| {
                    s["kind"] == "ServiceAccount" && s["name"] == sa.as_str() && s["namespace"] == RELEASE_NAMESPACE
                })
            })
            .map(|d| (d["roleRef"]["kind"].as_str().unwrap().into(), d["roleRef"]["name"].as_str().unwrap().into()))
            .collect();
        let strings = |v: &Value| -> Vec<String> {
            v.as_array().into_iter().flatten().map(|s| s.as_str().expect("a string").to_string()).collect()
        };
        let mut rules = Vec::new();
        for d in docs {
            let kind = d["kind"].as_str().unwrap_or_default();
            let name = d["metadata"]["name"].as_str().unwrap_or_default();
            if !matches!(kind, "Role" | "ClusterRole") || !bound.contains(&(kind.to_string(), name.to_string())) {
                continue;
            }
            let namespace = (kind == "Role").then(|| d["metadata"]["namespace"].as_str().unwrap().to_string());
            for r in d["rules"].as_array().into_iter().flatten() {
                rules.push(Rule {
                    groups: strings(&r["apiGroups"]),
                    resources: strings(&r["resources"]),
                    verbs: strings(&r["verbs"]),
                    names: strings(&r["resourceNames"]),
                    namespace: namespace.clone(),
                });
            }
        }
        Rbac { rules }
    }

    pub fn allows(&self, a: &Attributes) -> bool {
        self.rules.iter().any(|r| r.allows(a))
    }

    /// The same grants less one verb on one resource (a chart that forgot it).
    pub fn without(self, group: &str, resource: &str, verb: &str) -> Rbac {
        let mut split = Vec::new();
        for r in self.rules {
            if r.groups.iter().any(|g| g == group)
                && r.resources.iter().any(|x| x == resource)
                && r.verbs.iter().any(|v| v == verb)
            {
                let others: Vec<String> = r.resources.iter().filter(|x| *x != resource).cloned().collect();
                if !others.is_empty() {
                    split.push(Rule { resources: others, ..r.clone() });
                }
                split.push(Rule {
                    resources: vec![resource.to_string()],
                    verbs: r.verbs.iter().filter(|v| *v != verb).cloned().collect(),
                    ..r
                });
            } else {
                split.push(r);
            }
        }
        Rbac { rules: split }
    }

    /// Every (group, resource, verb) granted, for comparing with what the operator uses.
    pub fn grants(&self) -> BTreeSet<(String, String, String)> {
        let mut out = BTreeSet::new();
        for r in &self.rules {
            for g in &r.groups {
                for res in &r.resources {
                    for v in &r.verbs {
                        out.insert((g.clone(), res.clone(), v.clone()));
                    }
                }
            }
        }
        out
    }
}

/// The refusal a real API server sends, word for word: the authorization filter's for a
/// request, the patch handler's (with RBAC's empty reason) for the create that a
/// server-side apply of an absent object implies.
pub fn forbidden_message(a: &Attributes, create_on_apply: bool) -> String {
    let (resource, sub) = match a.resource.split_once('/') {
        Some((r, s)) => (r, Some(s)),
        None => (a.resource.as_str(), None),
    };
    let qualified = if a.group.is_empty() { resource.to_string() } else { format!("{resource}.{}", a.group) };
    let subject = match &a.name {
        Some(n) => format!("{qualified} \"{n}\" is forbidden"),
        None => format!("{qualified} is forbidden"),
    };
    if create_on_apply {
        return format!("{subject}: ");
    }
    let scope = match &a.namespace {
        Some(ns) => format!("in the namespace \"{ns}\""),
        None => "at the cluster scope".to_string(),
    };
    let sub = sub.map(|s| format!("/{s}")).unwrap_or_default();
    format!(
        "{subject}: User \"{OPERATOR_USER}\" cannot {} resource \"{resource}{sub}\" in API group \"{}\" {scope}",
        a.verb, a.group
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(verb: &str, group: &str, resource: &str, ns: Option<&str>, name: Option<&str>) -> Attributes {
        Attributes {
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            namespace: ns.map(Into::into),
            name: name.map(Into::into),
        }
    }

    #[test]
    fn the_chart_renders_to_rules_bound_to_the_operator() {
        let rbac = Rbac::chart();
        assert!(rbac.allows(&attrs("patch", "", "services", Some("apps"), Some("x"))));
        assert!(!rbac.allows(&attrs("delete", "", "secrets", Some("apps"), Some("x"))), "Secrets are never deleted");
        assert!(!rbac.allows(&attrs("list", "", "secrets", None, None)), "no cluster-wide Secret list");
        assert!(rbac.allows(&attrs("watch", "", "nodes", None, None)), "the node watch cache");
        assert!(!rbac.allows(&attrs("patch", "", "nodes", None, None)), "nodes are never written");
    }

    #[test]
    fn a_role_holds_in_its_namespace_and_resource_names_narrow_it() {
        let rbac = Rbac::chart();
        let lease = |ns: &str, name: &str| attrs("patch", "coordination.k8s.io", "leases", Some(ns), Some(name));
        assert!(rbac.allows(&lease(RELEASE_NAMESPACE, "nimbus-operator")));
        assert!(!rbac.allows(&lease("apps", "nimbus-operator")));
        assert!(!rbac.allows(&lease(RELEASE_NAMESPACE, "someone-elses")));
    }

    #[test]
    fn refusals_read_as_the_api_servers() {
        let a = attrs("create", "", "services", Some("apps"), Some("default-rs0"));
        assert_eq!(
            forbidden_message(&a, false),
            "services \"default-rs0\" is forbidden: User \"system:serviceaccount:nimbus-system:nimbus-operator\" \
             cannot create resource \"services\" in API group \"\" in the namespace \"apps\""
        );
        assert_eq!(forbidden_message(&a, true), "services \"default-rs0\" is forbidden: ");
        let n = attrs("list", "", "nodes", None, None);
        assert!(forbidden_message(&n, false).ends_with("in API group \"\" at the cluster scope"));
    }

    #[test]
    fn templating_the_renderer_does_not_know_is_refused_not_guessed() {
        let t = "rules:\n{{- if .Values.x }}\n  - verbs: [get]\n{{- end }}\n";
        assert!(std::panic::catch_unwind(|| render(t)).is_err());
    }
}
