//! How the daemon (and the demo) learn that they are asked to stop:
//! SIGINT and SIGTERM set a flag that the main loop polls, so the mount
//! is taken down in order (domains' threads stopped, views closed,
//! unmounted) instead of the process dying mid-operation.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The stop flag set by SIGINT and SIGTERM.
#[derive(Clone)]
pub struct StopSignals(Arc<AtomicBool>);

impl StopSignals {
    /// Registers the handlers (they only set the flag).
    pub fn install() -> std::io::Result<Self> {
        let flag = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(sig, flag.clone())?;
        }
        Ok(StopSignals(flag))
    }

    /// True once SIGINT or SIGTERM arrived.
    pub fn requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}
