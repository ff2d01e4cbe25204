//! The one error type of snapshot operations, and the one place that maps
//! it to an errno.

use std::fmt;
use std::sync::Arc;

/// What went wrong, as the caller of a file operation must see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad input: a name, a spec, a control-file word (`EINVAL`).
    Invalid,
    /// A name over 255 bytes (`ENAMETOOLONG`).
    NameTooLong,
    /// The name is taken (`EEXIST`).
    Exists,
    /// No such snapshot or domain (`ENOENT`).
    NotFound,
    /// Another operation runs on the domain, or an open view holds it (`EBUSY`).
    Busy,
    /// The action would throw away live state without `force` (`EPERM`).
    NotPermitted,
    /// The caller may not do this, e.g. place a file where it cannot
    /// write itself (`EACCES`).
    Denied,
    /// No space left for the new data (`ENOSPC`).
    NoSpace,
    /// The action cannot be done on this domain as configured (`EOPNOTSUPP`).
    Unsupported,
    /// QEMU gone, a QMP or qemu-img failure, an I/O error (`EIO`).
    Io,
    /// The guest agent a quiesced snapshot needs does not answer
    /// (`ENOTCONN`).
    NotConnected,
}

impl ErrorKind {
    /// The errno's symbolic name, for `.log`.
    pub fn errno_name(self) -> &'static str {
        match self {
            ErrorKind::Invalid => "EINVAL",
            ErrorKind::NameTooLong => "ENAMETOOLONG",
            ErrorKind::Exists => "EEXIST",
            ErrorKind::NotFound => "ENOENT",
            ErrorKind::Busy => "EBUSY",
            ErrorKind::NotPermitted => "EPERM",
            ErrorKind::Denied => "EACCES",
            ErrorKind::NoSpace => "ENOSPC",
            ErrorKind::Unsupported => "EOPNOTSUPP",
            ErrorKind::Io => "EIO",
            ErrorKind::NotConnected => "ENOTCONN",
        }
    }

    /// The errno that FUSE hands back for this kind.
    pub fn errno(self) -> i32 {
        match self {
            ErrorKind::Invalid => libc::EINVAL,
            ErrorKind::NameTooLong => libc::ENAMETOOLONG,
            ErrorKind::Exists => libc::EEXIST,
            ErrorKind::NotFound => libc::ENOENT,
            ErrorKind::Busy => libc::EBUSY,
            ErrorKind::NotPermitted => libc::EPERM,
            ErrorKind::Denied => libc::EACCES,
            ErrorKind::NoSpace => libc::ENOSPC,
            ErrorKind::Unsupported => libc::EOPNOTSUPP,
            ErrorKind::Io => libc::EIO,
            ErrorKind::NotConnected => libc::ENOTCONN,
        }
    }
}

/// An operation's failure: a kind (the errno), a sentence for `.log`
/// (what was being done, then why), and the error it came from, if any
/// (`std::error::Error::source`).
#[derive(Debug, Clone)]
pub struct Error {
    /// What the caller sees.
    pub kind: ErrorKind,
    /// Why, in words.
    pub message: String,
    /// The underlying error (an `io::Error` with its errno, a QMP error).
    source: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
}

impl PartialEq for Error {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind && self.message == other.message
    }
}

impl Eq for Error {}

impl Error {
    /// An error of the given kind with a message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// A failure another program reported only as text (qemu-img's
    /// stderr, a QMP error): no errno comes with it, so a text that says
    /// the disk is full is the one sign of `ENOSPC`; anything else is EIO.
    pub fn reported(message: impl Into<String>) -> Self {
        let message = message.into();
        let kind = if mentions_no_space(&message) {
            ErrorKind::NoSpace
        } else {
            ErrorKind::Io
        };
        Self::new(kind, message)
    }

    /// The same error, remembering `source` as its cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Arc::new(source));
        self
    }

    /// An I/O error on `path`: the kind from its errno, the path in the
    /// message, the error kept as the cause.
    pub fn at(path: &std::path::Path, e: std::io::Error) -> Self {
        Self::from(e).context(path.display())
    }

    /// `EINVAL` with a message.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid, message)
    }

    /// `EIO` with a message.
    pub fn io(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Io, message)
    }

    /// `EBUSY` with a message.
    pub fn busy(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Busy, message)
    }

    /// `ENOENT` with a message.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    /// Prefixes the message with what was being done.
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }

    /// The errno for FUSE.
    pub fn errno(&self) -> i32 {
        self.kind.errno()
    }
}

fn mentions_no_space(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("no space left") || m.contains("enospc")
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<crate::model::NameError> for Error {
    fn from(e: crate::model::NameError) -> Self {
        let kind = match e {
            crate::model::NameError::TooLong(_) => ErrorKind::NameTooLong,
            crate::model::NameError::Invalid(_) => ErrorKind::Invalid,
        };
        Error::new(kind, e.to_string())
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        let kind = match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorKind::NoSpace,
            Some(libc::ENOENT) => ErrorKind::NotFound,
            Some(libc::EEXIST) => ErrorKind::Exists,
            Some(libc::ENAMETOOLONG) => ErrorKind::NameTooLong,
            _ => ErrorKind::Io,
        };
        Error::new(kind, e.to_string()).with_source(e)
    }
}

/// Result of a snapshot operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_comes_from_the_errno_or_a_program_s_report() {
        let e: Error = std::io::Error::from_raw_os_error(libc::ENOSPC).into();
        assert_eq!(e.kind, ErrorKind::NoSpace);
        let e = Error::reported("qemu-img: Could not write: No space left on device");
        assert_eq!(e.errno(), libc::ENOSPC);
        // Our own words never change the kind.
        let e = Error::io("the file is not there, so no space left is checked");
        assert_eq!(e.errno(), libc::EIO);
    }

    #[test]
    fn the_cause_is_kept_through_context() {
        use std::error::Error as _;
        let e = Error::at(
            std::path::Path::new("/i/a.qcow2"),
            std::io::Error::from_raw_os_error(libc::EACCES),
        )
        .context("opening the overlay");
        assert!(
            e.message.starts_with("opening the overlay: /i/a.qcow2: "),
            "{e}"
        );
        let cause = e.source().expect("a cause");
        let io = cause
            .downcast_ref::<std::io::Error>()
            .expect("an io::Error");
        assert_eq!(io.raw_os_error(), Some(libc::EACCES));
    }
}
