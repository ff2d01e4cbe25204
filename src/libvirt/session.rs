//! Long-lived `virsh` processes, so that a command to libvirt costs a
//! line on a pipe instead of a process start and a new connection.
//!
//! A [`Pool`] keeps a few idle `virsh -q -c URI` shells (no arguments:
//! virsh reads commands from its standard input). A command takes an
//! idle shell, or starts one when all are busy, so concurrent callers
//! never wait for each other. Each command is written as one line with
//! every argument in single quotes, between markers: `echo 'W''-start'`
//! before it, `echo 'W''-end'` and `echo --err 'W''-end'` after it, `W`
//! a random word of the shell. virsh prints `W-start` and `W-end` (the
//! quotes removed) on its output and `error: W-end` on its error stream;
//! none of them can appear in readline's echo of the lines virsh reads
//! (which keeps the quotes), so the command's output on both streams is
//! known: on the output, after the start marker and the echo of the
//! command's line (readline echoes a line it reads from a pipe, with
//! `TERM=dumb` on one line ended by its newline), and before the echo
//! of the end marker's line. The command failed when its error stream
//! has an `error: ` line, as virsh's exit status would say.
//!
//! Every command has a deadline; past it the shell is killed by pid,
//! and the next command starts a new one. Arguments a shell line cannot
//! carry unchanged (anything but printable ASCII: virsh reads its input
//! through readline, which edits on control characters and, in the C
//! locale, on bytes >= 0x80) are not sent to a shell: such a command
//! runs in a process of its own with its arguments as argv
//! ([`super::Virsh::run`] decides).

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::error::{Error, Result};

/// Idle shells kept per connection; more are started while all are
/// busy, and exit when they come back to a full pool.
const MAX_IDLE: usize = 4;
/// What virsh prints before it reads each line (read-write connection).
const PROMPT: &[u8] = b"virsh # ";

/// `arg` quoted for virsh's command parser: single quotes, a quote
/// inside written as `'\''`. `None` when the argument cannot go on a
/// shell line unchanged (see the module's doc).
pub fn quote(arg: &str) -> Option<String> {
    if !arg.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return None;
    }
    Some(format!("'{}'", arg.replace('\'', r"'\''")))
}

/// The shell line of a command, or `None` when an argument cannot be
/// quoted.
pub fn line<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Option<String> {
    let mut words = Vec::with_capacity(args.len());
    for a in args {
        words.push(quote(a.as_ref().to_str()?)?);
    }
    Some(words.join(" "))
}

/// What a shell printed for one command: its output, and its error
/// stream.
#[derive(Debug)]
pub struct Said {
    /// The command's standard output, virsh's echo of the line removed.
    pub out: Vec<u8>,
    /// The command's error stream.
    pub err: Vec<u8>,
}

impl Said {
    /// The `error: ` lines of the error stream (virsh's note that it
    /// reconnected, which precedes a command that then ran, is not one).
    pub fn errors(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.err)
            .lines()
            .filter(|l| l.starts_with("error: ") && !l.contains("Reconnected to the hypervisor"))
            .map(str::to_owned)
            .collect()
    }

    /// Whether the error stream says the connection to libvirt broke
    /// (the shell is not kept).
    fn lost_connection(&self) -> bool {
        let e = String::from_utf8_lossy(&self.err);
        ["connect", "hypervisor", "hangup", "End of file"]
            .iter()
            .any(|w| e.contains(w))
    }
}

/// Which stream a chunk came from.
enum Chunk {
    Out(Vec<u8>),
    Err(Vec<u8>),
    Closed,
}

/// Why a shell gave no answer.
enum Failed {
    /// The command could not be written (the shell is gone): it did not run.
    NotSent(String),
    /// The deadline passed.
    Timeout,
    /// Anything else.
    Other(String),
}

/// One `virsh` shell.
struct Shell {
    child: Child,
    stdin: ChildStdin,
    rx: Receiver<Chunk>,
    out: Vec<u8>,
    err: Vec<u8>,
    /// The random word of the end markers.
    word: String,
}

impl Shell {
    fn start(uri: &str) -> Result<Shell> {
        let mut cmd = Command::new("virsh");
        cmd.arg("-q").arg("-c").arg(uri);
        // Matched messages in English; readline without anyone's
        // configuration.
        cmd.env("LC_ALL", "C")
            .env("INPUTRC", "/dev/null")
            .env("TERM", "dumb");
        // SAFETY: close_range(2) with integer arguments, async-signal-
        // safe: the shell inherits only its standard descriptors. (It
        // exits when its input closes, with the daemon; a parent-death
        // signal would follow the thread that started it instead.)
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || super::virsh::close_from(3));
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::io(format!("cannot run virsh: {e}")))?;
        let (tx, rx) = mpsc::channel();
        let stdin = child.stdin.take().expect("piped stdin");
        let mut out = child.stdout.take().expect("piped stdout");
        let mut err = child.stderr.take().expect("piped stderr");
        let tx2 = tx.clone();
        std::thread::spawn(move || forward(&mut out, &tx, Chunk::Out));
        std::thread::spawn(move || forward(&mut err, &tx2, Chunk::Err));
        Ok(Shell {
            child,
            stdin,
            rx,
            out: Vec::new(),
            err: Vec::new(),
            word: random_word(),
        })
    }

    /// Runs one command line and waits until `deadline` for both end
    /// markers.
    fn run(&mut self, line: &str, deadline: Instant) -> std::result::Result<Said, Failed> {
        // What the shell printed while idle (a keepalive's complaint)
        // belongs to no command.
        while let Ok(c) = self.rx.try_recv() {
            match c {
                Chunk::Out(c) => self.out.extend_from_slice(&c),
                Chunk::Err(_) => {}
                Chunk::Closed => return Err(Failed::NotSent("virsh exited".into())),
            }
        }
        self.err.clear();
        let w = &self.word;
        let text =
            format!("echo '{w}''-start'\n{line}\necho '{w}''-end'\necho --err '{w}''-end'\n");
        self.stdin
            .write_all(text.as_bytes())
            .map_err(|e| Failed::NotSent(format!("virsh's input: {e}")))?;
        let out_end = format!("{w}-end").into_bytes();
        let err_end = format!("error: {w}-end\n").into_bytes();
        let (mut out, mut err) = (None, None);
        loop {
            if out.is_none() {
                out = take_until(&mut self.out, &out_end);
            }
            if err.is_none() {
                err = take_until(&mut self.err, &err_end);
            }
            if out.is_some() && err.is_some() {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(Chunk::Out(c)) => self.out.extend_from_slice(&c),
                Ok(Chunk::Err(c)) => self.err.extend_from_slice(&c),
                Ok(Chunk::Closed) | Err(RecvTimeoutError::Disconnected) => {
                    return Err(Failed::Other(format!(
                        "virsh exited: {}",
                        String::from_utf8_lossy(&self.err).trim()
                    )))
                }
                Err(RecvTimeoutError::Timeout) => return Err(Failed::Timeout),
            }
        }
        let out = out.unwrap_or_default();
        Ok(Said {
            out: command_output(&out, w)
                .ok_or_else(|| Failed::Other("virsh's output lost its start marker".into()))?,
            err: err.unwrap_or_default(),
        })
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        // Our own child, not reaped yet: the pid is still its own.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Copies what `from` gives into `tx` until the end of the stream.
fn forward(from: &mut impl Read, tx: &mpsc::Sender<Chunk>, wrap: fn(Vec<u8>) -> Chunk) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = tx.send(Chunk::Closed);
                return;
            }
            Ok(n) => {
                if tx.send(wrap(buf[..n].to_vec())).is_err() {
                    return;
                }
            }
        }
    }
}

/// Removes `buf`'s bytes up to and including the first `end`, and
/// returns those before it; `None` (nothing removed) while `end` is not
/// in `buf`.
fn take_until(buf: &mut Vec<u8>, end: &[u8]) -> Option<Vec<u8>> {
    let at = buf.windows(end.len()).position(|w| w == end)?;
    let mut head: Vec<u8> = buf.drain(..at + end.len()).collect();
    head.truncate(at);
    Some(head)
}

/// The command's output in `out` (everything the shell printed before
/// the end marker `W-end`): after the start marker `W-start` and, when
/// readline echoed the command's line (the prompt follows the marker),
/// after that echo's newline; before the prompt and the echo of the end
/// marker's line. `None` without the start marker.
fn command_output(out: &[u8], w: &str) -> Option<Vec<u8>> {
    let start = format!("{w}-start");
    let at = out
        .windows(start.len())
        .position(|x| x == start.as_bytes())?;
    let mut s = &out[at + start.len()..];
    if s.starts_with(PROMPT) {
        let nl = s.iter().position(|&b| b == b'\n')?;
        s = &s[nl + 1..];
    }
    let tail = format!("{}echo '{w}''-end'\n", String::from_utf8_lossy(PROMPT));
    if let Some(rest) = s.strip_suffix(tail.as_bytes()) {
        s = rest;
    }
    Some(s.to_vec())
}

/// A word nobody can guess (it ends a command's output).
fn random_word() -> String {
    let mut b = [0u8; 12];
    // SAFETY: getrandom(2) into a buffer of the given length.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // Not expected on Linux >= 3.17; the time and pid still differ.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let x = (t ^ ((std::process::id() as u128) << 64)).to_le_bytes();
        b.copy_from_slice(&x[..12]);
    }
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    // Short: the end marker's line stays within readline's 80 columns.
    format!("v{hex}")
}

/// The shells of one libvirt connection.
#[derive(Default)]
pub struct Pool {
    idle: Mutex<Vec<Shell>>,
}

impl Pool {
    /// Runs `line` (from [`line`]) on an idle shell of `uri`, or a new
    /// one, within `timeout`. `what` names the command in errors. A
    /// shell that timed out or lost its connection is not kept.
    pub fn run(&self, uri: &str, line: &str, what: &str, timeout: Duration) -> Result<Said> {
        let deadline = Instant::now() + timeout;
        let idle = self.idle.lock().pop();
        let (mut shell, mut reused) = match idle {
            Some(s) => (s, true),
            None => (Shell::start(uri)?, false),
        };
        loop {
            match shell.run(line, deadline) {
                Ok(said) => {
                    if !said.lost_connection() {
                        let mut idle = self.idle.lock();
                        if idle.len() < MAX_IDLE {
                            idle.push(shell);
                        }
                    }
                    return Ok(said);
                }
                // An idle shell that exited meanwhile: the command did
                // not run; a new shell runs it.
                Err(Failed::NotSent(_)) if reused => {
                    shell = Shell::start(uri)?;
                    reused = false;
                }
                // The shell is dropped: killed by pid and reaped.
                Err(Failed::Timeout) => {
                    return Err(Error::io(format!(
                        "virsh {what} did not finish within {timeout:?} and was killed"
                    )))
                }
                Err(Failed::NotSent(e) | Failed::Other(e)) => {
                    return Err(Error::io(format!("virsh {what}: {e}")))
                }
            }
        }
    }

    /// How many shells are idle.
    pub fn idle(&self) -> usize {
        self.idle.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_single_quoted_and_quotes_escaped() {
        assert_eq!(quote("a b").unwrap(), "'a b'");
        assert_eq!(quote("it's").unwrap(), r"'it'\''s'");
        assert_eq!(quote("").unwrap(), "''");
        assert_eq!(
            quote(r#"x"; destroy d; #\"#).unwrap(),
            r#"'x"; destroy d; #\'"#
        );
        assert_eq!(
            line(&["snapshot-list", "--domain", "my vm"]).unwrap(),
            "'snapshot-list' '--domain' 'my vm'"
        );
    }

    #[test]
    fn what_readline_would_edit_never_goes_on_a_line() {
        for bad in [
            "a\nb",
            "a\rb",
            "tab\there",
            "\u{1}",
            "\u{7f}",
            "caf\u{e9}",
            "\u{1b}[A",
        ] {
            assert!(quote(bad).is_none(), "{bad:?}");
            assert!(line(&["echo", bad]).is_none(), "{bad:?}");
        }
        use std::os::unix::ffi::OsStrExt;
        assert!(line(&[std::ffi::OsStr::from_bytes(b"\xff")]).is_none());
    }

    #[test]
    fn the_end_marker_splits_the_stream() {
        let mut b = b"one\ntwoEND rest".to_vec();
        assert_eq!(take_until(&mut b, b"END").unwrap(), b"one\ntwo");
        assert_eq!(b, b" rest");
        assert!(take_until(&mut b, b"END").is_none());
        assert_eq!(b, b" rest");
    }

    #[test]
    fn the_output_is_between_the_echoes() {
        let w = "vW";
        // Readline's echo (here scrolled: a long line on TERM=dumb).
        let out = b"virsh # echo --err 'vW''-end'\nvirsh # echo 'vW''-start'\nvW-startvirsh # \r<ong line'\nid name\nvirsh # \nvirsh # echo 'vW''-end'\n";
        assert_eq!(command_output(out, w).unwrap(), b"id name\nvirsh # \n");
        // Without readline's echo the output is left as it is.
        assert_eq!(
            command_output(b"vW-startid name\n", w).unwrap(),
            b"id name\n"
        );
        assert!(command_output(b"id name\n", w).is_none());
    }

    #[test]
    fn errors_are_error_lines_but_a_reconnection() {
        let said = |e: &str| Said {
            out: Vec::new(),
            err: e.as_bytes().to_vec(),
        };
        assert!(said("").errors().is_empty());
        assert!(said("error: Reconnected to the hypervisor\n")
            .errors()
            .is_empty());
        assert_eq!(
            said("warning: x\nerror: failed to get domain 'd'\n").errors(),
            ["error: failed to get domain 'd'"]
        );
    }

    #[test]
    fn words_differ() {
        assert_ne!(random_word(), random_word());
    }
}
