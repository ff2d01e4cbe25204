//! Start-up recovery of one domain: interrupted operations found in the
//! journal are completed or undone, and the metadata is made to agree with
//! the images (snapshots made by other tools appear; snapshots whose data
//! is gone from every image disappear).

use super::Domain;
use crate::backend::ImageSnapshot;
use crate::error::Result;
use crate::model::{
    validate_name, DiskSnapshotKind, DomainState, MemoryLocation, Snapshot, SnapshotState,
};
use crate::store::{Intent, IntentRecord};

/// Replays the journal, then reconciles metadata and images.
pub fn recover(dom: &Domain) {
    match dom.backend.settle_leftover_jobs() {
        Ok(0) => {}
        Ok(n) => dom.log.line(&format!(
            "recovery: finished {n} block job(s) left by an earlier daemon"
        )),
        Err(e) => dom
            .log
            .line(&format!("recovery: cannot settle leftover block jobs: {e}")),
    }
    match dom.journal.pending() {
        Ok(records) => {
            let mut readable = Vec::new();
            for r in records {
                match r {
                    Ok(record) => readable.push(record),
                    Err(path) => dom.log.line(&format!(
                        "recovery: unreadable intent record {} left in place",
                        path.display()
                    )),
                }
            }
            // A guest left frozen is thawed before anything else.
            dom.take_thaw_records(&mut readable);
            for record in readable {
                replay(dom, record);
            }
        }
        Err(e) => dom
            .log
            .line(&format!("recovery: cannot read the journal: {e}")),
    }
    if dom.backend.refresh_state() == DomainState::Shutoff {
        dom.flush_pending_tag_deletes();
    }
    let pending: Vec<String> = dom
        .store
        .pending_tag_deletes()
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    match dom.backend.list_internal() {
        Ok(mut tags) => {
            tags.retain(|t| !pending.contains(&t.tag));
            reconcile(dom, &tags)
        }
        Err(e) => dom.log.line(&format!(
            "recovery: cannot list the images' snapshots, metadata taken as is: {e}"
        )),
    }
}

fn replay(dom: &Domain, record: IntentRecord) {
    let intent = record.intent.clone();
    let result: Result<&str> = (|| match &intent {
        // Taken out before the replay (see `Domain::take_thaw_records`).
        Intent::Thaw { .. } => Err(crate::error::Error::io(
            "a freeze is thawed by the domain's thread, not replayed",
        )),
        Intent::Create { id, .. } => {
            if dom.store.has_snapshot(id) {
                dom.set_current(id)?;
                Ok("completed")
            } else {
                dom.undo_create(id)?;
                Ok("rolled back")
            }
        }
        Intent::CreateExternal {
            id, overlays, plan, ..
        } => dom.replay_create_external(id, overlays, plan),
        Intent::RevertExternal {
            revert: r,
            overlays,
        } => dom.replay_revert_external(&r.id, overlays, r.left.as_deref(), &r.discard),
        Intent::RevertRelocate { revert: r, moved } => {
            dom.replay_revert_relocate(&r.id, moved, r.left.as_deref(), &r.discard)
        }
        Intent::DeleteExternal { id, candidates } => dom.replay_delete_external(id, candidates),
        Intent::Delete { id } => {
            dom.backend.delete_internal(id)?;
            let snap = dom.forest.read().get(id).cloned();
            if let Some(snap) = snap {
                dom.delete_tags_elsewhere(&snap)?;
            }
            dom.forget_snapshot(id)?;
            Ok("completed")
        }
        Intent::Revert { id, target } => {
            let Some(snap) = dom.forest.read().get(id).cloned() else {
                return Ok("dropped (snapshot gone)");
            };
            let live = dom.backend.refresh_state();
            if live == DomainState::Shutoff {
                // Disks may be half reverted: apply again, leave it stopped.
                dom.backend.apply_disks_offline(&snap.id)?;
                dom.set_current(id)?;
                return Ok(if target == "shutoff" {
                    "completed"
                } else {
                    "completed for the disks; the domain was left stopped"
                });
            }
            // A running QEMU finishes a snapshot-load job by itself.
            dom.set_current(id)?;
            Ok("completed")
        }
    })();
    match result {
        Ok(how) => {
            dom.log.line(&format!(
                "recovery: interrupted {} {how}",
                intent.describe()
            ));
            if let Err(e) = dom.journal.complete(record) {
                dom.log.line(&format!("recovery: cannot clear intent: {e}"));
            }
        }
        Err(e) => dom.log.line(&format!(
            "recovery: interrupted {} not resolved, retried at next start: {e}",
            intent.describe()
        )),
    }
}

fn reconcile(dom: &Domain, tags: &[ImageSnapshot]) {
    let known: Vec<Snapshot> = dom.forest.read().iter().cloned().collect();
    // Internal snapshots the images no longer have.
    for s in &known {
        let internal = s.disks.iter().any(|d| d.kind == DiskSnapshotKind::Internal);
        // Images outside the live chains (other branches) are read directly.
        let elsewhere = || {
            s.disks
                .iter()
                .filter(|d| d.kind == DiskSnapshotKind::Internal)
                .filter_map(|d| d.image.as_ref())
                .any(|img| {
                    dom.images
                        .tags(img)
                        .map(|t| t.iter().any(|t| t.tag == s.id))
                        .unwrap_or(false)
                })
        };
        if internal && !tags.iter().any(|t| t.tag == s.id) && !elsewhere() {
            match dom.forget_snapshot(&s.id) {
                Ok(()) => dom.log.line(&format!(
                    "recovery: snapshot {:?} is gone from the images; removed from the tree",
                    s.name
                )),
                Err(e) => dom
                    .log
                    .line(&format!("recovery: cannot drop {:?}: {e}", s.name)),
            }
        }
    }
    // Internal snapshots made by other tools (qemu-img, virsh): adopt as roots.
    for t in tags {
        if dom.forest.read().get(&t.tag).is_some() {
            continue;
        }
        let name = free_name(dom, &t.tag);
        let has_ram = t.vm_state_size > 0;
        let snap = Snapshot {
            id: t.tag.clone(),
            name: name.clone(),
            description: Some("found in the disk images".into()),
            creation_time: t.date_sec,
            state: if has_ram {
                SnapshotState::Running
            } else {
                SnapshotState::Shutoff
            },
            parent: None,
            memory: if has_ram {
                MemoryLocation::Internal
            } else {
                MemoryLocation::No
            },
            disks: dom.internal_points(),
            domain_xml: None,
            memory_format: Default::default(),
            machine: None,
        };
        let mut forest = dom.forest.write();
        let saved = dom
            .store
            .save_snapshot(&snap, &forest)
            .map_err(|e| e.to_string())
            .and_then(|_| forest.insert(snap).map_err(|e| e.to_string()));
        match saved {
            Ok(()) => dom.log.line(&format!(
                "recovery: adopted snapshot tag {:?} found in the images as {name:?}",
                t.tag
            )),
            Err(e) => dom
                .log
                .line(&format!("recovery: cannot adopt {:?}: {e}", t.tag)),
        }
        drop(forest);
    }
}

/// The tag itself when it is a valid, free name; otherwise a variant.
fn free_name(dom: &Domain, tag: &str) -> String {
    let forest = dom.forest.read();
    let base: String = if validate_name(tag).is_ok() {
        tag.to_owned()
    } else {
        let cleaned: String = tag
            .chars()
            .map(|c| if c == '/' || c.is_control() { '_' } else { c })
            .collect();
        let cleaned = cleaned.trim().trim_start_matches('.').to_owned();
        if cleaned.is_empty() {
            "snapshot".into()
        } else {
            cleaned.chars().take(200).collect()
        }
    };
    if forest.by_name(&base).is_none() {
        return base;
    }
    (2..)
        .map(|n| format!("{base}-{n}"))
        .find(|n| forest.by_name(n).is_none())
        .unwrap_or(base)
}
