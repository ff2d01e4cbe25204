//! The guest agent (qemu-ga) over the Unix socket of its virtio-serial
//! channel: a session resynchronised with `guest-sync-delimited`, then
//! `guest-fsfreeze-freeze`, `guest-fsfreeze-thaw` and
//! `guest-fsfreeze-status`, each with a deadline.
//!
//! The socket sits in a directory the VM's owner controls: it is reached
//! through a directory opened without following symlinks others made
//! ([`crate::store::safe_dir::open_dir`]), then opened `O_PATH |
//! O_NOFOLLOW` and connected through `/proc/self/fd/N`, so a name swapped
//! for a symlink is never followed. Whatever the peer sends is bounded (a
//! line length, a deadline per command); a session that timed out or read
//! something it did not expect is broken and refuses further commands, so
//! a late answer is never taken for the next command's.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a connect may take (a full backlog is retried until then).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the agent has to answer `guest-sync-delimited`: an agent that
/// is not running in the guest (QEMU accepts the connection anyway) is
/// found out after this.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(3);
/// How long `guest-fsfreeze-freeze` may take: the guest flushes its dirty
/// pages before its file systems freeze.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `guest-fsfreeze-thaw` may take.
pub const THAW_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `guest-fsfreeze-status` may take.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest line accepted from the agent.
const MAX_LINE: usize = 64 * 1024;
/// The byte qemu-ga puts before its answer to `guest-sync-delimited`
/// (never part of UTF-8 text, so never inside a JSON answer).
const SENTINEL: u8 = 0xFF;

/// Why a guest agent command did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The socket could not be reached or connected.
    #[error("cannot connect to the guest agent socket {}: {source}", .path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// No answer within the deadline (the agent is not running, or hangs).
    #[error("the guest agent did not answer {what} within {} s", .after.as_secs_f64())]
    Timeout {
        /// The command.
        what: String,
        /// The deadline it had.
        after: Duration,
    },
    /// The peer closed the connection.
    #[error("the guest agent closed the connection during {0}")]
    Closed(String),
    /// The agent answered with an error.
    #[error("the guest agent refused {what}: {class}: {desc}")]
    Refused {
        /// The command.
        what: String,
        /// QEMU's error class.
        class: String,
        /// Its description.
        desc: String,
    },
    /// The peer sent something that is not the agent's protocol.
    #[error("the guest agent's answer to {what} is not its protocol: {why}")]
    Protocol {
        /// The command.
        what: String,
        /// What was wrong.
        why: String,
    },
    /// The agent did not answer, in the words of whoever relays it
    /// (libvirt: not configured, not connected, not responding).
    #[error("the guest agent did not answer {what}: {said}")]
    Unanswered {
        /// The command.
        what: String,
        /// What the relay said.
        said: String,
    },
    /// An earlier command of this session failed; a new session is needed.
    #[error("the guest agent session is broken by an earlier failure")]
    Broken,
    /// Reading or writing the socket failed.
    #[error("guest agent socket: {0}")]
    Io(#[from] io::Error),
}

impl AgentError {
    /// True when the agent did not answer at all (no agent, a hung one,
    /// a closed connection), as opposed to an answer that refused.
    pub fn unanswered(&self) -> bool {
        !matches!(self, AgentError::Refused { .. })
    }
}

/// What `guest-fsfreeze-status` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreezeStatus {
    /// The guest's file systems run normally.
    Thawed,
    /// They are frozen.
    Frozen,
}

/// How many file systems a freeze or thaw acted on: `None` when the
/// relay does not say (libvirt); shown as `all` (neither freezes a
/// chosen few).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Count(pub Option<u64>);

impl std::fmt::Display for Count {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(n) => write!(f, "{n}"),
            None => f.write_str("all"),
        }
    }
}

/// A way to freeze and thaw a guest's file systems: a session with its
/// agent ([`Agent`]), or libvirt's calls on the agent it holds.
pub trait Freeze: Send {
    /// Whether the guest's file systems are frozen now.
    fn status(&mut self) -> Result<FreezeStatus, AgentError>;
    /// Freezes them: how many file systems froze.
    fn freeze(&mut self) -> Result<Count, AgentError>;
    /// Thaws them: how many thawed.
    fn thaw(&mut self) -> Result<Count, AgentError>;
}

impl Freeze for Agent {
    fn status(&mut self) -> Result<FreezeStatus, AgentError> {
        Agent::status(self)
    }
    fn freeze(&mut self) -> Result<Count, AgentError> {
        Agent::freeze(self).map(|n| Count(Some(n)))
    }
    fn thaw(&mut self) -> Result<Count, AgentError> {
        Agent::thaw(self).map(|n| Count(Some(n)))
    }
}

/// One session with a guest agent, past `guest-sync-delimited`.
pub struct Agent {
    stream: UnixStream,
    /// Bytes read and not yet consumed.
    pending: Vec<u8>,
    broken: bool,
}

impl Agent {
    /// Connects to the agent's socket at `path` (absolute; no symlink
    /// others could have made is followed) and resynchronises.
    pub fn connect(path: &Path) -> Result<Agent, AgentError> {
        let stream =
            connect_socket(path, CONNECT_TIMEOUT).map_err(|source| AgentError::Connect {
                path: path.to_owned(),
                source,
            })?;
        Agent::over(stream, SYNC_TIMEOUT)
    }

    /// A session over a connected stream, resynchronised within `sync`.
    pub fn over(stream: UnixStream, sync: Duration) -> Result<Agent, AgentError> {
        let mut agent = Agent {
            stream,
            pending: Vec::new(),
            broken: false,
        };
        agent.sync(sync)?;
        Ok(agent)
    }

    /// `guest-sync-delimited`: a fresh id, preceded by the sentinel byte
    /// that resets the agent's parser; everything before the sentinel in
    /// the answer (stale answers, the parser's complaint about the byte)
    /// is dropped, and an answer with another id is skipped.
    fn sync(&mut self, timeout: Duration) -> Result<(), AgentError> {
        let what = "guest-sync-delimited";
        let deadline = Instant::now() + timeout;
        let id = sync_id();
        let mut request = vec![SENTINEL];
        request.extend_from_slice(
            format!("{{\"execute\":\"{what}\",\"arguments\":{{\"id\":{id}}}}}\n").as_bytes(),
        );
        self.send(&request, what)?;
        loop {
            match self.pending.iter().position(|&b| b == SENTINEL) {
                Some(at) => {
                    self.pending.drain(..=at);
                }
                None => {
                    self.pending.clear();
                    self.fill(what, timeout, deadline)?;
                    continue;
                }
            }
            let line = self.line(what, timeout, deadline)?;
            if let Ok(Value::Object(o)) = serde_json::from_slice::<Value>(&line) {
                if o.get("return").and_then(Value::as_u64) == Some(id) {
                    return Ok(());
                }
            }
        }
    }

    /// `guest-fsfreeze-freeze`: the number of file systems frozen.
    pub fn freeze(&mut self) -> Result<u64, AgentError> {
        let r = self.execute("guest-fsfreeze-freeze", FREEZE_TIMEOUT)?;
        count(r, "guest-fsfreeze-freeze", self)
    }

    /// `guest-fsfreeze-thaw`: the number of file systems thawed.
    pub fn thaw(&mut self) -> Result<u64, AgentError> {
        let r = self.execute("guest-fsfreeze-thaw", THAW_TIMEOUT)?;
        count(r, "guest-fsfreeze-thaw", self)
    }

    /// `guest-fsfreeze-status`.
    pub fn status(&mut self) -> Result<FreezeStatus, AgentError> {
        let what = "guest-fsfreeze-status";
        match self.execute(what, STATUS_TIMEOUT)? {
            Value::String(s) if s == "thawed" => Ok(FreezeStatus::Thawed),
            Value::String(s) if s == "frozen" => Ok(FreezeStatus::Frozen),
            other => Err(self.protocol(what, format!("unexpected status {other}"))),
        }
    }

    /// Runs a command without arguments; its `return` value.
    fn execute(&mut self, what: &str, timeout: Duration) -> Result<Value, AgentError> {
        if self.broken {
            return Err(AgentError::Broken);
        }
        let deadline = Instant::now() + timeout;
        self.send(format!("{{\"execute\":\"{what}\"}}\n").as_bytes(), what)?;
        let line = self.line(what, timeout, deadline)?;
        let value: Value = match serde_json::from_slice(&line) {
            Ok(v) => v,
            Err(e) => return Err(self.protocol(what, format!("not JSON: {e}"))),
        };
        let Value::Object(mut o) = value else {
            return Err(self.protocol(what, "not a JSON object".into()));
        };
        if let Some(r) = o.remove("return") {
            return Ok(r);
        }
        if let Some(Value::Object(e)) = o.remove("error") {
            let text = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
            return Err(AgentError::Refused {
                what: what.to_owned(),
                class: text("class"),
                desc: text("desc"),
            });
        }
        Err(self.protocol(what, "neither \"return\" nor \"error\"".into()))
    }

    fn protocol(&mut self, what: &str, why: String) -> AgentError {
        self.broken = true;
        AgentError::Protocol {
            what: what.to_owned(),
            why,
        }
    }

    fn send(&mut self, bytes: &[u8], what: &str) -> Result<(), AgentError> {
        // A peer that never reads fills the socket buffer: bounded too.
        self.stream.set_write_timeout(Some(CONNECT_TIMEOUT))?;
        self.stream.write_all(bytes).map_err(|e| {
            self.broken = true;
            match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => AgentError::Timeout {
                    what: what.to_owned(),
                    after: CONNECT_TIMEOUT,
                },
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
                    AgentError::Closed(what.to_owned())
                }
                _ => AgentError::Io(e),
            }
        })
    }

    /// The next line (without its newline), reading until `deadline`.
    fn line(
        &mut self,
        what: &str,
        timeout: Duration,
        deadline: Instant,
    ) -> Result<Vec<u8>, AgentError> {
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.pending.drain(..=end).collect();
                line.pop();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Ok(line);
            }
            if self.pending.len() > MAX_LINE {
                return Err(self.protocol(what, format!("a line over {MAX_LINE} bytes")));
            }
            self.fill(what, timeout, deadline)?;
        }
    }

    /// Reads what the peer sent, waiting at most until `deadline`.
    fn fill(&mut self, what: &str, timeout: Duration, deadline: Instant) -> Result<(), AgentError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            self.broken = true;
            return Err(AgentError::Timeout {
                what: what.to_owned(),
                after: timeout,
            });
        }
        self.stream.set_read_timeout(Some(left))?;
        let mut buf = [0u8; 4096];
        match self.stream.read(&mut buf) {
            Ok(0) => {
                self.broken = true;
                Err(AgentError::Closed(what.to_owned()))
            }
            Ok(n) => {
                self.pending.extend_from_slice(&buf[..n]);
                Ok(())
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(())
            }
            Err(e) => {
                self.broken = true;
                Err(AgentError::Io(e))
            }
        }
    }
}

/// A count the agent returns (file systems frozen or thawed).
fn count(r: Value, what: &str, agent: &mut Agent) -> Result<u64, AgentError> {
    match r.as_u64() {
        Some(n) => Ok(n),
        None => Err(agent.protocol(what, format!("expected a count, got {r}"))),
    }
}

/// A sync id unlikely to match a stale answer of an earlier session.
fn sync_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos() as u64;
    // Within 2^53: JSON numbers stay exact for any reader.
    ((u64::from(std::process::id()) << 32) ^ (nanos << 8) ^ SEQ.fetch_add(1, Ordering::Relaxed))
        & ((1 << 53) - 1)
}

/// Connects to the Unix socket `path` without following a symlink that
/// anyone but root could have made: its directory is opened with
/// [`crate::store::safe_dir::open_dir`], the socket itself `O_PATH |
/// O_NOFOLLOW` (it must be a socket), and the connect goes through
/// `/proc/self/fd/N`, the inode opened, not the name again.
pub fn connect_socket(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    use nix::fcntl::{openat, OFlag};
    use nix::sys::stat::{fstat, Mode, SFlag};
    use std::os::fd::AsRawFd;
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no directory"))?;
    let name = crate::store::safe_dir::file_name(path)?;
    let dirfd = crate::store::safe_dir::open_dir(dir)?;
    let fd = openat(
        &dirfd,
        name,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let st = fstat(&fd)?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
        return Err(io::Error::other(format!(
            "{} is not a socket (vmsnapfs does not follow a symlink there)",
            path.display()
        )));
    }
    let via = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    super::qmp::connect_unix(&via, timeout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    /// A peer on the other end of a socket pair: reads each request line
    /// and answers with what `answer` returns for it (raw bytes).
    fn peer(answer: impl Fn(&[u8]) -> Vec<u8> + Send + 'static) -> UnixStream {
        let (ours, theirs) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let mut r = io::BufReader::new(theirs.try_clone().unwrap());
            let mut w = theirs;
            loop {
                let mut line = Vec::new();
                if r.read_until(b'\n', &mut line).unwrap_or(0) == 0 {
                    return;
                }
                if w.write_all(&answer(&line)).is_err() {
                    return;
                }
            }
        });
        ours
    }

    /// The id in a `guest-sync-delimited` request (after the sentinel).
    fn sync_request_id(line: &[u8]) -> Option<u64> {
        let line = line.strip_prefix(&[SENTINEL]).unwrap_or(line);
        let v: Value = serde_json::from_slice(line).ok()?;
        (v["execute"] == "guest-sync-delimited").then(|| v["arguments"]["id"].as_u64())?
    }

    /// Answers as qemu-ga 7.2 does: the sentinel byte it was sent is a
    /// parse error (answered first), stale output may precede, then the
    /// delimited sync answer; freeze/thaw/status from a small state.
    fn qemu_ga_like(stale: &'static [u8]) -> impl Fn(&[u8]) -> Vec<u8> {
        let frozen = std::sync::Mutex::new(false);
        move |line: &[u8]| {
            if let Some(id) = sync_request_id(line) {
                let mut out = stale.to_vec();
                out.extend_from_slice(
                    b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray '\\uFFFD'\"}}\n",
                );
                out.extend_from_slice(b"\xff{\"return\": 7}\n");
                out.push(SENTINEL);
                out.extend_from_slice(format!("{{\"return\": {id}}}\n").as_bytes());
                return out;
            }
            let v: Value = serde_json::from_slice(line).unwrap();
            let mut f = frozen.lock().unwrap();
            let r = match v["execute"].as_str().unwrap() {
                "guest-fsfreeze-freeze" if *f => {
                    return b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"already frozen\"}}\n".to_vec()
                }
                "guest-fsfreeze-freeze" => {
                    *f = true;
                    "2".to_owned()
                }
                "guest-fsfreeze-thaw" => {
                    let n = if *f { 2 } else { 0 };
                    *f = false;
                    n.to_string()
                }
                "guest-fsfreeze-status" => {
                    format!("\"{}\"", if *f { "frozen" } else { "thawed" })
                }
                _ => return b"{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"x\"}}\n".to_vec(),
            };
            format!("{{\"return\": {r}}}\n").into_bytes()
        }
    }

    #[test]
    fn sync_skips_stale_output_then_commands_frame_by_line() {
        let stream = peer(qemu_ga_like(
            b"{\"return\": \"frozen\"}\n{\"return\": 3}\npartial line without end",
        ));
        let mut a = Agent::over(stream, Duration::from_secs(10)).unwrap();
        assert_eq!(a.status().unwrap(), FreezeStatus::Thawed);
        assert_eq!(a.freeze().unwrap(), 2);
        assert_eq!(a.status().unwrap(), FreezeStatus::Frozen);
        let e = a.freeze().unwrap_err();
        assert!(matches!(&e, AgentError::Refused { desc, .. } if desc == "already frozen"));
        assert!(!e.unanswered());
        // A refusal keeps the session usable.
        assert_eq!(a.thaw().unwrap(), 2);
        assert_eq!(a.status().unwrap(), FreezeStatus::Thawed);
    }

    #[test]
    fn silence_times_out_and_breaks_the_session() {
        // Accepts and says nothing, like a socket with no agent behind it.
        let (ours, theirs) = UnixStream::pair().unwrap();
        let e = Agent::over(ours, Duration::from_millis(100))
            .err()
            .expect("no sync answer");
        assert!(matches!(e, AgentError::Timeout { .. }), "{e}");
        assert!(e.unanswered());
        drop(theirs);
    }

    #[test]
    fn garbage_and_closed_peers_are_errors_not_hangs() {
        // Answers every line with a non-JSON line after syncing.
        let stream = peer(|line| match sync_request_id(line) {
            Some(id) => b"\x00\x01junk\n\xc3\xbfx\n{}\n"
                .to_vec()
                .into_iter()
                .chain([SENTINEL])
                .chain(format!("{{\"return\": {id}}}\n").into_bytes())
                .collect(),
            None => b"this is not json\n".to_vec(),
        });
        let mut a = Agent::over(stream, Duration::from_secs(10)).unwrap();
        let e = a.freeze().unwrap_err();
        assert!(matches!(e, AgentError::Protocol { .. }), "{e}");
        assert!(matches!(a.thaw().unwrap_err(), AgentError::Broken));

        // A wrong type of answer is a protocol error too.
        let stream = peer(|line| match sync_request_id(line) {
            Some(id) => [
                vec![SENTINEL],
                format!("{{\"return\": {id}}}\n").into_bytes(),
            ]
            .concat(),
            None => b"{\"return\": \"many\"}\n".to_vec(),
        });
        let mut a = Agent::over(stream, Duration::from_secs(10)).unwrap();
        assert!(matches!(a.freeze(), Err(AgentError::Protocol { .. })));

        // An endless line is cut off.
        let stream = peer(|line| match sync_request_id(line) {
            Some(id) => [
                vec![SENTINEL],
                format!("{{\"return\": {id}}}\n").into_bytes(),
            ]
            .concat(),
            None => vec![b'x'; MAX_LINE * 2],
        });
        let mut a = Agent::over(stream, Duration::from_secs(10)).unwrap();
        assert!(matches!(a.status(), Err(AgentError::Protocol { .. })));

        // A peer that closes.
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        let e = Agent::over(ours, Duration::from_secs(10)).err().unwrap();
        assert!(
            matches!(e, AgentError::Closed(_) | AgentError::Io(_)),
            "{e}"
        );
    }

    #[test]
    fn connect_refuses_a_symlink_and_a_non_socket() {
        let dir = std::env::temp_dir().join(format!("vmsnapfs-qga-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let real = dir.join("real.sock");
        let listener = std::os::unix::net::UnixListener::bind(&real).unwrap();
        // The socket itself connects.
        assert!(connect_socket(&real, Duration::from_secs(2)).is_ok());
        // A symlink to it is not followed; nor is a plain file a socket.
        let link = dir.join("link.sock");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(connect_socket(&link, Duration::from_secs(2)).is_err());
        let file = dir.join("file.sock");
        std::fs::write(&file, b"").unwrap();
        assert!(connect_socket(&file, Duration::from_secs(2)).is_err());
        assert!(connect_socket(&dir.join("none.sock"), Duration::from_secs(2)).is_err());
        drop(listener);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
