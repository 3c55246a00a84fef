//! A restore's switch (`ImportStep::Publish`, `docs/design/0004-backup.md`, "Restore"):
//! the staging database `{into}~restore`, imported on the replica set serving `into`, is
//! published into `into` by one Raft entry, applied as one write batch, so a reader (who
//! takes a snapshot and the catalog together, `Engine::commit`) sees `into`'s collections
//! as they were or as restored, never half of it.
//!
//! The entry is the staging database's (`ctx.db`); `into` is written through
//! [`Ctx::in_database`], as ordinary changes: each replaced or dropped collection a
//! `DropCollection`, each published one a `CreateCollection`, a `CreateIndex` per index and
//! a `Put` per document, in `into`'s oplog at this entry's index, so a hot migration's
//! catch-up and the backup archive reproduce the result. Keys are by collection name, so
//! the documents are rewritten, not renamed: each with its index entries, and its checksum
//! hash recomputed under its new collection name (`DocSum::of` includes it). Published
//! indexes are ready at once (every entry is written here); a staging index still building
//! refuses the `Publish` with `Unavailable`, retryable: the leader's index builder drives
//! the staging database's builds like any other's. Then the staging database is dropped as
//! `Abort` drops an import, and the outcome recorded, so a repeated `Publish` answers
//! `Done` and changes nothing. `into`'s route epoch and idempotency records stay.
//!
//! Every refusal is decided before or while the batch is built; the apply loop clears the
//! batch and the catalog delta of a refused command, so nothing of it is written.

use std::collections::{BTreeMap, BTreeSet};

use nimbus_api::admin::OplogOp;
use nimbus_api::migration::{PublishedCollection, restore_staging_db};
use nimbus_api::path::{CollName, DbName};
use nimbus_api::{ApiError, ErrorCode};
use rocksdb::{Direction, IteratorMode, ReadOptions};
use serde_json::Value;
use serde_json::value::RawValue;

use super::apply::{Ctx, Refusal};
use super::catalog::{CollectionMeta, IndexSpec, KEY_VERSION};
use super::checksum::DocSum;
use super::command::WriteOp;
use super::engine::{Engine, decode};
use super::keys::{self, CF_DOCS};
use crate::doc::keycode::prefix_end;

/// What one `Publish` asks, checked against the staging database: which staging collection
/// becomes which collection of `into`, and which of `into`'s collections go.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct PublishPlan {
    /// (staging collection, collection of `into`), in the order given.
    pub(crate) moves: Vec<(String, String)>,
    /// Collections of `into` dropped (replaced ones included).
    pub(crate) drops: BTreeSet<String>,
}

/// Decides what a `Publish` does from the two catalogs (`staging`'s and `into`'s
/// collection names), or why it is refused. Pure: the apply step executes it.
pub(crate) fn plan_publish(
    into: &str,
    whole: bool,
    collections: &[PublishedCollection],
    replace: bool,
    staging: &BTreeSet<String>,
    current: &BTreeSet<String>,
) -> Result<PublishPlan, ApiError> {
    if whole {
        if !collections.is_empty() {
            return Err(ApiError::bad_request(
                "a whole Publish names no collections: it publishes every collection of the import",
            ));
        }
        // `into` becomes exactly the import: every collection of it goes (those the import
        // has are replaced), whatever `replace` says.
        let moves = staging.iter().map(|c| (c.clone(), c.clone())).collect();
        return Ok(PublishPlan { moves, drops: current.clone() });
    }
    if collections.is_empty() {
        return Err(ApiError::bad_request("Publish names no collections: give collections, or whole"));
    }
    let mut targets = BTreeSet::new();
    let mut drops = BTreeSet::new();
    for c in collections {
        if !staging.contains(&c.from) {
            return Err(ApiError::bad_request(format!(
                "collection {} is not in the import {}: nothing to publish as {}",
                c.from,
                restore_staging_db(into),
                c.to
            )));
        }
        CollName::new(&c.to)?;
        if !targets.insert(c.to.clone()) {
            return Err(ApiError::bad_request(format!("collection {} is published twice", c.to)));
        }
        if current.contains(&c.to) {
            if !replace {
                return Err(ApiError::bad_request(format!(
                    "collection {} exists in database {into}: publish with replace to replace it, or under another name",
                    c.to
                )));
            }
            drops.insert(c.to.clone());
        }
    }
    let moves = collections.iter().map(|c| (c.from.clone(), c.to.clone())).collect();
    Ok(PublishPlan { moves, drops })
}

impl Engine {
    /// Publishes the staging database `ctx.db` (incoming for the caller's import, checked
    /// by the caller) into `into`; the caller then drops it. See the module's documentation.
    pub(crate) fn publish(
        &self,
        ctx: &mut Ctx<'_>,
        into: &str,
        whole: bool,
        collections: &[PublishedCollection],
        replace: bool,
    ) -> Result<(), Refusal> {
        let (staging, current) = {
            let catalog = self.catalog_read();
            if catalog.incoming.contains_key(into) {
                return Err(ApiError::bad_request(format!(
                    "database {into} is itself being imported here: it cannot be published into"
                ))
                .into());
            }
            let staging: BTreeMap<String, CollectionMeta> = catalog.dbs.get(ctx.db).cloned().unwrap_or_default();
            let current: BTreeSet<String> =
                catalog.dbs.get(into).map(|c| c.keys().cloned().collect()).unwrap_or_default();
            (staging, current)
        };
        let names: BTreeSet<String> = staging.keys().cloned().collect();
        let plan = plan_publish(into, whole, collections, replace, &names, &current)?;
        for (from, _) in &plan.moves {
            let meta = staging.get(from).map(|m| m.indexes.as_slice()).unwrap_or_default();
            if let Some(ix) = meta.iter().find(|ix| !ix.is_ready()) {
                return Err(ApiError::new(
                    ErrorCode::Unavailable,
                    format!(
                        "index {} of collection {from} of the import is still being built: retry the Publish once it is ready",
                        ix.name
                    ),
                )
                .into());
            }
        }
        let staging_db = ctx.db.to_owned();
        // Counted over every document moved, refused at the first byte past the bound.
        let bound = self.options.max_publish_bytes;
        ctx.in_database(self, into, |ctx| {
            for coll in &plan.drops {
                self.apply_op(ctx, &WriteOp::DropCollection { coll: coll.clone() })?;
            }
            let mut bytes = 0u64;
            for (from, to) in &plan.moves {
                let indexes = staging.get(from).map(|m| m.indexes.as_slice()).unwrap_or_default();
                self.publish_collection(ctx, &staging_db, from, to, indexes, &mut bytes, bound)?;
            }
            Ok(())
        })
    }

    /// Creates `to` in `ctx.db` with the indexes `indexes` (ready) and every document of
    /// `staging`'s `from`, counting their bytes into `bytes` against `bound`.
    #[allow(clippy::too_many_arguments)]
    fn publish_collection(
        &self,
        ctx: &mut Ctx<'_>,
        staging: &str,
        from: &str,
        to: &str,
        indexes: &[IndexSpec],
        bytes: &mut u64,
        bound: u64,
    ) -> Result<(), Refusal> {
        let mut meta = self.ensure_collection(ctx, to);
        for ix in indexes {
            let ix = IndexSpec { multikey: false, build: None, key_version: KEY_VERSION, ..ix.clone() };
            self.oplog(ctx, Some(to), OplogOp::CreateIndex { spec: serde_json::to_value(&ix).unwrap_or_default() });
            meta.indexes.push(ix);
        }
        let prefix = keys::coll_prefix(staging, from);
        let target = keys::coll_prefix(ctx.db, to);
        let mut ro = ReadOptions::default();
        if let Some(end) = prefix_end(&prefix) {
            ro.set_iterate_upper_bound(end);
        }
        // Each document is read once: its blocks would only push hot ones out of the cache.
        ro.fill_cache(false);
        for item in self.db.iterator_cf_opt(self.cf(CF_DOCS), ro, IteratorMode::From(&prefix, Direction::Forward)) {
            let (k, v) = item?;
            *bytes += v.len() as u64;
            if *bytes > bound {
                return Err(ApiError::bad_request(format!(
                    "the import holds more than {bound} bytes of documents, more than one Publish moves into database {} (it is one write on every member): restore into a new database instance instead",
                    ctx.db
                ))
                .into());
            }
            let id_enc = &k[prefix.len()..];
            let doc: Value = decode("document", &v)?;
            let raw: Box<RawValue> = decode("document", &v)?;
            for ix in meta.indexes.iter_mut() {
                self.add_index_entries(ctx, to, ix, &doc, id_enc)?;
            }
            let mut key = target.clone();
            key.extend_from_slice(id_enc);
            ctx.batch.put_cf(self.cf(CF_DOCS), &key, &v);
            meta.documents += 1;
            if let Some(sum) = &mut meta.checksum {
                sum.add(DocSum::of(to, &doc));
            }
            self.oplog_put(ctx, to, &doc["_id"], &raw);
        }
        ctx.metas.insert(to.to_owned(), meta);
        Ok(())
    }
}

/// Checks that a `Publish` into `into` is sent to its staging database (`db`).
pub(crate) fn check_staging(db: &str, into: &str) -> Result<(), ApiError> {
    DbName::new(into)?;
    let staging = restore_staging_db(into);
    if db != staging {
        return Err(ApiError::bad_request(format!(
            "a Publish into {into} is applied to its staging database {staging}, not to {db}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn pc(from: &str, to: &str) -> PublishedCollection {
        PublishedCollection { from: from.into(), to: to.into() }
    }

    #[test]
    fn a_whole_publish_drops_every_current_collection_and_moves_every_imported_one() {
        let plan = plan_publish("d", true, &[], false, &set(&["a", "b"]), &set(&["b", "x"])).unwrap();
        assert_eq!(plan.moves, vec![("a".into(), "a".into()), ("b".into(), "b".into())]);
        assert_eq!(plan.drops, set(&["b", "x"]));
        let e = plan_publish("d", true, &[pc("a", "a")], false, &set(&["a"]), &set(&[])).unwrap_err();
        assert!(e.message.contains("names no collections"), "{e:?}");
    }

    #[test]
    fn a_collection_publish_checks_sources_targets_and_replacement() {
        let (staging, current) = (set(&["a", "b"]), set(&["a", "keep"]));
        let plan = plan_publish("d", false, &[pc("a", "a2")], false, &staging, &current).unwrap();
        assert_eq!(plan.moves, vec![("a".into(), "a2".into())]);
        assert!(plan.drops.is_empty());
        let e = plan_publish("d", false, &[pc("zz", "a2")], false, &staging, &current).unwrap_err();
        assert!(e.message.contains("collection zz is not in the import d~restore"), "{e:?}");
        let e = plan_publish("d", false, &[pc("a", "a")], false, &staging, &current).unwrap_err();
        assert!(e.message.contains("collection a exists in database d"), "{e:?}");
        let plan = plan_publish("d", false, &[pc("a", "a")], true, &staging, &current).unwrap();
        assert_eq!(plan.drops, set(&["a"]));
        let e = plan_publish("d", false, &[pc("a", "t"), pc("b", "t")], true, &staging, &current).unwrap_err();
        assert!(e.message.contains("published twice"), "{e:?}");
        assert!(plan_publish("d", false, &[pc("a", "bad\0name")], true, &staging, &current).is_err());
        assert!(plan_publish("d", false, &[], true, &staging, &current).is_err());
    }

    #[test]
    fn a_publish_applies_to_the_staging_database_only() {
        assert!(check_staging("shop~restore", "shop").is_ok());
        assert!(check_staging("shop", "shop").is_err());
        assert!(check_staging("other~restore", "shop").is_err());
        assert!(check_staging("shop~restore~restore", "shop~restore").is_err());
        // A verification's scratch copy is never published, whatever `into` is named.
        assert!(check_staging("shop~verify", "shop").is_err());
        assert!(check_staging("shop~verify", "shop~verify").is_err());
        assert!(check_staging("shop~verify~restore", "shop~verify").is_err());
    }
}
