//! Long operations in progress on one domain (merges of images), shown in
//! `.jobs` one a line with their progress, so another shell can watch.

use std::time::Instant;

use parking_lot::Mutex;

struct Job {
    label: String,
    done: u64,
    total: u64,
    started: Instant,
}

/// The running jobs of one domain.
#[derive(Default)]
pub struct Jobs {
    list: Mutex<Vec<Job>>,
}

impl Jobs {
    /// Registers a job named `label`.
    pub fn start(&self, label: &str) {
        self.list.lock().push(Job {
            label: label.to_owned(),
            done: 0,
            total: 0,
            started: Instant::now(),
        });
    }

    /// Records the progress of job `label`: `done` of `total` bytes.
    pub fn progress(&self, label: &str, done: u64, total: u64) {
        if let Some(j) = self.list.lock().iter_mut().find(|j| j.label == label) {
            j.done = done;
            j.total = total;
        }
    }

    /// Removes job `label`.
    pub fn end(&self, label: &str) {
        self.list.lock().retain(|j| j.label != label);
    }

    /// The `.jobs` text: one line per job. A job that has not reported
    /// a size yet (a merge that qemu-img runs, or a block job that has
    /// not started copying) says so instead of `0/0 bytes`.
    pub fn text(&self) -> String {
        self.list
            .lock()
            .iter()
            .map(|j| {
                let secs = j.started.elapsed().as_secs_f64();
                if j.total == 0 {
                    return format!(
                        "{}: running, {secs:.1} s (no progress reported yet)\n",
                        j.label
                    );
                }
                let pct = j.done.min(j.total) as f64 * 100.0 / j.total as f64;
                format!(
                    "{}: {}/{} bytes ({pct:.0}%), {secs:.1} s\n",
                    j.label, j.done, j.total
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_follow_jobs() {
        let j = Jobs::default();
        assert_eq!(j.text(), "");
        j.start("rmdir \"a\": commit disk vda");
        assert!(j
            .text()
            .starts_with("rmdir \"a\": commit disk vda: running, "));
        assert!(j.text().ends_with(" s (no progress reported yet)\n"));
        j.progress("rmdir \"a\": commit disk vda", 50, 200);
        assert!(j
            .text()
            .starts_with("rmdir \"a\": commit disk vda: 50/200 bytes (25%)"));
        j.end("rmdir \"a\": commit disk vda");
        assert_eq!(j.text(), "");
    }
}
