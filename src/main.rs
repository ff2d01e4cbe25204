//! The `vmsnapfs` command: mount the tree, or run the demo.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use vmsnapfs::demo;
use vmsnapfs::domain::Registry;
use vmsnapfs::fs::{MountConfig, SnapFs};
use vmsnapfs::signals::StopSignals;

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

/// The options of `vmsnapfs mount`.
#[derive(Args)]
struct MountArgs {
    /// Where to mount the tree.
    mountpoint: PathBuf,
    /// Directory of domain definitions (<name>.xml, libvirt <domain> subset).
    #[arg(long, required_unless_present = "libvirt", conflicts_with = "libvirt")]
    domains: Option<PathBuf>,
    /// Serve every domain of this libvirt connection (qemu:///system)
    /// instead of definition files.
    #[arg(long)]
    libvirt: Option<String>,
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
    /// Directory of block devices (nodes, or root's links such as an LVM
    /// volume group's /dev/VG) that `.create` may format as overlays, and
    /// that members of --group may name.
    #[arg(long)]
    format_devices: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mount the snapshot tree of the domains defined in --domains.
    Mount(MountArgs),
    /// Rebuild the disk at a snapshot: copy the changed runs of MAP from
    /// CHANGES (`since/<other>/<disk>` and its `.map`) into TARGET, a
    /// full raw copy of the disk at the other snapshot.
    Apply {
        /// The changes file (or a copy of it).
        changes: PathBuf,
        /// Its `.map` (or a copy of it).
        map: PathBuf,
        /// The raw copy to bring forward, changed in place.
        target: PathBuf,
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
    match nix::unistd::Group::from_name(g) {
        Ok(Some(gr)) => Ok(gr.gid.as_raw()),
        Ok(None) => Err(format!("no group named {g:?}")),
        Err(e) => Err(format!("cannot look up group {g:?}: {e}")),
    }
}

/// Forks; the parent waits until the child reports the mount is up (or
/// failed) and exits with that status. Returns the pipe to report on.
fn daemonize() -> Result<std::fs::File, String> {
    use std::io::Read;
    let (read_end, write_end) = nix::unistd::pipe().map_err(|e| format!("pipe failed: {e}"))?;
    // SAFETY: called before any thread of this process starts (the
    // registry and the mount come after), so the child is a copy of a
    // single-threaded process; nix has no safe fork.
    match unsafe { nix::unistd::fork() } {
        Err(e) => Err(format!("fork failed: {e}")),
        Ok(nix::unistd::ForkResult::Child) => {
            drop(read_end);
            let _ = nix::unistd::setsid();
            Ok(std::fs::File::from(write_end))
        }
        Ok(nix::unistd::ForkResult::Parent { .. }) => {
            drop(write_end);
            let mut b = [1u8];
            let n = std::fs::File::from(read_end).read(&mut b).unwrap_or(0);
            std::process::exit(if n == 1 { i32::from(b[0]) } else { 1 });
        }
    }
}

fn report(pipe: Option<std::fs::File>, status: u8) {
    use std::io::Write;
    if let Some(mut pipe) = pipe {
        let _ = pipe.write_all(&[status]);
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
    let Ok(f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
    else {
        return;
    };
    if let Ok(null) = std::fs::File::open("/dev/null") {
        let _ = nix::unistd::dup2_stdin(&null);
    }
    let _ = nix::unistd::dup2_stdout(&f);
    let _ = nix::unistd::dup2_stderr(&f);
    // Standard error is the log now: one copy of each line is enough.
    LOG_TEE.lock().unwrap_or_else(|e| e.into_inner()).file = None;
}

#[allow(clippy::too_many_arguments)]
fn mount(args: MountArgs) -> Result<(), String> {
    let group = args.group.as_deref().map(resolve_group).transpose()?;
    if let Some(dir) = &args.format_devices {
        vmsnapfs::backend::block_dev::set_format_dir(dir)
            .map_err(|e| format!("--format-devices: {e}"))?;
    }
    // Every path absolute from here on: sockets of view servers, the
    // daemon's log and anything handed to QEMU must not depend on the
    // directory the daemon was started in.
    let absolute = |p: &std::path::Path| {
        std::path::absolute(p).map_err(|e| format!("cannot make {} absolute: {e}", p.display()))
    };
    let (mountpoint, domains, state) = (
        absolute(&args.mountpoint)?,
        args.domains.as_deref().map(absolute).transpose()?,
        absolute(&args.state)?,
    );
    if !args.foreground {
        // The daemon's log has every line, the start-up ones included.
        log_to_file(&state.join("daemon.log"))?;
    }
    let mut ready = if args.foreground {
        None
    } else {
        Some(daemonize()?)
    };
    // Installed before the mount: a stop asked while it comes up is seen.
    let stop = StopSignals::install().map_err(|e| format!("signal handlers: {e}"))?;
    let result = (|| {
        let reg = match (&domains, &args.libvirt) {
            (_, Some(uri)) => Registry::open_libvirt(uri, &state),
            (Some(domains), None) => Registry::open(domains, &state),
            (None, None) => return Err("--domains or --libvirt is needed".to_string()),
        }
        .map_err(|e| e.to_string())?;
        let config = MountConfig {
            allow_other: args.allow_other,
            group,
            threads: args.threads,
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
            report(ready.take(), 1);
            return Err(e);
        }
    };
    if ready.is_some() {
        detach_stdio(&state.join("daemon.log"));
    }
    report(ready, 0);
    while !stop.requested() && !session.guard.is_finished() {
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
        Cmd::Mount(args) => mount(args),
        Cmd::Apply {
            changes,
            map,
            target,
        } => vmsnapfs::views::apply::apply(&changes, &map, &target)
            .map(|n| eprintln!("vmsnapfs: {n} bytes applied"))
            .map_err(|e| e.to_string()),
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
