//! Named points in multi-step operations where tests inject faults.
//!
//! `VMSNAPFS_FAILPOINTS="create.after-backend=crash,delete.before-meta=wait:/tmp/go"`
//! makes the daemon exit at once (`crash`, like `kill -9`: no cleanup, no
//! unmount), wait at the point until a file exists (`wait:PATH`: a
//! barrier the test opens when it has done what it does meanwhile; at
//! most [`WAIT_CAP`]), sleep N milliseconds (`sleep:N`), or fail the
//! operation with EIO (`error`) when it reaches that point. Unset, a
//! point costs one lookup in an empty list.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// The longest a `wait:PATH` point waits (a test that died never opens it).
pub const WAIT_CAP: Duration = Duration::from_secs(120);

fn points() -> &'static Vec<(String, String)> {
    static POINTS: OnceLock<Vec<(String, String)>> = OnceLock::new();
    POINTS.get_or_init(|| {
        std::env::var("VMSNAPFS_FAILPOINTS")
            .unwrap_or_default()
            .split(',')
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect()
    })
}

/// Reaches the point `name`: does what the environment asks there.
pub fn hit(name: &str) -> Result<()> {
    let Some((_, action)) = points().iter().find(|(k, _)| k == name) else {
        return Ok(());
    };
    log::warn!("failpoint {name}: {action}");
    if action == "crash" {
        // Like `kill -9`: nothing of the process runs after this.
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
    if let Some(ms) = action.strip_prefix("sleep:").and_then(|m| m.parse().ok()) {
        std::thread::sleep(Duration::from_millis(ms));
        return Ok(());
    }
    if let Some(path) = action.strip_prefix("wait:") {
        let deadline = Instant::now() + WAIT_CAP;
        while !std::path::Path::new(path).exists() {
            if Instant::now() >= deadline {
                log::warn!("failpoint {name}: {path} never appeared; going on");
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        return Ok(());
    }
    if action == "error" {
        return Err(Error::io(format!("injected failure at {name}")));
    }
    Ok(())
}
