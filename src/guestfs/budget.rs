//! Bounds on what one request may cost a reader of a hostile disk: a
//! path at most [`MAX_DEPTH`] directories deep (a corrupt filesystem can
//! make a directory its own descendant, and a reader walks each path from
//! the root), and a time [`Budget`] that the disk reads check, so that a
//! request that reads on and on ends in `EIO` with a sentence for `.log`.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::{components, eio};

/// A guest path deeper than this many directories is refused (`EIO`).
pub const MAX_DEPTH: usize = 256;

/// The time one request may read a disk.
pub const REQUEST_TIME: Duration = Duration::from_secs(20);

/// Refuses a path deeper than [`MAX_DEPTH`].
pub fn check_depth(path: &[u8]) -> io::Result<()> {
    if components(path).nth(MAX_DEPTH).is_some() {
        return Err(eio(format!(
            "the path is deeper than {MAX_DEPTH} directories (a directory loop in a \
             corrupt filesystem?): refused"
        )));
    }
    Ok(())
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// The deadline of the request in progress on one disk, shared by the
/// disk and every byte range of it a reader holds. Cloning shares it.
#[derive(Clone, Debug, Default)]
pub struct Budget(Arc<AtomicU64>);

impl Budget {
    /// Starts a request that may read for `time`.
    pub fn start(&self, time: Duration) {
        let end = epoch().elapsed() + time;
        self.0.store(
            u64::try_from(end.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Ends the request: reads are unbounded until the next start.
    pub fn clear(&self) {
        self.0.store(0, Ordering::Relaxed);
    }

    /// `EIO` when the request in progress is past its deadline.
    pub fn check(&self) -> io::Result<()> {
        let end = self.0.load(Ordering::Relaxed);
        if end != 0 && u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX) > end {
            return Err(eio(format!(
                "the request read for longer than {} s (a hostile filesystem?): stopped",
                REQUEST_TIME.as_secs()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_is_bounded() {
        let deep: Vec<u8> = b"/d".repeat(MAX_DEPTH);
        assert!(check_depth(&deep).is_ok());
        assert!(check_depth(b"").is_ok());
        let deeper = [deep.as_slice(), b"/x"].concat();
        let e = check_depth(&deeper).unwrap_err();
        assert!(e.to_string().contains("deeper than 256"), "{e}");
    }

    #[test]
    fn a_request_past_its_deadline_fails_and_the_next_starts_afresh() {
        let b = Budget::default();
        assert!(b.check().is_ok(), "no request: unbounded");
        b.start(Duration::ZERO);
        std::thread::sleep(Duration::from_millis(2));
        let shared = b.clone();
        assert!(shared
            .check()
            .unwrap_err()
            .to_string()
            .contains("longer than"));
        b.clear();
        assert!(shared.check().is_ok());
        b.start(Duration::from_secs(3600));
        assert!(shared.check().is_ok());
    }
}
