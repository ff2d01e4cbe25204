//! An in-memory hypervisor and image store for the domain's unit tables:
//! the decisions of revert and delete (which image is kept, merged or
//! removed; EPERM, EBUSY) without a QEMU. Image files exist (empty, in a
//! temporary directory) so that paths resolve and removals can be seen;
//! their chains, tags and data live in memory. Real-QEMU tests in
//! `tests/` remain the proof that each operation works.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::backend::qemu_img::ChainImage;
use crate::backend::{
    Backend, ExternalOutcome, ExternalPlan, ExternalRevert, ImageSnapshot, Images, Merge,
    MergeKind, OnMade, Unreachable,
};
use crate::error::{Error, Result};
use crate::model::{DiskDef, DomainState, SnapshotState};

/// One image: its backing image, internal snapshots and own data.
#[derive(Debug, Clone, Default)]
pub struct FakeImage {
    /// The image below it.
    pub backing: Option<PathBuf>,
    /// Its format.
    pub format: String,
    /// Its internal snapshots (tag, RAM saved).
    pub tags: Vec<(String, bool)>,
    /// Bytes it holds itself.
    pub own: u64,
}

/// Images in memory, by path.
#[derive(Default)]
pub struct FakeImages {
    /// Every image.
    pub images: Mutex<HashMap<PathBuf, FakeImage>>,
    /// The changes made, in words (`apply vda.qcow2 tag`).
    pub calls: Mutex<Vec<String>>,
}

fn name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl FakeImages {
    /// Adds an image and makes its (empty) file.
    pub fn add(&self, path: &Path, image: FakeImage) {
        std::fs::write(path, b"").expect("fake image file");
        self.images.lock().insert(path.to_owned(), image);
    }

    fn get(&self, p: &Path) -> Result<FakeImage> {
        self.images
            .lock()
            .get(p)
            .cloned()
            .ok_or_else(|| Error::io(format!("{}: no such image", p.display())))
    }
}

impl Images for FakeImages {
    fn chain(&self, image: &Path, format: &str) -> Result<Vec<ChainImage>> {
        let mut out = Vec::new();
        let mut next = Some((image.to_owned(), format.to_owned()));
        while let Some((path, format)) = next {
            let i = self.get(&path)?;
            out.push(ChainImage {
                path: path.clone(),
                format,
                snapshots: i
                    .tags
                    .iter()
                    .map(|(t, ram)| ImageSnapshot {
                        tag: t.clone(),
                        vm_state_size: u64::from(*ram),
                        date_sec: 0,
                    })
                    .collect(),
            });
            next = i.backing.map(|b| {
                let f = self.get(&b).map(|x| x.format).unwrap_or_default();
                (b, f)
            });
        }
        Ok(out)
    }

    fn tags(&self, image: &Path) -> Result<Vec<ImageSnapshot>> {
        Ok(self
            .chain(image, "qcow2")?
            .into_iter()
            .next()
            .map(|c| c.snapshots)
            .unwrap_or_default())
    }

    fn own_bytes(&self, image: &Path, _format: &str) -> Result<u64> {
        Ok(self.get(image)?.own)
    }

    fn copy_above_backing(&self, image: &Path, copy: &Path, made: OnMade) -> Result<()> {
        let src = self.get(image)?;
        let file = crate::store::owned::create_new(copy, 0o600)?;
        made(crate::store::owned::id_of(&file)?)?;
        self.images.lock().insert(
            copy.to_owned(),
            FakeImage {
                backing: src.backing,
                format: "qcow2".into(),
                tags: Vec::new(),
                own: src.own,
            },
        );
        self.calls
            .lock()
            .push(format!("copy {} {}", name(image), name(copy)));
        Ok(())
    }

    fn rebase_unsafe(&self, image: &Path, backing: &Path, _format: &str) -> Result<()> {
        let mut all = self.images.lock();
        let i = all
            .get_mut(image)
            .ok_or_else(|| Error::io("rebase of an unknown image"))?;
        i.backing = Some(backing.to_owned());
        self.calls
            .lock()
            .push(format!("rebase {} {}", name(image), name(backing)));
        Ok(())
    }

    fn apply_tag(&self, image: &Path, tag: &str) -> Result<()> {
        if !self.get(image)?.tags.iter().any(|(t, _)| t == tag) {
            return Err(Error::io(format!("{tag} is not in {}", image.display())));
        }
        self.calls
            .lock()
            .push(format!("apply {} {tag}", name(image)));
        Ok(())
    }
}

/// A hypervisor in memory: a state, each disk's active layer, the calls.
pub struct FakeBackend {
    /// Where the images are.
    pub images: Arc<FakeImages>,
    /// The domain's state.
    pub state: Mutex<DomainState>,
    /// Each disk's active layer.
    pub active: Mutex<Vec<DiskDef>>,
    /// What was asked, in words (`stop`, `start loadvm=... paused`).
    pub calls: Mutex<Vec<String>>,
    /// Whether a command line is known.
    pub can_start: bool,
    /// Set: the hypervisor cannot change its disks now, and why.
    pub unavailable: Mutex<Option<String>>,
}

impl FakeBackend {
    /// A domain with `disks`, in state `state`.
    pub fn new(images: Arc<FakeImages>, disks: Vec<DiskDef>, state: DomainState) -> Self {
        FakeBackend {
            images,
            state: Mutex::new(state),
            active: Mutex::new(disks),
            calls: Mutex::new(Vec::new()),
            can_start: true,
            unavailable: Mutex::new(None),
        }
    }

    /// A disk switch inside `hook`, recorded as a call `switch`.
    fn switch(&self, hook: Option<&dyn crate::backend::SwitchHook>) -> Result<()> {
        if hook.is_none() {
            return Ok(());
        }
        crate::backend::hooked(hook, || {
            self.call("switch".into());
            Ok(())
        })
    }

    fn call(&self, what: String) {
        self.calls.lock().push(what);
    }

    fn up(&self) -> bool {
        *self.state.lock() != DomainState::Shutoff
    }
}

impl Backend for FakeBackend {
    fn refresh_state(&self) -> DomainState {
        *self.state.lock()
    }

    fn try_refresh_state(&self) -> Option<DomainState> {
        Some(*self.state.lock())
    }

    fn list_internal(&self) -> Result<Vec<ImageSnapshot>> {
        let mut all: Vec<ImageSnapshot> = Vec::new();
        for d in self.active.lock().iter() {
            for t in self.images.tags(&d.source)? {
                if !all.iter().any(|a| a.tag == t.tag) {
                    all.push(t);
                }
            }
        }
        Ok(all)
    }

    fn create_internal(
        &self,
        tag: &str,
        live: DomainState,
        memory: bool,
        hook: Option<&dyn crate::backend::SwitchHook>,
    ) -> Result<SnapshotState> {
        let ram = memory && live != DomainState::Shutoff;
        let hook = hook.filter(|_| live == DomainState::Running && !ram);
        self.switch(hook)?;
        for d in self.active.lock().iter() {
            if let Some(i) = self.images.images.lock().get_mut(&d.source) {
                i.tags.push((tag.to_owned(), ram));
            }
        }
        self.call(format!("create-internal ram={ram}"));
        Ok(match (live, ram) {
            (DomainState::Shutoff, _) => SnapshotState::Shutoff,
            (_, false) => SnapshotState::DiskSnapshot,
            (DomainState::Paused, true) => SnapshotState::Paused,
            (_, true) => SnapshotState::Running,
        })
    }

    fn delete_internal(&self, tag: &str) -> Result<()> {
        for d in self.active.lock().iter() {
            if let Some(i) = self.images.images.lock().get_mut(&d.source) {
                i.tags.retain(|(t, _)| t != tag);
            }
        }
        self.call("delete-internal".into());
        Ok(())
    }

    fn delete_tag_in(&self, image: &Path, tag: &str) -> Result<bool> {
        if let Some(i) = self.images.images.lock().get_mut(image) {
            i.tags.retain(|(t, _)| t != tag);
        }
        Ok(true)
    }

    fn set_active_layers(&self, images: &[(String, PathBuf)]) -> Result<()> {
        let mut active = self.active.lock();
        for (target, image) in images {
            if let Some(d) = active.iter_mut().find(|d| &d.target == target) {
                d.source = image.clone();
                d.format = "qcow2".into();
            }
        }
        Ok(())
    }

    fn tag_presence(&self, tag: &str) -> Result<(usize, usize)> {
        let active = self.active.lock().clone();
        let mut present = 0;
        for d in &active {
            if self.images.tags(&d.source)?.iter().any(|t| t.tag == tag) {
                present += 1;
            }
        }
        Ok((present, active.len()))
    }

    fn load_checkpoint_live(&self, _tag: &str) -> Result<()> {
        self.call("load-live".into());
        Ok(())
    }

    fn apply_disks_offline(&self, tag: &str) -> Result<()> {
        for d in self.active.lock().clone() {
            self.images.apply_tag(&d.source, tag)?;
        }
        self.call("apply-offline".into());
        Ok(())
    }

    fn stop_process(&self) -> Result<()> {
        *self.state.lock() = DomainState::Shutoff;
        self.call("stop".into());
        Ok(())
    }

    fn start_process(&self, loadvm: Option<&str>, paused: bool) -> Result<()> {
        if !self.can_start {
            return Err(Error::io("no command line"));
        }
        *self.state.lock() = if paused {
            DomainState::Paused
        } else {
            DomainState::Running
        };
        self.call(format!(
            "start{}{}",
            if loadvm.is_some() { " loadvm" } else { "" },
            if paused { " paused" } else { "" }
        ));
        Ok(())
    }

    fn set_running(&self, running: bool) -> Result<()> {
        *self.state.lock() = if running {
            DomainState::Running
        } else {
            DomainState::Paused
        };
        self.call(if running { "cont" } else { "pause" }.into());
        Ok(())
    }

    fn unreachable(&self) -> Option<Unreachable> {
        None
    }

    fn take_notes(&self) -> Vec<String> {
        Vec::new()
    }

    fn space_shortage(&self) -> Option<String> {
        None
    }

    fn can_start(&self) -> bool {
        self.can_start
    }

    fn start_argv(&self) -> Result<Vec<String>> {
        Ok(vec!["qemu-system-x86_64".into()])
    }

    fn active_disks(&self) -> Vec<DiskDef> {
        self.active.lock().clone()
    }

    fn create_external(
        &self,
        plan: &ExternalPlan,
        live: DomainState,
        hook: Option<&dyn crate::backend::SwitchHook>,
    ) -> Result<ExternalOutcome> {
        let hook = hook.filter(|_| live == DomainState::Running && plan.memory.is_none());
        self.switch(hook)?;
        let mut points = Vec::new();
        let mut active = self.active.lock();
        for (target, overlay) in &plan.overlays {
            let d = active
                .iter_mut()
                .find(|d| &d.target == target)
                .ok_or_else(|| Error::io("unknown disk"))?;
            self.images.add(
                overlay,
                FakeImage {
                    backing: Some(d.source.clone()),
                    format: "qcow2".into(),
                    ..Default::default()
                },
            );
            points.push((target.clone(), d.source.clone()));
            d.source = overlay.clone();
            d.format = "qcow2".into();
        }
        let memory = plan.memory.is_some() && live != DomainState::Shutoff;
        if let Some(m) = plan.memory.as_ref().filter(|_| memory) {
            std::fs::write(m, b"").map_err(Error::from)?;
        }
        self.call(format!("create-external memory={memory}"));
        Ok(ExternalOutcome {
            state: match (live, memory) {
                (DomainState::Shutoff, _) => SnapshotState::Shutoff,
                (_, false) => SnapshotState::DiskSnapshot,
                (DomainState::Paused, true) => SnapshotState::Paused,
                (_, true) => SnapshotState::Running,
            },
            points,
            memory_saved: memory,
            note: None,
            paused_for: None,
            pause_steps: None,
            machine: None,
            memory_format: None,
        })
    }

    fn undo_external(&self, _plan: &ExternalPlan) -> Result<()> {
        Err(Error::io("the fake does not undo external snapshots"))
    }

    fn settle_external(&self, plan: &ExternalPlan) -> Result<bool> {
        let active = self.active.lock();
        Ok(plan
            .overlays
            .iter()
            .any(|(t, o)| active.iter().any(|d| &d.target == t && &d.source == o)))
    }

    fn revert_external(&self, revert: &ExternalRevert) -> Result<()> {
        let up = self.up();
        let to_up = revert.target != DomainState::Shutoff;
        if up && (!to_up || revert.memory.is_some()) {
            self.stop_process()?;
        }
        let images: Vec<(String, PathBuf)> = revert
            .branches
            .iter()
            .map(|(t, _, o)| (t.clone(), o.clone()))
            .collect();
        self.set_active_layers(&images)?;
        if up && to_up && revert.memory.is_none() {
            self.call("switch-devices".into());
            self.set_running(revert.target == DomainState::Running)?;
        } else if to_up {
            self.start_process(
                revert.memory.as_ref().map(|_| "memory"),
                revert.target == DomainState::Paused,
            )?;
        }
        Ok(())
    }

    fn prepare_overlays(&self, branches: &[(String, PathBuf, PathBuf, String)]) -> Result<()> {
        for (_, point, overlay, format) in branches {
            let _ = format;
            self.images.add(
                overlay,
                FakeImage {
                    backing: Some(point.clone()),
                    format: "qcow2".into(),
                    ..Default::default()
                },
            );
        }
        Ok(())
    }

    fn disks_unavailable(&self) -> Option<String> {
        self.unavailable.lock().clone()
    }

    fn settle_leftover_jobs(&self) -> Result<usize> {
        Ok(0)
    }

    fn merge(&self, m: &Merge, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
        progress(0, 1);
        let mut all = self.images.images.lock();
        let lower = all.get(&m.lower).cloned().unwrap_or_default();
        let upper = all.get(&m.upper).cloned().unwrap_or_default();
        match m.kind {
            MergeKind::Commit => {
                if let Some(l) = all.get_mut(&m.lower) {
                    l.own += upper.own;
                }
                for a in &m.above {
                    if let Some(i) = all.get_mut(a) {
                        i.backing = Some(m.lower.clone());
                    }
                }
                let mut active = self.active.lock();
                for d in active.iter_mut().filter(|d| d.source == m.upper) {
                    d.source = m.lower.clone();
                }
            }
            MergeKind::Stream => {
                if let Some(u) = all.get_mut(&m.upper) {
                    u.own += lower.own;
                    u.backing = lower.backing.clone();
                }
            }
        }
        drop(all);
        progress(1, 1);
        self.call(format!(
            "{} {} {}",
            match m.kind {
                MergeKind::Commit => "commit",
                MergeKind::Stream => "stream",
            },
            name(&m.upper),
            name(&m.lower)
        ));
        Ok(())
    }
}
