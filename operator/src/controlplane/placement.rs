//! Placement: which zones a replica set spans, and which replica set a database lands in.
//!
//! Pure. The rule that makes "every acknowledged write survives any single-zone failure"
//! true: no zone holds a majority of a replica set's voters, so the other zones always
//! keep a quorum.

use std::collections::BTreeSet;

use sha2::Digest;

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PlacementError {
    #[error("failed to place {replicas} replicas: {found} distinct zones found, at least 3 are needed")]
    TooFewZones { replicas: u32, found: usize },
    #[error("failed to place replicas: zone {0:?} is listed twice")]
    DuplicateZone(String),
    #[error("failed to place replicas: {0} replicas requested, 3 or 5 are allowed")]
    BadReplicaCount(u32),
    #[error("failed to place replicas: zone {0:?} is not among the zones of the nodes")]
    UnknownZone(String),
}

/// The zone of each member slot: `replicas` slots spread round-robin over the chosen zones,
/// so with 3 zones and 5 replicas the zones hold 2, 2 and 1 (no zone has a majority).
///
/// `requested` empty means "choose": the first zones in name order of `available`.
pub fn member_zones(available: &[String], requested: &[String], replicas: u32) -> Result<Vec<String>, PlacementError> {
    if replicas != 3 && replicas != 5 {
        return Err(PlacementError::BadReplicaCount(replicas));
    }
    let distinct: BTreeSet<&String> = available.iter().collect();
    let chosen: Vec<String> = if requested.is_empty() {
        distinct.iter().take(replicas as usize).map(|z| (*z).clone()).collect()
    } else {
        let mut seen = BTreeSet::new();
        for z in requested {
            if !seen.insert(z) {
                return Err(PlacementError::DuplicateZone(z.clone()));
            }
            if !available.is_empty() && !distinct.contains(z) {
                return Err(PlacementError::UnknownZone(z.clone()));
            }
        }
        requested.to_vec()
    };
    if chosen.len() < 3 {
        return Err(PlacementError::TooFewZones { replicas, found: chosen.len() });
    }
    Ok((0..replicas as usize).map(|i| chosen[i % chosen.len()].clone()).collect())
}

/// How a pool shares its replica sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// Many databases per replica set, up to a capacity.
    Shared { capacity: u32 },
    /// One replica set per database.
    Dedicated,
}

/// A replica set of a pool and how many databases it holds now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaSetLoad {
    pub name: String,
    pub databases: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    Existing(String),
    New(String),
}

impl Placement {
    pub fn name(&self) -> &str {
        match self {
            Placement::Existing(n) | Placement::New(n) => n,
        }
    }
}

/// The replica set for a new database: in a shared pool the least loaded one with room
/// (ties by name), else a new one; in a dedicated pool always a new one named after the
/// instance. Names are DNS labels short enough for the Pod names built from them.
pub fn choose_replica_set(pool: &str, mode: PoolMode, sets: &[ReplicaSetLoad], instance: &str) -> Placement {
    match mode {
        PoolMode::Dedicated => Placement::New(dedicated_name(pool, instance)),
        PoolMode::Shared { capacity } => {
            let best = sets
                .iter()
                .filter(|s| s.databases < capacity)
                .min_by(|a, b| a.databases.cmp(&b.databases).then_with(|| a.name.cmp(&b.name)));
            match best {
                Some(s) => Placement::Existing(s.name.clone()),
                None => {
                    let taken: BTreeSet<&str> = sets.iter().map(|s| s.name.as_str()).collect();
                    let name = (0..)
                        .map(|n| truncate_label(&format!("{pool}-rs{n}")))
                        .find(|n| !taken.contains(n.as_str()))
                        .unwrap_or_else(|| format!("{pool}-rs"));
                    Placement::New(name)
                }
            }
        }
    }
}

/// Replica-set names become Pod names (`{set}-m{id}`, at most 63 characters): keep them at 50.
pub const MAX_REPLICA_SET_NAME: usize = 50;

/// `s` if it fits; else a prefix and a hash of the whole name, so two long names that
/// share their first 50 characters still name two replica sets.
fn truncate_label(s: &str) -> String {
    if s.len() <= MAX_REPLICA_SET_NAME {
        return s.to_string();
    }
    let hash = hex::encode(&sha2::Sha256::digest(s.as_bytes())[..4]);
    let prefix: String = s.chars().take(MAX_REPLICA_SET_NAME - hash.len() - 1).collect();
    format!("{}-{hash}", prefix.trim_end_matches('-'))
}

/// A dedicated replica set's name: `{pool}-{instance}`, unless that could be a shared
/// replica set's name (`{pool}-rs{n}`, an instance named `rs0`), which gets a hash suffix.
fn dedicated_name(pool: &str, instance: &str) -> String {
    let plain = format!("{pool}-{instance}");
    let shared_like =
        instance.strip_prefix("rs").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    if shared_like {
        let hash = hex::encode(&sha2::Sha256::digest(plain.as_bytes())[..4]);
        return truncate_label(&format!("{plain}-{hash}"));
    }
    truncate_label(&plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_set_names_never_collide_after_truncation() {
        let long = "a".repeat(60);
        let (one, two) = (format!("{long}-one"), format!("{long}-two"));
        let a = choose_replica_set("default", PoolMode::Dedicated, &[], &one).name().to_string();
        let b = choose_replica_set("default", PoolMode::Dedicated, &[], &two).name().to_string();
        assert_ne!(a, b);
        assert!(a.len() <= MAX_REPLICA_SET_NAME && b.len() <= MAX_REPLICA_SET_NAME, "{a} {b}");
        assert!(!a.contains("--") && !a.ends_with('-'), "{a}");
        // A dedicated instance named like a shared replica set does not take its name.
        let shared = choose_replica_set("default", PoolMode::Shared { capacity: 10 }, &[], "x").name().to_string();
        let dedicated = choose_replica_set("default", PoolMode::Dedicated, &[], "rs0").name().to_string();
        assert_eq!(shared, "default-rs0");
        assert_ne!(dedicated, shared);
        // Short names are kept as they are.
        assert_eq!(choose_replica_set("default", PoolMode::Dedicated, &[], "orders").name(), "default-orders");
    }

    fn zones(z: &[&str]) -> Vec<String> {
        z.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn three_replicas_take_three_distinct_zones_in_name_order() {
        let got = member_zones(&zones(&["c", "a", "b", "a", "d"]), &[], 3).unwrap();
        assert_eq!(got, zones(&["a", "b", "c"]));
    }

    #[test]
    fn five_replicas_over_three_zones_leave_no_zone_a_majority() {
        let got = member_zones(&zones(&["a", "b", "c"]), &[], 5).unwrap();
        assert_eq!(got, zones(&["a", "b", "c", "a", "b"]));
        for z in ["a", "b", "c"] {
            assert!(got.iter().filter(|x| *x == z).count() * 2 < got.len());
        }
    }

    #[test]
    fn fewer_than_three_zones_is_refused() {
        assert_eq!(
            member_zones(&zones(&["a", "b", "a"]), &[], 3),
            Err(PlacementError::TooFewZones { replicas: 3, found: 2 })
        );
    }

    #[test]
    fn requested_zones_must_be_distinct_and_exist() {
        let avail = zones(&["a", "b", "c"]);
        assert_eq!(member_zones(&avail, &zones(&["a", "a", "b"]), 3), Err(PlacementError::DuplicateZone("a".into())));
        assert_eq!(member_zones(&avail, &zones(&["a", "b", "x"]), 3), Err(PlacementError::UnknownZone("x".into())));
        assert_eq!(member_zones(&avail, &zones(&["c", "b", "a"]), 3).unwrap(), zones(&["c", "b", "a"]));
        assert_eq!(member_zones(&avail, &[], 4), Err(PlacementError::BadReplicaCount(4)));
    }

    #[test]
    fn a_shared_pool_fills_the_least_loaded_set_with_room() {
        let sets = vec![
            ReplicaSetLoad { name: "p-rs0".into(), databases: 10 },
            ReplicaSetLoad { name: "p-rs1".into(), databases: 3 },
            ReplicaSetLoad { name: "p-rs2".into(), databases: 3 },
        ];
        let mode = PoolMode::Shared { capacity: 10 };
        assert_eq!(choose_replica_set("p", mode, &sets, "x"), Placement::Existing("p-rs1".into()));
    }

    #[test]
    fn a_full_shared_pool_gets_a_new_set_with_a_free_name() {
        let sets = vec![
            ReplicaSetLoad { name: "p-rs0".into(), databases: 2 },
            ReplicaSetLoad { name: "p-rs2".into(), databases: 2 },
        ];
        let mode = PoolMode::Shared { capacity: 2 };
        assert_eq!(choose_replica_set("p", mode, &sets, "x"), Placement::New("p-rs1".into()));
        assert_eq!(choose_replica_set("p", mode, &[], "x"), Placement::New("p-rs0".into()));
    }

    #[test]
    fn a_dedicated_pool_gives_each_instance_its_own_set_with_a_pod_safe_name() {
        let long = "x".repeat(80);
        let p = choose_replica_set("dedicated", PoolMode::Dedicated, &[], &long);
        assert!(matches!(p, Placement::New(_)));
        assert!(p.name().len() <= MAX_REPLICA_SET_NAME);
        assert!(p.name().starts_with("dedicated-x"));
    }
}
