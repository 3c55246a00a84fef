//! The `nimbus-operator` binary: `run` (the controllers) and `crd` (print the CRDs).

use std::net::SocketAddr;

use anyhow::Context as _;
use axum::Router;
use axum::routing::get;
use clap::{Parser, Subcommand};
use metrics_exporter_prometheus::PrometheusBuilder;
use nimbus_operator::crd;
use nimbus_operator::crd::v1alpha1::DatabaseInstance;
use nimbus_operator::k8s::failure;
use nimbus_operator::k8s::health::{self, Health};
use nimbus_operator::k8s::objects::Settings;
use nimbus_operator::k8s::objects::{self, Credentials, ReplicaSetShape};
use nimbus_operator::k8s::{RunConfig, run};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "nimbus-operator", version, about = "The Nimbus operator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML (what `crds/` holds).
    Crd,
    /// Run the controllers (with leader election).
    Run(Box<RunArgs>),
    /// Init container of a member of the chart's etcd: decide how it starts (a member that
    /// lost its volume is removed and added anew) and write etcd's configuration file.
    EtcdMember(Box<nimbus_operator::etcd_member::MemberArgs>),
    /// Init container of the operator: create etcd's roles and users (one per component,
    /// least rights) and switch authentication on. Idempotent. Connects as root.
    EtcdSetup {
        #[command(flatten)]
        etcd: nimbus_net::EtcdArgs,
        /// Once set up, record in this ConfigMap (in POD_NAMESPACE) that the etcd cluster
        /// was bootstrapped: its members with no data then wait for the others instead of
        /// starting a new cluster.
        #[arg(long, env = "NIMBUS_ETCD_STATE_CONFIGMAP")]
        state_configmap: Option<String>,
        #[arg(long, env = "POD_NAMESPACE", default_value = "nimbus-system")]
        namespace: String,
    },
    /// Print the objects the operator would create for a DatabaseInstance manifest (its
    /// first replica set, in zones a, b, c; tokens left as placeholders).
    Preview {
        /// A DatabaseInstance manifest.
        file: std::path::PathBuf,
        #[arg(long, default_value = "default")]
        namespace: String,
        /// The settings `run` takes (the same flags and environment variables): give it the
        /// chart's operator environment to see what that operator would build.
        #[command(flatten)]
        settings: SettingsArgs,
        /// The operator's etcd endpoints, as `run` takes them.
        #[arg(long = "etcd", env = "NIMBUS_ETCD", value_delimiter = ',', default_value = "http://etcd:2379")]
        etcd_endpoints: Vec<String>,
    },
}

/// What shapes the objects the operator builds: shared by `run` and `preview`.
#[derive(clap::Args)]
struct SettingsArgs {
    /// Do not create NetworkPolicies for datanodes and gateways.
    #[arg(long, env = "NIMBUS_NO_NETWORK_POLICIES")]
    no_network_policies: bool,
    /// Namespaces allowed to scrape the admin ports' metrics, as a label selector
    /// (`key=value,...`), e.g. `kubernetes.io/metadata.name=monitoring`.
    #[arg(long, env = "NIMBUS_METRICS_NAMESPACES", default_value = "")]
    metrics_namespaces: String,
    /// Image of the datanode Pods.
    #[arg(long, env = "NIMBUS_DATANODE_IMAGE")]
    datanode_image: String,
    /// Image of the gateway Pods.
    #[arg(long, env = "NIMBUS_GATEWAY_IMAGE")]
    gateway_image: String,
    #[arg(long, env = "NIMBUS_IMAGE_PULL_POLICY", default_value = "IfNotPresent")]
    image_pull_policy: String,
    /// Gateway replicas per namespace with instances.
    #[arg(long, env = "NIMBUS_GATEWAY_REPLICAS", default_value_t = 2)]
    gateway_replicas: i32,
    /// Namespace of the leader-election Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "nimbus-system")]
    lease_namespace: String,
}

impl SettingsArgs {
    fn settings(
        self,
        etcd_endpoints: Vec<String>,
        internal_files: std::collections::BTreeMap<String, String>,
    ) -> anyhow::Result<Settings> {
        Ok(Settings {
            datanode_image: self.datanode_image,
            gateway_image: self.gateway_image,
            image_pull_policy: self.image_pull_policy,
            etcd_endpoints,
            gateway_replicas: self.gateway_replicas,
            gateway_service_account: None,
            internal_files,
            operator_namespace: self.lease_namespace,
            network_policies: !self.no_network_policies,
            metrics_namespace_selector: parse_selector(&self.metrics_namespaces)?,
        })
    }
}

#[derive(clap::Args)]
struct RunArgs {
    /// The operator's etcd connection (endpoints, TLS client certificate).
    #[command(flatten)]
    etcd: nimbus_net::EtcdArgs,
    /// Directory of the internal Secret's files (the cluster secret, and with a TLS etcd
    /// its CA and the gateways' client certificate): copied into every namespace with
    /// datanodes or gateways.
    #[arg(long, env = "NIMBUS_INTERNAL_DIR", default_value = "/etc/nimbus/internal")]
    internal_dir: std::path::PathBuf,
    #[command(flatten)]
    settings: SettingsArgs,
    /// This replica's identity in the leader election.
    #[arg(long, env = "POD_NAME")]
    identity: String,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    #[arg(long, env = "NIMBUS_METRICS_LISTEN", default_value = health::DEFAULT_METRICS_LISTEN)]
    metrics_listen: SocketAddr,
    /// Log as JSON lines.
    #[arg(long, env = "NIMBUS_LOG_JSON")]
    log_json: bool,
    /// How long a replica-set member may be down (its Pod pending, terminating or not
    /// ready, or its node NotReady or gone) before it is declared lost and replaced in its
    /// zone: `5m`, `90s`, `1h`.
    #[arg(long, env = "NIMBUS_MEMBER_FAILURE_PERIOD", default_value = failure::DEFAULT_FAILURE_PERIOD_FLAG)]
    member_failure_period: jiff::SignedDuration,
    /// Hot migration: how long gateways hold a moving database's requests at the cutover
    /// before the attempt aborts (and is retried): `5s`.
    #[arg(long, env = "NIMBUS_MIGRATION_HOLD_TIMEOUT", default_value = "5s")]
    migration_hold_timeout: jiff::SignedDuration,
    /// Hot migration: how long the catch-up after the copy may take to get close enough to
    /// hold before the attempt aborts (nothing lost) and is retried: `10m`; `0s`: no limit.
    #[arg(long, env = "NIMBUS_MIGRATION_CATCH_UP_TIMEOUT", default_value = "10m")]
    migration_catch_up_timeout: jiff::SignedDuration,
    /// Hot migration: the most a copy reads from its source per second, in MiB; below it
    /// the copy slows down by itself when its pages queue behind the tenants' requests.
    #[arg(long, env = "NIMBUS_MIGRATION_COPY_MIB_PER_SEC", default_value_t = 64)]
    migration_copy_mib_per_sec: u64,
    /// Hot migration: migrations run at once.
    #[arg(long, env = "NIMBUS_MIGRATION_CONCURRENCY", default_value_t = 2)]
    migration_concurrency: usize,
    /// Hot migration: how long the source keeps its copy after the switch: `5m`.
    #[arg(long, env = "NIMBUS_MIGRATION_CLEANUP_GRACE", default_value = "5m")]
    migration_cleanup_grace: jiff::SignedDuration,
    /// Backups: the directory they are written to (a PersistentVolume mounted into the
    /// operator's Pod; one store for every namespace, each under its own path). Unset:
    /// backups are off, and every instance's `status.notYetActive` lists `backup`.
    #[arg(long, env = "NIMBUS_BACKUP_DIR")]
    backup_dir: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => {
            for (_, yaml) in crd::crd_files()? {
                print!("{yaml}");
            }
            Ok(())
        }
        Command::Preview { file, namespace, settings, etcd_endpoints } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("failed to read {}", file.display()))?;
            let dbi: DatabaseInstance =
                serde_yaml_ng::from_str(&text).context("failed to parse the DatabaseInstance")?;
            // The internal Secret's files live in the operator's Pod: placeholders here.
            let internal =
                [objects::CLUSTER_SECRET_KEY].map(|k| (k.to_string(), "<from the chart's Secret>".to_string()));
            let settings = settings.settings(etcd_endpoints, internal.into_iter().collect())?;
            for object in preview(&dbi, &namespace, &settings) {
                print!("---\n{}", serde_yaml_ng::to_string(&object)?);
            }
            Ok(())
        }
        Command::EtcdMember(args) => {
            init_logs(false);
            let plan = nimbus_operator::etcd_member::run(&args).await?;
            tracing::info!(member = %args.name, ?plan, config = %args.config_file.display(), "etcd member configured");
            Ok(())
        }
        Command::EtcdSetup { etcd, state_configmap, namespace } => {
            use nimbus_operator::controlplane::etcd_access::{self, GATEWAY_USER, OPERATOR_USER, ROOT_USER, User};
            init_logs(false);
            let opts = etcd_client::ConnectOptions::new().with_connect_timeout(std::time::Duration::from_secs(5));
            let mut client = etcd.connect(opts).await?;
            // Certificate users: the common name is the user, no password.
            let users = [ROOT_USER, OPERATOR_USER, GATEWAY_USER].map(|name| User { name, password: None });
            etcd_access::ensure(&mut client, &users).await.context("failed to set up etcd's roles and users")?;
            tracing::info!("etcd roles and users in place; authentication on");
            if let Some(name) = state_configmap {
                record_bootstrapped(&namespace, &name).await?;
            }
            Ok(())
        }
        Command::Run(args) => {
            init_logs(args.log_json);
            let prometheus = PrometheusBuilder::new().install_recorder()?;
            let listener = tokio::net::TcpListener::bind(args.metrics_listen)
                .await
                .with_context(|| format!("failed to bind {}", args.metrics_listen))?;
            // Ready means: the Lease read, the leader's watches synced, etcd answering (see
            // `k8s::health`). Served before anything else so that a probe reads why not.
            let health = Health::new();
            let ready = health.clone();
            let app = Router::new()
                .route("/metrics", get(move || std::future::ready(prometheus.render())))
                .route("/healthz", get(|| async { "ok" }))
                .route("/readyz", get(move || std::future::ready(ready.readyz())));
            // The first line on stdout, as the other binaries do: where it listens.
            let metrics_url = format!("http://{}", listener.local_addr()?);
            println!("{}", serde_json::json!({"metrics": metrics_url, "pid": std::process::id()}));
            tracing::info!(metrics = %metrics_url, "serving /metrics, /healthz and /readyz");
            tokio::spawn(async move { axum::serve(listener, app).await });
            tokio::spawn(health::check_etcd_forever(health.clone(), args.etcd.clone()));
            let internal_files = read_internal(&args.internal_dir)?;
            let secret = nimbus_net::ClusterSecret::parse(
                internal_files.get(objects::CLUSTER_SECRET_KEY).map(String::as_str).unwrap_or_default(),
            )
            .with_context(|| format!("no usable cluster secret in {}", args.internal_dir.display()))?;
            let args = *args;
            let lease_namespace = args.settings.lease_namespace.clone();
            let settings = args.settings.settings(args.etcd.endpoints.clone(), internal_files)?;
            let member_failure_period = std::time::Duration::try_from(args.member_failure_period.abs())
                .context("the member failure period is out of range")?;
            let duration = |d: jiff::SignedDuration, what: &str| {
                std::time::Duration::try_from(d.abs()).with_context(|| format!("{what} is out of range"))
            };
            let migration = nimbus_operator::controlplane::migration::Tuning {
                hold_timeout: duration(args.migration_hold_timeout, "the migration hold timeout")?,
                catch_up_timeout: duration(args.migration_catch_up_timeout, "the migration catch-up timeout")?,
                copy_bytes_per_sec: args.migration_copy_mib_per_sec.max(1) << 20,
                max_concurrent: args.migration_concurrency.max(1),
                cleanup_grace: duration(args.migration_cleanup_grace, "the migration clean-up grace")?,
                ..Default::default()
            };
            let backup_store = match &args.backup_dir {
                Some(dir) => {
                    let store = nimbus_operator::k8s::backup::object_store(dir)?;
                    tracing::info!(dir = %dir.display(), "backups on: written under this directory");
                    Some(store)
                }
                None => {
                    tracing::info!(
                        "backups off: no --backup-dir (NIMBUS_BACKUP_DIR) given; instances show `backup` in \
                         status.notYetActive and DatabaseRestores wait in Pending"
                    );
                    None
                }
            };
            let cfg = RunConfig {
                settings,
                etcd: args.etcd,
                secret,
                lease_namespace,
                identity: args.identity,
                member_failure_period,
                migration,
                backup_store,
                // The restore runner (controlplane::backup) is wired here once it exists.
                restore_runner: None,
            };
            run(cfg, health).await?;
            Ok(())
        }
    }
}

/// `bootstrapped: "true"` in ConfigMap `name`: the record etcd's members read.
async fn record_bootstrapped(namespace: &str, name: &str) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::ConfigMap;
    let client = kube::Client::try_default().await.context("failed to reach the Kubernetes API")?;
    let api: kube::Api<ConfigMap> = kube::Api::namespaced(client, namespace);
    let cm = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"app.kubernetes.io/name": "nimbus", "app.kubernetes.io/component": "etcd"}},
        "data": {"bootstrapped": "true"}
    });
    let ssa = kube::api::PatchParams::apply("nimbus-operator").force();
    api.patch(name, &ssa, &kube::api::Patch::Apply(cm)).await.context("failed to record that etcd was bootstrapped")?;
    tracing::info!(configmap = name, "recorded that the etcd cluster was bootstrapped");
    Ok(())
}

fn init_logs(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if json {
        tracing_subscriber::fmt().with_env_filter(filter).json().with_writer(std::io::stderr).init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    }
}

/// The internal Secret's files the operator copies into tenant namespaces.
fn read_internal(dir: &std::path::Path) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let mut files = std::collections::BTreeMap::new();
    for key in [
        objects::CLUSTER_SECRET_KEY,
        objects::ETCD_CA_KEY,
        objects::ETCD_GATEWAY_CERT_KEY,
        objects::ETCD_GATEWAY_KEY_KEY,
    ] {
        match std::fs::read_to_string(dir.join(key)) {
            Ok(text) => {
                files.insert(key.to_string(), text);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && key != objects::CLUSTER_SECRET_KEY => {}
            Err(e) => return Err(e).with_context(|| format!("failed to read {}", dir.join(key).display())),
        }
    }
    Ok(files)
}

/// `key=value,...` as a label map.
fn parse_selector(text: &str) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    text.split(',')
        .filter(|t| !t.trim().is_empty())
        .map(|t| {
            let (k, v) = t.split_once('=').with_context(|| format!("{t:?} is not key=value"))?;
            Ok((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

/// The objects of a new instance's replica set, as the reconciler builds them.
fn preview(dbi: &DatabaseInstance, namespace: &str, settings: &Settings) -> Vec<serde_json::Value> {
    let name = dbi.metadata.name.clone().unwrap_or_default();
    let owner = k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
        api_version: "nimbus.io/v1alpha1".into(),
        kind: "DatabaseInstance".into(),
        name: name.clone(),
        uid: "00000000-0000-0000-0000-000000000000".into(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    };
    let rs = ReplicaSetShape {
        name: format!("{}-rs0", dbi.spec.pool),
        namespace: namespace.into(),
        pool: dbi.spec.pool.clone(),
        storage_size: dbi.spec.storage.size.clone(),
        storage_class: dbi.spec.storage.storage_class_name.clone(),
        resources: dbi.spec.resources.clone(),
        node_selector: Default::default(),
        tolerations: vec![],
        owner: Some(owner.clone()),
    };
    let zones: Vec<String> = ["a", "b", "c"].iter().map(|z| z.to_string()).collect();
    let v = |x: serde_json::Result<serde_json::Value>| x.unwrap_or_default();
    let mut out = vec![v(serde_json::to_value(objects::internal_secret(settings, namespace)))];
    if settings.network_policies {
        out.push(v(serde_json::to_value(objects::datanode_network_policy(settings, namespace))));
        out.push(v(serde_json::to_value(objects::gateway_network_policy(settings, namespace))));
    }
    out.push(v(serde_json::to_value(objects::replica_set_service(&rs, &zones, false))));
    out.push(v(serde_json::to_value(objects::replica_set_pdb(&rs, zones.len()))));
    for (i, zone) in zones.iter().enumerate() {
        let id = i as u64 + 1;
        out.push(v(serde_json::to_value(objects::member_pvc(&rs, id, zone))));
        out.push(v(serde_json::to_value(objects::member_pod(settings, &rs, id, zone))));
    }
    out.push(v(serde_json::to_value(objects::gateway_deployment(settings, namespace, None))));
    out.push(v(serde_json::to_value(objects::gateway_service(namespace, None))));
    let creds = Credentials {
        endpoint: objects::gateway_endpoint(namespace),
        database: dbi.database(),
        tokens: Default::default(),
        token: Some("<token>".into()),
        read_only_token: Some("<read-only token>".into()),
    };
    out.push(v(serde_json::to_value(objects::credentials_secret(&name, namespace, &owner, &creds))));
    out
}
