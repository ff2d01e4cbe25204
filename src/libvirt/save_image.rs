//! A memory file loaded through libvirt: `virsh restore` reads a libvirt
//! save image (libvirt's header, the domain XML, then QEMU's migration
//! stream) and starts QEMU from that XML with the stream as its incoming
//! migration. vmsnapfs's memory files are plain migration streams, so
//! the image is never written to disk: a FIFO in the domain's private
//! state directory is fed libvirt's header and XML followed by the
//! memory file's bytes, read from the start and never written (a frozen
//! file never changes), and removed afterwards.
//!
//! The header is libvirt's `virQEMUSaveHeader` (`qemu_saveimage.h`):
//! the magic `LibvirtQemudSave`, then native-endian 32-bit `version` (2),
//! `data_len` (the XML, its NUL and padding), `was_running`, the
//! compression format (0: raw), `cookieOffset` (0: no cookie) and 14
//! unused words.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::Virsh;
use crate::error::{Error, Result};

/// libvirt's magic of a complete save image.
const MAGIC: &[u8; 16] = b"LibvirtQemudSave";
/// The header version libvirt 9.0 writes and reads.
const VERSION: u32 = 2;
/// The header's size: the magic, five words and 14 unused ones.
pub const HEADER_LEN: usize = 16 + 4 * 5 + 4 * 14;
/// The start of every QEMU migration stream (`QEMU_VM_FILE_MAGIC`).
const STREAM_MAGIC: &[u8; 4] = b"QEVM";
/// The name of the FIFO in the domain's state directory.
const FIFO: &str = "libvirt-restore.fifo";
/// The name of the save image written as a file, where a FIFO is not read.
const FILE: &str = "libvirt-restore.save";
/// Bytes copied at a time from the memory file into the FIFO.
const CHUNK: usize = 1 << 20;
/// How long the feeder waits between checks of its stop flag.
const POLL_MS: i32 = 100;

/// libvirt's save-image header and data for `xml` (a domain definition):
/// the header, the XML with its NUL, and zeros so that the migration
/// stream starts 4 KiB-aligned (as it would in a file).
pub fn header(xml: &str, was_running: bool) -> Result<Vec<u8>> {
    if xml.as_bytes().contains(&0) {
        return Err(Error::invalid("the domain XML holds a NUL byte"));
    }
    let used = HEADER_LEN + xml.len() + 1;
    let data_len = xml.len() + 1 + (used.next_multiple_of(4096) - used);
    let data_len = u32::try_from(data_len)
        .map_err(|_| Error::invalid("the domain XML is too large for libvirt's header"))?;
    let mut h = Vec::with_capacity(HEADER_LEN + data_len as usize);
    h.extend_from_slice(MAGIC);
    for word in [VERSION, data_len, u32::from(was_running), 0, 0] {
        h.extend_from_slice(&word.to_ne_bytes());
    }
    h.resize(HEADER_LEN, 0);
    h.extend_from_slice(xml.as_bytes());
    h.resize(HEADER_LEN + data_len as usize, 0);
    Ok(h)
}

/// Checks that `memory` is a QEMU migration stream (its magic).
pub fn check_stream(memory: &File) -> Result<()> {
    let mut magic = [0u8; 4];
    memory
        .read_exact_at(&mut magic, 0)
        .map_err(|e| Error::io(format!("the memory file cannot be read: {e}")))?;
    if &magic != STREAM_MAGIC {
        return Err(Error::io("the memory file is not a QEMU migration stream"));
    }
    Ok(())
}

/// Runs `virsh restore` (of the shut-off domain `xml` names) from a
/// save image of `xml` and `memory` in `state_dir`, leaving the guest
/// paused (libvirt reports it `paused (migrating)`), within `deadline`.
/// The image is a FIFO fed on the fly; a libvirt that leaves it after
/// the header (to open it again) gets a regular file instead, written
/// O_EXCL and removed afterwards. Nothing is left in `state_dir`.
pub fn restore(
    virsh: &Virsh,
    state_dir: &Path,
    xml: &str,
    memory: &File,
    deadline: Duration,
) -> Result<()> {
    check_stream(memory)?;
    let head = header(xml, false)?;
    let fifo = crate::failpoint::hit("restore.fifo").and_then(|()| {
        let feed = Feed::start(&state_dir.join(FIFO), head.clone(), memory.try_clone()?)?;
        let r = run_restore(virsh, feed.path(), deadline);
        Ok((r, feed.finish()))
    });
    let left_early = match fifo {
        Ok((Ok(()), _)) => return Ok(()),
        // libvirt read the header, closed the FIFO and opened it again
        // (gone by then, or fed on): it reads the image twice.
        Ok((Err(e), Err(f)))
            if f.kind() == io::ErrorKind::BrokenPipe
                && ["No such file", "magic", "header"]
                    .iter()
                    .any(|m| e.message.contains(m)) =>
        {
            e
        }
        Ok((Err(e), Err(f))) => return Err(e.context(format!("feeding the memory file: {f}"))),
        Ok((Err(e), Ok(_))) => return Err(e),
        // The FIFO could not be made (or a test asks for the file).
        Err(e) => e,
    };
    log::info!(
        "libvirt did not read the save image in one pass ({left_early}); restoring from a file"
    );
    let path = state_dir.join(FILE);
    // A leftover of an interrupted restore is ours: the directory is private.
    let _ = std::fs::remove_file(&path);
    let mut file = crate::store::owned::create_new(&path, 0o600)
        .map_err(|e| Error::from(e).context(path.display().to_string()))?;
    let r = (|| {
        use std::io::Write;
        file.write_all(&head)?;
        let mut from = memory.try_clone()?;
        std::io::Seek::rewind(&mut from)?;
        std::io::copy(&mut from, &mut file)?;
        file.sync_data()?;
        drop(file);
        run_restore(virsh, &path, deadline)
    })();
    let _ = std::fs::remove_file(&path);
    r
}

/// `virsh restore PATH --paused`.
fn run_restore(virsh: &Virsh, path: &Path, deadline: Duration) -> Result<()> {
    virsh
        .run(
            &[
                std::ffi::OsStr::new("restore"),
                path.as_os_str(),
                std::ffi::OsStr::new("--paused"),
            ],
            deadline,
        )
        .map(drop)
}

/// A FIFO and the thread that writes the save image into it, once, for
/// the first reader that opens it. A reader that leaves before the end
/// ends the feed (EPIPE) and the FIFO is removed at once, so that a
/// second open fails rather than waits.
pub struct Feed {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<io::Result<u64>>>,
}

impl Feed {
    /// Makes the FIFO at `path` (0600; a leftover of an interrupted
    /// restore is removed first) and starts feeding it `head` then
    /// `memory`.
    pub fn start(path: &Path, head: Vec<u8>, memory: File) -> Result<Feed> {
        if let Ok(m) = std::fs::symlink_metadata(path) {
            if !m.file_type().is_fifo() {
                return Err(Error::io(format!(
                    "{} exists and is not a FIFO vmsnapfs made",
                    path.display()
                )));
            }
            std::fs::remove_file(path)?;
        }
        let c = std::ffi::CString::new(path.as_os_str().as_bytes())
            .map_err(|_| Error::invalid("a NUL in the state directory's path"))?;
        // SAFETY: mkfifo(3) with a valid C string; fails if anything is there.
        if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } < 0 {
            return Err(Error::from(io::Error::last_os_error()).context(path.display().to_string()));
        }
        let ino = std::fs::symlink_metadata(path)?.ino();
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (path.to_owned(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("libvirt-restore".into())
            .spawn(move || feed(&p, ino, &head, &memory, &s));
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(e.into());
            }
        };
        Ok(Feed {
            path: path.to_owned(),
            stop,
            thread: Some(thread),
        })
    }

    /// The FIFO.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops feeding and removes the FIFO: the bytes fed (0: nobody
    /// opened it), or EPIPE when the reader left before the end.
    pub fn finish(mut self) -> io::Result<u64> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> io::Result<u64> {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = &self.thread {
            // A feeder still waiting in its open for a reader is woken by
            // one (opened and closed at once; again until it has left
            // the open, which it may not have reached yet).
            while !t.is_finished() {
                let _ = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(&self.path);
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let r = match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the feeder panicked"))),
            None => Ok(0),
        };
        let _ = std::fs::remove_file(&self.path);
        r
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

/// The feeder thread: `head` then all of `memory` to the first reader
/// of the FIFO, unless stopped first.
fn feed(path: &Path, ino: u64, head: &[u8], memory: &File, stop: &AtomicBool) -> io::Result<u64> {
    let Some(pipe) = open_writer(path, ino, stop)? else {
        return Ok(0);
    };
    // Fewer wake-ups with a larger pipe (best effort).
    // SAFETY: fcntl(2) on a descriptor this thread owns.
    unsafe {
        libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, CHUNK as libc::c_int);
    }
    let mut written = 0u64;
    match copy(&pipe, head, memory, stop, &mut written) {
        Ok(()) => Ok(written),
        Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {
            // Gone before the pipe closes: a second open cannot wait
            // for a writer that never comes, nor read the rest of this feed.
            let _ = std::fs::remove_file(path);
            drop(pipe);
            Err(io::Error::new(
                e.kind(),
                format!("the reader left after {written} bytes: {e}"),
            ))
        }
        Err(e) => Err(e),
    }
}

/// Opens the FIFO's write end once a reader has opened it (`None`:
/// stopped first), checking that it is still the FIFO made. The open
/// blocks until the reader comes (no polling: libvirt's own open waits
/// for this one); [`Feed`]'s stop wakes it by opening the read end.
/// The descriptor is then non-blocking, so that a reader that stops
/// reading never holds the thread past a stop.
fn open_writer(path: &Path, ino: u64, stop: &AtomicBool) -> io::Result<Option<File>> {
    if stop.load(Ordering::Acquire) {
        return Ok(None);
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    if stop.load(Ordering::Acquire) {
        return Ok(None);
    }
    let m = f.metadata()?;
    if !m.file_type().is_fifo() || m.ino() != ino {
        return Err(io::Error::other("the FIFO was replaced"));
    }
    // SAFETY: fcntl(2) on a descriptor this thread owns.
    unsafe {
        let flags = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(Some(f))
}

/// Writes `head` then `memory` into `pipe`, counting in `written`;
/// returns early when stopped. The memory file's pages move into the
/// pipe with splice(2), not copied through this process (read and write
/// where the file's filesystem cannot splice).
fn copy(
    pipe: &File,
    head: &[u8],
    memory: &File,
    stop: &AtomicBool,
    written: &mut u64,
) -> io::Result<()> {
    if !write_all(pipe, head, stop, written)? {
        return Ok(());
    }
    let mut at = 0u64;
    loop {
        if stop.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut off = at as libc::loff_t;
        // SAFETY: splice(2) between two descriptors this thread holds,
        // with a valid offset pointer for the input and none for the pipe.
        let n = unsafe {
            libc::splice(
                memory.as_raw_fd(),
                &mut off,
                pipe.as_raw_fd(),
                std::ptr::null_mut(),
                CHUNK,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        match n {
            0 => return Ok(()),
            n if n > 0 => {
                at += n as u64;
                *written += n as u64;
            }
            _ => {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => wait_writable(pipe),
                    Some(libc::EINTR) => {}
                    Some(libc::EINVAL | libc::ENOSYS) => {
                        return copy_through(pipe, memory, at, stop, written)
                    }
                    _ => return Err(e),
                }
            }
        }
    }
}

/// Writes `memory` from offset `at` into `pipe` through a buffer.
fn copy_through(
    pipe: &File,
    memory: &File,
    mut at: u64,
    stop: &AtomicBool,
    written: &mut u64,
) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = memory.read_at(&mut buf, at)?;
        if n == 0 || !write_all(pipe, &buf[..n], stop, written)? {
            return Ok(());
        }
        at += n as u64;
    }
}

/// Writes all of `data` into the non-blocking `pipe`, waiting for room;
/// false when stopped first.
fn write_all(
    pipe: &File,
    mut data: &[u8],
    stop: &AtomicBool,
    written: &mut u64,
) -> io::Result<bool> {
    use std::io::Write;
    while !data.is_empty() {
        if stop.load(Ordering::Acquire) {
            return Ok(false);
        }
        match (&mut &*pipe).write(data) {
            Ok(n) => {
                data = &data[n..];
                *written += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_writable(pipe),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Waits until `pipe` has room, at most [`POLL_MS`] (the caller then
/// checks its stop flag).
fn wait_writable(pipe: &File) {
    let mut p = libc::pollfd {
        fd: pipe.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: poll(2) on one pollfd this function owns.
    unsafe { libc::poll(&mut p, 1, POLL_MS) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_is_libvirts_and_the_stream_starts_aligned() {
        let xml = "<domain type='kvm'><name>d</name></domain>";
        let h = header(xml, true).unwrap();
        assert_eq!(HEADER_LEN, 92);
        assert_eq!(&h[..16], b"LibvirtQemudSave");
        let word = |i: usize| u32::from_ne_bytes(h[16 + 4 * i..20 + 4 * i].try_into().unwrap());
        assert_eq!(word(0), 2, "version");
        assert_eq!(word(1) as usize, h.len() - HEADER_LEN, "data_len");
        assert_eq!(word(2), 1, "was_running");
        assert_eq!((word(3), word(4)), (0, 0), "raw, no cookie");
        assert!(h[36..92].iter().all(|&b| b == 0));
        assert_eq!(&h[92..92 + xml.len()], xml.as_bytes());
        assert!(h[92 + xml.len()..].iter().all(|&b| b == 0));
        assert_eq!(h.len() % 4096, 0);
        assert_eq!(word(2), 1);
        assert_eq!(
            u32::from_ne_bytes(header(xml, false).unwrap()[24..28].try_into().unwrap()),
            0
        );
        // An XML that fills a block exactly still gets its NUL.
        let long = "x".repeat(4096 - 92);
        let h = header(&long, false).unwrap();
        assert_eq!(h.len(), 8192);
        assert!(header("a\0b", false).is_err());
    }

    #[test]
    fn the_first_reader_gets_the_whole_image_and_an_early_leaver_ends_the_feed() {
        let dir = std::env::temp_dir().join(format!("vmsnapfs-feed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mem = dir.join("memory");
        let data: Vec<u8> = (0..3 * CHUNK + 17).map(|i| (i % 251) as u8).collect();
        std::fs::write(&mem, [STREAM_MAGIC.as_slice(), &data].concat()).unwrap();
        let memory = File::open(&mem).unwrap();
        check_stream(&memory).unwrap();
        let feed = Feed::start(
            &dir.join(FIFO),
            b"HEAD".to_vec(),
            memory.try_clone().unwrap(),
        )
        .unwrap();
        let all = std::fs::read(feed.path()).unwrap();
        assert_eq!(&all[..4], b"HEAD");
        assert_eq!(&all[4..8], STREAM_MAGIC);
        assert_eq!(&all[8..], &data[..]);
        let path = feed.path().to_owned();
        assert_eq!(feed.finish().unwrap() as usize, all.len());
        assert!(std::fs::symlink_metadata(&path).is_err());
        // A reader that leaves after the head: EPIPE, and the FIFO is
        // gone at once (a second open fails, never waits).
        let feed = Feed::start(&path, b"HEAD".to_vec(), memory).unwrap();
        {
            use std::io::Read;
            let mut first = [0u8; 4];
            File::open(feed.path())
                .unwrap()
                .read_exact(&mut first)
                .unwrap();
            assert_eq!(&first, b"HEAD");
        }
        let t = std::time::Instant::now();
        while std::fs::symlink_metadata(&path).is_ok() {
            assert!(t.elapsed() < Duration::from_secs(30), "the FIFO stays");
            std::thread::sleep(Duration::from_millis(10));
        }
        let e = feed.finish().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
        // Stopped before anyone read: nothing fed, nothing left.
        let feed = Feed::start(&path, b"HEAD".to_vec(), File::open(&mem).unwrap()).unwrap();
        assert_eq!(feed.finish().unwrap(), 0);
        assert!(std::fs::symlink_metadata(&path).is_err());
        // Where splice cannot be used, the same bytes through a buffer,
        // from the offset reached.
        {
            use std::io::Read;
            use std::os::fd::FromRawFd;
            let mut fds = [0; 2];
            // SAFETY: pipe2(2) into a two-element array.
            assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
            // SAFETY: pipe2 just made both descriptors, owned from here on.
            let (mut r, w) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
            let reader = std::thread::spawn(move || {
                let mut got = Vec::new();
                r.read_to_end(&mut got).unwrap();
                got
            });
            let mut written = 0;
            let memory = File::open(&mem).unwrap();
            copy_through(&w, &memory, 5, &AtomicBool::new(false), &mut written).unwrap();
            drop(w);
            let got = reader.join().unwrap();
            assert_eq!(got.len() as u64, written);
            assert_eq!(&got[..], &[STREAM_MAGIC.as_slice(), &data].concat()[5..]);
        }
        // Not a stream: refused before anything is made.
        std::fs::write(&mem, b"nope").unwrap();
        assert!(check_stream(&File::open(&mem).unwrap()).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
