//! The guest's files (`<snapshot>/files/`): ext4 and vfat filesystems put
//! on a real VM's disks (whole disk, GPT and MBR partitions), read through
//! the mount from internal and external snapshots of the running and the
//! stopped VM: contents byte for byte, owners, modes, times, symlinks and
//! sizes as the guest stored them; a file deleted later is still in the
//! older snapshot; `cp -a` restores a directory; an open file holds its
//! snapshot; a journal that needs recovery is applied; a disk of garbage
//! is an empty directory with a `.log` line; another user reads only what
//! the images' modes and the guest's own modes allow.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::*;

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sh(script: &str) {
    run(Command::new("sh").arg("-ec").arg(script));
}

/// A guest tree: owners, modes (setuid too), times, a symlink, a 3 MiB
/// file, an empty one, and a directory of 300 entries. `version` 2 has
/// `gone.txt` deleted and `hello.txt` changed.
fn make_tree(dir: &Path, version: u32) {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir.join("etc")).unwrap();
    fs::create_dir_all(dir.join("home/alice/bin")).unwrap();
    fs::create_dir_all(dir.join("many")).unwrap();
    let hello = if version == 1 {
        "hello\n"
    } else {
        "hello, again\n"
    };
    fs::write(dir.join("hello.txt"), hello).unwrap();
    if version == 1 {
        fs::write(dir.join("gone.txt"), "deleted later\n").unwrap();
    }
    let big: Vec<u8> = (0..3 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    fs::write(dir.join("big.bin"), &big).unwrap();
    fs::write(dir.join("empty"), "").unwrap();
    fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    fs::write(dir.join("etc/shadow"), "root:*:19000:0:99999:7:::\n").unwrap();
    fs::write(dir.join("home/alice/notes.txt"), "alice's notes\n").unwrap();
    fs::write(dir.join("home/alice/bin/run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    for i in 0..300 {
        fs::write(dir.join(format!("many/f{i:03}")), format!("{i}\n")).unwrap();
    }
    std::os::unix::fs::symlink("../../hello.txt", dir.join("home/alice/link")).unwrap();
    let d = dir.display();
    sh(&format!(
        "cd {d}
         chmod 0600 big.bin; chmod 0400 empty; chmod 0640 etc/shadow
         chown 0:42 etc/shadow
         chown -R 1000:1000 home/alice; chmod 0700 home/alice; chmod 0664 home/alice/notes.txt
         chown 0:0 home/alice/bin/run.sh; chmod 4755 home/alice/bin/run.sh
         chown -h 1000:1000 home/alice/link
         touch -d '2021-02-03 04:05:06' hello.txt
         touch -d '1999-12-31 23:59:58' etc/passwd
         touch -h -d '2010-06-07 08:09:10' home/alice/link
         touch -d '2015-05-05 05:05:05' home/alice home/alice/bin etc"
    ));
}

/// An ext4 image of `tree`, `mb` MiB.
fn ext4(tree: &Path, out: &Path, mb: u32) {
    run(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-E", "root_owner=0:0", "-d"])
        .arg(tree)
        .arg(out)
        .arg(format!("{mb}M")));
}

/// A vfat image of `tree` (files and directories only), `mb` MiB.
fn vfat(tree: &Path, out: &Path, mb: u32) {
    let _ = fs::remove_file(out);
    run(Command::new("mkfs.vfat")
        .args(["-C", "-n", "GUEST"])
        .arg(out)
        .arg((mb * 1024).to_string()));
    for name in ["hello.txt", "big.bin", "etc", "many"] {
        run(Command::new("mcopy")
            .env("MTOOLS_SKIP_CHECK", "1")
            .args(["-s", "-m", "-i"])
            .arg(out)
            .arg(tree.join(name))
            .arg("::/"));
    }
}

/// A disk of `mb` MiB with partition table `label` (`gpt` or `dos`) and
/// the filesystem images `parts` (start sector, image, MBR type).
fn partitioned(out: &Path, mb: u32, label: &str, parts: &[(u64, &Path, &str)]) {
    let f = fs::File::create(out).unwrap();
    f.set_len(u64::from(mb) << 20).unwrap();
    drop(f);
    let mut script = format!("label: {label}\n");
    for (start, image, kind) in parts {
        let sectors = fs::metadata(image).unwrap().len() / 512;
        script.push_str(&format!("start={start}, size={sectors}"));
        if label == "dos" {
            script.push_str(&format!(", type={kind}"));
        }
        script.push('\n');
    }
    let mut child = Command::new("sfdisk")
        .arg("-q")
        .arg(out)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "sfdisk {script}");
    for (start, image, _) in parts {
        run(Command::new("dd")
            .arg(format!("if={}", image.display()))
            .arg(format!("of={}", out.display()))
            .args(["bs=512", "conv=notrunc", "status=none"])
            .arg(format!("seek={start}")));
    }
}

/// Writes the bytes of `image` at the start of disk `target`, through the
/// guest's device (qemu-io over QMP).
fn put_on_disk(vm: &Vm, target: &str, image: &Path) {
    let len = fs::metadata(image).unwrap().len();
    vm.qemu_io(target, &format!("write -s {} 0 {len}", image.display()))
        .unwrap();
}

/// What a tree holds, as `ls -lR` would compare it: per relative path,
/// kind, mode, owner, size, mtime seconds, symlink target, contents.
#[derive(Debug, PartialEq, Eq, Clone)]
struct Seen {
    kind: char,
    mode: u32,
    owner: (u32, u32),
    size: u64,
    mtime: i64,
    link: Option<PathBuf>,
    data: Option<Vec<u8>>,
}

fn walk(root: &Path) -> BTreeMap<PathBuf, Seen> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_owned();
            if rel.starts_with("lost+found") {
                continue;
            }
            let m = fs::symlink_metadata(&p).unwrap();
            let kind = if m.is_dir() {
                stack.push(p.clone());
                'd'
            } else if m.file_type().is_symlink() {
                'l'
            } else {
                'f'
            };
            out.insert(
                rel,
                Seen {
                    kind,
                    mode: m.mode() & 0o7777,
                    owner: (m.uid(), m.gid()),
                    size: if kind == 'd' { 0 } else { m.len() },
                    mtime: m.mtime(),
                    link: (kind == 'l').then(|| fs::read_link(&p).unwrap()),
                    data: (kind == 'f').then(|| fs::read(&p).unwrap()),
                },
            );
        }
    }
    out
}

/// Asserts that `shown` (a directory of the mount) holds `tree` exactly.
fn assert_same_tree(tree: &Path, shown: &Path) {
    let want = walk(tree);
    let got = walk(shown);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "names under {}",
        shown.display()
    );
    for (rel, w) in &want {
        let g = &got[rel];
        if w.kind == 'd' {
            assert_eq!(
                (g.kind, g.mode, g.owner),
                (w.kind, w.mode, w.owner),
                "{}",
                rel.display()
            );
            continue;
        }
        assert!(g == w, "{}: shown {g:?}", rel.display());
    }
}

/// FAT keeps names, contents, sizes and mtimes (2 s steps): compare those.
fn assert_same_fat(tree: &Path, shown: &Path) {
    let got = walk(shown);
    for name in ["hello.txt", "big.bin", "etc/passwd", "many/f299"] {
        let w = fs::metadata(tree.join(name)).unwrap();
        let g = &got[Path::new(name)];
        assert_eq!(
            g.data.as_deref(),
            Some(&fs::read(tree.join(name)).unwrap()[..]),
            "{name}"
        );
        assert_eq!(g.size, w.len(), "{name}");
        assert!(
            (g.mtime - w.mtime()).abs() <= 2,
            "{name}: {} vs {}",
            g.mtime,
            w.mtime()
        );
        assert_eq!((g.mode, g.owner), (0o644, (0, 0)), "{name}");
    }
    assert_eq!(
        got.len(),
        300 + 6,
        "{:?}",
        got.keys().take(8).collect::<Vec<_>>()
    );
}

fn spec() -> VmSpec {
    let mut spec = VmSpec::small("vm1");
    spec.disks = vec![("vda".into(), 64), ("vdb".into(), 48), ("vdc".into(), 16)];
    spec
}

#[test]
fn files_of_internal_snapshots_running_and_stopped() {
    let mut fx = Fixture::with_spec("gfiles", &spec(), &[]);
    let work = fx.dir.0.join("work");
    fs::create_dir_all(&work).unwrap();
    let (t1, t2) = (work.join("tree1"), work.join("tree2"));
    make_tree(&t1, 1);
    make_tree(&t2, 2);
    // vda: ext4 on the whole disk; vdb: GPT with ext4 and vfat; vdc: MBR
    // with vfat and ext4.
    ext4(&t1, &work.join("vda.img"), 64);
    ext4(&t1, &work.join("p-ext4.img"), 12);
    vfat(&t1, &work.join("p-vfat.img"), 12);
    ext4(&t1, &work.join("small-ext4.img"), 6);
    vfat(&t1, &work.join("small-vfat.img"), 6);
    partitioned(
        &work.join("vdb.img"),
        48,
        "gpt",
        &[
            (2048, &work.join("p-ext4.img"), ""),
            (2048 + 12 * 2048, &work.join("p-vfat.img"), ""),
        ],
    );
    partitioned(
        &work.join("vdc.img"),
        16,
        "dos",
        &[
            (2048, &work.join("small-vfat.img"), "c"),
            (2048 + 6 * 2048, &work.join("small-ext4.img"), "83"),
        ],
    );
    for t in ["vda", "vdb", "vdc"] {
        put_on_disk(&fx.vm, t, &work.join(format!("{t}.img")));
    }

    fs::create_dir(fx.path("s1")).unwrap();
    let started = Instant::now();
    let first = names(&fx.path("s1/files/vda"));
    eprintln!("first ls of files/vda after mkdir: {:?}", started.elapsed());
    assert!(first.contains(&"hello.txt".to_owned()), "{first:?}");
    assert_eq!(names(&fx.path("s1/files")), vec!["vda", "vdb", "vdc"]);
    assert_eq!(names(&fx.path("s1/files/vdb")), vec!["1", "2"]);
    assert_eq!(names(&fx.path("s1/files/vdc")), vec!["1", "2"]);
    assert_same_tree(&t1, &fx.path("s1/files/vda"));
    assert_same_tree(&t1, &fx.path("s1/files/vdb/1"));
    assert_same_tree(&t1, &fx.path("s1/files/vdc/2"));
    assert_same_fat(&t1, &fx.path("s1/files/vdb/2"));
    assert_same_fat(&t1, &fx.path("s1/files/vdc/1"));
    let m = fs::metadata(fx.path("s1/files")).unwrap();
    assert_eq!(
        m.mode() & 0o777,
        0o555,
        "files/ takes the images' read bits"
    );

    // Writing is refused.
    assert!(fs::OpenOptions::new()
        .write(true)
        .open(fx.path("s1/files/vda/hello.txt"))
        .is_err());
    assert!(fs::write(fx.path("s1/files/vda/new"), "x").is_err());

    // The guest's disk changes: the snapshot does not.
    ext4(&t2, &work.join("vda2.img"), 64);
    put_on_disk(&fx.vm, "vda", &work.join("vda2.img"));
    fs::create_dir(fx.path("s2")).unwrap();
    assert_same_tree(&t2, &fx.path("s2/files/vda"));
    assert_same_tree(&t1, &fx.path("s1/files/vda"));
    assert_eq!(fx.read("s1/files/vda/gone.txt"), "deleted later\n");
    assert!(!fx.path("s2/files/vda/gone.txt").exists());

    // cp -a restores a directory with its owners, modes, times and links.
    let restored = work.join("restored");
    run(Command::new("cp")
        .arg("-a")
        .arg(fx.path("s1/files/vda/home"))
        .arg(&restored));
    assert_same_tree(&t1.join("home"), &restored);
    let run_sh = fs::metadata(restored.join("alice/bin/run.sh")).unwrap();
    assert_eq!(run_sh.permissions().mode() & 0o7777, 0o4755);

    // An open guest file holds its snapshot.
    let held = fs::File::open(fx.path("s1/files/vda/big.bin")).unwrap();
    assert_eq!(errno(fs::remove_dir(fx.path("s1"))), libc::EBUSY);
    assert!(fx.read(".log").contains("a guest file"));
    drop(held);

    // Stopped VM: a new snapshot, and the older ones, read the same.
    fx.vm.kill();
    fx.wait_state("shutoff");
    fs::create_dir(fx.path("s3")).unwrap();
    assert_same_tree(&t2, &fx.path("s3/files/vda"));
    assert_same_tree(&t1, &fx.path("s1/files/vdb/1"));
    fs::remove_dir(fx.path("s1")).unwrap();
    assert!(!fx.path("s1").exists());
    let log = fx.read(".log");
    assert!(
        !log.contains("files/vd"),
        "nothing to say about files: {log}"
    );
    fx.daemon.stop();
}

#[test]
fn files_of_external_snapshots_a_dirty_journal_and_garbage() {
    let mut fx = Fixture::with_policy("gfext", "external-disk-only", &[]);
    let work = fx.dir.0.join("work");
    fs::create_dir_all(&work).unwrap();
    let (t1, t2) = (work.join("tree1"), work.join("tree2"));
    make_tree(&t1, 1);
    make_tree(&t2, 2);
    ext4(&t1, &work.join("vda.img"), 64);
    put_on_disk(&fx.vm, "vda", &work.join("vda.img"));
    // vdb: an ext4 whose journal holds a transaction not yet in place
    // (a crash-consistent disk); then garbage over its first MiB in e2.
    let dirty = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus/guestfs/ok-ext4-dirty-journal.img");
    put_on_disk(&fx.vm, "vdb", &dirty);

    fs::create_dir(fx.path("e1")).unwrap();
    assert_same_tree(&t1, &fx.path("e1/files/vda"));
    assert_eq!(
        fx.read("e1/files/vdb/hello.txt"),
        "howdy\n",
        "journal applied"
    );
    assert!(fx.read(".log").contains("journal needs recovery"));

    ext4(&t2, &work.join("vda2.img"), 64);
    put_on_disk(&fx.vm, "vda", &work.join("vda2.img"));
    let garbage: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(7919) >> 3) as u8)
        .collect();
    fs::write(work.join("garbage"), &garbage).unwrap();
    put_on_disk(&fx.vm, "vdb", &work.join("garbage"));
    fs::create_dir(fx.path("e2")).unwrap();
    assert_same_tree(&t2, &fx.path("e2/files/vda"));
    assert_same_tree(&t1, &fx.path("e1/files/vda"));
    assert!(names(&fx.path("e2/files/vdb")).is_empty());
    let log = fx.read(".log");
    assert!(
        log.contains("files/vdb of \"e2\"") && log.contains("shown as an empty directory"),
        "{log}"
    );

    fx.vm.kill();
    fx.wait_state("shutoff");
    fs::create_dir(fx.path("e3")).unwrap();
    assert_same_tree(&t2, &fx.path("e3/files/vda"));
    assert_eq!(fx.read("e1/files/vda/gone.txt"), "deleted later\n");
    fx.daemon.stop();
}

#[test]
fn another_user_reads_only_what_the_images_and_the_guest_allow() {
    let other = TestUser::new("gfo", false);
    let dir = TempDir::new("gfperm");
    let mut vm = Vm::start(&VmSpec::small("vm1"), &dir.0.join("images")).expect("start VM");
    vm.policy = Some("internal".into());
    vm.write_definition(&dir.0.join("domains")).unwrap();
    let daemon = Daemon::start_with_args(&dir.0, &[], &["--allow-other"]);
    let fx = Fixture { daemon, vm, dir };
    let work = fx.dir.0.join("work");
    fs::create_dir_all(&work).unwrap();
    let tree = work.join("tree");
    make_tree(&tree, 1);
    ext4(&tree, &work.join("vda.img"), 64);
    put_on_disk(&fx.vm, "vda", &work.join("vda.img"));
    fs::create_dir(fx.path("s1")).unwrap();

    // Images 0644: `files/` is open; the guest's modes apply below it.
    let files = fx.path("s1/files/vda");
    let (hello, shadow) = (files.join("hello.txt"), files.join("etc/shadow"));
    let out = other.sh(&format!("cat '{}'", hello.display()), b"");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
    assert_failed_with(
        &other.sh(&format!("cat '{}'", shadow.display()), b""),
        libc::EACCES,
        "another user reads the guest's root-only file",
    );
    // Guest uid 1000's 0700 directory: the host user with uid 1000 enters
    // (owners are numbers, as on any mounted disk), any other does not.
    let alice = other.sh(&format!("ls '{}'", files.join("home/alice").display()), b"");
    if other.uid == 1000 {
        assert!(alice.status.success(), "uid 1000 lists its own directory");
    } else {
        assert_failed_with(
            &alice,
            libc::EACCES,
            "another user lists a 0700 directory of guest uid 1000",
        );
    }
    // Images 0600: `files/` of a new snapshot is root's alone.
    for d in &fx.vm.disks {
        fs::set_permissions(&d.image, fs::Permissions::from_mode(0o600)).unwrap();
    }
    fs::create_dir(fx.path("s2")).unwrap();
    let m = fs::metadata(fx.path("s2/files")).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o777), (0, 0o500));
    let hello2 = fx.path("s2/files/vda/hello.txt");
    assert_failed_with(
        &other.sh(&format!("cat '{}'", hello2.display()), b""),
        libc::EACCES,
        "another user reads a guest file of a 0600 image",
    );
    assert_eq!(
        fs::read_to_string(&hello2).unwrap(),
        "hello\n",
        "root reads it"
    );
}

/// A guest can corrupt its filesystem so that a directory is its own
/// descendant (`dir/sub` made to share `dir`'s block). `files/` follows
/// the loop down to its depth bound, then refuses with `EIO` and a `.log`
/// line; the files along the way and elsewhere read as stored, and the
/// mount answers throughout.
#[test]
fn a_directory_loop_in_the_guest_is_cut_at_a_bounded_depth() {
    let mut fx = Fixture::with_policy("gfloop", "external-disk-only", &[]);
    let work = fx.dir.0.join("work");
    let tree = work.join("tree");
    fs::create_dir_all(tree.join("dir/sub")).unwrap();
    fs::write(tree.join("hello.txt"), "hello\n").unwrap();
    fs::write(tree.join("dir/inner.txt"), "inner\n").unwrap();
    let img = work.join("loop.img");
    run(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext2", "-b", "1024", "-d"])
        .arg(&tree)
        .arg(&img)
        .arg("2M"));
    let out = Command::new("debugfs")
        .args(["-R", "bmap /dir 0"])
        .arg(&img)
        .output()
        .unwrap();
    let block = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(block.parse::<u64>().is_ok(), "bmap: {block:?}");
    run(Command::new("debugfs")
        .arg("-w")
        .arg("-R")
        .arg(format!("set_inode_field /dir/sub block[0] {block}"))
        .arg(&img));
    put_on_disk(&fx.vm, "vda", &img);

    fs::create_dir(fx.path("s1")).unwrap();
    let root = fx.path("s1/files/vda");
    assert_eq!(
        fs::read_to_string(root.join("hello.txt")).unwrap(),
        "hello\n"
    );
    // Down the loop: each level lists `inner.txt` and `sub`, until the
    // bound refuses a listing with EIO.
    let mut dir = root.join("dir");
    let mut levels = 0;
    let refused = loop {
        let listed: std::io::Result<Vec<String>> = fs::read_dir(&dir).and_then(|rd| {
            rd.map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect()
        });
        match listed {
            Ok(mut seen) => {
                seen.sort();
                assert_eq!(seen, ["inner.txt", "sub"], "level {levels}");
                if levels % 50 == 0 {
                    assert_eq!(
                        fs::read_to_string(dir.join("inner.txt")).unwrap(),
                        "inner\n"
                    );
                }
            }
            Err(e) => break e,
        }
        levels += 1;
        assert!(levels <= 300, "the loop was followed past its bound");
        dir = dir.join("sub");
    };
    assert_eq!(refused.raw_os_error(), Some(libc::EIO), "{refused}");
    assert_eq!(levels, 256, "refused at level {levels}");
    let log = fx.read(".log");
    assert!(log.contains("deeper than 256 directories"), "{log}");
    // The mount answers, and the snapshot's other files still read.
    assert!(fx.read(".state").contains("running"));
    assert_eq!(
        fs::read_to_string(root.join("dir/inner.txt")).unwrap(),
        "inner\n"
    );
    fx.daemon.stop();
}
