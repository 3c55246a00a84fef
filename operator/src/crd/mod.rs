//! Custom resources. Each API version lives in its own module; the Rust types are the
//! source of the CRDs in `crds/` and `charts/nimbus/crds/` (`nimbus-operator crd` prints
//! them; `tests/crds.rs` fails when a file differs from the code).

pub mod v1alpha1;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The API group of every Nimbus resource.
pub const GROUP: &str = "nimbus.io";

/// Every CRD.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![v1alpha1::DatabaseInstance::crd(), v1alpha1::ResourcePool::crd(), v1alpha1::DatabaseRestore::crd()]
}

/// Each CRD as `(file name, YAML)`, the file named after the CRD (`<plural>.<group>.yaml`).
pub fn crd_files() -> Result<Vec<(String, String)>, serde_yaml_ng::Error> {
    crds()
        .into_iter()
        .map(|crd| {
            let name = format!("{}.yaml", crd.metadata.name.clone().unwrap_or_default());
            Ok((name, format!("---\n{}", serde_yaml_ng::to_string(&crd)?)))
        })
        .collect()
}
