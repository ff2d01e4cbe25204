//! Rules for snapshot names: what the tree accepts as a directory name.

use std::fmt;

/// Longest snapshot name, in bytes (the limit of one path component).
pub const MAX_NAME_BYTES: usize = 255;

/// Why a snapshot name was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameError {
    /// The name breaks a rule; the text says which.
    Invalid(&'static str),
    /// The name is longer than [`MAX_NAME_BYTES`].
    TooLong(usize),
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameError::Invalid(why) => write!(f, "invalid snapshot name: {why}"),
            NameError::TooLong(n) => {
                write!(
                    f,
                    "snapshot name is {n} bytes, the limit is {MAX_NAME_BYTES}"
                )
            }
        }
    }
}

impl std::error::Error for NameError {}

/// Checks a snapshot name given as raw bytes (as FUSE hands them over).
///
/// Accepted: valid UTF-8, 1..=255 bytes, no `/`, NUL or control
/// characters, not `.` or `..`, not starting with `.` (dot-names belong to
/// the domain), no leading or trailing white space.
pub fn validate_name_bytes(raw: &[u8]) -> Result<&str, NameError> {
    if raw.len() > MAX_NAME_BYTES {
        return Err(NameError::TooLong(raw.len()));
    }
    let name = std::str::from_utf8(raw).map_err(|_| NameError::Invalid("not valid UTF-8"))?;
    validate_name(name)?;
    Ok(name)
}

/// Checks a snapshot name; see [`validate_name_bytes`] for the rules.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.len() > MAX_NAME_BYTES {
        return Err(NameError::TooLong(name.len()));
    }
    if name.is_empty() {
        return Err(NameError::Invalid("empty"));
    }
    if name == "." || name == ".." {
        return Err(NameError::Invalid("'.' and '..' are reserved"));
    }
    if name.starts_with('.') {
        return Err(NameError::Invalid(
            "a leading '.' is reserved for domain files",
        ));
    }
    if name.contains('/') {
        return Err(NameError::Invalid("contains '/'"));
    }
    if name.contains('\0') {
        return Err(NameError::Invalid("contains NUL"));
    }
    if name.chars().any(char::is_control) {
        return Err(NameError::Invalid("contains a control character"));
    }
    if name.trim() != name {
        return Err(NameError::Invalid("leading or trailing white space"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for n in ["pre-upgrade", "a", "2024-01-01 nightly", "snap_1.2", "été"] {
            assert_eq!(validate_name(n), Ok(()), "{n}");
        }
        assert!(validate_name(&"x".repeat(255)).is_ok());
    }

    #[test]
    fn refuses_bad_names() {
        for n in [
            "", ".", "..", ".hidden", "a/b", "a\0b", "a\nb", "tab\t", " x", "x ",
        ] {
            assert!(
                matches!(validate_name(n), Err(NameError::Invalid(_))),
                "{n:?}"
            );
        }
        assert_eq!(
            validate_name(&"x".repeat(256)),
            Err(NameError::TooLong(256))
        );
        assert!(matches!(
            validate_name_bytes(b"\xff\xfe"),
            Err(NameError::Invalid("not valid UTF-8"))
        ));
        assert_eq!(
            validate_name_bytes(&[b'a'; 300]),
            Err(NameError::TooLong(300))
        );
    }
}
