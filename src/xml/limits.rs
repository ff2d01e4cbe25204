//! Safety limits shared by every XML parse.

/// Largest document accepted, in bytes (1 MiB).
pub const MAX_INPUT_BYTES: usize = 1024 * 1024;

/// Deepest nesting of elements accepted; the root element is level 1.
pub const MAX_DEPTH: usize = 64;
