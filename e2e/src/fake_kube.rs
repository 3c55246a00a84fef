//! The least of a Kubernetes API server the operator needs to start: one Lease (get,
//! create, patch) for its leader election, and empty lists with watches that stay open
//! for its controllers. Enough to run the real `nimbus-operator run` binary and call its
//! probes; nothing is reconciled (there is nothing to reconcile).
//!
//! The lists answer only once [`FakeKube::open_lists`] is called, so a test sees the
//! operator leading with its watches not yet synced.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::watch;

#[derive(Clone)]
struct Api {
    /// Leases by namespace/name.
    leases: Arc<Mutex<HashMap<String, Value>>>,
    revision: Arc<Mutex<u64>>,
    lists_open: watch::Receiver<bool>,
}

/// A fake API server on 127.0.0.1 (stopped on drop) and a kubeconfig file pointing at it.
pub struct FakeKube {
    pub url: String,
    pub kubeconfig: PathBuf,
    open: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeKube {
    /// Serves on a port picked by the OS; writes `dir/kubeconfig`.
    pub async fn start(dir: &Path) -> anyhow::Result<FakeKube> {
        let (open, lists_open) = watch::channel(false);
        let api = Api { leases: Default::default(), revision: Arc::new(Mutex::new(1)), lists_open };
        let app = Router::new().fallback(handle).with_state(api);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {url}\n\
                 users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
                 current-context: fake\n"
            ),
        )?;
        Ok(FakeKube { url, kubeconfig, open, task })
    }

    /// From now on the lists answer (the controllers' watches sync).
    pub fn open_lists(&self) {
        let _ = self.open.send(true);
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": reason,
                      "code": code, "message": message});
    (StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), axum::Json(body)).into_response()
}

async fn handle(
    State(api): State<Api>,
    method: Method,
    uri: Uri,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let path = uri.path().trim_end_matches('/');
    let segments: Vec<&str> = path.split('/').collect();
    // /apis/coordination.k8s.io/v1/namespaces/{ns}/leases[/{name}]
    if path.starts_with("/apis/coordination.k8s.io/v1/namespaces/") && segments.get(6) == Some(&"leases") {
        let ns = segments[5];
        return lease(&api, method, ns, segments.get(7).copied(), &body);
    }
    if method != Method::GET {
        return status(405, "MethodNotAllowed", "the fake API server only lists and watches");
    }
    if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
        // A watch with nothing to report: open until the client goes.
        return Response::new(Body::from_stream(futures::stream::pending::<Result<Bytes, std::io::Error>>()));
    }
    let mut open = api.lists_open.clone();
    if open.wait_for(|o| *o).await.is_err() {
        return status(503, "ServiceUnavailable", "shutting down");
    }
    let rv = api.revision.lock().map(|r| r.to_string()).unwrap_or_default();
    axum::Json(json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": rv}, "items": []}))
        .into_response()
}

fn lease(api: &Api, method: Method, ns: &str, name: Option<&str>, body: &[u8]) -> Response {
    let Ok(mut leases) = api.leases.lock() else { return status(500, "InternalError", "poisoned") };
    let Ok(mut revision) = api.revision.lock() else { return status(500, "InternalError", "poisoned") };
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    match (method, name) {
        (Method::GET, Some(name)) => match leases.get(&format!("{ns}/{name}")) {
            Some(l) => axum::Json(l.clone()).into_response(),
            None => status(404, "NotFound", &format!("leases \"{name}\" not found")),
        },
        (Method::POST, None) => {
            let Some(mut l) = parsed else { return status(400, "BadRequest", "not JSON") };
            let Some(name) = l["metadata"]["name"].as_str().map(str::to_owned) else {
                return status(400, "BadRequest", "no name");
            };
            if leases.contains_key(&format!("{ns}/{name}")) {
                return status(409, "AlreadyExists", "exists");
            }
            *revision += 1;
            l["apiVersion"] = json!("coordination.k8s.io/v1");
            l["kind"] = json!("Lease");
            l["metadata"]["namespace"] = json!(ns);
            l["metadata"]["resourceVersion"] = json!(revision.to_string());
            leases.insert(format!("{ns}/{name}"), l.clone());
            (StatusCode::CREATED, axum::Json(l)).into_response()
        }
        (Method::PATCH | Method::PUT, Some(name)) => {
            let Some(patch) = parsed else { return status(400, "BadRequest", "not JSON") };
            let key = format!("{ns}/{name}");
            let l = leases.entry(key).or_insert_with(|| {
                json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                       "metadata": {"name": name, "namespace": ns}, "spec": {}})
            });
            json_patch::merge(l, &patch);
            *revision += 1;
            l["metadata"]["resourceVersion"] = json!(revision.to_string());
            axum::Json(l.clone()).into_response()
        }
        _ => status(405, "MethodNotAllowed", "not a Lease call the operator makes"),
    }
}
