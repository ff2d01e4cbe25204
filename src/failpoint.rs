//! Named points in multi-step operations where tests inject faults.
//!
//! `VMSNAPFS_FAILPOINTS="create.after-backend=crash,delete.before-meta=sleep:2000"`
//! makes the daemon exit at once (`crash`, like `kill -9`: no cleanup, no
//! unmount), sleep N milliseconds (`sleep:N`), or fail the operation with
//! EIO (`error`) when it reaches that point. Unset, a point costs one
//! lookup in an empty list.

use std::sync::OnceLock;

use crate::error::{Error, Result};

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
        std::thread::sleep(std::time::Duration::from_millis(ms));
        return Ok(());
    }
    if action == "error" {
        return Err(Error::io(format!("injected failure at {name}")));
    }
    Ok(())
}
