//! The reconcilers' Kubernetes calls. Each failure says what the operator was doing and,
//! when the API refused it, which RBAC verbs that takes: a sentence a person can act on
//! (a refused server-side apply that would have created its object says only
//! `services "x" is forbidden: `, without the verb).

use std::fmt;

use k8s_openapi::NamespaceResourceScope;
use kube::Resource;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Error;

/// The field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "nimbus-operator";

/// What a call does, in words and in RBAC verbs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Get,
    List,
    Create,
    /// Server-side apply: `patch`, and `create` when the object does not exist yet.
    Apply,
    Delete,
    /// A merge patch of the object.
    Patch,
    /// A merge patch of the status subresource.
    Status,
}

impl Verb {
    fn words(self) -> &'static str {
        match self {
            Verb::Get => "read",
            Verb::List => "list",
            Verb::Create => "create",
            Verb::Apply => "apply",
            Verb::Delete => "delete",
            Verb::Patch => "patch",
            Verb::Status => "write the status of",
        }
    }

    fn rbac(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Create => "create",
            Verb::Apply => "patch and create",
            Verb::Delete => "delete",
            Verb::Patch => "patch",
            Verb::Status => "patch",
        }
    }
}

/// A Kubernetes API call that failed.
#[derive(Debug)]
pub struct CallError {
    pub verb: Verb,
    pub kind: String,
    /// The resource as RBAC names it: `services`, `deployments.apps`.
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub error: kube::Error,
}

impl CallError {
    /// The API server's answer, when there was one.
    pub fn status(&self) -> Option<&kube::core::Status> {
        match &self.error {
            kube::Error::Api(s) => Some(s),
            _ => None,
        }
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match (&self.name, &self.namespace) {
            (Some(n), Some(ns)) => format!("{} {ns}/{n}", self.kind),
            (Some(n), None) => format!("{} {n}", self.kind),
            (None, Some(ns)) => format!("the {} of namespace {ns}", self.resource),
            (None, None) => format!("the {}", self.resource),
        };
        write!(f, "failed to {} {what}: ", self.verb.words())?;
        let Some(s) = self.status() else { return write!(f, "{}", self.error) };
        write!(f, "the Kubernetes API answered {} {}", s.code, s.reason)?;
        let message = s.message.trim().trim_end_matches(':');
        if !message.is_empty() {
            write!(f, " ({message})")?;
        }
        if s.code == 403 {
            let sub = if self.verb == Verb::Status { "/status" } else { "" };
            write!(f, "; the operator's RBAC must grant {} on {}{sub}", self.verb.rbac(), self.resource)?;
        }
        Ok(())
    }
}

/// One kind of object in one namespace (or cluster-wide), called with errors that say what
/// was being done.
pub struct Objects<K> {
    api: Api<K>,
    namespace: Option<String>,
}

impl<K> Objects<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + fmt::Debug,
{
    pub fn namespaced(client: kube::Client, namespace: &str) -> Self
    where
        K: Resource<Scope = NamespaceResourceScope>,
    {
        Objects { api: Api::namespaced(client, namespace), namespace: Some(namespace.to_string()) }
    }

    pub fn all(client: kube::Client) -> Self {
        Objects { api: Api::all(client), namespace: None }
    }

    fn failed(&self, verb: Verb, name: Option<&str>) -> impl FnOnce(kube::Error) -> Error + use<K> {
        let group = K::group(&());
        let plural = K::plural(&());
        let resource = if group.is_empty() { plural.to_string() } else { format!("{plural}.{group}") };
        let (kind, namespace, name) = (K::kind(&()).to_string(), self.namespace.clone(), name.map(str::to_string));
        move |error| Error::Call(Box::new(CallError { verb, kind, resource, namespace, name, error }))
    }

    pub async fn get_opt(&self, name: &str) -> Result<Option<K>, Error> {
        self.api.get_opt(name).await.map_err(self.failed(Verb::Get, Some(name)))
    }

    pub async fn get(&self, name: &str) -> Result<K, Error> {
        self.api.get(name).await.map_err(self.failed(Verb::Get, Some(name)))
    }

    pub async fn list(&self, params: &ListParams) -> Result<Vec<K>, Error> {
        Ok(self.api.list(params).await.map_err(self.failed(Verb::List, None))?.items)
    }

    /// Server-side apply as [`FIELD_MANAGER`], taking the fields from any other manager.
    pub async fn apply(&self, name: &str, object: &K) -> Result<K, Error> {
        let ssa = PatchParams::apply(FIELD_MANAGER).force();
        self.api.patch(name, &ssa, &Patch::Apply(object)).await.map_err(self.failed(Verb::Apply, Some(name)))
    }

    pub async fn create(&self, object: &K) -> Result<K, Error> {
        let name = object.meta().name.clone();
        self.api.create(&PostParams::default(), object).await.map_err(self.failed(Verb::Create, name.as_deref()))
    }

    pub async fn delete(&self, name: &str) -> Result<(), Error> {
        self.api.delete(name, &DeleteParams::default()).await.map_err(self.failed(Verb::Delete, Some(name)))?;
        Ok(())
    }

    /// Deletes at once, without a grace period: the API server forgets the object without
    /// waiting for a kubelet (a Pod on a lost node, which would stay Terminating forever).
    pub async fn delete_now(&self, name: &str) -> Result<(), Error> {
        let params = DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::default() };
        self.api.delete(name, &params).await.map_err(self.failed(Verb::Delete, Some(name)))?;
        Ok(())
    }

    /// A JSON merge patch of the object.
    pub async fn merge(&self, name: &str, patch: &serde_json::Value) -> Result<K, Error> {
        let params = PatchParams::default();
        self.api.patch(name, &params, &Patch::Merge(patch)).await.map_err(self.failed(Verb::Patch, Some(name)))
    }

    pub async fn patch_status(&self, name: &str, status: &serde_json::Value) -> Result<(), Error> {
        let params = PatchParams::default();
        self.api
            .patch_status(name, &params, &Patch::Merge(status))
            .await
            .map_err(self.failed(Verb::Status, Some(name)))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(code: u16, reason: &str, message: &str) -> kube::Error {
        let s: kube::core::Status =
            serde_json::from_value(serde_json::json!({"code": code, "reason": reason, "message": message})).unwrap();
        kube::Error::Api(Box::new(s))
    }

    #[test]
    fn a_refused_apply_names_the_object_and_the_verbs_it_needs() {
        let e = CallError {
            verb: Verb::Apply,
            kind: "Service".into(),
            resource: "services".into(),
            namespace: Some("apps".into()),
            name: Some("default-rs0".into()),
            error: refusal(403, "Forbidden", "services \"default-rs0\" is forbidden: "),
        };
        assert_eq!(
            e.to_string(),
            "failed to apply Service apps/default-rs0: the Kubernetes API answered 403 Forbidden (services \
             \"default-rs0\" is forbidden); the operator's RBAC must grant patch and create on services"
        );
    }
}
