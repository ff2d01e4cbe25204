//! The `vmsnapfs` command: mount the tree, or run the demo.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use vmsnapfs::demo;
use vmsnapfs::domain::Registry;
use vmsnapfs::fs::{MountConfig, SnapFs};

#[derive(Parser)]
#[command(
    name = "vmsnapfs",
    version,
    about = "QEMU VM snapshots as a filesystem"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mount the snapshot tree of the domains defined in --domains.
    Mount {
        /// Where to mount the tree.
        mountpoint: PathBuf,
        /// Directory of domain definitions (<name>.xml, libvirt <domain> subset).
        #[arg(long)]
        domains: PathBuf,
        /// Directory for snapshot metadata (keep it beside the images).
        #[arg(long)]
        state: PathBuf,
        /// Stay in the foreground (logs to stderr; RUST_LOG sets the level).
        #[arg(short, long)]
        foreground: bool,
        /// Let other users in; permissions are then enforced.
        #[arg(long)]
        allow_other: bool,
        /// Group (name or gid) allowed to create, revert and delete snapshots.
        #[arg(long)]
        group: Option<String>,
        /// FUSE request threads.
        #[arg(long, default_value_t = 4)]
        threads: usize,
    },
    /// Start a small real VM, mount its tree, and show what to try.
    Demo {
        /// Where to mount (default: a temporary directory).
        mountpoint: Option<PathBuf>,
    },
}

fn resolve_group(g: &str) -> Result<u32, String> {
    if let Ok(gid) = g.parse::<u32>() {
        return Ok(gid);
    }
    let name = std::ffi::CString::new(g).map_err(|_| format!("bad group name {g:?}"))?;
    // SAFETY: getgrnam with a valid C string; the result is read at once.
    let gr = unsafe { libc::getgrnam(name.as_ptr()) };
    if gr.is_null() {
        return Err(format!("no group named {g:?}"));
    }
    // SAFETY: gr is non-null and points to libc's static group record.
    Ok(unsafe { (*gr).gr_gid })
}

/// Forks; the parent waits until the child reports the mount is up (or
/// failed) and exits with that status. Returns the pipe to report on.
fn daemonize() -> Result<libc::c_int, String> {
    let mut fds = [0; 2];
    // SAFETY: pipe/fork/setsid are used as in any daemon, before any thread starts.
    unsafe {
        if libc::pipe(fds.as_mut_ptr()) != 0 {
            return Err("pipe failed".into());
        }
        match libc::fork() {
            -1 => Err("fork failed".into()),
            0 => {
                libc::close(fds[0]);
                libc::setsid();
                Ok(fds[1])
            }
            _ => {
                libc::close(fds[1]);
                let mut b = [1u8];
                let n = libc::read(fds[0], b.as_mut_ptr().cast(), 1);
                libc::_exit(if n == 1 { i32::from(b[0]) } else { 1 });
            }
        }
    }
}

fn report(fd: Option<libc::c_int>, status: u8) {
    if let Some(fd) = fd {
        // SAFETY: fd is the write end of the daemonize pipe.
        unsafe {
            libc::write(fd, [status].as_ptr().cast(), 1);
            libc::close(fd);
        }
    }
}

/// Where log lines go: the caller's terminal (standard error) and, for a
/// daemon, its log file from the first line on.
struct LogTee {
    file: Option<std::fs::File>,
}

static LOG_TEE: std::sync::Mutex<LogTee> = std::sync::Mutex::new(LogTee { file: None });

/// The writer env_logger writes to: standard error, and the daemon's log
/// file while one is set (until standard error itself goes there).
struct TeeWriter;

impl std::io::Write for TeeWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut tee = LOG_TEE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = tee.file.as_mut() {
            let _ = f.write_all(buf);
        }
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Sends log lines to `log` as well as to standard error, from now on.
fn log_to_file(log: &std::path::Path) -> Result<(), String> {
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("cannot open the daemon log {}: {e}", log.display()))?;
    LOG_TEE.lock().unwrap_or_else(|e| e.into_inner()).file = Some(f);
    Ok(())
}

/// Sends the daemon's stdio to `log` once the mount is up.
fn detach_stdio(log: &std::path::Path) {
    use std::os::fd::AsRawFd;
    let Ok(f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
    else {
        return;
    };
    // SAFETY: dup2 onto the standard descriptors.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
        libc::dup2(null, 0);
        libc::dup2(f.as_raw_fd(), 1);
        libc::dup2(f.as_raw_fd(), 2);
    }
    // Standard error is the log now: one copy of each line is enough.
    LOG_TEE.lock().unwrap_or_else(|e| e.into_inner()).file = None;
}

#[allow(clippy::too_many_arguments)]
fn mount(
    mountpoint: PathBuf,
    domains: PathBuf,
    state: PathBuf,
    foreground: bool,
    allow_other: bool,
    group: Option<String>,
    threads: usize,
) -> Result<(), String> {
    let group = group.as_deref().map(resolve_group).transpose()?;
    // Every path absolute from here on: sockets of view servers, the
    // daemon's log and anything handed to QEMU must not depend on the
    // directory the daemon was started in.
    let absolute = |p: &std::path::Path| {
        std::path::absolute(p).map_err(|e| format!("cannot make {} absolute: {e}", p.display()))
    };
    let (mountpoint, domains, state) = (
        absolute(&mountpoint)?,
        absolute(&domains)?,
        absolute(&state)?,
    );
    if !foreground {
        // The daemon's log has every line, the start-up ones included.
        log_to_file(&state.join("daemon.log"))?;
    }
    let ready = if foreground { None } else { Some(daemonize()?) };
    let result = (|| {
        let reg = Registry::open(&domains, &state).map_err(|e| e.to_string())?;
        let config = MountConfig {
            allow_other,
            group,
            threads,
        };
        let session = SnapFs::new(reg.clone(), config)
            .spawn(&mountpoint)
            .map_err(|e| format!("cannot mount {}: {e}", mountpoint.display()))?;
        log::info!(
            "mounted at {} ({} domains)",
            mountpoint.display(),
            reg.all().len()
        );
        Ok((reg, session))
    })();
    let (reg, session) = match result {
        Ok(x) => x,
        Err(e) => {
            log::error!("{e}");
            report(ready, 1);
            return Err(e);
        }
    };
    if ready.is_some() {
        detach_stdio(&state.join("daemon.log"));
    }
    report(ready, 0);
    demo::install_stop_handlers();
    while !demo::stop_requested() && !session.guard.is_finished() {
        std::thread::sleep(Duration::from_millis(100));
    }
    reg.shutdown();
    if session.guard.is_finished() {
        log::info!("unmounted");
        let _ = session.join();
    } else {
        log::info!("signal: unmounting");
        session.umount_and_join().map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_micros()
        .target(env_logger::Target::Pipe(Box::new(TeeWriter)))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Mount {
            mountpoint,
            domains,
            state,
            foreground,
            allow_other,
            group,
            threads,
        } => mount(
            mountpoint,
            domains,
            state,
            foreground,
            allow_other,
            group,
            threads,
        ),
        Cmd::Demo { mountpoint } => demo::run(mountpoint).map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmsnapfs: {e}");
            ExitCode::FAILURE
        }
    }
}
