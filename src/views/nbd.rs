//! A small synchronous NBD client over a Unix socket, written from the NBD
//! protocol document (fixed newstyle handshake, structured replies, the
//! `base:allocation` metadata context), and a pool of such connections.
//!
//! One [`NbdClient`] is one connection with one request in flight at a
//! time. All request/reply traffic goes through one private method
//! (`transact`), so a pipelining client can later replace it without
//! touching the commands. [`NbdPool`] holds several connections, each
//! behind its own mutex, for parallel reads from several FUSE threads.
//!
//! Nothing the server sends can make this code panic or allocate without
//! bound: every length is checked against what the request allows, and a
//! connection that saw an I/O error, a timeout or a protocol violation is
//! marked broken and never used again (the pool reconnects).

use std::io::{self, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

/// `base:allocation` flag: the extent is a hole (not allocated).
pub const NBD_STATE_HOLE: u32 = 1;
/// `base:allocation` flag: the extent reads as zeroes.
pub const NBD_STATE_ZERO: u32 = 2;

/// Wire constants from the NBD protocol document.
mod proto {
    pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
    pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
    pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
    pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

    pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
    pub const FLAG_NO_ZEROES: u16 = 2;
    pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
    pub const FLAG_C_NO_ZEROES: u32 = 2;

    pub const OPT_EXPORT_NAME: u32 = 1;
    pub const OPT_ABORT: u32 = 2;
    pub const OPT_GO: u32 = 7;
    pub const OPT_STRUCTURED_REPLY: u32 = 8;
    pub const OPT_SET_META_CONTEXT: u32 = 10;

    pub const REP_ACK: u32 = 1;
    pub const REP_INFO: u32 = 3;
    pub const REP_META_CONTEXT: u32 = 4;
    pub const REP_ERR_BIT: u32 = 1 << 31;
    pub const REP_ERR_UNSUP: u32 = REP_ERR_BIT | 1;

    pub const INFO_EXPORT: u16 = 0;
    pub const INFO_BLOCK_SIZE: u16 = 3;

    pub const REQUEST_MAGIC: u32 = 0x2560_9513;
    pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
    pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

    pub const CMD_READ: u16 = 0;
    pub const CMD_DISC: u16 = 2;
    pub const CMD_BLOCK_STATUS: u16 = 7;

    pub const REPLY_FLAG_DONE: u16 = 1;
    pub const REPLY_TYPE_NONE: u16 = 0;
    pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
    pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
    pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
    pub const REPLY_TYPE_ERR_BIT: u16 = 1 << 15;
    pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_ERR_BIT | 2;

    pub const FLAG_HAS_FLAGS: u16 = 1;

    /// The largest option reply payload accepted during the handshake.
    pub const MAX_OPTION_REPLY: u32 = 64 * 1024;
    /// Strings (export names, error messages) are at most this long.
    pub const MAX_STRING: usize = 4096;
    /// The maximum payload a client may assume without block size info.
    pub const DEFAULT_MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
    /// The largest structured chunk accepted that is not read data.
    pub const MAX_META_CHUNK: u32 = 64 * 1024 * 1024;
}

/// Why an NBD operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The socket could not be connected.
    #[error("cannot connect to NBD socket {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The error of `connect(2)`.
        source: io::Error,
    },
    /// Any other I/O error on the socket.
    #[error("NBD socket I/O error: {0}")]
    Io(io::Error),
    /// The server did not answer within the socket timeout.
    #[error("NBD server did not answer in time")]
    Timeout,
    /// The server closed the connection.
    #[error("NBD server closed the connection")]
    Closed,
    /// The server sent something the protocol does not allow.
    #[error("NBD protocol violation: {0}")]
    Protocol(String),
    /// The server refused a handshake option it must not refuse.
    #[error("NBD server refused option {option}: reply {reply:#x}{}", fmt_msg(.message))]
    OptionRefused {
        /// The option's name.
        option: &'static str,
        /// The NBD reply type (an `NBD_REP_ERR_*` value).
        reply: u32,
        /// The server's message, possibly empty.
        message: String,
    },
    /// The server answered a request with an error.
    #[error("NBD server error {errno}{}", fmt_msg(.message))]
    Server {
        /// The NBD error value (Linux errno numbers: EIO 5, EINVAL 22...).
        errno: u32,
        /// The server's message, possibly empty.
        message: String,
    },
    /// The request lies outside the export or is otherwise invalid.
    #[error("invalid NBD request: {0}")]
    Invalid(String),
    /// The server lacks a feature this operation needs.
    #[error("NBD server does not support {0}")]
    Unsupported(&'static str),
    /// An earlier error left this connection in an unknown state.
    #[error("NBD connection is broken by an earlier error")]
    Broken,
}

fn fmt_msg(m: &str) -> String {
    if m.is_empty() {
        String::new()
    } else {
        format!(": {m}")
    }
}

impl From<io::Error> for NbdError {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted => NbdError::Closed,
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => NbdError::Timeout,
            _ => NbdError::Io(e),
        }
    }
}

impl NbdError {
    /// True when the connection cannot be used after this error (its
    /// state on the wire is unknown); false for errors the server
    /// reported cleanly or that were caught before sending.
    pub fn breaks_connection(&self) -> bool {
        matches!(
            self,
            NbdError::Connect { .. }
                | NbdError::Io(_)
                | NbdError::Timeout
                | NbdError::Closed
                | NbdError::Protocol(_)
                | NbdError::Broken
        )
    }

    /// The errno a file operation should return for this error.
    pub fn errno(&self) -> i32 {
        match self {
            NbdError::Server { errno, .. } => match *errno as i32 {
                e @ (libc::EPERM
                | libc::EIO
                | libc::ENOMEM
                | libc::EINVAL
                | libc::ENOSPC
                | libc::EOVERFLOW
                | libc::EOPNOTSUPP
                | libc::ESHUTDOWN) => e,
                _ => libc::EIO,
            },
            NbdError::Timeout => libc::ETIMEDOUT,
            NbdError::Invalid(_) => libc::EINVAL,
            NbdError::Unsupported(_) => libc::EOPNOTSUPP,
            NbdError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            _ => libc::EIO,
        }
    }
}

impl From<NbdError> for io::Error {
    fn from(e: NbdError) -> Self {
        io::Error::from_raw_os_error(e.errno())
    }
}

/// Shorthand for results of this module.
pub type Result<T, E = NbdError> = std::result::Result<T, E>;

/// Settings of a connection.
#[derive(Debug, Clone)]
pub struct NbdOptions {
    /// Read and write timeout of the socket (each system call).
    pub timeout: Duration,
    /// Negotiate structured replies (sparse reads, block status).
    pub structured_replies: bool,
    /// Negotiate the `base:allocation` metadata context.
    pub block_status: bool,
    /// Upper bound of one read request, further limited by the server's
    /// maximum payload; larger reads are split.
    pub max_request: u32,
}

impl Default for NbdOptions {
    fn default() -> Self {
        NbdOptions {
            timeout: Duration::from_secs(30),
            structured_replies: true,
            block_status: true,
            max_request: 32 * 1024 * 1024,
        }
    }
}

/// Block size constraints of an export (`NBD_INFO_BLOCK_SIZE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    /// Requests must be aligned to this (a power of two, 1 to 64 KiB).
    pub minimum: u32,
    /// The size the server prefers (a power of two).
    pub preferred: u32,
    /// The largest payload of one request.
    pub maximum: u32,
}

impl Default for BlockSize {
    fn default() -> Self {
        BlockSize {
            minimum: 1,
            preferred: 4096,
            maximum: proto::DEFAULT_MAX_PAYLOAD,
        }
    }
}

/// What the server said about the export in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size of the export in bytes.
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*`).
    pub flags: u16,
    /// Block size constraints (defaults when the server sent none).
    pub block_size: BlockSize,
}

/// One block status descriptor: `length` bytes with `base:allocation`
/// flags ([`NBD_STATE_HOLE`], [`NBD_STATE_ZERO`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (never 0).
    pub length: u64,
    /// `NBD_STATE_*` flags.
    pub flags: u32,
}

/// A reply message as `transact` hands it to a command's handler.
enum Reply {
    /// A simple reply without error; any data follows on the reader.
    Simple,
    /// A structured chunk that is not an error or `NONE`; the reader
    /// yields exactly its payload.
    Chunk { kind: u16, length: u32 },
}

/// One connection to an NBD export.
pub struct NbdClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    info: ExportInfo,
    structured: bool,
    meta_context: Option<u32>,
    next_cookie: u64,
    broken: bool,
    max_payload: u32,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("info", &self.info)
            .field("structured", &self.structured)
            .field("meta_context", &self.meta_context)
            .field("broken", &self.broken)
            .finish()
    }
}

fn rd_u16(r: &mut dyn Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn rd_u32(r: &mut dyn Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn rd_u64(r: &mut dyn Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// Reads `len` bytes (already bounded by the caller) into a vector.
fn rd_vec(r: &mut dyn Read, len: usize) -> io::Result<Vec<u8>> {
    let mut v = vec![0u8; len];
    r.read_exact(&mut v)?;
    Ok(v)
}

/// A string from the server: lossy UTF-8, cut to the protocol's limit.
fn lossy(bytes: &[u8]) -> String {
    let s = &bytes[..bytes.len().min(proto::MAX_STRING)];
    String::from_utf8_lossy(s).into_owned()
}

fn be_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Checks that the chunks of a read reply (ranges relative to `offset`)
/// cover `0..len` exactly once.
fn check_coverage(mut covered: Vec<(u64, u64)>, offset: u64, len: u64) -> Result<()> {
    covered.sort_unstable();
    let mut pos = 0;
    for (start, end) in covered {
        if start != pos {
            return Err(protocol(format!(
                "read reply chunks overlap or leave a gap at {}",
                offset + pos.min(start)
            )));
        }
        pos = end;
    }
    if pos != len {
        return Err(protocol(format!("read reply covers {pos} of {len} bytes")));
    }
    Ok(())
}

fn protocol(msg: impl Into<String>) -> NbdError {
    NbdError::Protocol(msg.into())
}

impl NbdClient {
    /// Connects to the Unix socket `path` and negotiates `export`.
    pub fn connect(path: &Path, export: &str, options: &NbdOptions) -> Result<Self> {
        let stream = UnixStream::connect(path).map_err(|source| NbdError::Connect {
            path: path.to_owned(),
            source,
        })?;
        Self::from_stream(stream, export, options)
    }

    /// Negotiates `export` on an already connected stream (the handshake
    /// of [`NbdClient::connect`]).
    pub fn from_stream(stream: UnixStream, export: &str, options: &NbdOptions) -> Result<Self> {
        if export.len() > proto::MAX_STRING || export.contains('\0') {
            return Err(NbdError::Invalid(format!("bad export name {export:?}")));
        }
        let timeout = Some(options.timeout.max(Duration::from_millis(1)));
        stream.set_read_timeout(timeout)?;
        stream.set_write_timeout(timeout)?;
        let writer = stream.try_clone()?;
        let mut client = NbdClient {
            reader: BufReader::with_capacity(64 * 1024, stream),
            writer,
            info: ExportInfo {
                size: 0,
                flags: 0,
                block_size: BlockSize::default(),
            },
            structured: false,
            meta_context: None,
            next_cookie: 1,
            broken: false,
            max_payload: 0,
        };
        match client.handshake(export, options) {
            Ok(()) => Ok(client),
            Err(e) => {
                // A soft disconnect where the protocol still allows one.
                if !e.breaks_connection() {
                    let _ = client.send_option(proto::OPT_ABORT, &[]);
                }
                client.broken = true;
                let _ = client.writer.shutdown(Shutdown::Both);
                Err(e)
            }
        }
    }

    /// What the server said about the export.
    pub fn info(&self) -> ExportInfo {
        self.info
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// True when structured replies were negotiated.
    pub fn structured_replies(&self) -> bool {
        self.structured
    }

    /// True when `base:allocation` was negotiated: [`NbdClient::block_status`] works.
    pub fn has_block_status(&self) -> bool {
        self.meta_context.is_some()
    }

    /// True when an earlier error left the connection unusable.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    fn handshake(&mut self, export: &str, options: &NbdOptions) -> Result<()> {
        let magic = rd_u64(&mut self.reader)?;
        if magic != proto::NBDMAGIC {
            return Err(protocol(format!("bad greeting magic {magic:#x}")));
        }
        let magic = rd_u64(&mut self.reader)?;
        if magic == proto::CLISERV_MAGIC {
            return Err(NbdError::Unsupported("oldstyle negotiation"));
        }
        if magic != proto::IHAVEOPT {
            return Err(protocol(format!("bad newstyle magic {magic:#x}")));
        }
        let hflags = rd_u16(&mut self.reader)?;
        if hflags & proto::FLAG_FIXED_NEWSTYLE == 0 {
            return Err(NbdError::Unsupported("fixed newstyle negotiation"));
        }
        let no_zeroes = hflags & proto::FLAG_NO_ZEROES != 0;
        let mut cflags = proto::FLAG_C_FIXED_NEWSTYLE;
        if no_zeroes {
            cflags |= proto::FLAG_C_NO_ZEROES;
        }
        self.writer.write_all(&cflags.to_be_bytes())?;

        if options.structured_replies {
            self.send_option(proto::OPT_STRUCTURED_REPLY, &[])?;
            let (rep, data) = self.read_option_reply(proto::OPT_STRUCTURED_REPLY)?;
            match rep {
                proto::REP_ACK => self.structured = true,
                r if r & proto::REP_ERR_BIT != 0 => {
                    log::debug!(
                        "NBD server refused structured replies ({r:#x}): {}",
                        lossy(&data)
                    );
                }
                r => return Err(protocol(format!("reply {r:#x} to STRUCTURED_REPLY"))),
            }
        }

        if self.structured && options.block_status {
            self.negotiate_meta_context(export)?;
        }

        let mut go = Vec::with_capacity(export.len() + 8);
        go.extend_from_slice(&(export.len() as u32).to_be_bytes());
        go.extend_from_slice(export.as_bytes());
        go.extend_from_slice(&1u16.to_be_bytes());
        go.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
        self.send_option(proto::OPT_GO, &go)?;
        let mut export_info: Option<(u64, u16)> = None;
        let mut block_size = BlockSize::default();
        loop {
            let (rep, data) = self.read_option_reply(proto::OPT_GO)?;
            match rep {
                proto::REP_ACK => break,
                proto::REP_INFO => {
                    let kind = be_u16(&data, 0).ok_or_else(|| protocol("empty NBD_REP_INFO"))?;
                    match kind {
                        proto::INFO_EXPORT => {
                            if data.len() != 12 {
                                return Err(protocol("bad NBD_INFO_EXPORT length"));
                            }
                            let size = be_u64(&data, 2).unwrap_or(0);
                            let flags = be_u16(&data, 10).unwrap_or(0);
                            export_info = Some((size, flags));
                        }
                        proto::INFO_BLOCK_SIZE => {
                            if data.len() != 14 {
                                return Err(protocol("bad NBD_INFO_BLOCK_SIZE length"));
                            }
                            block_size = BlockSize {
                                minimum: be_u32(&data, 2).unwrap_or(0),
                                preferred: be_u32(&data, 6).unwrap_or(0),
                                maximum: be_u32(&data, 10).unwrap_or(0),
                            };
                        }
                        _ => {} // names, descriptions, future info: ignored
                    }
                }
                proto::REP_ERR_UNSUP => {
                    // An old server: NBD_OPT_EXPORT_NAME, which cannot fail cleanly.
                    return self.export_name(export, no_zeroes);
                }
                r if r & proto::REP_ERR_BIT != 0 => {
                    return Err(NbdError::OptionRefused {
                        option: "NBD_OPT_GO",
                        reply: r,
                        message: lossy(&data),
                    })
                }
                r => return Err(protocol(format!("unexpected reply {r:#x} to NBD_OPT_GO"))),
            }
        }
        let (size, flags) = export_info
            .ok_or_else(|| protocol("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT"))?;
        self.set_export(size, flags, block_size)
    }

    fn negotiate_meta_context(&mut self, export: &str) -> Result<()> {
        const QUERY: &str = "base:allocation";
        let mut data = Vec::with_capacity(export.len() + QUERY.len() + 12);
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&1u32.to_be_bytes());
        data.extend_from_slice(&(QUERY.len() as u32).to_be_bytes());
        data.extend_from_slice(QUERY.as_bytes());
        self.send_option(proto::OPT_SET_META_CONTEXT, &data)?;
        loop {
            let (rep, data) = self.read_option_reply(proto::OPT_SET_META_CONTEXT)?;
            match rep {
                proto::REP_ACK => return Ok(()),
                proto::REP_META_CONTEXT => {
                    let id =
                        be_u32(&data, 0).ok_or_else(|| protocol("short NBD_REP_META_CONTEXT"))?;
                    if &data[4..] == QUERY.as_bytes() {
                        self.meta_context = Some(id);
                    }
                }
                r if r & proto::REP_ERR_BIT != 0 => {
                    log::debug!(
                        "NBD server refused base:allocation ({r:#x}): {}",
                        lossy(&data)
                    );
                    self.meta_context = None;
                    return Ok(());
                }
                r => return Err(protocol(format!("reply {r:#x} to SET_META_CONTEXT"))),
            }
        }
    }

    fn export_name(&mut self, export: &str, no_zeroes: bool) -> Result<()> {
        self.send_option(proto::OPT_EXPORT_NAME, export.as_bytes())?;
        let size = rd_u64(&mut self.reader)?;
        let flags = rd_u16(&mut self.reader)?;
        if !no_zeroes {
            let mut zeroes = [0u8; 124];
            self.reader.read_exact(&mut zeroes)?;
        }
        self.set_export(size, flags, BlockSize::default())
    }

    fn set_export(&mut self, size: u64, flags: u16, bs: BlockSize) -> Result<()> {
        if flags & proto::FLAG_HAS_FLAGS == 0 {
            return Err(protocol("transmission flags without NBD_FLAG_HAS_FLAGS"));
        }
        if size > i64::MAX as u64 {
            return Err(protocol(format!("export size {size} too large")));
        }
        let min_ok = bs.minimum.is_power_of_two() && bs.minimum <= 64 * 1024;
        if !min_ok || bs.maximum < bs.minimum {
            return Err(protocol(format!("bad block size constraints {bs:?}")));
        }
        let preferred = if bs.preferred.is_power_of_two() && bs.preferred >= bs.minimum {
            bs.preferred
        } else {
            bs.minimum.max(4096)
        };
        let block_size = BlockSize { preferred, ..bs };
        self.info = ExportInfo {
            size,
            flags,
            block_size,
        };
        // The largest request: within the server's maximum, aligned to its minimum.
        let cap = bs.maximum.min(proto::DEFAULT_MAX_PAYLOAD.max(bs.minimum));
        self.max_payload = (cap / bs.minimum * bs.minimum).max(bs.minimum);
        Ok(())
    }

    fn send_option(&mut self, option: u32, data: &[u8]) -> Result<()> {
        let mut msg = Vec::with_capacity(16 + data.len());
        msg.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&option.to_be_bytes());
        msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
        msg.extend_from_slice(data);
        self.writer.write_all(&msg)?;
        Ok(())
    }

    /// Reads one option reply to `option`: (reply type, data).
    fn read_option_reply(&mut self, option: u32) -> Result<(u32, Vec<u8>)> {
        let magic = rd_u64(&mut self.reader)?;
        if magic != proto::OPT_REPLY_MAGIC {
            return Err(protocol(format!("bad option reply magic {magic:#x}")));
        }
        let opt = rd_u32(&mut self.reader)?;
        if opt != option {
            return Err(protocol(format!(
                "reply to option {opt} while {option} was sent"
            )));
        }
        let rep = rd_u32(&mut self.reader)?;
        let len = rd_u32(&mut self.reader)?;
        if len > proto::MAX_OPTION_REPLY {
            return Err(protocol(format!("option reply of {len} bytes")));
        }
        let data = rd_vec(&mut self.reader, len as usize)?;
        Ok((rep, data))
    }

    /// Reads `buf.len()` bytes at `offset`. Split into requests within the
    /// server's limits; unaligned edges are read through a bounce buffer.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let min = u64::from(self.info.block_size.minimum);
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let rest = buf.len() - done;
            let misaligned = !pos.is_multiple_of(min) || (rest as u64) < min;
            if misaligned {
                // One aligned block around `pos`, copied out.
                let start = pos - pos % min;
                let end = (start + min).min(self.info.size);
                let mut bounce = vec![0u8; (end - start) as usize];
                self.read_request(start, &mut bounce)?;
                let skip = (pos - start) as usize;
                let n = (bounce.len() - skip).min(rest);
                buf[done..done + n].copy_from_slice(&bounce[skip..skip + n]);
                done += n;
            } else {
                let n = (rest as u64).min(u64::from(self.max_payload));
                let n = (n - n % min) as usize;
                self.read_request(pos, &mut buf[done..done + n])?;
                done += n;
            }
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<()> {
        match offset.checked_add(length) {
            Some(end) if end <= self.info.size => Ok(()),
            _ => Err(NbdError::Invalid(format!(
                "{length} bytes at {offset} beyond the export's {} bytes",
                self.info.size
            ))),
        }
    }

    /// One NBD_CMD_READ of `buf.len()` (<= max payload) bytes at `offset`.
    fn read_request(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        // The byte ranges (relative to `offset`) the chunks filled.
        let mut covered: Vec<(u64, u64)> = Vec::new();
        let mut simple = false;
        let mut handler = |reply: Reply, r: &mut dyn Read| -> Result<()> {
            match reply {
                Reply::Simple => {
                    r.read_exact(buf)?;
                    simple = true;
                    Ok(())
                }
                Reply::Chunk {
                    kind: proto::REPLY_TYPE_OFFSET_DATA,
                    length,
                } => {
                    if length < 8 {
                        return Err(protocol("short OFFSET_DATA chunk"));
                    }
                    let at = rd_u64(r)?;
                    let n = u64::from(length - 8);
                    let rel = at
                        .checked_sub(offset)
                        .filter(|rel| rel.checked_add(n).is_some_and(|e| e <= len));
                    let rel = rel.ok_or_else(|| {
                        protocol(format!(
                            "OFFSET_DATA of {n} bytes at {at} outside the read {len} at {offset}"
                        ))
                    })?;
                    r.read_exact(&mut buf[rel as usize..(rel + n) as usize])?;
                    covered.push((rel, rel + n));
                    Ok(())
                }
                Reply::Chunk {
                    kind: proto::REPLY_TYPE_OFFSET_HOLE,
                    length,
                } => {
                    if length != 12 {
                        return Err(protocol("OFFSET_HOLE chunk of bad length"));
                    }
                    let at = rd_u64(r)?;
                    let n = u64::from(rd_u32(r)?);
                    let rel = at
                        .checked_sub(offset)
                        .filter(|rel| rel.checked_add(n).is_some_and(|e| e <= len));
                    let rel = rel.ok_or_else(|| {
                        protocol(format!(
                            "OFFSET_HOLE of {n} bytes at {at} outside the read {len} at {offset}"
                        ))
                    })?;
                    buf[rel as usize..(rel + n) as usize].fill(0);
                    covered.push((rel, rel + n));
                    Ok(())
                }
                Reply::Chunk { kind, .. } => {
                    Err(protocol(format!("chunk type {kind} in a read reply")))
                }
            }
        };
        self.transact(proto::CMD_READ, 0, offset, len as u32, &mut handler)?;
        if simple {
            return Ok(());
        }
        let checked = check_coverage(covered, offset, len);
        if checked.is_err() {
            // A server that lies about coverage is not trusted again.
            self.broken = true;
        }
        checked
    }

    /// NBD_CMD_BLOCK_STATUS for `base:allocation` from `offset`, for up to
    /// `length` bytes (clamped to the export). The server may describe
    /// less than asked (ask again from the end of the answer) and the last
    /// extent may reach beyond the range. Never empty on success.
    pub fn block_status(&mut self, offset: u64, length: u32) -> Result<Vec<Extent>> {
        let ctx = self
            .meta_context
            .ok_or(NbdError::Unsupported("base:allocation"))?;
        if offset >= self.info.size || length == 0 {
            return Err(NbdError::Invalid(format!(
                "block status of {length} bytes at {offset}"
            )));
        }
        let length = u64::from(length).min(self.info.size - offset) as u32;
        let mut extents: Vec<Extent> = Vec::new();
        let mut seen = false;
        let mut handler = |reply: Reply, r: &mut dyn Read| -> Result<()> {
            match reply {
                Reply::Simple => Err(protocol("simple reply with success to BLOCK_STATUS")),
                Reply::Chunk {
                    kind: proto::REPLY_TYPE_BLOCK_STATUS,
                    length,
                } => {
                    if length < 12 || (length - 4) % 8 != 0 {
                        return Err(protocol(format!("BLOCK_STATUS chunk of {length} bytes")));
                    }
                    let id = rd_u32(r)?;
                    if id != ctx || seen {
                        return Err(protocol(format!(
                            "unexpected BLOCK_STATUS chunk for context {id}"
                        )));
                    }
                    seen = true;
                    let count = (length - 4) / 8;
                    extents.reserve(count as usize);
                    for _ in 0..count {
                        let len = rd_u32(r)?;
                        let flags = rd_u32(r)?;
                        if len == 0 {
                            return Err(protocol("zero-length extent"));
                        }
                        extents.push(Extent {
                            length: u64::from(len),
                            flags,
                        });
                    }
                    Ok(())
                }
                Reply::Chunk { kind, .. } => Err(protocol(format!(
                    "chunk type {kind} in a block status reply"
                ))),
            }
        };
        self.transact(proto::CMD_BLOCK_STATUS, 0, offset, length, &mut handler)?;
        if extents.is_empty() {
            self.broken = true;
            return Err(protocol("BLOCK_STATUS reply without extents"));
        }
        Ok(extents)
    }

    fn send_request(
        &mut self,
        cmd: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u32,
    ) -> Result<()> {
        let mut req = [0u8; 28];
        req[0..4].copy_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
        req[4..6].copy_from_slice(&flags.to_be_bytes());
        req[6..8].copy_from_slice(&cmd.to_be_bytes());
        req[8..16].copy_from_slice(&cookie.to_be_bytes());
        req[16..24].copy_from_slice(&offset.to_be_bytes());
        req[24..28].copy_from_slice(&length.to_be_bytes());
        self.writer.write_all(&req)?;
        Ok(())
    }

    /// Sends one request and reads its whole reply, handing each simple
    /// reply or data-carrying chunk to `handler`. The one place where
    /// requests and replies meet the wire. A server error (error chunk or
    /// simple reply errno) is returned after the final chunk, leaving the
    /// connection usable; any other failure marks it broken.
    fn transact(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        length: u32,
        handler: &mut dyn FnMut(Reply, &mut dyn Read) -> Result<()>,
    ) -> Result<()> {
        if self.broken {
            return Err(NbdError::Broken);
        }
        let result = self.transact_inner(cmd, flags, offset, length, handler);
        if let Err(e) = &result {
            if e.breaks_connection() {
                self.broken = true;
            }
        }
        result
    }

    fn transact_inner(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        length: u32,
        handler: &mut dyn FnMut(Reply, &mut dyn Read) -> Result<()>,
    ) -> Result<()> {
        let cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        self.send_request(cmd, flags, cookie, offset, length)?;
        let mut server_error: Option<NbdError> = None;
        let mut chunks = 0u64;
        loop {
            let magic = rd_u32(&mut self.reader)?;
            match magic {
                proto::SIMPLE_REPLY_MAGIC => {
                    let errno = rd_u32(&mut self.reader)?;
                    let got = rd_u64(&mut self.reader)?;
                    if got != cookie {
                        return Err(protocol(format!(
                            "reply for cookie {got}, expected {cookie}"
                        )));
                    }
                    if chunks > 0 {
                        return Err(protocol("simple reply after structured chunks"));
                    }
                    if errno != 0 {
                        return Err(NbdError::Server {
                            errno,
                            message: String::new(),
                        });
                    }
                    return handler(Reply::Simple, &mut self.reader);
                }
                proto::STRUCTURED_REPLY_MAGIC if self.structured => {
                    let rflags = rd_u16(&mut self.reader)?;
                    let kind = rd_u16(&mut self.reader)?;
                    let got = rd_u64(&mut self.reader)?;
                    let len = rd_u32(&mut self.reader)?;
                    if got != cookie {
                        return Err(protocol(format!(
                            "reply for cookie {got}, expected {cookie}"
                        )));
                    }
                    chunks += 1;
                    let limit = if kind == proto::REPLY_TYPE_OFFSET_DATA {
                        length.saturating_add(8)
                    } else {
                        proto::MAX_META_CHUNK
                    };
                    if len > limit {
                        return Err(protocol(format!("chunk type {kind} of {len} bytes")));
                    }
                    if kind & proto::REPLY_TYPE_ERR_BIT != 0 {
                        let e = self.read_error_chunk(kind, len)?;
                        server_error.get_or_insert(e);
                    } else if kind == proto::REPLY_TYPE_NONE {
                        if len != 0 || rflags & proto::REPLY_FLAG_DONE == 0 {
                            return Err(protocol("NONE chunk with payload or without DONE"));
                        }
                    } else {
                        let mut take = (&mut self.reader).take(u64::from(len));
                        handler(Reply::Chunk { kind, length: len }, &mut take)?;
                        if take.limit() != 0 {
                            return Err(protocol(format!(
                                "{} trailing bytes in chunk type {kind}",
                                take.limit()
                            )));
                        }
                    }
                    if rflags & proto::REPLY_FLAG_DONE != 0 {
                        return server_error.map_or(Ok(()), Err);
                    }
                }
                m => return Err(protocol(format!("bad reply magic {m:#x}"))),
            }
        }
    }

    fn read_error_chunk(&mut self, kind: u16, len: u32) -> Result<NbdError> {
        if len < 6 {
            return Err(protocol("short error chunk"));
        }
        let payload = rd_vec(&mut self.reader, len as usize)?;
        let errno = be_u32(&payload, 0).unwrap_or(0);
        let mlen = be_u16(&payload, 4).unwrap_or(0) as usize;
        let msg = payload
            .get(6..6 + mlen)
            .ok_or_else(|| protocol("error chunk message beyond its payload"))?;
        let mut message = lossy(msg);
        if kind == proto::REPLY_TYPE_ERROR_OFFSET {
            if let Some(at) = be_u64(&payload, 6 + mlen) {
                message = format!("{message} (at offset {at})");
            }
        }
        // errno 0 in an error chunk violates the protocol: still an error.
        let errno = if errno == 0 { libc::EIO as u32 } else { errno };
        Ok(NbdError::Server { errno, message })
    }

    /// Ends the session: NBD_CMD_DISC, then closes the socket. Also done on drop.
    pub fn disconnect(mut self) {
        self.disconnect_inner();
    }

    fn disconnect_inner(&mut self) {
        if !self.broken {
            self.broken = true;
            let cookie = self.next_cookie;
            let _ = self.send_request(proto::CMD_DISC, 0, cookie, 0, 0);
        }
        let _ = self.writer.shutdown(Shutdown::Both);
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        self.disconnect_inner();
    }
}

/// Several connections to one export, each behind its own mutex, so that
/// reads from several threads run in parallel. Connections are opened on
/// demand and replaced after a connection-level error; an idempotent
/// request that fails that way is retried once on a fresh connection.
pub struct NbdPool {
    socket: PathBuf,
    export: String,
    options: NbdOptions,
    info: ExportInfo,
    block_status: bool,
    slots: Vec<Mutex<Option<NbdClient>>>,
    next: AtomicUsize,
}

impl std::fmt::Debug for NbdPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdPool")
            .field("socket", &self.socket)
            .field("export", &self.export)
            .field("info", &self.info)
            .field("connections", &self.slots.len())
            .finish()
    }
}

impl NbdPool {
    /// Opens the first of up to `connections` (at least 1) connections to
    /// `export` at `socket`; the others open when reads overlap.
    pub fn connect(
        socket: &Path,
        export: &str,
        options: &NbdOptions,
        connections: usize,
    ) -> Result<Self> {
        let first = NbdClient::connect(socket, export, options)?;
        let mut slots: Vec<Mutex<Option<NbdClient>>> =
            (0..connections.max(1)).map(|_| Mutex::new(None)).collect();
        let info = first.info();
        let block_status = first.has_block_status();
        slots[0] = Mutex::new(Some(first));
        Ok(NbdPool {
            socket: socket.to_owned(),
            export: export.to_owned(),
            options: options.clone(),
            info,
            block_status,
            slots,
            next: AtomicUsize::new(0),
        })
    }

    /// What the server said about the export (on the first connection).
    pub fn info(&self) -> ExportInfo {
        self.info
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// True when the server offers `base:allocation` block status.
    pub fn has_block_status(&self) -> bool {
        self.block_status
    }

    /// The most connections this pool opens.
    pub fn max_connections(&self) -> usize {
        self.slots.len()
    }

    /// How many connections are open now.
    pub fn open_connections(&self) -> usize {
        self.slots.iter().filter(|s| s.lock().is_some()).count()
    }

    /// Runs `op` on a free connection (or waits for one), opening or
    /// replacing connections as needed. `op` must be idempotent: after a
    /// connection-level error it runs once more on a new connection.
    pub fn with_client<R>(&self, mut op: impl FnMut(&mut NbdClient) -> Result<R>) -> Result<R> {
        let n = self.slots.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut guard = (0..n)
            .find_map(|i| self.slots[(start + i) % n].try_lock())
            .unwrap_or_else(|| self.slots[start].lock());
        let mut attempt = 0;
        loop {
            attempt += 1;
            if guard.as_ref().is_none_or(NbdClient::is_broken) {
                *guard = None;
                let c = NbdClient::connect(&self.socket, &self.export, &self.options)?;
                if c.size() != self.info.size {
                    return Err(protocol(format!(
                        "export size changed from {} to {} on reconnect",
                        self.info.size,
                        c.size()
                    )));
                }
                *guard = Some(c);
            }
            let Some(client) = guard.as_mut() else {
                return Err(NbdError::Broken);
            };
            match op(client) {
                Err(e) if e.breaks_connection() => {
                    log::debug!("NBD connection to {} failed: {e}", self.socket.display());
                    *guard = None;
                    if attempt >= 2 {
                        return Err(e);
                    }
                }
                other => return other,
            }
        }
    }

    /// Reads `buf.len()` bytes at `offset` (see [`NbdClient::read`]).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.with_client(|c| c.read(offset, buf))
    }

    /// Block status (see [`NbdClient::block_status`]).
    pub fn block_status(&self, offset: u64, length: u32) -> Result<Vec<Extent>> {
        self.with_client(|c| c.block_status(offset, length))
    }

    /// Disconnects every connection; later requests reconnect.
    pub fn close(&self) {
        for slot in &self.slots {
            if let Some(c) = slot.lock().take() {
                c.disconnect();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    /// A scripted server end: greeting and option replies helpers.
    struct Fake(UnixStream);

    impl Fake {
        fn greet(&mut self, hflags: u16) {
            let mut g = Vec::new();
            g.extend_from_slice(&proto::NBDMAGIC.to_be_bytes());
            g.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
            g.extend_from_slice(&hflags.to_be_bytes());
            self.0.write_all(&g).unwrap();
            let _cflags = rd_u32(&mut self.0).unwrap();
        }
        /// Reads one option: (option, data).
        fn option(&mut self) -> (u32, Vec<u8>) {
            assert_eq!(rd_u64(&mut self.0).unwrap(), proto::IHAVEOPT);
            let opt = rd_u32(&mut self.0).unwrap();
            let len = rd_u32(&mut self.0).unwrap();
            (opt, rd_vec(&mut self.0, len as usize).unwrap())
        }
        fn reply(&mut self, opt: u32, rep: u32, data: &[u8]) {
            let mut m = Vec::new();
            m.extend_from_slice(&proto::OPT_REPLY_MAGIC.to_be_bytes());
            m.extend_from_slice(&opt.to_be_bytes());
            m.extend_from_slice(&rep.to_be_bytes());
            m.extend_from_slice(&(data.len() as u32).to_be_bytes());
            m.extend_from_slice(data);
            self.0.write_all(&m).unwrap();
        }
        /// A full handshake: structured replies, base:allocation id 7, size.
        fn handshake(&mut self, size: u64) {
            self.greet(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
            let (opt, _) = self.option();
            assert_eq!(opt, proto::OPT_STRUCTURED_REPLY);
            self.reply(opt, proto::REP_ACK, &[]);
            let (opt, _) = self.option();
            assert_eq!(opt, proto::OPT_SET_META_CONTEXT);
            let mut d = 7u32.to_be_bytes().to_vec();
            d.extend_from_slice(b"base:allocation");
            self.reply(opt, proto::REP_META_CONTEXT, &d);
            self.reply(opt, proto::REP_ACK, &[]);
            let (opt, _) = self.option();
            assert_eq!(opt, proto::OPT_GO);
            let mut info = proto::INFO_EXPORT.to_be_bytes().to_vec();
            info.extend_from_slice(&size.to_be_bytes());
            info.extend_from_slice(&(proto::FLAG_HAS_FLAGS | 2).to_be_bytes());
            self.reply(opt, proto::REP_INFO, &info);
            let mut bs = proto::INFO_BLOCK_SIZE.to_be_bytes().to_vec();
            for v in [1u32, 4096, 1 << 20] {
                bs.extend_from_slice(&v.to_be_bytes());
            }
            self.reply(opt, proto::REP_INFO, &bs);
            self.reply(opt, proto::REP_ACK, &[]);
        }
        /// Reads one request: (type, cookie, offset, length).
        fn request(&mut self) -> (u16, u64, u64, u32) {
            assert_eq!(rd_u32(&mut self.0).unwrap(), proto::REQUEST_MAGIC);
            let _flags = rd_u16(&mut self.0).unwrap();
            let kind = rd_u16(&mut self.0).unwrap();
            let cookie = rd_u64(&mut self.0).unwrap();
            let off = rd_u64(&mut self.0).unwrap();
            let len = rd_u32(&mut self.0).unwrap();
            (kind, cookie, off, len)
        }
        fn chunk(&mut self, flags: u16, kind: u16, cookie: u64, payload: &[u8]) {
            let mut m = Vec::new();
            m.extend_from_slice(&proto::STRUCTURED_REPLY_MAGIC.to_be_bytes());
            m.extend_from_slice(&flags.to_be_bytes());
            m.extend_from_slice(&kind.to_be_bytes());
            m.extend_from_slice(&cookie.to_be_bytes());
            m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            m.extend_from_slice(payload);
            self.0.write_all(&m).unwrap();
        }
    }

    fn pair(script: impl FnOnce(Fake) + Send + 'static) -> (UnixStream, thread::JoinHandle<()>) {
        let (a, b) = UnixStream::pair().unwrap();
        let h = thread::spawn(move || script(Fake(b)));
        (a, h)
    }

    fn opts() -> NbdOptions {
        NbdOptions {
            timeout: Duration::from_secs(5),
            ..NbdOptions::default()
        }
    }

    #[test]
    fn handshake_read_and_block_status() {
        let (s, h) = pair(|mut f| {
            f.handshake(1 << 20);
            // read 16 bytes at 8: data 4 bytes at 8, hole 8 at 12, data 4 at 20
            let (k, c, off, len) = f.request();
            assert_eq!((k, off, len), (proto::CMD_READ, 8, 16));
            let mut d = 20u64.to_be_bytes().to_vec();
            d.extend_from_slice(&[4, 4, 4, 4]);
            f.chunk(0, proto::REPLY_TYPE_OFFSET_DATA, c, &d);
            let mut hole = 12u64.to_be_bytes().to_vec();
            hole.extend_from_slice(&8u32.to_be_bytes());
            f.chunk(0, proto::REPLY_TYPE_OFFSET_HOLE, c, &hole);
            let mut d = 8u64.to_be_bytes().to_vec();
            d.extend_from_slice(&[1, 2, 3, 4]);
            f.chunk(proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_OFFSET_DATA, c, &d);
            let (k, c, off, len) = f.request();
            assert_eq!((k, off, len), (proto::CMD_BLOCK_STATUS, 0, 1 << 20));
            let mut p = 7u32.to_be_bytes().to_vec();
            for (l, fl) in [(4096u32, 0u32), (8192, 3)] {
                p.extend_from_slice(&l.to_be_bytes());
                p.extend_from_slice(&fl.to_be_bytes());
            }
            f.chunk(
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_BLOCK_STATUS,
                c,
                &p,
            );
            let (k, ..) = f.request();
            assert_eq!(k, proto::CMD_DISC);
        });
        let mut c = NbdClient::from_stream(s, "x", &opts()).unwrap();
        assert_eq!(c.size(), 1 << 20);
        assert!(c.has_block_status());
        assert_eq!(c.info().block_size.maximum, 1 << 20);
        let mut buf = [9u8; 16];
        c.read(8, &mut buf).unwrap();
        assert_eq!(buf, [1, 2, 3, 4, 0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4]);
        let ext = c.block_status(0, u32::MAX).unwrap();
        assert_eq!(
            ext,
            vec![
                Extent {
                    length: 4096,
                    flags: 0
                },
                Extent {
                    length: 8192,
                    flags: 3
                }
            ]
        );
        drop(c);
        h.join().unwrap();
    }

    #[test]
    fn old_server_export_name_and_simple_replies() {
        let (s, h) = pair(|mut f| {
            f.greet(proto::FLAG_FIXED_NEWSTYLE); // no NO_ZEROES
            let (o, _) = f.option();
            f.reply(o, proto::REP_ERR_UNSUP, &[]);
            let (o, _) = f.option();
            assert_eq!(o, proto::OPT_GO);
            f.reply(o, proto::REP_ERR_UNSUP, &[]);
            let (o, name) = f.option();
            assert_eq!((o, name.as_slice()), (proto::OPT_EXPORT_NAME, &b"exp"[..]));
            let mut m = 8192u64.to_be_bytes().to_vec();
            m.extend_from_slice(&proto::FLAG_HAS_FLAGS.to_be_bytes());
            m.extend_from_slice(&[0; 124]);
            f.0.write_all(&m).unwrap();
            let (k, c, off, len) = f.request();
            assert_eq!((k, off, len), (proto::CMD_READ, 100, 3));
            let mut r = proto::SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
            r.extend_from_slice(&0u32.to_be_bytes());
            r.extend_from_slice(&c.to_be_bytes());
            r.extend_from_slice(b"abc");
            f.0.write_all(&r).unwrap();
            let (_, c, ..) = f.request();
            let mut r = proto::SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
            r.extend_from_slice(&22u32.to_be_bytes());
            r.extend_from_slice(&c.to_be_bytes());
            f.0.write_all(&r).unwrap();
            let (k, ..) = f.request();
            assert_eq!(k, proto::CMD_DISC);
        });
        let mut c = NbdClient::from_stream(s, "exp", &opts()).unwrap();
        assert_eq!(c.size(), 8192);
        assert!(!c.structured_replies() && !c.has_block_status());
        assert!(matches!(
            c.block_status(0, 10),
            Err(NbdError::Unsupported(_))
        ));
        let mut buf = [0u8; 3];
        c.read(100, &mut buf).unwrap();
        assert_eq!(&buf, b"abc");
        let e = c.read(0, &mut buf).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL);
        assert!(!c.is_broken());
        drop(c);
        h.join().unwrap();
    }

    #[test]
    fn server_error_keeps_connection_usable() {
        let (s, h) = pair(|mut f| {
            f.handshake(4096);
            let (_, c, ..) = f.request();
            let mut e = 5u32.to_be_bytes().to_vec();
            e.extend_from_slice(&3u16.to_be_bytes());
            e.extend_from_slice(b"bad");
            f.chunk(proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_ERR_BIT | 1, c, &e);
            let (_, c, ..) = f.request();
            let mut d = 0u64.to_be_bytes().to_vec();
            d.extend_from_slice(&[7; 4]);
            f.chunk(proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_OFFSET_DATA, c, &d);
            let _ = f.request();
        });
        let mut c = NbdClient::from_stream(s, "", &opts()).unwrap();
        let mut buf = [0u8; 4];
        let e = c.read(0, &mut buf).unwrap_err();
        assert!(
            matches!(&e, NbdError::Server { errno: 5, message } if message == "bad"),
            "{e}"
        );
        assert_eq!(e.errno(), libc::EIO);
        assert!(!c.is_broken());
        c.read(0, &mut buf).unwrap();
        assert_eq!(buf, [7; 4]);
        drop(c);
        h.join().unwrap();
    }

    #[test]
    fn malformed_replies_are_errors() {
        // Each case: what the server sends in reply to the first read.
        type Case = Box<dyn FnOnce(&mut Fake, u64) + Send>;
        let cases: Vec<(&str, Case)> = vec![
            (
                "closes",
                Box::new(|f, _| f.0.shutdown(Shutdown::Both).unwrap()),
            ),
            (
                "bad magic",
                Box::new(|f, _| f.0.write_all(&[0xde; 32]).unwrap()),
            ),
            (
                "wrong cookie",
                Box::new(|f, c| {
                    f.chunk(proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, c + 1, &[])
                }),
            ),
            (
                "huge chunk",
                Box::new(|f, c| {
                    let mut m = proto::STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
                    m.extend_from_slice(&1u16.to_be_bytes());
                    m.extend_from_slice(&proto::REPLY_TYPE_OFFSET_DATA.to_be_bytes());
                    m.extend_from_slice(&c.to_be_bytes());
                    m.extend_from_slice(&u32::MAX.to_be_bytes());
                    f.0.write_all(&m).unwrap();
                }),
            ),
            (
                "data outside the request",
                Box::new(|f, c| {
                    let mut d = 4000u64.to_be_bytes().to_vec();
                    d.extend_from_slice(&[1; 200]);
                    f.chunk(proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_OFFSET_DATA, c, &d);
                }),
            ),
            (
                "gap",
                Box::new(|f, c| {
                    let mut d = 0u64.to_be_bytes().to_vec();
                    d.extend_from_slice(&[1; 100]);
                    f.chunk(proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_OFFSET_DATA, c, &d);
                }),
            ),
            (
                "overlap",
                Box::new(|f, c| {
                    let mut d = 0u64.to_be_bytes().to_vec();
                    d.extend_from_slice(&[1; 256]);
                    f.chunk(0, proto::REPLY_TYPE_OFFSET_DATA, c, &d);
                    let mut hole = 128u64.to_be_bytes().to_vec();
                    hole.extend_from_slice(&128u32.to_be_bytes());
                    f.chunk(
                        proto::REPLY_FLAG_DONE,
                        proto::REPLY_TYPE_OFFSET_HOLE,
                        c,
                        &hole,
                    );
                }),
            ),
            (
                "short error chunk",
                Box::new(|f, c| {
                    f.chunk(
                        proto::REPLY_FLAG_DONE,
                        proto::REPLY_TYPE_ERR_BIT | 1,
                        c,
                        &[0, 0],
                    )
                }),
            ),
            (
                "error message too long",
                Box::new(|f, c| {
                    let mut e = 5u32.to_be_bytes().to_vec();
                    e.extend_from_slice(&u16::MAX.to_be_bytes());
                    f.chunk(proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_ERR_BIT | 1, c, &e);
                }),
            ),
            (
                "block status chunk in read",
                Box::new(|f, c| {
                    f.chunk(
                        proto::REPLY_FLAG_DONE,
                        proto::REPLY_TYPE_BLOCK_STATUS,
                        c,
                        &[0; 12],
                    )
                }),
            ),
            (
                "truncated header",
                Box::new(|f, _| {
                    f.0.write_all(&proto::STRUCTURED_REPLY_MAGIC.to_be_bytes())
                        .unwrap();
                    f.0.shutdown(Shutdown::Write).unwrap();
                }),
            ),
        ];
        for (name, case) in cases {
            let (s, h) = pair(move |mut f| {
                f.handshake(4096);
                let (_, c, ..) = f.request();
                case(&mut f, c);
                // Keep the socket open until the client gives up.
                let mut sink = Vec::new();
                let _ = f.0.read_to_end(&mut sink);
            });
            let mut c = NbdClient::from_stream(s, "", &opts()).unwrap();
            let mut buf = [0u8; 256];
            let e = c.read(0, &mut buf).unwrap_err();
            assert!(e.breaks_connection(), "{name}: {e}");
            assert!(c.is_broken(), "{name}");
            assert!(
                matches!(c.read(0, &mut buf), Err(NbdError::Broken)),
                "{name}"
            );
            drop(c);
            h.join().unwrap();
        }
    }

    #[test]
    fn malformed_handshakes_are_errors() {
        type Script = Box<dyn FnOnce(&mut Fake) + Send>;
        let cases: Vec<(&str, Script)> = vec![
            (
                "not nbd",
                Box::new(|f| f.0.write_all(b"HTTP/1.1 400 Bad\r\n\r\n").unwrap()),
            ),
            (
                "closes",
                Box::new(|f| f.0.shutdown(Shutdown::Both).unwrap()),
            ),
            (
                "oldstyle",
                Box::new(|f| {
                    let mut g = proto::NBDMAGIC.to_be_bytes().to_vec();
                    g.extend_from_slice(&proto::CLISERV_MAGIC.to_be_bytes());
                    f.0.write_all(&g).unwrap();
                }),
            ),
            (
                "no export info",
                Box::new(|f| {
                    f.greet(1);
                    let (o, _) = f.option();
                    f.reply(o, proto::REP_ERR_UNSUP, &[]);
                    let (o, _) = f.option();
                    f.reply(o, proto::REP_ACK, &[]);
                }),
            ),
            (
                "unknown export",
                Box::new(|f| {
                    f.greet(1);
                    let (o, _) = f.option();
                    f.reply(o, proto::REP_ERR_UNSUP, &[]);
                    let (o, _) = f.option();
                    f.reply(o, proto::REP_ERR_BIT | 6, b"no such export");
                }),
            ),
            (
                "huge option reply",
                Box::new(|f| {
                    f.greet(1);
                    let (o, _) = f.option();
                    let mut m = proto::OPT_REPLY_MAGIC.to_be_bytes().to_vec();
                    m.extend_from_slice(&o.to_be_bytes());
                    m.extend_from_slice(&proto::REP_ACK.to_be_bytes());
                    m.extend_from_slice(&u32::MAX.to_be_bytes());
                    f.0.write_all(&m).unwrap();
                }),
            ),
            (
                "bad block size",
                Box::new(|f| {
                    f.greet(1);
                    let (o, _) = f.option();
                    f.reply(o, proto::REP_ERR_UNSUP, &[]);
                    let (o, _) = f.option();
                    let mut info = proto::INFO_EXPORT.to_be_bytes().to_vec();
                    info.extend_from_slice(&4096u64.to_be_bytes());
                    info.extend_from_slice(&1u16.to_be_bytes());
                    f.reply(o, proto::REP_INFO, &info);
                    let mut bs = proto::INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    for v in [3u32, 4096, 1 << 20] {
                        bs.extend_from_slice(&v.to_be_bytes());
                    }
                    f.reply(o, proto::REP_INFO, &bs);
                    f.reply(o, proto::REP_ACK, &[]);
                }),
            ),
        ];
        for (name, case) in cases {
            let (s, h) = pair(move |mut f| {
                case(&mut f);
                let mut sink = Vec::new();
                let _ = f.0.read_to_end(&mut sink);
            });
            let e = NbdClient::from_stream(s, "", &opts()).unwrap_err();
            log::debug!("{name}: {e}");
            if name == "unknown export" {
                assert!(matches!(e, NbdError::OptionRefused { .. }), "{name}: {e}");
            }
            h.join().unwrap();
        }
    }

    #[test]
    fn timeout_is_an_error() {
        let (s, h) = pair(|mut f| {
            f.handshake(4096);
            let _ = f.request();
            thread::sleep(Duration::from_millis(600));
        });
        let o = NbdOptions {
            timeout: Duration::from_millis(200),
            ..opts()
        };
        let mut c = NbdClient::from_stream(s, "", &o).unwrap();
        let mut buf = [0u8; 16];
        let e = c.read(0, &mut buf).unwrap_err();
        assert!(matches!(e, NbdError::Timeout), "{e}");
        assert_eq!(e.errno(), libc::ETIMEDOUT);
        drop(c);
        h.join().unwrap();
    }

    #[test]
    fn out_of_range_requests_are_refused_locally() {
        let (s, h) = pair(|mut f| {
            f.handshake(4096);
            let (k, ..) = f.request();
            assert_eq!(k, proto::CMD_DISC);
        });
        let mut c = NbdClient::from_stream(s, "", &opts()).unwrap();
        let mut buf = [0u8; 16];
        assert!(matches!(c.read(4090, &mut buf), Err(NbdError::Invalid(_))));
        assert!(matches!(
            c.read(u64::MAX - 2, &mut buf),
            Err(NbdError::Invalid(_))
        ));
        assert!(matches!(c.block_status(4096, 1), Err(NbdError::Invalid(_))));
        assert!(!c.is_broken());
        drop(c);
        h.join().unwrap();
    }
}
