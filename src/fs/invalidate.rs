//! Keeps the kernel's caches true. Names and attributes are cached for
//! [`super::STABLE_TTL`]; when a domain's snapshots change behind the
//! kernel's back (a subtree delete, a `.create`, a revert's `left-*`
//! snapshot, recovery, a rename), every inode the kernel holds in that
//! domain is looked at again: a name that no longer leads to it is
//! invalidated (`FUSE_NOTIFY_INVAL_ENTRY`), and its attributes are
//! dropped (`FUSE_NOTIFY_INVAL_INODE`). Numbers the kernel holds no
//! lookup on are forgotten once their node is gone.
//!
//! Notifications go out from one thread of their own, never from a FUSE
//! request handler: an entry invalidation takes the directory's lock,
//! which the kernel holds while it waits for our answer to a mkdir,
//! rmdir or rename. A write to a control file (`delete`, `revert`,
//! `.create`) waits for the notifications before it returns, since the
//! kernel holds no directory lock then; mkdir, rmdir and rename only ask.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use fuser::{INodeNo, Notifier};
use parking_lot::{Condvar, Mutex};

use super::inode::Node;
use super::Inner;

/// How often the domains are looked at for changes made by nobody's
/// request (recovery, the state poll).
const POLL: Duration = Duration::from_millis(250);
/// How long a write to a control file waits for its notifications.
const SYNC_WAIT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Progress {
    asked: u64,
    done: u64,
}

/// The queue of the invalidation thread.
#[derive(Default)]
pub(super) struct Invalidator {
    progress: Mutex<Progress>,
    cv: Condvar,
    notifier: OnceLock<Notifier>,
}

impl Invalidator {
    /// Starts the thread that sends notifications through `notifier`
    /// for the filesystem `fs`; it ends when `fs` is gone.
    pub(super) fn start(self: &Arc<Self>, notifier: Notifier, fs: Weak<Inner>) {
        let _ = self.notifier.set(notifier);
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("fuse-inval".into())
            .spawn(move || me.run(fs));
        if let Err(e) = spawned {
            log::error!("cannot start the cache invalidation thread: {e}");
        }
    }

    /// Asks for a look at every domain soon, without waiting.
    pub(super) fn kick(&self) {
        self.progress.lock().asked += 1;
        self.cv.notify_all();
    }

    /// Asks for a look at every domain and waits until it is done (at
    /// most [`SYNC_WAIT`]; never from a FUSE request handler).
    pub(super) fn sync(&self) {
        if self.notifier.get().is_none() {
            return;
        }
        let deadline = Instant::now() + SYNC_WAIT;
        let mut p = self.progress.lock();
        p.asked += 1;
        let mine = p.asked;
        self.cv.notify_all();
        while p.done < mine {
            if self.cv.wait_until(&mut p, deadline).timed_out() {
                log::warn!("cache invalidation is late; the write returns without it");
                return;
            }
        }
    }

    fn run(&self, fs: Weak<Inner>) {
        let mut seen: HashMap<String, u64> = HashMap::new();
        loop {
            let target = {
                let mut p = self.progress.lock();
                if p.asked == p.done {
                    self.cv.wait_for(&mut p, POLL);
                }
                p.asked
            };
            let Some(fs) = fs.upgrade() else {
                return;
            };
            fs.sweep(self.notifier.get(), &mut seen);
            drop(fs);
            let mut p = self.progress.lock();
            p.done = p.done.max(target);
            self.cv.notify_all();
        }
    }
}

impl Inner {
    /// Looks again at each domain whose snapshots changed since `seen`.
    fn sweep(&self, notifier: Option<&Notifier>, seen: &mut HashMap<String, u64>) {
        for dom in self.reg.all() {
            let generation = dom.forest().generation();
            if seen.get(dom.name()) == Some(&generation) {
                continue;
            }
            seen.insert(dom.name().to_owned(), generation);
            self.sweep_domain(dom.name(), notifier);
        }
    }

    /// Invalidates what the kernel may hold wrongly in domain `d`,
    /// deepest first, and forgets the numbers of gone nodes nobody holds.
    fn sweep_domain(&self, d: &str, notifier: Option<&Notifier>) {
        let mut known = self.inodes.known_in(d);
        known.sort_by_key(|k| Reverse(k.node.depth()));
        for k in known {
            let now = self.name_now(&k.node);
            if k.lookups == 0 {
                if now.is_none() {
                    self.inodes.drop_unheld(k.ino);
                }
                continue;
            }
            let Some(n) = notifier else {
                continue;
            };
            if now.as_deref() != Some(&k.name[..]) {
                let parent = self.parent_of(&k.node);
                if let Some(p) = self.inodes.known_ino(&parent) {
                    report(
                        n.inval_entry(INodeNo(p), OsStr::from_bytes(&k.name)),
                        &k.node,
                    );
                }
                if let Some(new) = &now {
                    self.inodes.set_name(k.ino, new);
                }
            }
            report(n.inval_inode(INodeNo(k.ino), -1, 0), &k.node);
        }
    }

    /// The name a node has now; `None` once it or a directory above it
    /// is gone. A snapshot is found by id (it may have been renamed);
    /// every other node by the one name it can have.
    fn name_now(&self, node: &Node) -> Option<Vec<u8>> {
        if let Node::Snapshot(d, id) = node {
            let dom = self.reg.get(d)?;
            let forest = dom.forest();
            return forest.name_of(id).map(|n| n.as_bytes().to_vec());
        }
        if let Node::SinceDir(d, id, other) = node {
            let dom = self.reg.get(d)?;
            let forest = dom.forest();
            forest.name_of(id)?;
            return forest.name_of(other).map(|n| n.as_bytes().to_vec());
        }
        let name = node.fixed_name()?;
        let parent = self.parent_of(node);
        // A file of a gone snapshot is gone too.
        if parent != Node::Root {
            self.name_now(&parent)?;
        }
        // What a snapshot's disk holds is frozen: a place below a disk
        // is there while the disk is.
        if let Node::Guest(..) = parent {
            return Some(name.to_vec());
        }
        let found = self.child(&parent, OsStr::from_bytes(name))?;
        (&found == node).then(|| name.to_vec())
    }
}

fn report(r: std::io::Result<()>, node: &Node) {
    if let Err(e) = r {
        log::debug!("cache invalidation of {node:?}: {e}");
    }
}
