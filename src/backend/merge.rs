//! Merging two adjacent images of a disk's chain, the work behind deleting
//! an external snapshot: `block-commit` / `block-stream` jobs when the
//! running QEMU has the images open, `qemu-img commit` / `rebase`
//! otherwise. Every step can run again after an interruption.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::qemu::{canonical, qmp_err, Conn, LiveDisk, QemuBackend, JOB_TIMEOUT};
use super::{qemu_img, Merge, MergeKind};
use crate::error::{Error, ErrorKind, Result};
use crate::store::Layer;

/// The format nodes the running QEMU has open, by (canonical) file name.
fn format_nodes(conn: &mut Conn) -> Result<HashMap<PathBuf, String>> {
    let nodes = conn.qmp.named_nodes().map_err(qmp_err)?;
    let mut out = HashMap::new();
    for n in nodes {
        if matches!(n.drv.as_str(), "file" | "host_device" | "host_cdrom") {
            continue;
        }
        if let Some(name) = n.node_name {
            out.entry(canonical(Path::new(&n.file))).or_insert(name);
        }
    }
    Ok(out)
}

impl QemuBackend {
    /// See [`super::Backend::merge`].
    pub(super) fn merge_impl(&self, m: &Merge, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
        self.check_intact(&[&m.upper, &m.lower])?;
        if self.is_up()? {
            let done = self.with_qmp(|conn| {
                let nodes = format_nodes(conn)?;
                let upper = nodes.get(&canonical(&m.upper)).cloned();
                let lower = nodes.get(&canonical(&m.lower)).cloned();
                match (upper, lower) {
                    (Some(u), Some(l)) => self.merge_live(conn, m, &u, &l, progress).map(|_| true),
                    (None, None) => Ok(false),
                    _ => Err(Error::io(format!(
                        "QEMU has only one of {} and {} open; cannot merge them",
                        m.upper.display(),
                        m.lower.display()
                    ))),
                }
            })?;
            if done {
                return Ok(());
            }
        }
        self.merge_offline(m, progress)
    }

    /// Refuses to merge when an image's name no longer leads to the file
    /// it did: QEMU reopens a merge's target by name, and qemu-img opens
    /// the images it is given by name. A file vmsnapfs made must still be
    /// that inode; any other must be reachable without a symlink others
    /// may have made.
    fn check_intact(&self, paths: &[&Path]) -> Result<()> {
        for p in paths {
            if self.store.made_id(p).is_some() {
                self.open_made(p, false)?;
            } else {
                qemu_img::pin(p)?;
            }
        }
        Ok(())
    }

    fn merge_live(
        &self,
        conn: &mut Conn,
        m: &Merge,
        upper: &str,
        lower: &str,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        let disks = self.live_disks(&mut conn.qmp)?;
        let disk = disks
            .get(&m.target)
            .ok_or_else(|| Error::io(format!("disk {} is not attached", m.target)))?;
        let upper_is_top = disk
            .chain
            .first()
            .is_some_and(|i| canonical(&i.path) == canonical(&m.upper));
        let error = if let Some(manager) = self.manager.clone() {
            // Through the manager, so that its live definition follows.
            let r = match m.kind {
                MergeKind::Commit => {
                    let top = (!upper_is_top).then_some(m.upper.as_path());
                    progress(0, 0);
                    manager.commit(&m.target, top, &m.lower)
                }
                MergeKind::Stream if upper_is_top => {
                    let below = disk
                        .chain
                        .iter()
                        .position(|i| canonical(&i.path) == canonical(&m.lower))
                        .and_then(|i| disk.chain.get(i + 1))
                        .map(|i| i.path.clone());
                    progress(0, 0);
                    manager.pull(&m.target, below.as_deref())
                }
                // libvirt streams into the active layer only; nothing
                // is started.
                MergeKind::Stream => Err(Error::new(
                    ErrorKind::Unsupported,
                    format!(
                        "{} cannot stream {} into {}, which is not the active layer; \
                         delete this snapshot while the domain is stopped",
                        manager.describe(),
                        m.lower.display(),
                        m.upper.display()
                    ),
                )),
            };
            if let Err(e) = &r {
                if e.kind == ErrorKind::Unsupported {
                    return r;
                }
            }
            r.err().map(|e| e.message)
        } else {
            self.merge_qmp(conn, m, disk, upper_is_top, (upper, lower), progress)?
        };
        conn.nodes = None;
        // QEMU reopened the image it wrote by name: it must hold the file
        // checked above (see `check_intact`).
        let written = match m.kind {
            MergeKind::Commit => &m.lower,
            MergeKind::Stream => &m.upper,
        };
        self.check_opened_made(conn, &[written.as_path()])?;
        if let Some(e) = error {
            return Err(Error::io(format!(
                "merging {} and {}: {e}",
                m.upper.display(),
                m.lower.display()
            )));
        }
        if m.kind == MergeKind::Commit && upper_is_top {
            let format = self.format_of(&m.lower);
            self.set_layers(&[(
                m.target.clone(),
                Layer {
                    path: m.lower.clone(),
                    format,
                },
            )])?;
        }
        Ok(())
    }

    /// The block job of [`Self::merge_live`] over QMP: the error the job
    /// ended with, if it failed.
    fn merge_qmp(
        &self,
        conn: &mut Conn,
        m: &Merge,
        disk: &LiveDisk,
        upper_is_top: bool,
        (upper, lower): (&str, &str),
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Option<String>> {
        let job = format!("vmsnapfs-merge-{}", std::process::id());
        Ok(match m.kind {
            MergeKind::Commit if upper_is_top => {
                conn.qmp
                    .block_commit(&job, upper, None, Some(lower))
                    .map_err(qmp_err)?;
                conn.qmp
                    .wait_job_completing(&job, JOB_TIMEOUT, &mut *progress)
                    .map_err(qmp_err)?
            }
            MergeKind::Commit => {
                conn.qmp
                    .block_commit(&job, &disk.node, Some(upper), Some(lower))
                    .map_err(qmp_err)?;
                conn.qmp
                    .wait_job(&job, JOB_TIMEOUT, &mut *progress)
                    .map_err(qmp_err)?
            }
            MergeKind::Stream => {
                let below = disk
                    .chain
                    .iter()
                    .position(|i| canonical(&i.path) == canonical(&m.lower))
                    .and_then(|i| disk.chain.get(i + 1))
                    .map(|i| canonical(&i.path));
                let nodes = format_nodes(conn)?;
                let base = below.and_then(|b| nodes.get(&b).cloned());
                conn.qmp
                    .block_stream(&job, upper, base.as_deref())
                    .map_err(qmp_err)?;
                conn.qmp
                    .wait_job(&job, JOB_TIMEOUT, &mut *progress)
                    .map_err(qmp_err)?
            }
        })
    }

    fn merge_offline(&self, m: &Merge, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
        let lower_chain = qemu_img::chain(&m.lower, &self.format_of(&m.lower))?;
        let lower_format = lower_chain
            .first()
            .map(|i| i.format.clone())
            .unwrap_or_else(|| "qcow2".into());
        match m.kind {
            MergeKind::Commit => {
                // Into the upper image's backing (which must be `lower`).
                let upper_chain = qemu_img::chain(&m.upper, "qcow2")?;
                let backing = upper_chain.get(1).map(|i| canonical(&i.path));
                if backing.as_ref() != Some(&canonical(&m.lower)) {
                    return Err(Error::io(format!(
                        "{} does not back onto {}",
                        m.upper.display(),
                        m.lower.display()
                    )));
                }
                progress(0, 0);
                qemu_img::commit(&m.upper, true)?;
                for a in &m.above {
                    qemu_img::rebase_unsafe(a, &m.lower, &lower_format)?;
                }
                let active = self.layers.lock().get(&m.target).cloned();
                if active.is_some_and(|l| canonical(&l.path) == canonical(&m.upper)) {
                    self.set_layers(&[(
                        m.target.clone(),
                        Layer {
                            path: m.lower.clone(),
                            format: lower_format,
                        },
                    )])?;
                }
                Ok(())
            }
            MergeKind::Stream => {
                let upper_chain = qemu_img::chain(&m.upper, "qcow2")?;
                let backing = upper_chain.get(1).map(|i| canonical(&i.path));
                if backing.as_ref() != Some(&canonical(&m.lower)) {
                    // Already streamed.
                    return Ok(());
                }
                let (base, base_format) = match lower_chain.get(1) {
                    Some(b) => (b.path.clone().into_os_string(), b.format.clone()),
                    None => (Default::default(), String::new()),
                };
                use std::ffi::OsStr;
                let mut args: Vec<&OsStr> = ["rebase", "-f", "qcow2"].map(OsStr::new).to_vec();
                if !base_format.is_empty() {
                    args.extend([OsStr::new("-F"), OsStr::new(&base_format)]);
                }
                args.extend([OsStr::new("-b"), base.as_os_str(), m.upper.as_os_str()]);
                progress(0, 0);
                qemu_img::run_for(&args, qemu_img::DATA_TIMEOUT).map(drop)
            }
        }
    }
}
