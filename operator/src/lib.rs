//! The Nimbus control plane.
//!
//! - [`crd`]: the custom resources (`DatabaseInstance`, `ResourcePool`), source of `crds/`.
//! - [`controlplane`]: the decisions, pure and shared by both provisioners (placement,
//!   member replacement, rolling restarts), the replica-set driver that carries them out
//!   through a provisioner, and the clients they drive (datanode admin API, etcd).
//! - [`k8s`]: the Kubernetes provisioner: desired objects and the reconcilers.
//!
//! The playground (processes instead of Pods, `nimbus playground`) is the
//! `nimbus-playground` crate: this one, and the operator's image, spawn no processes.
//! - [`etcd_member`]: how a member of the chart's etcd starts (and rejoins after losing its
//!   volume).

pub mod controlplane;
pub mod crd;
pub mod etcd_member;
pub mod k8s;
