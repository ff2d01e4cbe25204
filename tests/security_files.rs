//! Attacks on the files the daemon (root) reads, creates and deletes, made
//! by an unprivileged user where that is the attacker: other users of an
//! `--allow-other` mount, members of `--group`, the owner of the image
//! directory. Each must fail with a clear errno and a `.log` line, and
//! leave nothing behind.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A running VM under `policy`; `prepare` runs before the daemon starts.
fn fixture(tag: &str, policy: &str, args: &[&str], prepare: impl FnOnce(&Vm)) -> Fixture {
    let dir = TempDir::new(tag);
    let mut vm = Vm::start(&VmSpec::small("vm1"), &dir.0.join("images")).expect("start VM");
    vm.policy = Some(policy.into());
    vm.write_definition(&dir.0.join("domains")).unwrap();
    prepare(&vm);
    let daemon = Daemon::start_with_args(&dir.0, &[], args);
    Fixture { daemon, vm, dir }
}

fn images_dir(vm: &Vm) -> PathBuf {
    vm.disks[0].image.parent().unwrap().to_owned()
}

/// Gives the images and their directory to `uid`:`gid` with `mode`.
fn own_images(vm: &Vm, uid: u32, gid: u32, dir_mode: u32, image_mode: u32) {
    let dir = images_dir(vm);
    std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(dir_mode)).unwrap();
    for d in &vm.disks {
        std::os::unix::fs::chown(&d.image, Some(uid), Some(gid)).unwrap();
        fs::set_permissions(&d.image, fs::Permissions::from_mode(image_mode)).unwrap();
    }
}

/// A root-only directory with a root-only file in it.
fn root_only(base: &Path) -> (PathBuf, PathBuf) {
    let dir = base.join("rootonly");
    fs::create_dir_all(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
    let secret = dir.join("secret");
    fs::write(&secret, b"root's secret").unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    (dir, secret)
}

#[test]
fn views_keep_the_image_owner_and_mode_and_root_breaks_a_hold() {
    let owner = TestUser::new("own", false);
    let other = TestUser::new("oth", false);
    let (uid, gid) = (owner.uid, 100);
    let mut fx = fixture("sec-holds", "external", &["--allow-other"], |vm| {
        own_images(vm, uid, gid, 0o700, 0o600)
    });
    fs::create_dir(fx.path("s1")).unwrap();
    let images = images_dir(&fx.vm);
    // New overlays copy the base image's owner, group and mode.
    for d in ["vda", "vdb"] {
        let m = fs::metadata(images.join(format!("vm1-{d}.s1.qcow2"))).unwrap();
        assert_eq!(
            (m.uid(), m.gid(), m.mode() & 0o777),
            (uid, gid, 0o600),
            "{d}"
        );
    }
    // The memory file stays root's, 0400.
    let memory = images.join("vm1.s1.memory");
    let m = fs::metadata(&memory).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o777), (0, 0o400));

    // The view has the image's owner and mode, less the write bits.
    let view = fx.path("s1/disks/vda");
    let m = fs::metadata(&view).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (uid, gid, 0o400));
    let v = view.to_str().unwrap().to_owned();
    let mem = fx.path("s1/memory").to_str().unwrap().to_owned();
    assert_failed_with(
        &other.sh(&format!("head -c 1 '{v}'"), b""),
        libc::EACCES,
        "another user reads the guest disk",
    );
    assert_failed_with(
        &owner.sh(&format!("head -c 1 '{mem}'"), b""),
        libc::EACCES,
        "the image owner reads the guest RAM",
    );
    let out = owner.sh(&format!("head -c 4096 '{v}' | wc -c"), b"");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "4096");

    // The owner holds the view open; so does root, here.
    // The holder runs as the owner itself (no runuser in between), so the
    // pid killed below is the process holding the view.
    let mut holder = {
        use std::os::unix::process::CommandExt;
        Command::new("sh")
            .arg("-c")
            .arg(format!("exec 3< '{v}'; echo ready; exec sleep 60"))
            .uid(uid)
            .gid(gid)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut ready = [0u8; 6];
    holder
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut ready)
        .unwrap();
    let mut mine = fs::File::open(&view).unwrap();
    let mut buf = vec![0u8; 4096];
    mine.read_exact(&mut buf).unwrap();
    // rmdir: EBUSY, and .log says who holds it.
    let r = fs::remove_dir(fx.path("s1"));
    let log = fx.read(".log");
    assert_eq!(errno(r), libc::EBUSY, "{log}");
    assert!(
        log.contains(&format!(") uid {uid}")) && log.contains("echo force > s1/release"),
        "{log}"
    );
    // Only root breaks holds.
    let release = fx.path("s1/release").to_str().unwrap().to_owned();
    for u in [&owner, &other] {
        assert_failed_with(
            &u.sh(&format!("echo force > '{release}'"), b""),
            libc::EACCES,
            "a user breaks a hold",
        );
    }
    write_file(&fx.path("s1/release"), b"nonsense").unwrap_err();
    write_file(&fx.path("s1/release"), b"force\n").unwrap();
    let log = fx.read(".log");
    assert!(log.contains("release \"s1\": broke 2 hold(s)"), "{log}");
    // The broken hold reads nothing more: ESTALE, never bytes of a
    // changed image.
    let r = mine.read(&mut buf);
    assert_eq!(errno(r), libc::ESTALE);
    fs::remove_dir(fx.path("s1")).unwrap();
    let r = mine.read(&mut buf);
    assert_eq!(errno(r), libc::ESTALE);
    drop(mine);
    // SAFETY: stopping the holder this test started, by pid.
    unsafe {
        libc::kill(holder.id() as i32, libc::SIGKILL);
    }
    let _ = holder.wait();
    assert!(!memory.exists(), "the memory file went with its snapshot");
    fx.daemon.stop();
}

#[test]
fn deleting_never_follows_a_symlink_or_removes_a_replaced_file() {
    let owner = TestUser::new("dir", false);
    let uid = owner.uid;
    let fx = fixture("sec-unlink", "external", &[], |vm| {
        own_images(vm, uid, 100, 0o700, 0o600)
    });
    let images = images_dir(&fx.vm);
    let (_, secret) = root_only(&fx.dir.0);
    fs::create_dir(fx.path("c1")).unwrap();
    fs::create_dir(fx.path("c2")).unwrap();
    // The owner of the image directory swaps the memory files: one for a
    // symlink to a root-only file, one for a file of its own.
    let (m1, m2) = (images.join("vm1.c1.memory"), images.join("vm1.c2.memory"));
    let out = owner.sh(
        &format!(
            "rm -f '{m1}' && ln -s '{s}' '{m1}' && echo mine > '{m2}.new' && mv -f '{m2}.new' '{m2}'",
            m1 = m1.display(),
            m2 = m2.display(),
            s = secret.display()
        ),
        b"",
    );
    assert!(out.status.success(), "{out:?}");
    fs::remove_dir(fx.path("c1")).unwrap();
    fs::remove_dir(fx.path("c2")).unwrap();
    assert_eq!(fs::read(&secret).unwrap(), b"root's secret");
    assert_eq!(fs::read(&m2).unwrap(), b"mine\n");
    assert!(fs::symlink_metadata(&m1).unwrap().file_type().is_symlink());
    let log = fx.read(".log");
    assert!(log.contains("is not a regular file (a symlink?)"), "{log}");
    assert!(log.contains("is no longer the file vmsnapfs made"), "{log}");
    assert!(fx.ls().is_empty());
    check_no_orphans(&fx);
}

#[test]
fn create_paths_of_a_group_member_stay_where_it_may_write() {
    let member = TestUser::new("grp", true);
    let gid = member.gid();
    let group = member.group.as_ref().unwrap().0.clone();
    let fx = fixture(
        "sec-create",
        "external",
        &["--allow-other", "--group", &group],
        |vm| own_images(vm, 0, gid, 0o770, 0o640),
    );
    let images = images_dir(&fx.vm);
    let (rootonly, _) = root_only(&fx.dir.0);
    let elsewhere = fx.dir.0.join("elsewhere");
    fs::create_dir_all(&elsewhere).unwrap();
    fs::set_permissions(&elsewhere, fs::Permissions::from_mode(0o777)).unwrap();
    let create = fx.path(".create").to_str().unwrap().to_owned();
    let spec = |name: &str, overlay: &Path, memory: &Path| {
        format!(
            "<domainsnapshot><name>{name}</name><memory snapshot='external' file='{}'/>\
             <disks><disk name='vda' snapshot='external'><source file='{}'/></disk>\
             <disk name='vdb' snapshot='no'/></disks></domainsnapshot>",
            memory.display(),
            overlay.display()
        )
    };
    let by_member = |xml: String| member.sh(&format!("cat > '{create}'"), xml.as_bytes());
    let before = names(&images);

    // Guest RAM into a directory the member cannot read: EACCES.
    let out = by_member(spec("a1", &images.join("a1.qcow2"), &rootonly.join("ram")));
    assert_failed_with(&out, libc::EACCES, "memory file in a root-only dir");
    // An overlay outside the image directory, even one anyone may write.
    let out = by_member(spec(
        "a2",
        &elsewhere.join("a2.qcow2"),
        &images.join("a2.mem"),
    ));
    assert_failed_with(&out, libc::EACCES, "overlay outside the image dir");
    let out = by_member(spec(
        "a3",
        &images.join("../elsewhere/a3.qcow2"),
        &images.join("a3.mem"),
    ));
    assert_failed_with(&out, libc::EACCES, "a path with ..");
    assert!(names(&rootonly) == vec!["secret"] && names(&elsewhere).is_empty());

    // A dangling symlink into a root-only directory: never followed.
    let evil = images.join("evil.qcow2");
    let planted = rootonly.join("planted.qcow2");
    let out = member.sh(
        &format!("ln -s '{}' '{}'", planted.display(), evil.display()),
        b"",
    );
    assert!(out.status.success());
    let out = by_member(spec("a4", &evil, &images.join("a4.mem")));
    assert_failed_with(&out, libc::EEXIST, "overlay through a dangling symlink");
    assert!(!planted.exists());
    // An existing <memory>.part is never removed or written.
    let part = images.join("a5.mem.part");
    assert!(member
        .sh(&format!("echo member > '{}'", part.display()), b"")
        .status
        .success());
    let out = by_member(spec("a5", &images.join("a5.qcow2"), &images.join("a5.mem")));
    assert_failed_with(&out, libc::EEXIST, "an existing .part");
    assert_eq!(fs::read(&part).unwrap(), b"member\n");
    // The memory file named as the overlay: EINVAL before anything is made.
    let dup = images.join("dup.qcow2");
    let out = by_member(spec("a6", &dup, &dup));
    assert_failed_with(&out, libc::EINVAL, "memory file == overlay");

    let log = fx.read(".log");
    assert_eq!(log.matches("refused (EACCES)").count(), 3, "{log}");
    assert!(
        log.contains("may place files only in the directory"),
        "{log}"
    );
    assert_eq!(log.matches("refused (EEXIST)").count(), 2, "{log}");
    assert!(log.contains("named twice"), "{log}");
    assert!(fx.ls().is_empty());
    // Nothing made: only the member's own two files are new.
    let mut want = before.clone();
    want.extend(["a5.mem.part".to_owned(), "evil.qcow2".to_owned()]);
    want.sort();
    assert_eq!(names(&images), want);
    assert!(fx.journal().is_empty());

    // Where it may write, the member's snapshot is made, and the overlay
    // takes the base image's owner, group and mode.
    let out = by_member(spec("ok", &images.join("ok.qcow2"), &images.join("ok.mem")));
    assert!(out.status.success(), "{out:?}\n{}", fx.read(".log"));
    assert_eq!(fx.ls(), vec!["ok"]);
    let m = fs::metadata(images.join("ok.qcow2")).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (0, gid, 0o640));
    let m = fs::metadata(images.join("ok.mem")).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o777), (0, 0o400));
    assert_eq!(fx.read(".state"), "running\n");
}

#[test]
fn a_fifo_or_a_device_link_among_the_definitions_is_skipped() {
    let dir = TempDir::new("sec-fifo");
    let domains = dir.0.join("domains");
    fs::create_dir_all(&domains).unwrap();
    let img = dir.0.join("vm1.qcow2");
    create_qcow2(&img, "16M");
    fs::write(
        domains.join("vm1.xml"),
        format!(
            "<domain><name>vm1</name><monitor path='{}'/><devices><disk type='file' \
             device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/>\
             <target dev='vda'/></disk></devices></domain>",
            dir.0.join("none.qmp").display(),
            img.display()
        ),
    )
    .unwrap();
    let fifo = std::ffi::CString::new(domains.join("a-fifo.xml").to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) of a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    std::os::unix::fs::symlink("/dev/zero", domains.join("b-zero.xml")).unwrap();
    // Before, the mount never appeared: the daemon read the FIFO forever.
    let daemon = Daemon::start(&dir.0, &[]);
    let mnt = daemon.mnt.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(names(&mnt));
    });
    let listed = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("ls of the mount hangs");
    assert_eq!(listed, vec![".jobs", ".stats", "vm1"]);
    let log = daemon.log_text();
    assert!(log.contains("a-fifo.xml: not a regular file"), "{log}");
    assert!(log.contains("b-zero.xml: a symlink"), "{log}");
    fs::create_dir(daemon.mnt.join("vm1/offline")).unwrap();
}

#[test]
fn names_too_long_for_the_files_fail_before_anything_is_made() {
    let mut fx = fixture("sec-long", "external", &[], |_| {});
    let images = images_dir(&fx.vm);
    let before = names(&images);
    // 250 bytes: a valid name, but <stem>.<name>.qcow2 is over 255.
    let long = "n".repeat(250);
    let r = fs::create_dir(fx.path(&long));
    assert_eq!(errno(r), libc::ENAMETOOLONG, "{}", fx.read(".log"));
    let spec = format!(
        "<domainsnapshot><name>{long}</name><memory snapshot='no'/><disks>\
         <disk name='vda' snapshot='external'/></disks></domainsnapshot>"
    );
    assert_eq!(
        write_file(&fx.path(".create"), spec.as_bytes()),
        Err(libc::ENAMETOOLONG)
    );
    // 235 bytes fit a snapshot, not the overlay of a revert to it.
    let fits = "f".repeat(235);
    fs::create_dir(fx.path(&fits)).unwrap();
    let made = names(&images);
    assert_eq!(
        fx.revert(&fits, "running"),
        Err(libc::ENAMETOOLONG),
        "{}",
        fx.read(".log")
    );
    assert_eq!(names(&images), made, "the revert made nothing");
    let log = fx.read(".log");
    assert_eq!(log.matches("refused (ENAMETOOLONG)").count(), 3, "{log}");
    assert!(log.contains("the limit is 255"), "{log}");
    assert_eq!(
        made.len(),
        before.len() + 3,
        "two overlays and a memory file"
    );
    assert!(fx.journal().is_empty());
    // No intent is left to retry at the next start.
    fx.restart_daemon(&[]);
    assert_eq!(fx.ls(), vec![fits.clone()]);
    assert!(!fx.read(".log").contains("recovery: interrupted"));
    assert_eq!(fx.read(".state"), "running\n");
}

#[test]
fn a_spec_written_in_small_pieces_is_parsed_once() {
    let fx = fixture("sec-create-pieces", "internal", &[], |_| {});
    // Nearly 1 MiB, 50 bytes a write: each write scans only its own bytes.
    let head = "<domainsnapshot><name>big</name><memory snapshot='no'/><description>";
    let tail = "</description></domainsnapshot>\n";
    let body = "x".repeat(1_000_000);
    let doc = format!("{head}{body}{tail}");
    let t0 = Instant::now();
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(fx.path(".create"))
        .unwrap();
    for chunk in doc.as_bytes().chunks(50) {
        f.write_all(chunk).unwrap();
    }
    drop(f);
    let took = t0.elapsed();
    assert_eq!(fx.ls(), vec!["big"]);
    // Generous: re-parsing on every write took minutes.
    assert!(took < Duration::from_secs(120), "{took:?}");
    // Errors still come back from the write that completes the document.
    let bad = b"<domainsnapshot><name>.bad</name></domainsnapshot>";
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(fx.path(".create"))
        .unwrap();
    let mut last = Ok(());
    for b in bad.iter() {
        last = f.write_all(&[*b]);
        if last.is_err() {
            break;
        }
    }
    assert_eq!(errno(last), libc::EINVAL);
    drop(f);
    // A document that never ends is refused when the file is closed.
    let f = fs::OpenOptions::new()
        .write(true)
        .open(fx.path(".create"))
        .unwrap();
    (&f).write_all(b"<domainsnapshot><name>half</name>")
        .unwrap();
    use std::os::unix::io::IntoRawFd;
    let fd = f.into_raw_fd();
    // SAFETY: closing the descriptor this test owns, once.
    let r = unsafe { libc::close(fd) };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EINVAL)
    );
    let log = fx.read(".log");
    assert_eq!(log.matches(".create: refused (EINVAL)").count(), 2, "{log}");
    assert_eq!(fx.ls(), vec!["big"]);
}

/// As `owner`, moves `path` away (to `<path>.moved`) and puts a symlink
/// to `target` in its place: what the owner of an image directory can do.
fn swap_for_symlink(owner: &TestUser, path: &Path, target: &Path) {
    let out = owner.sh(
        &format!(
            "mv '{p}' '{p}.moved' && ln -s '{t}' '{p}'",
            p = path.display(),
            t = target.display()
        ),
        b"",
    );
    assert!(out.status.success(), "{out:?}");
}

/// A root-only qcow2 image beside the test's files, and its bytes.
fn root_only_image(base: &Path) -> (PathBuf, Vec<u8>) {
    let (rootonly, _) = root_only(base);
    let victim = rootonly.join("victim.qcow2");
    create_qcow2(&victim, "64M");
    let bytes = fs::read(&victim).unwrap();
    (victim, bytes)
}

/// A running VM under `policy` whose images and their directory belong
/// to `owner`, with the daemon's failpoints `points` (may be empty).
fn owned_fixture(tag: &str, policy: &str, owner: &TestUser, points: &str) -> Fixture {
    let dir = TempDir::new(tag);
    let mut vm = Vm::start(&VmSpec::small("vm1"), &dir.0.join("images")).expect("start VM");
    vm.policy = Some(policy.into());
    vm.write_definition(&dir.0.join("domains")).unwrap();
    own_images(&vm, owner.uid, 100, 0o700, 0o600);
    let env: &[(&str, &str)] = if points.is_empty() {
        &[]
    } else {
        &[("VMSNAPFS_FAILPOINTS", points)]
    };
    let daemon = Daemon::start_with_args(&dir.0, env, &[]);
    let fx = Fixture { daemon, vm, dir };
    fx.wait_state("running");
    fx
}

/// A checkpoint of a running (RAM streamed by a helper process) or
/// paused (RAM written by QEMU itself, at fixed offsets where QEMU has
/// mapped-ram) VM while the owner of the image directory swaps the memory
/// file for a symlink to a root-only file.
fn swap_memory_file_during_save(paused: bool) {
    let owner = TestUser::new("mem", false);
    let uid = owner.uid;
    let dir = TempDir::new(if paused {
        "sec-memswap-p"
    } else {
        "sec-memswap-r"
    });
    let mut vm = Vm::start(&VmSpec::small("vm1"), &dir.0.join("images")).expect("start VM");
    vm.policy = Some("external".into());
    vm.write_definition(&dir.0.join("domains")).unwrap();
    own_images(&vm, uid, 100, 0o700, 0o600);
    let gate = Gate::new(if paused { "memswap-p" } else { "memswap-r" });
    let daemon = Daemon::start_with_args(
        &dir.0,
        &[(
            "VMSNAPFS_FAILPOINTS",
            &format!("checkpoint.part-made={}", gate.action()),
        )],
        &[],
    );
    let fx = Fixture { daemon, vm, dir };
    if paused {
        fx.vm
            .control()
            .unwrap()
            .execute_raw("stop", serde_json::json!({}))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !fx.read(".state").starts_with("paused") {
            assert!(Instant::now() < deadline, "{}", fx.read(".state"));
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let images = images_dir(&fx.vm);
    let (_, secret) = root_only(&fx.dir.0);
    let part = images.join("vm1.c1.memory.part");
    let target = fx.path("c1");
    let mkdir = std::thread::spawn(move || fs::create_dir(target));
    let deadline = Instant::now() + Duration::from_secs(30);
    while fs::symlink_metadata(&part).is_err() {
        assert!(Instant::now() < deadline, "no {} appeared", part.display());
        std::thread::sleep(Duration::from_millis(20));
    }
    // While root is about to write guest RAM into the file it made, the
    // owner of the image directory moves it away and puts a symlink to a
    // root-only file in its place.
    swap_for_symlink(&owner, &part, &secret);
    gate.open();
    let r = mkdir.join().unwrap();
    assert!(
        fs::read(&secret).unwrap() == b"root's secret",
        "guest RAM was written through the symlink into a root-only file"
    );
    assert!(fs::symlink_metadata(&part)
        .unwrap()
        .file_type()
        .is_symlink());
    // The RAM went into the file vmsnapfs made (now under the owner's new
    // name); the snapshot is refused, since its memory file is not where
    // it was made.
    assert!(r.is_err(), "mkdir succeeded over a swapped memory file");
    let log = fx.read(".log");
    assert!(log.contains("c1"), "{log}");
    assert!(fx.ls().is_empty(), "{:?}", fx.ls());
}

#[test]
fn a_memory_file_swapped_for_a_symlink_during_the_save_is_never_written_through() {
    swap_memory_file_during_save(false);
    swap_memory_file_during_save(true);
}

/// The owner of a directory on the way to the images swaps the image
/// directory for a symlink to a root-only directory: root must not make
/// the snapshot's overlays there (a symlink is followed only where only
/// root can have made it).
#[test]
fn a_directory_swapped_for_a_symlink_on_the_way_is_never_followed() {
    let owner = TestUser::new("dir", false);
    let dir = TempDir::new("sec-dirswap");
    let home = dir.0.join("home");
    fs::create_dir_all(&home).unwrap();
    let mut vm = Vm::start(&VmSpec::small("vm1"), &home.join("imgs")).expect("start VM");
    vm.policy = Some("external-disk-only".into());
    vm.write_definition(&dir.0.join("domains")).unwrap();
    own_images(&vm, owner.uid, 100, 0o700, 0o600);
    std::os::unix::fs::chown(&home, Some(owner.uid), Some(100)).unwrap();
    let daemon = Daemon::start(&dir.0, &[]);
    let fx = Fixture { daemon, vm, dir };
    fx.wait_state("running");
    let (rootonly, _) = root_only(&fx.dir.0);
    let before = names(&rootonly);
    let out = owner.sh(
        &format!(
            "cd '{h}' && mv imgs imgs.real && ln -s '{r}' imgs",
            h = home.display(),
            r = rootonly.display()
        ),
        b"",
    );
    assert!(out.status.success(), "{out:?}");
    let r = fs::create_dir(fx.path("s1"));
    let log = fx.read(".log");
    assert!(r.is_err(), "mkdir went through a swapped directory\n{log}");
    assert_eq!(
        names(&rootonly),
        before,
        "files were made in a root-only directory"
    );
    assert!(log.contains("does not follow"), "{log}");
    assert!(fx.ls().is_empty(), "{:?}", fx.ls());
}

/// The owner of the image directory swaps a new overlay for a symlink to
/// a root-only image after vmsnapfs made it and before QEMU (root) opened
/// it by name: QEMU then holds the other image, so the snapshot is
/// refused and the guest stays paused: none of its writes reach that
/// image.
fn swap_overlay_before_qemu_opens_it(policy: &str) {
    let owner = TestUser::new(if policy.len() > 8 { "ovld" } else { "ovlc" }, false);
    let gate = Gate::new(&format!("ovlswap-{}", policy.len()));
    let fx = owned_fixture(
        &format!("sec-ovlswap-{}", policy.len()),
        policy,
        &owner,
        &format!("create.overlays-made={}", gate.action()),
    );
    let (victim, before) = root_only_image(&fx.dir.0);
    let overlay = images_dir(&fx.vm).join("vm1-vda.s1.qcow2");
    let target = fx.path("s1");
    let mkdir = std::thread::spawn(move || fs::create_dir(target));
    fx.daemon.wait_log("failpoint create.overlays-made");
    assert!(
        fs::symlink_metadata(&overlay).is_ok(),
        "no overlay was made"
    );
    swap_for_symlink(&owner, &overlay, &victim);
    gate.open();
    let made = mkdir.join().unwrap();
    let log = fx.read(".log");
    assert_eq!(errno(made), libc::EIO, "{log}");
    assert!(
        log.contains("does not hold the file vmsnapfs made"),
        "{log}"
    );
    assert!(log.contains("left paused"), "{log}");
    let status = fx
        .vm
        .control()
        .unwrap()
        .execute_raw("query-status", serde_json::json!({}))
        .unwrap();
    assert_eq!(status["status"], "paused", "{status}");
    assert!(
        fs::read(&victim).unwrap() == before,
        "a root-only image changed"
    );
    assert!(fx.ls().is_empty(), "{:?}", fx.ls());
}

#[test]
fn an_overlay_swapped_before_qemu_opens_it_is_never_written_disk_only() {
    swap_overlay_before_qemu_opens_it("external-disk-only");
}

#[test]
fn an_overlay_swapped_before_qemu_opens_it_is_never_written_checkpoint() {
    swap_overlay_before_qemu_opens_it("external");
}

/// As above, for the overlays a revert makes: a running QEMU adds them by
/// name (`blockdev-add`), a stopped domain's new QEMU opens them from its
/// command line. The swapped-in image is refused before the guest runs on
/// it: the running guest stays on its layers, the new QEMU is stopped.
fn swap_revert_overlay_before_qemu_opens_it(stopped: bool) {
    let owner = TestUser::new(if stopped { "rovs" } else { "rovr" }, false);
    let tag = if stopped { "rovswap-s" } else { "rovswap-r" };
    let gate = Gate::new(tag);
    let fx = owned_fixture(
        &format!("sec-{tag}"),
        "external-disk-only",
        &owner,
        &format!("revert.overlays-made={}", gate.action()),
    );
    fs::create_dir(fx.path("s1")).unwrap();
    fx.vm.qemu_io("vda", "write -P 0x5a 0 64k").unwrap();
    if stopped {
        fx.quit_vm();
    }
    let images = images_dir(&fx.vm);
    let (victim, before) = root_only_image(&fx.dir.0);
    let existing = names(&images);
    let request = fx.path("s1/revert");
    // A running guest's RAM is not in a disk-only snapshot: `force`.
    let how: &[u8] = if stopped {
        b"running"
    } else {
        b"running force"
    };
    let revert = std::thread::spawn(move || write_file(&request, how));
    fx.daemon.wait_log("failpoint revert.overlays-made");
    let overlay = names(&images)
        .into_iter()
        .find(|n| !existing.contains(n) && n.contains("vda"))
        .map(|n| images.join(n))
        .expect("the revert made no overlay for vda");
    swap_for_symlink(&owner, &overlay, &victim);
    gate.open();
    let r = revert.join().unwrap();
    let log = fx.read(".log");
    assert_eq!(r, Err(libc::EIO), "{log}");
    // Refused when QEMU holds another file, or before: the chain is read
    // without following the symlink.
    assert!(
        log.contains("does not hold the file vmsnapfs made") || log.contains("is a symlink"),
        "{log}"
    );
    assert!(
        fs::read(&victim).unwrap() == before,
        "a root-only image changed"
    );
    if stopped {
        assert!(
            fx.read(".state").starts_with("shutoff"),
            "{}",
            fx.read(".state")
        );
    } else {
        // The guest runs on, on the layers it had.
        let status = fx
            .vm
            .control()
            .unwrap()
            .execute_raw("query-status", serde_json::json!({}))
            .unwrap();
        assert_eq!(status["status"], "running", "{status}");
        fx.vm.qemu_io("vda", "read -P 0x5a 0 64k").unwrap();
    }
}

#[test]
fn a_revert_overlay_swapped_before_a_running_qemu_adds_it_is_refused() {
    swap_revert_overlay_before_qemu_opens_it(false);
}

#[test]
fn a_revert_overlay_swapped_before_a_new_qemu_opens_it_is_refused() {
    swap_revert_overlay_before_qemu_opens_it(true);
}

/// The owner of the image directory swaps a frozen overlay (the image a
/// delete merges into) for a symlink to a root-only image, long before
/// the `rmdir`: neither QEMU, which reopens a merge's target by name, nor
/// qemu-img may write through it. The delete is refused and says why.
fn swap_frozen_overlay_before_a_merge(running: bool) {
    let owner = TestUser::new(if running { "mrgr" } else { "mrgs" }, false);
    let tag = if running { "mrgswap-r" } else { "mrgswap-s" };
    let fx = owned_fixture(&format!("sec-{tag}"), "external-disk-only", &owner, "");
    fs::create_dir(fx.path("s1")).unwrap();
    fx.vm.qemu_io("vda", "write -P 0x11 0 64k").unwrap();
    fs::create_dir(fx.path("s2")).unwrap();
    fx.vm.qemu_io("vda", "write -P 0x22 64k 64k").unwrap();
    if !running {
        fx.quit_vm();
    }
    let (victim, before) = root_only_image(&fx.dir.0);
    // s2's frozen image: the overlay made at s1, which deleting s2
    // merges the newer layer into.
    let frozen = images_dir(&fx.vm).join("vm1-vda.s1.qcow2");
    swap_for_symlink(&owner, &frozen, &victim);
    let r = fs::remove_dir(fx.path("s2"));
    let log = fx.read(".log");
    assert!(r.is_err(), "a merge went through a swapped image\n{log}");
    assert!(
        fs::read(&victim).unwrap() == before,
        "a root-only image changed"
    );
    assert!(
        log.contains("no longer the file vmsnapfs made") || log.contains("is a symlink"),
        "{log}"
    );
    assert!(fx.ls().contains(&"s2".to_string()), "{:?}", fx.ls());
}

#[test]
fn a_frozen_overlay_swapped_before_a_live_merge_is_never_written() {
    swap_frozen_overlay_before_a_merge(true);
}

#[test]
fn a_frozen_overlay_swapped_before_an_offline_merge_is_never_written() {
    swap_frozen_overlay_before_a_merge(false);
}
