//! The one error type of snapshot operations, and the one place that maps
//! it to an errno.

use std::fmt;

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
        }
    }
}

/// An operation's failure: a kind (the errno) and a sentence for `.log`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// What the caller sees.
    pub kind: ErrorKind,
    /// Why, in words.
    pub message: String,
}

impl Error {
    /// An error of the given kind with a message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        let message = message.into();
        // Any failure that says the disk is full is ENOSPC, whoever raised it.
        let kind = if kind == ErrorKind::Io && mentions_no_space(&message) {
            ErrorKind::NoSpace
        } else {
            kind
        };
        Error { kind, message }
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

impl std::error::Error for Error {}

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
        Error::new(kind, e.to_string())
    }
}

/// Result of a snapshot operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_space_messages_become_enospc() {
        let e = Error::io("qemu-img: Could not write: No space left on device");
        assert_eq!(e.errno(), libc::ENOSPC);
        let e: Error = std::io::Error::from_raw_os_error(libc::ENOSPC).into();
        assert_eq!(e.kind, ErrorKind::NoSpace);
    }
}
