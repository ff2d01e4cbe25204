//! How a view is served: a [`ViewSource`] says what to export (an image,
//! or an internal snapshot inside a qcow2 image), [`NbdServer`] runs the
//! `qemu-nbd` child that exports it on a private Unix socket, [`View`]
//! reads it through an [`NbdPool`] and an [`ExtentMap`], and [`LazyView`]
//! starts all that on first use and releases it when idle.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::extents::{ExtentMap, DEFAULT_CHUNK};
use super::nbd::{NbdError, NbdOptions, NbdPool};

/// The export name the views' `qemu-nbd` servers use.
pub const EXPORT_NAME: &str = "view";

/// The longest Unix socket path (`sun_path` holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Why a view could not be opened or served.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    /// `qemu-nbd` could not be started.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// The error of `exec`.
        source: io::Error,
    },
    /// `qemu-nbd` exited before it accepted a connection.
    #[error("qemu-nbd exited ({status}): {message}")]
    ServerExited {
        /// How it exited.
        status: ExitStatus,
        /// The end of its standard error, e.g. "Can't find snapshot".
        message: String,
    },
    /// `qemu-nbd` did not accept a connection in time.
    #[error("qemu-nbd did not accept connections within {0:?}")]
    StartTimeout(Duration),
    /// A path or name that cannot be handed to `qemu-nbd`.
    #[error("invalid view source: {0}")]
    Invalid(String),
    /// The NBD connection failed.
    #[error(transparent)]
    Nbd(#[from] NbdError),
    /// Any other I/O error (socket directory, log file).
    #[error("view I/O error: {0}")]
    Io(#[from] io::Error),
}

impl ViewError {
    /// The errno a file operation should return for this error.
    pub fn errno(&self) -> i32 {
        match self {
            ViewError::Nbd(e) => e.errno(),
            ViewError::Invalid(_) => libc::EINVAL,
            ViewError::StartTimeout(_) => libc::ETIMEDOUT,
            _ => libc::EIO,
        }
    }
}

impl From<ViewError> for io::Error {
    fn from(e: ViewError) -> Self {
        io::Error::from_raw_os_error(e.errno())
    }
}

/// What a view exports: an image file as a whole (an external snapshot's
/// image, a backing file), or an internal snapshot inside a qcow2 image.
/// Both are opened read-only with `force-share=on`, so an image that a
/// running QEMU holds can be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewSource {
    /// The image file.
    pub image: PathBuf,
    /// Its format driver: `qcow2` (default) or `raw`.
    pub format: String,
    /// The tag of an internal snapshot to export, or `None` for the
    /// image's own (current) contents.
    pub snapshot: Option<String>,
    /// The image's backing chain below it (file, format), opened with
    /// `force-share` too, so that no lock of a view ever stops QEMU from
    /// merging images. Empty: QEMU opens the chain the image names,
    /// unless `pinned`.
    pub backing: Vec<(PathBuf, String)>,
    /// True when `backing` is the whole chain: QEMU opens nothing below
    /// its last image (`backing=` null there), whatever a header says.
    pub pinned: bool,
}

/// Doubles commas, the escape of QEMU's `key=value,...` option strings.
fn opt_escape(s: &str) -> String {
    s.replace(',', ",,")
}

impl ViewSource {
    /// The internal snapshot `tag` of the qcow2 image `image`.
    pub fn internal_snapshot(image: impl Into<PathBuf>, tag: impl Into<String>) -> Self {
        ViewSource {
            image: image.into(),
            format: "qcow2".into(),
            backing: Vec::new(),
            snapshot: Some(tag.into()),
            pinned: false,
        }
    }

    /// The contents of the qcow2 image `image` (with its backing chain).
    pub fn image(image: impl Into<PathBuf>) -> Self {
        ViewSource {
            image: image.into(),
            format: "qcow2".into(),
            snapshot: None,
            backing: Vec::new(),
            pinned: false,
        }
    }

    /// The same source with another format driver (e.g. `raw`).
    pub fn with_format(mut self, format: impl Into<String>) -> Self {
        self.format = format.into();
        self
    }

    /// The same source with its whole backing chain spelled out (see
    /// [`ViewSource::backing`]): QEMU follows nothing else.
    pub fn with_backing(mut self, backing: Vec<(PathBuf, String)>) -> Self {
        self.backing = backing;
        self.pinned = true;
        self
    }

    /// The arguments of `qemu-nbd` that export this source read-only on
    /// `socket` under `export`, for any number of clients, surviving
    /// disconnects:
    ///
    /// `--image-opts -r -t -e 0 -k SOCK -x EXPORT [-l snapshot.name=TAG]
    /// driver=FMT,file.driver=file,file.filename=IMAGE,force-share=on,read-only=on`
    ///
    /// (commas in the tag and the file name are doubled, QEMU's escape).
    pub fn qemu_nbd_args(&self, socket: &Path, export: &str) -> Result<Vec<OsString>, ViewError> {
        let image = self.image.to_str().ok_or_else(|| {
            ViewError::Invalid(format!("image path {:?} is not UTF-8", self.image))
        })?;
        if image.is_empty() || image.contains('\0') {
            return Err(ViewError::Invalid(format!("bad image path {image:?}")));
        }
        let format_ok = !self.format.is_empty()
            && self
                .format
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !format_ok {
            return Err(ViewError::Invalid(format!(
                "bad image format {:?}",
                self.format
            )));
        }
        let mut args: Vec<OsString> = vec![
            "--image-opts".into(),
            "--read-only".into(),
            "--persistent".into(),
            "--shared=0".into(),
            "--socket".into(),
            socket.into(),
            "--export-name".into(),
            export.into(),
        ];
        if let Some(tag) = &self.snapshot {
            if tag.is_empty() || tag.contains('\0') {
                return Err(ViewError::Invalid(format!("bad snapshot tag {tag:?}")));
            }
            args.push("--load-snapshot".into());
            args.push(format!("snapshot.name={}", opt_escape(tag)).into());
        }
        let mut opts = format!(
            "driver={},file.driver=file,file.filename={},force-share=on,read-only=on",
            self.format,
            opt_escape(image)
        );
        let mut prefix = String::new();
        let mut bottom = self.format.as_str();
        for (file, format) in &self.backing {
            bottom = format.as_str();
            prefix.push_str("backing.");
            let file = file
                .to_str()
                .ok_or_else(|| ViewError::Invalid(format!("backing path {file:?} is not UTF-8")))?;
            opts += &format!(
                ",{prefix}driver={format},{prefix}file.driver=file,\
                 {prefix}file.filename={},{prefix}force-share=on,{prefix}read-only=on",
                opt_escape(file)
            );
        }
        if self.pinned && bottom == "qcow2" {
            opts += &format!(",{prefix}backing=");
        }
        args.push(opts.into());
        Ok(args)
    }

    /// Starts a `qemu-nbd` for this source and connects to it.
    pub fn open(&self, options: &ViewOptions) -> Result<View, ViewError> {
        let server = NbdServer::spawn(self, options)?;
        View::serve(server, options)
    }
}

/// How views are served and read.
#[derive(Debug, Clone)]
pub struct ViewOptions {
    /// Where the `qemu-nbd` sockets (and their stderr logs) are made; the
    /// path of a socket must stay under 108 bytes.
    pub runtime_dir: PathBuf,
    /// The `qemu-nbd` program.
    pub qemu_nbd: PathBuf,
    /// Connections per view (parallel reads).
    pub connections: usize,
    /// Settings of each NBD connection (timeout...).
    pub nbd: NbdOptions,
    /// How long `qemu-nbd` may take to accept the first connection.
    pub start_timeout: Duration,
    /// Bytes per block status query of the extent map.
    pub extent_chunk: u64,
    /// Answer reads of ranges the server reports as zero without asking it.
    pub zero_fill: bool,
    /// Told each new failure to serve a view (with `qemu-nbd`'s own
    /// words), so that it reaches the domain's `.log`.
    pub on_error: Option<ErrorSink>,
}

/// Where the failures of views are told (the domain's `.log`).
#[derive(Clone)]
pub struct ErrorSink(pub Arc<dyn Fn(&str) + Send + Sync>);

impl std::fmt::Debug for ErrorSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ErrorSink")
    }
}

impl Default for ViewOptions {
    fn default() -> Self {
        ViewOptions {
            runtime_dir: std::env::temp_dir(),
            qemu_nbd: "qemu-nbd".into(),
            connections: 4,
            nbd: NbdOptions::default(),
            start_timeout: Duration::from_secs(10),
            extent_chunk: DEFAULT_CHUNK,
            zero_fill: true,
            on_error: None,
        }
    }
}

/// A `qemu-nbd` child process serving one source on a private socket.
/// Dropping it stops the process (SIGTERM, then SIGKILL, by pid) and
/// removes the socket and log files.
#[derive(Debug)]
pub struct NbdServer {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    stopped: bool,
}

static SERVER_SEQ: AtomicU64 = AtomicU64::new(0);

impl NbdServer {
    /// Starts `qemu-nbd` for `source`; it may not accept connections yet.
    pub fn spawn(source: &ViewSource, options: &ViewOptions) -> Result<Self, ViewError> {
        let n = SERVER_SEQ.fetch_add(1, Ordering::Relaxed);
        let base = format!("vmsnapfs-nbd-{}-{n}", std::process::id());
        let socket = options.runtime_dir.join(format!("{base}.sock"));
        let log = options.runtime_dir.join(format!("{base}.log"));
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(ViewError::Invalid(format!(
                "socket path {} too long",
                socket.display()
            )));
        }
        let args = source.qemu_nbd_args(&socket, EXPORT_NAME)?;
        let _ = fs::remove_file(&socket);
        let err = File::create(&log)?;
        let child = Command::new(&options.qemu_nbd)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .map_err(|source| {
                let _ = fs::remove_file(&log);
                ViewError::Spawn {
                    program: options.qemu_nbd.clone(),
                    source,
                }
            })?;
        log::debug!(
            "started qemu-nbd pid {} for {source:?} on {}",
            child.id(),
            socket.display()
        );
        Ok(NbdServer {
            child,
            socket,
            log,
            stopped: false,
        })
    }

    /// The process id of `qemu-nbd`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The Unix socket it listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// How it exited, or `None` while it runs.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// The end of what it wrote to standard error.
    pub fn stderr_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = f.seek(SeekFrom::Start(len.saturating_sub(4096)));
            let mut bytes = Vec::new();
            let _ = f.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).trim().to_string();
        }
        text
    }

    /// Stops the process (SIGTERM, SIGKILL after 2 s), reaps it, removes
    /// its files. Idempotent.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        if let Ok(None) = self.child.try_wait() {
            // Still our unreaped child: the pid cannot have been reused.
            if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
                // SAFETY: kill(2) with a valid signal on our own child.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            let deadline = Instant::now() + Duration::from_secs(2);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if let Ok(None) = self.child.try_wait() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        let _ = fs::remove_file(&self.socket);
        let _ = fs::remove_file(&self.log);
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An open read-only view of a disk: a connection pool to its NBD export,
/// its extent map, and (when the view started it) the `qemu-nbd` serving
/// it, which stops when the view is dropped.
pub struct View {
    // Field order is drop order: disconnect before the server stops.
    pool: NbdPool,
    extents: ExtentMap,
    size: u64,
    zero_fill: bool,
    server: Option<Mutex<NbdServer>>,
}

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View")
            .field("size", &self.size)
            .field("pool", &self.pool)
            .field("server_pid", &self.server_pid())
            .finish()
    }
}

impl View {
    /// A view of an export some other server already serves (e.g. QEMU's
    /// own NBD server for a backing node of a running VM).
    pub fn connect(socket: &Path, export: &str, options: &ViewOptions) -> Result<View, ViewError> {
        let pool = NbdPool::connect(socket, export, &options.nbd, options.connections)?;
        Ok(Self::from_pool(pool, None, options))
    }

    /// Waits until `server` accepts a connection, then makes the view that
    /// owns it.
    pub fn serve(mut server: NbdServer, options: &ViewOptions) -> Result<View, ViewError> {
        let deadline = Instant::now() + options.start_timeout;
        loop {
            match NbdPool::connect(
                server.socket(),
                EXPORT_NAME,
                &options.nbd,
                options.connections,
            ) {
                Ok(pool) => return Ok(Self::from_pool(pool, Some(server), options)),
                Err(NbdError::Connect { source, .. })
                    if matches!(
                        source.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) => {}
                Err(e) => {
                    // qemu-nbd may listen before it opens the image and
                    // close the connection when that fails: its message
                    // says more than "connection closed".
                    let until = Instant::now() + Duration::from_secs(1);
                    while Instant::now() < until {
                        if let Some(status) = server.try_wait()? {
                            return Err(ViewError::ServerExited {
                                status,
                                message: server.stderr_tail(),
                            });
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    return Err(e.into());
                }
            }
            if let Some(status) = server.try_wait()? {
                return Err(ViewError::ServerExited {
                    status,
                    message: server.stderr_tail(),
                });
            }
            if Instant::now() >= deadline {
                return Err(ViewError::StartTimeout(options.start_timeout));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn from_pool(pool: NbdPool, server: Option<NbdServer>, options: &ViewOptions) -> View {
        let size = pool.size();
        View {
            extents: ExtentMap::new(size, options.extent_chunk),
            pool,
            size,
            zero_fill: options.zero_fill,
            server: server.map(Mutex::new),
        }
    }

    /// Size of the disk in bytes (the virtual size).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The NBD connections.
    pub fn pool(&self) -> &NbdPool {
        &self.pool
    }

    /// The cached extent map.
    pub fn extents(&self) -> &ExtentMap {
        &self.extents
    }

    /// The pid of the `qemu-nbd` this view started, if it started one.
    pub fn server_pid(&self) -> Option<u32> {
        self.server.as_ref().map(|s| s.lock().pid())
    }

    /// False once the `qemu-nbd` this view started has exited.
    pub fn server_running(&self) -> bool {
        self.server
            .as_ref()
            .is_none_or(|s| matches!(s.lock().try_wait(), Ok(None)))
    }

    /// Reads at `offset` like `pread(2)`: fills `buf` up to the end of
    /// the disk and returns the count, 0 at or past the end. A range the
    /// extent map knows to read as zero is filled without asking.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        if offset >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.size - offset) as usize;
        let buf = &mut buf[..n];
        if self.zero_fill && self.pool.has_block_status() {
            match self.extents.is_zero(&self.pool, offset, n as u64) {
                Ok(true) => {
                    buf.fill(0);
                    return Ok(n);
                }
                Ok(false) => {}
                Err(e) => log::debug!("block status for a read at {offset} failed: {e}"),
            }
        }
        self.pool.read(offset, buf)?;
        Ok(n)
    }

    /// `lseek(SEEK_DATA)`: `None` means `ENXIO`. Without block status
    /// every byte is data.
    pub fn seek_data(&self, offset: u64) -> io::Result<Option<u64>> {
        if !self.pool.has_block_status() {
            return Ok((offset < self.size).then_some(offset));
        }
        Ok(self.extents.seek_data(&self.pool, offset)?)
    }

    /// `lseek(SEEK_HOLE)`: the next hole or the disk size; `None` means
    /// `ENXIO` (offset at or past the end).
    pub fn seek_hole(&self, offset: u64) -> io::Result<Option<u64>> {
        if !self.pool.has_block_status() {
            return Ok((offset < self.size).then_some(self.size));
        }
        Ok(self.extents.seek_hole(&self.pool, offset)?)
    }

    /// True when all of `offset..offset+len` (within the disk) is a hole.
    pub fn is_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        if !self.pool.has_block_status() {
            return Ok(offset.saturating_add(len).min(self.size) <= offset);
        }
        Ok(self.extents.is_hole(&self.pool, offset, len)?)
    }
}

struct LazyState {
    view: Option<Arc<View>>,
    last_used: Instant,
    size: Option<u64>,
    /// The last failure told to [`ViewOptions::on_error`] (told once).
    last_error: Option<String>,
}

/// A view that starts its server on first use and can be released when
/// idle ([`LazyView::close_if_idle`], called from a periodic sweep), then
/// starts again on the next use. An error that leaves the server dead
/// drops the open view, so the next call starts a new one.
pub struct LazyView {
    source: ViewSource,
    options: ViewOptions,
    state: Mutex<LazyState>,
}

impl std::fmt::Debug for LazyView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyView")
            .field("source", &self.source)
            .field("open", &self.is_open())
            .finish()
    }
}

impl LazyView {
    /// A closed view of `source`.
    pub fn new(source: ViewSource, options: ViewOptions) -> Self {
        LazyView {
            source,
            options,
            state: Mutex::new(LazyState {
                view: None,
                last_used: Instant::now(),
                size: None,
                last_error: None,
            }),
        }
    }

    /// What this view shows.
    pub fn source(&self) -> &ViewSource {
        &self.source
    }

    /// The open view, opening it if needed. Concurrent callers wait for
    /// one opening.
    pub fn view(&self) -> Result<Arc<View>, ViewError> {
        let mut st = self.state.lock();
        st.last_used = Instant::now();
        if let Some(v) = &st.view {
            return Ok(Arc::clone(v));
        }
        let v = match self.source.open(&self.options) {
            Ok(v) => Arc::new(v),
            Err(e) => {
                let text = format!("view of {}: {e}", self.source.image.display());
                if st.last_error.as_deref() != Some(text.as_str()) {
                    log::warn!("{text}");
                    if let Some(sink) = &self.options.on_error {
                        (sink.0)(&text);
                    }
                    st.last_error = Some(text);
                }
                return Err(e);
            }
        };
        st.last_error = None;
        st.size = Some(v.size());
        st.view = Some(Arc::clone(&v));
        Ok(v)
    }

    /// True while a server runs for this view.
    pub fn is_open(&self) -> bool {
        self.state.lock().view.is_some()
    }

    /// Size of the disk: known without a server after the first opening.
    pub fn size(&self) -> Result<u64, ViewError> {
        if let Some(s) = self.state.lock().size {
            return Ok(s);
        }
        Ok(self.view()?.size())
    }

    fn run<R>(&self, op: impl FnOnce(&View) -> io::Result<R>) -> io::Result<R> {
        let v = self.view()?;
        let result = op(&v);
        let mut st = self.state.lock();
        st.last_used = Instant::now();
        let current = st.view.as_ref().is_some_and(|cur| Arc::ptr_eq(cur, &v));
        if result.is_err() && current && !v.server_running() {
            log::warn!(
                "qemu-nbd for {:?} died; the next use restarts it",
                self.source
            );
            st.view = None;
        }
        result
    }

    /// [`View::read_at`], opening the view if needed.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        if self.state.lock().size.is_some_and(|s| offset >= s) {
            return Ok(0);
        }
        self.run(|v| v.read_at(offset, buf))
    }

    /// [`View::seek_data`], opening the view if needed.
    pub fn seek_data(&self, offset: u64) -> io::Result<Option<u64>> {
        self.run(|v| v.seek_data(offset))
    }

    /// [`View::seek_hole`], opening the view if needed.
    pub fn seek_hole(&self, offset: u64) -> io::Result<Option<u64>> {
        self.run(|v| v.seek_hole(offset))
    }

    /// Releases the server and connections if unused for `after` and no
    /// call is in progress. True when it closed the view.
    pub fn close_if_idle(&self, after: Duration) -> bool {
        let taken = {
            let mut st = self.state.lock();
            let idle = st.last_used.elapsed() >= after;
            let busy = st.view.as_ref().is_some_and(|v| Arc::strong_count(v) > 1);
            if idle && !busy {
                st.view.take()
            } else {
                None
            }
        };
        // Dropped outside the lock: stopping qemu-nbd takes a moment.
        taken.is_some()
    }

    /// Releases the view now; calls in progress finish on it first (it
    /// stops when the last one ends). True when a view was open.
    pub fn close(&self) -> bool {
        let taken = self.state.lock().view.take();
        taken.is_some()
    }
}
