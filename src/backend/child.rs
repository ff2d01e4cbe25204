//! Child processes with a deadline: every `qemu-img` (and any other
//! helper program) the daemon runs is killed by pid when it takes longer
//! than it may, so a hostile image (a FIFO, a network backing) can never
//! hang an operation.

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Why a child did not give its output.
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    /// The program could not be started.
    #[error("cannot run {0}: {1}")]
    Spawn(String, std::io::Error),
    /// It ran past its deadline and was killed.
    #[error("{0} did not finish within {1:?} and was killed")]
    Timeout(String, Duration),
    /// Waiting for it failed.
    #[error("waiting for {0}: {1}")]
    Wait(String, std::io::Error),
}

/// Runs `cmd` (stdin closed, stdout and stderr captured) and waits at
/// most `timeout`; past it the child is killed by pid (SIGKILL) and
/// reaped.
pub fn output(mut cmd: Command, timeout: Duration) -> Result<Output, ChildError> {
    let name = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| ChildError::Spawn(name.clone(), e))?;
    let pid = child.id() as i32;
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let (tx, rx) = mpsc::channel();
    // The waiter owns the child: until it reaps it the pid stays ours,
    // so killing it by pid from here cannot hit another process.
    std::thread::spawn(move || {
        let reader = std::thread::spawn(move || {
            let mut b = Vec::new();
            if let Some(e) = err.as_mut() {
                let _ = e.read_to_end(&mut b);
            }
            b
        });
        let mut stdout = Vec::new();
        if let Some(o) = out.as_mut() {
            let _ = o.read_to_end(&mut stdout);
        }
        let stderr = reader.join().unwrap_or_default();
        let status = child.wait();
        let _ = tx.send(status.map(|status| Output {
            status,
            stdout,
            stderr,
        }));
    });
    match rx.recv_timeout(timeout) {
        Ok(r) => r.map_err(|e| ChildError::Wait(name, e)),
        Err(_) => {
            // Our own child, not reaped yet (see above).
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            // Reaped by the waiter; its pipes close with the process
            // (a grandchild holding them is not waited for).
            let _ = rx.recv_timeout(Duration::from_secs(5));
            Err(ChildError::Timeout(name, timeout))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gives_output_and_status() {
        let mut c = Command::new("sh");
        c.args(["-c", "echo out; echo err >&2; exit 3"]);
        let o = output(c, Duration::from_secs(60)).unwrap();
        assert_eq!(o.stdout, b"out\n");
        assert_eq!(o.stderr, b"err\n");
        assert_eq!(o.status.code(), Some(3));
    }

    #[test]
    fn kills_a_child_past_its_deadline() {
        let mut c = Command::new("sleep");
        c.arg("600");
        let e = output(c, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, ChildError::Timeout(..)), "{e}");
    }
}
