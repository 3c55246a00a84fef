//! Custom resources. Each API version lives in its own module; the Rust types are the
//! source of the CRDs in `crds/` (`nimbus-operator crd` prints them).

pub mod v1alpha1;

use kube::CustomResourceExt;

/// The API group of every Nimbus resource.
pub const GROUP: &str = "nimbus.io";

/// Every CRD as one multi-document YAML stream, as `crds/` holds it.
pub fn crds_yaml() -> Result<String, serde_yaml_ng::Error> {
    let mut out = String::new();
    for crd in [v1alpha1::DatabaseInstance::crd(), v1alpha1::ResourcePool::crd()] {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&crd)?);
    }
    Ok(out)
}
