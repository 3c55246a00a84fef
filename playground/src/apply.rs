//! What an apply changes, decided without I/O: from the playground's state and the checked
//! manifests to the next state, the lines to print (`instance shop created`, as kubectl
//! says them), the migrations to start and the etcd records to rewrite.
//!
//! The next state is computed on a copy: the apply is all or nothing by construction, and
//! the caller commits it only once every step that can fail (starting a migration) has
//! succeeded.
//!
//! An instance manifest annotated [`ANNOTATION_RESTORED_BY`] (the instance `restore
//! --into` makes) only creates: an instance of that name is refused, not reconfigured.
//! Decided here, against the state the control loop holds while it applies, so no
//! instance can appear between the check and the creation.

use std::collections::BTreeMap;

use nimbus_operator::controlplane::placement::{self, ReplicaSetLoad};
use nimbus_operator::crd::v1alpha1::{DatabaseInstance, PoolMode, Tier, UserRole};
pub use nimbus_operator::k8s::restore::ANNOTATION_RESTORED_BY;

use crate::manifest::{ManifestError, Manifests};
use crate::migrate::MigrationRequest;
use crate::state::{InstanceState, PoolState, ReplicaSetState, State};

/// What became of one object, in kubectl's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Created,
    Configured,
    Unchanged,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Change::Created => "created",
            Change::Configured => "configured",
            Change::Unchanged => "unchanged",
        })
    }
}

/// The records of an existing instance to rewrite in etcd now (a new one gets them from
/// the control loop once its replica set leads).
#[derive(Debug, Clone, PartialEq)]
pub struct Republish {
    pub instance: String,
    /// Users to keep; every other user of the database is deleted (its token stops working).
    pub users: Vec<String>,
}

/// The outcome of an apply, not yet committed.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub state: State,
    /// `pool big created`, `instance shop configured`, ...
    pub lines: Vec<String>,
    pub migrations: Vec<MigrationRequest>,
    pub republish: Vec<Republish>,
}

/// Applies checked manifests to a copy of `st`. The manifests were checked on their own
/// (`manifest::parse`); this checks them against `st` again (`manifest::check_against`)
/// and places new instances.
pub fn plan(st: &State, m: &Manifests) -> Result<Outcome, ManifestError> {
    crate::manifest::check_against(st, m)?;
    let mut next = st.clone();
    let mut out = Outcome { state: State::default(), lines: Vec::new(), migrations: Vec::new(), republish: Vec::new() };
    for (_, pool) in &m.pools {
        let name = pool.metadata.name.clone().unwrap_or_default();
        let wanted = PoolState::of(&pool.spec);
        let change = match next.pools.get(&name) {
            None => Change::Created,
            Some(p) if *p == wanted => Change::Unchanged,
            Some(_) => Change::Configured,
        };
        next.pools.insert(name.clone(), wanted);
        out.lines.push(format!("pool {name} {change}"));
    }
    for (src, dbi) in &m.instances {
        let name = dbi.metadata.name.clone().unwrap_or_default();
        let refuse =
            |field: &str, message: String| ManifestError { location: src.clone(), field: field.into(), message };
        let change = match next.instances.get(&name).cloned() {
            None => {
                let inst = admit(&mut next, dbi).map_err(|e| refuse("spec.replicas", e))?;
                next.instances.insert(name.clone(), inst);
                Change::Created
            }
            Some(_) if dbi.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(ANNOTATION_RESTORED_BY)) => {
                return Err(refuse(
                    "metadata.name",
                    format!(
                        "instance {name} exists: a restore's new instance ({ANNOTATION_RESTORED_BY}) is only created, \
                         never applied over an existing one"
                    ),
                ));
            }
            Some(have) => {
                let mut inst = reconfigure(&have, dbi);
                if let Some(req) = pool_change(&mut next, &name, &have, dbi).map_err(|e| refuse("spec.pool", e))? {
                    inst.wanted_pool = Some(req.to_pool.clone());
                    inst.wanted_replica_set = Some(req.to_replica_set.clone());
                    out.migrations.push(req);
                }
                let change = if inst == have { Change::Unchanged } else { Change::Configured };
                if change == Change::Configured {
                    out.republish.push(Republish {
                        instance: name.clone(),
                        users: dbi.users().into_iter().map(|u| u.name).collect(),
                    });
                }
                next.instances.insert(name.clone(), inst);
                change
            }
        };
        out.lines.push(format!("instance {name} {change}"));
    }
    out.state = next;
    Ok(out)
}

/// Whether an instance gets a replica set of its own: a dedicated tier, or a dedicated pool.
fn dedicated(pool: &PoolState, dbi: &DatabaseInstance) -> bool {
    pool.mode == PoolMode::Dedicated || dbi.spec.tier == Tier::Dedicated
}

/// The replica set of `pool_name` for the instance `name` (made in `st` when new).
fn place(st: &mut State, pool_name: &str, dbi: &DatabaseInstance, name: &str) -> Result<String, String> {
    let pool = st.pool(pool_name).ok_or_else(|| format!("no ResourcePool {pool_name:?}"))?;
    let dedicated = dedicated(&pool, dbi);
    let mode = if dedicated {
        placement::PoolMode::Dedicated
    } else {
        placement::PoolMode::Shared { capacity: pool.databases_per_replica_set }
    };
    // The pool's shared sets with their databases; every other set counts as full, so it
    // is never chosen and its name never reused (names stay distinct across pools).
    let mut counts: BTreeMap<&str, u32> = BTreeMap::new();
    for i in st.instances.values() {
        *counts.entry(i.replica_set.as_str()).or_default() += 1;
    }
    let loads: Vec<ReplicaSetLoad> = st
        .replica_sets
        .iter()
        .map(|(rs, set)| {
            let own = set.pool == pool_name && !set.dedicated;
            let databases = if own { counts.get(rs.as_str()).copied().unwrap_or(0) } else { u32::MAX };
            ReplicaSetLoad { name: rs.clone(), databases }
        })
        .collect();
    let chosen = placement::choose_replica_set(pool_name, mode, &loads, name).name().to_string();
    match st.replica_sets.get(&chosen) {
        // A dedicated set left by a deleted instance of the same name: its own again.
        Some(set) if dedicated && set.pool == pool_name && set.dedicated => {
            if st.instances.iter().any(|(n, i)| i.replica_set == chosen && n != name) {
                return Err(format!("replica set {chosen} is another instance's"));
            }
        }
        Some(set) if dedicated => {
            return Err(format!("replica set {chosen} already belongs to pool {}", set.pool));
        }
        Some(_) => {}
        None => {
            let replicas = if dedicated { dbi.spec.replicas } else { pool.replicas_per_set };
            // The playground's zones are its own (a, b, c): an instance's zone names are
            // for a cluster's nodes.
            let zones = placement::member_zones(&st.zones, &[], replicas.max(0) as u32).map_err(|e| e.to_string())?;
            let set = ReplicaSetState { pool: pool_name.to_owned(), dedicated, zones, ..Default::default() };
            st.replica_sets.insert(chosen.clone(), set);
        }
    }
    Ok(chosen)
}

/// A new instance: placed in its pool, with a token for each user.
fn admit(st: &mut State, dbi: &DatabaseInstance) -> Result<InstanceState, String> {
    let name = dbi.metadata.name.clone().unwrap_or_default();
    let replica_set = place(st, &dbi.spec.pool, dbi, &name)?;
    let empty = InstanceState {
        database: dbi.database(),
        incarnation: crate::state::new_incarnation(),
        pool: dbi.spec.pool.clone(),
        wanted_pool: None,
        wanted_replica_set: None,
        replica_set,
        tokens: BTreeMap::new(),
        token: String::new(),
        read_only_token: String::new(),
        roles: BTreeMap::new(),
        limits: None,
        spec: None,
        migration: None,
    };
    Ok(reconfigure(&empty, dbi))
}

/// An instance with `dbi`'s users, limits and spec: users kept keep their tokens, new
/// users get new ones, users no longer listed lose theirs.
fn reconfigure(have: &InstanceState, dbi: &DatabaseInstance) -> InstanceState {
    let mut tokens = BTreeMap::new();
    let mut roles = BTreeMap::new();
    let (mut token, mut read_only) = (String::new(), String::new());
    for u in dbi.users() {
        let t = match have.tokens.get(&u.name) {
            Some(t) => t.clone(),
            None => nimbus_api::token::new_token(&have.database, &u.name, u.role.into()).0,
        };
        match u.role {
            UserRole::ReadWrite if token.is_empty() => token = t.clone(),
            UserRole::Read if read_only.is_empty() => read_only = t.clone(),
            _ => {}
        }
        roles.insert(u.name.clone(), u.role.into());
        tokens.insert(u.name, t);
    }
    InstanceState {
        tokens,
        roles,
        token,
        read_only_token: read_only,
        limits: Some(dbi.spec.limits.resolve(dbi.spec.tier)),
        spec: Some(dbi.spec.clone()),
        ..have.clone()
    }
}

/// A changed `spec.pool`: the migration to start, with its target replica set chosen (and
/// made in `st` when new). `None` when the instance is where the spec wants it, or already
/// on its way there. Changing the pool again while a migration runs is refused.
fn pool_change(
    st: &mut State,
    name: &str,
    have: &InstanceState,
    dbi: &DatabaseInstance,
) -> Result<Option<MigrationRequest>, String> {
    let wanted = &dbi.spec.pool;
    match &have.wanted_pool {
        Some(w) if w == wanted => return Ok(None),
        Some(w) => {
            return Err(format!("a migration to pool {w} is running: spec.pool can change again once it has ended"));
        }
        None if wanted == &have.pool => return Ok(None),
        None => {}
    }
    let to_replica_set = place(st, wanted, dbi, name)?;
    Ok(Some(MigrationRequest {
        instance: name.to_owned(),
        database: have.database.clone(),
        from_pool: have.pool.clone(),
        from_replica_set: have.replica_set.clone(),
        to_pool: wanted.clone(),
        to_replica_set,
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::manifest::{parse, split_yaml};

    fn manifests(text: &str) -> Manifests {
        parse(&split_yaml(text, "f.yaml").unwrap()).unwrap()
    }

    fn instance(name: &str, spec: &str) -> String {
        format!(
            "apiVersion: nimbus.io/v1alpha1\nkind: DatabaseInstance\nmetadata: {{name: {name}}}\nspec: {spec}\n---\n"
        )
    }

    fn pool(name: &str, spec: &str) -> String {
        format!("apiVersion: nimbus.io/v1alpha1\nkind: ResourcePool\nmetadata: {{name: {name}}}\nspec: {spec}\n---\n")
    }

    fn zones() -> State {
        State { zones: vec!["a".into(), "b".into(), "c".into()], ..Default::default() }
    }

    #[test]
    fn new_instances_fill_their_pools_shared_sets_and_dedicated_ones_get_their_own() {
        let text = pool("small", "{databasesPerReplicaSet: 2}")
            + &pool("big", "{mode: dedicated, replicasPerSet: 5}")
            + &instance("a", "{pool: small}")
            + &instance("b", "{pool: small}")
            + &instance("c", "{pool: small}")
            + &instance("d", "{pool: big, replicas: 5}")
            + &instance("e", "{}");
        let out = plan(&zones(), &manifests(&text)).unwrap();
        let rs = |n: &str| out.state.instances[n].replica_set.clone();
        assert_eq!((rs("a"), rs("b"), rs("c")), ("small-rs0".into(), "small-rs0".into(), "small-rs1".into()));
        assert_eq!(rs("d"), "big-d");
        assert_eq!(rs("e"), "default-rs0");
        assert_eq!(out.state.replica_sets["big-d"].zones.len(), 5);
        assert!(out.state.replica_sets["big-d"].dedicated);
        assert_eq!(out.state.instances["d"].pool, "big");
        assert_eq!(
            out.lines,
            vec![
                "pool small created",
                "pool big created",
                "instance a created",
                "instance b created",
                "instance c created",
                "instance d created",
                "instance e created"
            ]
        );
    }

    #[test]
    fn a_restores_new_instance_is_created_but_never_applied_over_an_existing_one() {
        let made_by_restore = |name: &str, spec: &str| {
            format!(
                "apiVersion: nimbus.io/v1alpha1\nkind: DatabaseInstance\nmetadata: {{name: {name}, annotations: \
                 {{{ANNOTATION_RESTORED_BY}: restore-1}}}}\nspec: {spec}\n---\n"
            )
        };
        let out = plan(&zones(), &manifests(&made_by_restore("copy", "{}"))).unwrap();
        assert_eq!(out.lines, ["instance copy created"]);
        // An instance of the name appeared first (applied by someone else): refused, and
        // it stays as it was.
        let st = plan(&zones(), &manifests(&instance("copy", "{}"))).unwrap().state;
        let e = plan(&st, &manifests(&made_by_restore("copy", "{users: [{name: app}]}"))).unwrap_err();
        assert_eq!(e.field, "metadata.name");
        assert!(e.message.contains("instance copy exists"), "{e}");
        // A plain apply of the same name still configures it.
        let out = plan(&st, &manifests(&instance("copy", "{users: [{name: app}]}"))).unwrap();
        assert_eq!(out.lines, ["instance copy configured"]);
    }

    #[test]
    fn a_shared_pool_never_takes_another_pools_set_or_a_dedicated_one() {
        // Pool `x` dedicated makes `x-rs0` for an instance named `rs0`... with a hash; a
        // dedicated-tier instance in the shared default pool gets `default-solo`.
        let text = instance("solo", "{tier: dedicated}") + &instance("shared", "{}");
        let out = plan(&zones(), &manifests(&text)).unwrap();
        assert_eq!(out.state.instances["solo"].replica_set, "default-solo");
        assert_eq!(out.state.instances["shared"].replica_set, "default-rs0");
    }

    /// Every `read` user is read-only and every `readWrite` user may write, not only the
    /// first of each; and the instance's limits are kept for etcd.
    #[test]
    fn each_user_keeps_its_own_role_and_the_limits_are_kept() {
        let users = "[{name: app}, {name: reader, role: read}, {name: analyst, role: read}, {name: batch}]";
        let text = instance("shop", &format!("{{tier: free, limits: {{qps: 7}}, users: {users}}}"));
        let st = plan(&zones(), &manifests(&text)).unwrap().state;
        let inst = &st.instances["shop"];
        use nimbus_api::etcd::UserRole::{Read, ReadWrite};
        let roles: Vec<_> = ["app", "reader", "analyst", "batch"].iter().map(|u| inst.role(u)).collect();
        assert_eq!(roles, vec![ReadWrite, Read, Read, ReadWrite]);
        assert_eq!(inst.limits.as_ref().unwrap().qps, 7);
        assert_eq!(
            (inst.token.clone(), inst.read_only_token.clone()),
            (inst.tokens["app"].clone(), inst.tokens["reader"].clone())
        );
    }

    #[test]
    fn a_second_apply_keeps_tokens_of_kept_users_and_says_what_changed() {
        let first = instance("shop", "{users: [{name: app}, {name: old, role: read}]}");
        let out = plan(&zones(), &manifests(&first)).unwrap();
        let st = out.state;
        let again = plan(&st, &manifests(&first)).unwrap();
        assert_eq!(again.lines, vec!["instance shop unchanged"]);
        assert!(again.republish.is_empty());

        let second = instance("shop", "{limits: {qps: 9}, users: [{name: app}, {name: new, role: read}]}");
        let out = plan(&st, &manifests(&second)).unwrap();
        assert_eq!(out.lines, vec!["instance shop configured"]);
        let (before, after) = (&st.instances["shop"], &out.state.instances["shop"]);
        assert_eq!(after.tokens["app"], before.tokens["app"]);
        assert!(!after.tokens.contains_key("old"));
        assert!(after.tokens["new"].starts_with("nmb_shop.new."));
        assert_eq!(after.read_only_token, after.tokens["new"]);
        assert_eq!(after.limits.as_ref().unwrap().qps, 9);
        assert_eq!(after.replica_set, before.replica_set);
        assert_eq!(out.republish, vec![Republish { instance: "shop".into(), users: vec!["app".into(), "new".into()] }]);
    }

    #[test]
    fn a_pool_change_asks_for_a_migration_to_a_set_of_the_new_pool() {
        let st = plan(&zones(), &manifests(&instance("shop", "{}"))).unwrap().state;
        let text = pool("big", "{mode: dedicated}") + &instance("shop", "{pool: big}");
        let out = plan(&st, &manifests(&text)).unwrap();
        let req = &out.migrations[0];
        assert_eq!((req.from_replica_set.as_str(), req.to_replica_set.as_str()), ("default-rs0", "big-shop"));
        let inst = &out.state.instances["shop"];
        assert_eq!((inst.pool.as_str(), inst.wanted_pool.as_deref()), ("default", Some("big")));
        // Asked again while it runs: not started twice; another pool meanwhile: refused.
        let again = plan(&out.state, &manifests(&text)).unwrap();
        assert!(again.migrations.is_empty());
        let elsewhere = pool("other", "{}") + &instance("shop", "{pool: other}");
        assert_eq!(plan(&out.state, &manifests(&elsewhere)).unwrap_err().field, "spec.pool");
    }
}
