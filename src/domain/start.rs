//! Starting a stopped domain on its active layers: the `.start` control
//! file, and `.commandline`, the corrected command line for those who
//! start the VM with their own scripts. After an external snapshot the
//! definition's images are frozen points; a start from the command line
//! as written would open them (and is refused by the image locks).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

use super::Domain;
use crate::error::{Error, ErrorKind, Result};
use crate::model::DomainState;

/// The cached text of `.commandline` and the newest refresh asked for.
#[derive(Default)]
pub struct CommandLine {
    text: Arc<RwLock<String>>,
    generation: Arc<AtomicU64>,
}

/// Quotes one argument for a POSIX shell (as is when nothing in it is special).
fn shell_quote(a: &str) -> String {
    let plain = !a.is_empty()
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_./=:,+@%-".contains(c));
    if plain {
        a.to_owned()
    } else {
        format!("'{}'", a.replace('\'', "'\\''"))
    }
}

/// An argv as one shell command line.
pub fn shell_join(argv: &[String]) -> String {
    argv.iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ")
}

impl Domain {
    /// `echo running|paused > .start`: starts the stopped domain from its
    /// command line pointed at the active layers (see `backend::process`),
    /// running (also for an empty write) or paused.
    pub fn start(&self, request: &[u8]) -> Result<()> {
        let text = String::from_utf8_lossy(request).trim().to_owned();
        let what = format!("start {text:?}");
        let r = (|| {
            let paused = match text.as_str() {
                "" | "running" => false,
                "paused" => true,
                other => {
                    return Err(Error::invalid(format!(
                        "unknown start request {other:?}; write 'running' or 'paused'"
                    )))
                }
            };
            let _busy = self.begin(&what)?;
            let live = self.live_state()?;
            if live != DomainState::Shutoff {
                return Err(Error::busy(format!(
                    "the domain is already {}",
                    live.as_str()
                )));
            }
            if !self.backend.can_start() {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    "no command line is known: add <commandline> to the domain definition",
                ));
            }
            let layers: Vec<String> = self
                .backend
                .active_disks()
                .iter()
                .map(|d| format!("{} {}", d.target, d.source.display()))
                .collect();
            let started = self.backend.start_process(None, paused);
            let s = self.backend.refresh_state();
            self.note_state(s);
            started?;
            self.log.line(&format!(
                "{what}: started on the active layers ({}), domain {}",
                layers.join(", "),
                s.as_str()
            ));
            Ok(())
        })();
        r.or_else(|e| self.refuse(&what, e))
    }

    /// The text of `.commandline`: the command line a start runs, one
    /// shell command line; computed in the background, never on a FUSE
    /// thread.
    pub fn commandline_text(&self) -> String {
        self.commandline.text.read().clone()
    }

    /// Computes `.commandline` again in the background (the active layers
    /// may have changed).
    pub(super) fn refresh_commandline(&self) {
        let backend = self.backend.clone();
        let text = self.commandline.text.clone();
        let generation = self.commandline.generation.clone();
        let mine = generation.fetch_add(1, Ordering::SeqCst) + 1;
        let _ = std::thread::Builder::new()
            .name("commandline".into())
            .spawn(move || {
                let line = match backend.start_argv() {
                    Ok(argv) => shell_join(&argv) + "\n",
                    Err(e) => format!("# {}\n", e.message),
                };
                if generation.load(Ordering::SeqCst) == mine {
                    *text.write() = line;
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_for_a_shell() {
        let argv: Vec<String> = [
            "qemu-system-x86_64",
            "-drive",
            "file=/i/a b.qcow2,format=qcow2",
            "-name",
            "it's",
            "",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            shell_join(&argv),
            "qemu-system-x86_64 -drive 'file=/i/a b.qcow2,format=qcow2' -name 'it'\\''s' ''"
        );
    }
}
