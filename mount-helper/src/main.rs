//! `mount.vmsnapfs`: lets `mount -t vmsnapfs` and `/etc/fstab` mount a
//! vmsnapfs tree.
//!
//! ```text
//! mount -t vmsnapfs -o domains=/etc/vmsnapfs/domains,state=/var/lib/vmsnapfs none /snaps
//! # /etc/fstab:
//! none  /snaps  vmsnapfs  domains=/etc/vmsnapfs/domains,state=/var/lib/vmsnapfs  0 0
//! ```
//!
//! mount(8) calls `mount.vmsnapfs SPEC DIR [-sfnv] [-o OPTIONS]`; this
//! turns the options into `vmsnapfs mount DIR --domains .. --state ..` and
//! runs it (it returns once the tree is mounted and serving).

use std::path::PathBuf;
use std::process::{Command, ExitCode};

/// What mount(8) asked for.
#[derive(Debug, Default, PartialEq, Eq)]
struct Request {
    dir: String,
    domains: Option<String>,
    state: Option<String>,
    allow_other: bool,
    group: Option<String>,
    format_devices: Option<String>,
    threads: Option<String>,
    fake: bool,
    verbose: bool,
}

/// Mount options that mount(8) or fstab pass along and that mean nothing here.
const IGNORED: &[&str] = &[
    "rw", "defaults", "auto", "noauto", "nofail", "_netdev", "user", "nouser", "users", "dev",
    "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime", "relatime", "async",
];

fn parse(args: &[String]) -> Result<Request, String> {
    let mut req = Request::default();
    let mut positional = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-o" => {
                let opts = it.next().ok_or("-o needs a value")?;
                for opt in opts.split(',').filter(|o| !o.is_empty()) {
                    let (k, v) = match opt.split_once('=') {
                        Some((k, v)) => (k, Some(v.to_owned())),
                        None => (opt, None),
                    };
                    match (k, v) {
                        ("domains", Some(v)) => req.domains = Some(v),
                        ("state", Some(v)) => req.state = Some(v),
                        ("group", Some(v)) => req.group = Some(v),
                        ("format_devices", Some(v)) => req.format_devices = Some(v),
                        ("threads", Some(v)) => req.threads = Some(v),
                        ("allow_other", None) => req.allow_other = true,
                        ("ro", None) => return Err("vmsnapfs cannot be mounted read-only".into()),
                        (k, _) if IGNORED.contains(&k) || k.starts_with("x-") => {}
                        (k, _) => return Err(format!("unknown option {k:?}")),
                    }
                }
            }
            "-f" => req.fake = true,
            "-v" => req.verbose = true,
            "-s" | "-n" => {}
            "-N" | "-t" => {
                it.next();
            }
            s if s.starts_with('-') => return Err(format!("unknown flag {s}")),
            _ => positional.push(a.clone()),
        }
    }
    match positional.as_slice() {
        [_spec, dir] => req.dir = dir.clone(),
        _ => return Err("usage: mount.vmsnapfs SPEC DIR -o domains=DIR,state=DIR".into()),
    }
    if req.domains.is_none() || req.state.is_none() {
        return Err("the options domains=DIR and state=DIR are required".into());
    }
    Ok(req)
}

/// The `vmsnapfs` binary: beside this one, else on PATH.
fn vmsnapfs_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("vmsnapfs")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("vmsnapfs"))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let req = match parse(&args) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mount.vmsnapfs: {e}");
            return ExitCode::from(1);
        }
    };
    let mut cmd = Command::new(vmsnapfs_binary());
    cmd.arg("mount").arg(&req.dir);
    cmd.arg("--domains")
        .arg(req.domains.as_deref().unwrap_or_default());
    cmd.arg("--state")
        .arg(req.state.as_deref().unwrap_or_default());
    if req.allow_other {
        cmd.arg("--allow-other");
    }
    if let Some(g) = &req.group {
        cmd.arg("--group").arg(g);
    }
    if let Some(d) = &req.format_devices {
        cmd.arg("--format-devices").arg(d);
    }
    if let Some(t) = &req.threads {
        cmd.arg("--threads").arg(t);
    }
    if req.verbose || req.fake {
        eprintln!("mount.vmsnapfs: {cmd:?}");
    }
    if req.fake {
        return ExitCode::SUCCESS;
    }
    match cmd.status() {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(32),
        Err(e) => {
            eprintln!("mount.vmsnapfs: cannot run {:?}: {e}", cmd.get_program());
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn parses_mount_arguments() {
        let r = parse(&args(
            "none /snaps -o rw,domains=/d,state=/s,allow_other,group=kvm,format_devices=/dev/vg0",
        ))
        .unwrap();
        assert_eq!(r.format_devices.as_deref(), Some("/dev/vg0"));
        assert_eq!(r.dir, "/snaps");
        assert_eq!(r.domains.as_deref(), Some("/d"));
        assert_eq!(r.state.as_deref(), Some("/s"));
        assert!(r.allow_other);
        assert_eq!(r.group.as_deref(), Some("kvm"));
    }

    #[test]
    fn refuses_missing_or_unknown_options() {
        assert!(parse(&args("none /snaps -o domains=/d")).is_err());
        assert!(parse(&args("none /snaps -o domains=/d,state=/s,bogus")).is_err());
        assert!(parse(&args("none -o domains=/d,state=/s")).is_err());
        assert!(parse(&args("none /snaps -o domains=/d,state=/s,ro")).is_err());
    }
}
