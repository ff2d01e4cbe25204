//! One thread per disk in use, which owns that disk's readers (they are
//! not thread-safe, and opening one reads and checks a lot): the FUSE
//! threads queue work here and return at once; the work answers the
//! kernel itself. A thread idle for [`IDLE`] ends and drops its readers.

use std::collections::HashMap;
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::disk::Disk;

/// How long a disk's thread waits for work before it ends.
pub const IDLE: Duration = Duration::from_secs(30);

/// Which disk: (domain, snapshot id, target).
pub type DiskKey = (String, String, String);

/// Work for a disk's thread.
pub type Job = Box<dyn FnOnce(&mut Disk) + Send>;

/// The disks' threads.
#[derive(Default)]
pub struct Workers {
    queues: Arc<Mutex<HashMap<DiskKey, Sender<Job>>>>,
}

impl Workers {
    /// No thread yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues `job` for the thread of disk `key`, started if needed.
    /// Never waits for the job.
    pub fn submit(&self, key: &DiskKey, job: Job) {
        let mut queues = self.queues.lock();
        let job = match queues.get(key) {
            Some(tx) => match tx.send(job) {
                Ok(()) => return,
                Err(e) => e.0,
            },
            None => job,
        };
        let (tx, rx) = channel::<Job>();
        let _ = tx.send(job);
        let all = self.queues.clone();
        let me = key.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("files-{}", key.2))
            .spawn(move || {
                let mut disk = Disk::new();
                loop {
                    match rx.recv_timeout(IDLE) {
                        Ok(job) => job(&mut disk),
                        Err(RecvTimeoutError::Timeout) => {
                            // Senders queue under this lock: nothing is
                            // lost between the last look and the removal.
                            let mut queues = all.lock();
                            if let Ok(job) = rx.try_recv() {
                                drop(queues);
                                job(&mut disk);
                                continue;
                            }
                            queues.remove(&me);
                            return;
                        }
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
            });
        match spawned {
            Ok(_) => {
                queues.insert(key.clone(), tx);
            }
            Err(e) => log::error!("cannot start a thread for the files of {}: {e}", key.2),
        }
    }

    /// Ends the threads of snapshot `id` of `domain` (its images changed
    /// or it is gone): each ends once its queued work is done.
    pub fn forget(&self, domain: &str, id: &str) {
        self.queues
            .lock()
            .retain(|(d, s, _), _| !(d == domain && s == id));
    }

    /// How many disks have a thread.
    pub fn len(&self) -> usize {
        self.queues.lock().len()
    }

    /// True when no disk has a thread.
    pub fn is_empty(&self) -> bool {
        self.queues.lock().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_of_one_disk_run_in_order_and_idle_threads_stay_until_idle() {
        let w = Workers::new();
        let key: DiskKey = ("vm".into(), "s".into(), "vda".into());
        let (tx, rx) = channel();
        for i in 0..50 {
            let tx = tx.clone();
            w.submit(&key, Box::new(move |_| tx.send(i).unwrap()));
        }
        let got: Vec<i32> = (0..50).map(|_| rx.recv().unwrap()).collect();
        assert_eq!(got, (0..50).collect::<Vec<_>>());
        assert_eq!(w.len(), 1);
        w.forget("vm", "s");
        assert!(w.is_empty());
        // A new job starts a new thread.
        let tx2 = tx.clone();
        w.submit(&key, Box::new(move |_| tx2.send(99).unwrap()));
        assert_eq!(rx.recv().unwrap(), 99);
    }
}
