//! A QMP session on a Unix socket: typed commands from the `qapi` crate's
//! schema, a tolerant reader, timeouts, events kept for whoever waits.
//!
//! The `qapi` crate's own session (`qapi::Qmp`) is not used: it panics when
//! the peer closes before its greeting (`expect("unexpected eof")`) and
//! fails a whole response when an interleaved event does not decode, and a
//! daemon must survive a hostile or dying peer. Its typed command structs
//! (`qapi::qmp::*`) are used for every command sent.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::qmp_message::{decode, Message};

/// Longest line accepted from QEMU (a `query-block` of many disks is a few KiB).
const MAX_LINE: usize = 16 * 1024 * 1024;
/// Events kept for a later `wait_event`; older ones are dropped.
const MAX_QUEUED_EVENTS: usize = 256;

/// Why a QMP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be reached or broke.
    #[error("QMP socket: {0}")]
    Io(#[from] io::Error),
    /// Nobody accepted the connection in time (the socket's backlog is
    /// full: another client holds a one-client monitor, or QEMU is stopped).
    #[error("connect timed out after {}", secs(*.0))]
    ConnectTimeout(Duration),
    /// QEMU did not answer in time; the session is unusable afterwards.
    #[error("{what} within {}", secs(*after))]
    Timeout {
        /// What was awaited: "no greeting", "no answer to query-status".
        what: String,
        /// The deadline that passed.
        after: Duration,
    },
    /// QEMU sent something that is not QMP.
    #[error("QMP protocol: {0}")]
    Protocol(String),
    /// QEMU refused the command.
    #[error("QMP {command}: {desc}")]
    Command {
        /// The command's name.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's message.
        desc: String,
    },
}

/// One QMP connection, past the capabilities handshake.
pub struct Qmp {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    events: VecDeque<Value>,
    timeout: Duration,
    peer: Option<libc::ucred>,
    broken: bool,
    /// QEMU's version as its greeting gave it (the answer `query-version`
    /// would give), when the greeting carried one.
    greeting_version: Option<qapi::qmp::VersionInfo>,
    /// Commands sent on this connection so far.
    sent: u64,
    /// Of those, the ones that may change QEMU (all but `query-*`).
    changes: u64,
}

impl Qmp {
    /// Connects to a QMP socket and negotiates capabilities. Every later
    /// exchange must finish within `timeout`, and so must the connect.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        Self::connect_within(path, timeout, timeout)
    }

    /// Connects within `connect_timeout` (a full backlog never blocks the
    /// caller), then waits at most `timeout` for the greeting and for the
    /// answer to `qmp_capabilities`; later exchanges get `timeout` too.
    pub fn connect_within(
        path: &Path,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Result<Self, QmpError> {
        let stream = connect_deadline(path, connect_timeout)?;
        stream.set_write_timeout(Some(timeout))?;
        let peer = peer_cred(&stream);
        let mut qmp = Qmp {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
            events: VecDeque::new(),
            timeout,
            peer,
            broken: false,
            greeting_version: None,
            sent: 0,
            changes: 0,
        };
        let deadline = Instant::now() + timeout;
        let greeting = qmp.read_message(deadline, "no greeting", timeout)?;
        let Message::Greeting(greeting) = greeting else {
            return Err(QmpError::Protocol(format!(
                "expected a greeting, got {}",
                greeting.kind()
            )));
        };
        qmp.greeting_version = greeting
            .get("version")
            .and_then(|v| serde_json::from_value(v.clone()).ok());
        qmp.execute(&qapi::qmp::qmp_capabilities { enable: None })?;
        Ok(qmp)
    }

    /// How long each exchange may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Changes how long each later exchange may take.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
        let _ = self.writer.set_write_timeout(Some(timeout));
    }

    /// The pid of the QEMU process on the other end (`SO_PEERCRED`).
    pub fn peer_pid(&self) -> Option<i32> {
        self.peer.map(|c| c.pid)
    }

    /// The user and group ids of the process on the other end, as the
    /// kernel gives them (`SO_PEERCRED`).
    pub fn peer_ids(&self) -> Option<(u32, u32)> {
        self.peer.map(|c| (c.uid, c.gid))
    }

    /// QEMU's version from its greeting, when it gave a whole one.
    pub fn greeting_version(&self) -> Option<&qapi::qmp::VersionInfo> {
        self.greeting_version.as_ref()
    }

    /// How many commands were sent on this connection: a state read
    /// earlier on it still holds while this count has not moved (and no
    /// one else changed QEMU).
    pub fn commands_sent(&self) -> u64 {
        self.sent
    }

    /// How many commands that may change QEMU (any but a `query-*`) were
    /// sent on this connection: what a query answered earlier on it still
    /// holds while this count has not moved (and no one else changed QEMU).
    pub fn changes_sent(&self) -> u64 {
        self.changes
    }

    /// False once a timeout or protocol error left the stream in an unknown state.
    pub fn is_usable(&self) -> bool {
        !self.broken
    }

    /// Runs a typed command and decodes its answer.
    pub fn execute<C: qapi::Command>(&mut self, cmd: &C) -> Result<C::Ok, QmpError> {
        self.execute_typed_within(cmd, self.timeout)
    }

    /// Like [`Qmp::execute`] with its own deadline (a state probe that
    /// must not wait as long as a snapshot command may).
    pub fn execute_typed_within<C: qapi::Command>(
        &mut self,
        cmd: &C,
        timeout: Duration,
    ) -> Result<C::Ok, QmpError> {
        let args = serde_json::to_value(cmd).map_err(|e| QmpError::Protocol(e.to_string()))?;
        let ret = self.execute_within(C::NAME, args, timeout)?;
        serde_json::from_value(ret)
            .map_err(|e| QmpError::Protocol(format!("{}: cannot decode the answer: {e}", C::NAME)))
    }

    /// Runs a command given by name with JSON arguments; returns `return`.
    pub fn execute_raw(&mut self, name: &str, args: Value) -> Result<Value, QmpError> {
        self.execute_within(name, args, self.timeout)
    }

    /// Like [`Qmp::execute_raw`] with its own deadline (a state probe
    /// that must not wait as long as a snapshot command may).
    pub fn execute_within(
        &mut self,
        name: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        if self.broken {
            return Err(QmpError::Protocol(
                "session broken by an earlier error".into(),
            ));
        }
        self.send_command(name, args, &[])?;
        self.await_reply(name, timeout)
    }

    /// Runs a typed command with open descriptors attached to it
    /// (`SCM_RIGHTS`), as `getfd` and `add-fd` expect: QEMU then uses the
    /// very files vmsnapfs opened, never a name someone could swap.
    pub fn execute_with_fds<C: qapi::Command>(
        &mut self,
        cmd: &C,
        fds: &[BorrowedFd<'_>],
    ) -> Result<C::Ok, QmpError> {
        if self.broken {
            return Err(QmpError::Protocol(
                "session broken by an earlier error".into(),
            ));
        }
        let args = serde_json::to_value(cmd).map_err(|e| QmpError::Protocol(e.to_string()))?;
        self.send_command(C::NAME, args, fds)?;
        let ret = self.await_reply(C::NAME, self.timeout)?;
        serde_json::from_value(ret)
            .map_err(|e| QmpError::Protocol(format!("{}: cannot decode the answer: {e}", C::NAME)))
    }

    /// Writes one command line, with `fds` attached to its first byte.
    fn send_command(
        &mut self,
        name: &str,
        args: Value,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), QmpError> {
        let mut line = serde_json::to_vec(&json!({"execute": name, "arguments": args}))
            .map_err(|e| QmpError::Protocol(e.to_string()))?;
        line.push(b'\n');
        log::trace!("qmp -> {}", String::from_utf8_lossy(&line).trim_end());
        self.sent += 1;
        if !name.starts_with("query-") {
            self.changes += 1;
        }
        let mut sent = 0;
        if !fds.is_empty() {
            match send_with_fds(&self.writer, &line, fds) {
                Ok(n) => sent = n,
                Err(e) => {
                    self.broken = true;
                    return Err(e.into());
                }
            }
        }
        if let Err(e) = self.writer.write_all(&line[sent..]) {
            self.broken = true;
            return Err(e.into());
        }
        Ok(())
    }

    /// Reads until the answer to the command just sent (events are queued).
    fn await_reply(&mut self, name: &str, timeout: Duration) -> Result<Value, QmpError> {
        let deadline = Instant::now() + timeout;
        let what = format!("no answer to {name}");
        loop {
            let msg = match self.read_message(deadline, &what, timeout) {
                Ok(m) => m,
                Err(e) => {
                    // The answer may still come: never match it to a later command.
                    self.broken = true;
                    return Err(e);
                }
            };
            match msg {
                Message::Return(ret) => return Ok(ret),
                Message::Error { class, desc } => {
                    return Err(QmpError::Command {
                        command: name.to_owned(),
                        class,
                        desc,
                    })
                }
                Message::Event(e) => self.queue_event(e),
                other => {
                    self.broken = true;
                    return Err(QmpError::Protocol(format!(
                        "unexpected message: {}",
                        other.kind()
                    )));
                }
            }
        }
    }

    /// Runs a human monitor command (HMP) and returns its text output.
    pub fn hmp(&mut self, command_line: &str) -> Result<String, QmpError> {
        self.execute(&qapi::qmp::human_monitor_command {
            command_line: command_line.to_owned(),
            cpu_index: None,
        })
    }

    fn queue_event(&mut self, msg: Value) {
        if self.events.len() == MAX_QUEUED_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(msg);
    }

    /// Takes the events received so far.
    pub fn take_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }

    /// Waits until an event satisfies `pred` (events already queued count)
    /// and returns it; other events stay queued. Fails after `timeout`.
    pub fn wait_event(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Result<Value, QmpError> {
        if let Some(i) = self.events.iter().position(&mut pred) {
            return Ok(self.events.remove(i).unwrap_or_default());
        }
        let deadline = Instant::now() + timeout;
        loop {
            let msg = match self.read_message(deadline, "no event", timeout)? {
                Message::Event(e) => e,
                other => {
                    self.broken = true;
                    return Err(QmpError::Protocol(format!(
                        "unexpected message: {}",
                        other.kind()
                    )));
                }
            };
            if pred(&msg) {
                return Ok(msg);
            }
            self.queue_event(msg);
        }
    }

    /// Waits for a job started with `job_id` to conclude, dismisses it and
    /// returns its error text if it failed. `on_progress` sees
    /// (done, total) each time the job is polled.
    pub fn wait_job(
        &mut self,
        job_id: &str,
        timeout: Duration,
        on_progress: impl FnMut(u64, u64),
    ) -> Result<Option<String>, QmpError> {
        self.follow_job(job_id, timeout, false, on_progress)
    }

    /// Like [`Qmp::wait_job`] for a job that waits in `ready` for a
    /// `job-complete` (an active-layer block-commit): completes it.
    /// The job must have been started with `auto-dismiss: false`.
    pub fn wait_job_completing(
        &mut self,
        job_id: &str,
        timeout: Duration,
        on_progress: impl FnMut(u64, u64),
    ) -> Result<Option<String>, QmpError> {
        self.follow_job(job_id, timeout, true, on_progress)
    }

    /// Drops the queued status changes of job `job_id` (before a job of
    /// that id starts, so that only its own are seen afterwards).
    pub fn forget_job_events(&mut self, job_id: &str) {
        self.events
            .retain(|e| !super::qmp_ops::is_status_change_of(e, job_id));
    }

    /// Whether the queued status changes of job `job_id` (queued since
    /// [`Qmp::forget_job_events`]) show it concluded without aborting:
    /// QEMU passes every failing job through `aborting` before
    /// `concluded`, and sends a job's changes in order, so a `concluded`
    /// with no `aborting` before it is a success and `query-jobs` need not
    /// be asked. Those events are taken from the queue when it is so.
    pub fn job_succeeded_by_events(&mut self, job_id: &str) -> bool {
        let statuses: Vec<qapi::qmp::JobStatus> = self
            .events
            .iter()
            .filter_map(
                |e| match serde_json::from_value::<qapi::qmp::Event>(e.clone()) {
                    Ok(qapi::qmp::Event::JOB_STATUS_CHANGE { data, .. }) if data.id == job_id => {
                        Some(data.status)
                    }
                    _ => None,
                },
            )
            .collect();
        let Some(end) = statuses
            .iter()
            .position(|s| matches!(s, qapi::qmp::JobStatus::concluded))
        else {
            return false;
        };
        if statuses[..end]
            .iter()
            .any(|s| matches!(s, qapi::qmp::JobStatus::aborting))
        {
            return false;
        }
        self.forget_job_events(job_id);
        true
    }

    fn follow_job(
        &mut self,
        job_id: &str,
        timeout: Duration,
        complete_when_ready: bool,
        mut on_progress: impl FnMut(u64, u64),
    ) -> Result<Option<String>, QmpError> {
        let mut completing = false;
        let deadline = Instant::now() + timeout;
        // Events of earlier jobs with the same id must not wake this wait.
        self.events
            .retain(|e| !super::qmp_ops::is_status_change_of(e, job_id));
        loop {
            let jobs = self.jobs()?;
            let Some(job) = jobs.iter().find(|j| j.id == job_id) else {
                return Err(QmpError::Protocol(format!("job {job_id} vanished")));
            };
            on_progress(job.current_progress as u64, job.total_progress as u64);
            if matches!(job.status, qapi::qmp::JobStatus::concluded) {
                let error = job.error.clone();
                self.job_dismiss(job_id)?;
                return Ok(error);
            }
            if complete_when_ready
                && !completing
                && matches!(job.status, qapi::qmp::JobStatus::ready)
            {
                self.job_complete(job_id)?;
                completing = true;
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QmpError::Timeout {
                    what: format!("job {job_id} not done"),
                    after: timeout,
                });
            }
            // Sleep until the next status change of this job, or 200 ms.
            let id = job_id.to_owned();
            match self.wait_event(left.min(Duration::from_millis(200)), |e| {
                super::qmp_ops::is_status_change_of(e, &id)
            }) {
                Ok(_) | Err(QmpError::Timeout { .. }) => {
                    self.broken = false;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads one JSON message, whole, before `deadline`; `what` names
    /// what was awaited if it does not come.
    fn read_message(
        &mut self,
        deadline: Instant,
        what: &str,
        after: Duration,
    ) -> Result<Message, QmpError> {
        let mut line = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // A partial line means the stream is out of step for good.
                self.broken = !line.is_empty() || self.broken;
                return Err(QmpError::Timeout {
                    what: what.to_owned(),
                    after,
                });
            }
            self.reader.get_ref().set_read_timeout(Some(left))?;
            let limit = (MAX_LINE - line.len()) as u64;
            match (&mut self.reader).take(limit).read_until(b'\n', &mut line) {
                Ok(0) => {
                    self.broken = true;
                    return Err(QmpError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "QEMU closed the monitor connection",
                    )));
                }
                Ok(_) if line.ends_with(b"\n") => break,
                Ok(_) if line.len() >= MAX_LINE => {
                    self.broken = true;
                    return Err(QmpError::Protocol("message too long".into()));
                }
                Ok(_) => continue,
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut =>
                {
                    continue
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.broken = true;
                    return Err(e.into());
                }
            }
        }
        log::trace!("qmp <- {}", String::from_utf8_lossy(&line).trim_end());
        decode(&line).inspect_err(|_| self.broken = true)
    }
}

/// `2s`, `0.2s`: a deadline as `.state` and `.log` show it.
pub fn secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// Sends `data` (at least its first byte) with `fds` attached as
/// `SCM_RIGHTS`; returns how many bytes went out.
fn send_with_fds(sock: &UnixStream, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    let raw: Vec<libc::c_int> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let payload = std::mem::size_of_val(raw.as_slice());
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: a zeroed msghdr is valid; every pointer set below outlives
    // the sendmsg call, and the control buffer is large enough for one
    // SCM_RIGHTS header holding `raw` (CMSG_SPACE), aligned for cmsghdr.
    let n = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
        std::ptr::copy_nonoverlapping(raw.as_ptr() as *const u8, libc::CMSG_DATA(cmsg), payload);
        libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Connects to the Unix socket `path` within `timeout` (see
/// [`connect_deadline`]), for other peers than QMP (the guest agent).
pub(crate) fn connect_unix(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    connect_deadline(path, timeout).map_err(|e| match e {
        QmpError::Io(e) => e,
        other => io::Error::new(io::ErrorKind::TimedOut, other.to_string()),
    })
}

/// Connects to a Unix socket without ever blocking past `timeout`: the
/// socket is non-blocking while connecting, and a full backlog (EAGAIN)
/// is retried until the deadline.
fn connect_deadline(path: &Path, timeout: Duration) -> Result<UnixStream, QmpError> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: a zeroed sockaddr_un is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(QmpError::Io(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        )));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: plain socket(2); the fd is owned at once.
    let raw = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error().into());
    }
    // SAFETY: raw is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let deadline = Instant::now() + timeout;
    loop {
        use std::os::fd::AsRawFd;
        // SAFETY: addr is a valid sockaddr_un of `len` bytes.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                len,
            )
        };
        if rc == 0 {
            break;
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            // Backlog full: nobody accepts, and a Unix socket does not
            // queue the caller. Try again until the deadline.
            Some(libc::EAGAIN) => {
                if Instant::now() >= deadline {
                    return Err(QmpError::ConnectTimeout(timeout));
                }
                std::thread::sleep(Duration::from_millis(20).min(timeout));
            }
            Some(libc::EINPROGRESS) => {
                while !wait_writable(fd.as_raw_fd(), deadline)? {
                    if Instant::now() >= deadline {
                        return Err(QmpError::ConnectTimeout(timeout));
                    }
                }
                match so_error(fd.as_raw_fd())? {
                    0 => break,
                    e => return Err(io::Error::from_raw_os_error(e).into()),
                }
            }
            _ => return Err(err.into()),
        }
    }
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// Polls `fd` for writability until `deadline`; true when writable.
fn wait_writable(fd: libc::c_int, deadline: Instant) -> io::Result<bool> {
    let left = deadline.saturating_duration_since(Instant::now());
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    let ms = left.as_millis().clamp(1, 20) as libc::c_int;
    // SAFETY: one valid pollfd.
    let rc = unsafe { libc::poll(&mut p, 1, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(rc > 0)
}

/// The pending error of a socket (`SO_ERROR`).
fn so_error(fd: libc::c_int) -> io::Result<i32> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: v and len are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

/// The credentials of the process at the other end of a Unix socket.
fn peer_cred(stream: &UnixStream) -> Option<libc::ucred> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0 && cred.pid > 0).then_some(cred)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn fake_peer(
        script: impl FnOnce(UnixStream) + Send + 'static,
    ) -> (tempdir::Dir, std::path::PathBuf) {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            script(s);
        });
        (dir, path)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                let p = std::env::temp_dir().join(format!(
                    "vmsnapfs-qmp-test-{}-{:?}",
                    std::process::id(),
                    std::thread::current().id()
                ));
                let _ = std::fs::remove_dir_all(&p);
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn peer_closing_before_greeting_is_an_error_not_a_panic() {
        let (_d, path) = fake_peer(drop);
        assert!(Qmp::connect(&path, Duration::from_secs(2)).is_err());
    }

    #[test]
    fn garbage_is_a_protocol_error() {
        let (_d, path) = fake_peer(|mut s| {
            let _ = s.write_all(b"\x00\x01garbage\n");
            std::thread::sleep(Duration::from_millis(200));
        });
        assert!(matches!(
            Qmp::connect(&path, Duration::from_secs(2)),
            Err(QmpError::Protocol(_))
        ));
    }

    #[test]
    fn silent_peer_times_out() {
        let (_d, path) = fake_peer(|s| {
            std::thread::sleep(Duration::from_millis(800));
            drop(s);
        });
        let t = Instant::now();
        match Qmp::connect(&path, Duration::from_millis(200)) {
            Err(e @ QmpError::Timeout { .. }) => {
                assert_eq!(e.to_string(), "no greeting within 0.2s")
            }
            other => panic!("{:?}", other.err()),
        }
        assert!(t.elapsed() < Duration::from_millis(700));
    }

    #[test]
    fn events_are_queued_and_errors_decoded() {
        let (_d, path) = fake_peer(|s| {
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            let mut line = String::new();
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .unwrap();
            r.read_line(&mut line).unwrap();
            w.write_all(b"{\"return\": {}}\n").unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            w.write_all(b"{\"event\": \"STOP\", \"data\": {}}\n")
                .unwrap();
            w.write_all(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}}\n")
                .unwrap();
            std::thread::sleep(Duration::from_millis(100));
        });
        let mut q = Qmp::connect(&path, Duration::from_secs(2)).unwrap();
        match q.execute(&qapi::qmp::stop {}) {
            Err(QmpError::Command { desc, .. }) => assert_eq!(desc, "nope"),
            other => panic!("{other:?}"),
        }
        let ev = q.take_events();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0]["event"], "STOP");
    }
}
