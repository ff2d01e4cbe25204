//! The daemon's virsh (`vmsnapfs::libvirt::Virsh`) on the real `virsh`
//! binary: commands on long-lived shells give what a virsh process of
//! their own gives; no argument (spaces, quotes, semicolons, comment
//! signs, backslashes, newlines, control characters, non-ASCII) splits a
//! command or injects another; a libvirt that never answers costs one
//! deadline and the shell is killed. libvirt's test driver
//! (`test:///default`, in virsh itself: one running domain `test` per
//! connection) stands for libvirtd where none is needed. Skipped, saying
//! so, where virsh is not installed.

use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use vmsnapfs::libvirt::Virsh;

const T: Duration = Duration::from_secs(30);

fn have_virsh() -> bool {
    if std::path::Path::new("/usr/bin/virsh").exists() {
        return true;
    }
    eprintln!("SKIPPED: virsh is not installed (scripts/install-deps.sh installs it)");
    false
}

/// Arguments that a shell line must carry unchanged, or not at all.
const HOSTILE: &[&str] = &[
    "two words",
    "it's",
    "'",
    "''",
    "\"",
    "a\"b'c",
    "x; destroy test",
    "x'; destroy test; echo '",
    "x\"; destroy test; echo \"",
    "#comment",
    "# destroy test",
    "back\\slash",
    "\\",
    "trailing\\",
    "$(destroy test)",
    "`destroy test`",
    "x\ndestroy test",
    "x\rdestroy test",
    "tab\tdestroy test",
    "\u{1}destroy test",
    "\u{1b}[Adestroy test",
    "caf\u{e9} destroy test",
    "",
    " ",
];

#[test]
fn shells_give_what_a_process_gives_and_no_argument_injects_a_command() {
    if !have_virsh() {
        return;
    }
    let v = Virsh::new("test:///default");
    // The same commands on a shell and in a process of their own.
    for args in [
        &["list", "--all", "--name"][..],
        &["dumpxml", "--domain", "test"][..],
        &["domstate", "--domain", "test"][..],
    ] {
        assert_eq!(v.run(args, T).unwrap(), v.run_alone(args, T).unwrap());
    }
    assert_eq!(v.idle_shells(), 1);
    // Each argument comes back whole from `echo` (which joins its
    // arguments with a space), between two fixed words.
    for arg in HOSTILE {
        let got = v.run(&["echo", "--", "[", arg, "]"], T).unwrap();
        assert_eq!(
            got.trim_end_matches('\n'),
            format!("[ {arg} ]"),
            "echo of {arg:?}"
        );
        // A domain named by it is not found, and nothing else ran.
        let e = v.run(&["domstate", "--domain", arg], T).unwrap_err();
        assert!(
            e.message.contains("failed to get domain") || e.message.contains("is empty"),
            "{arg:?}: {e}"
        );
        assert_eq!(
            v.run(&["domstate", "--domain", "test"], T).unwrap().trim(),
            "running"
        );
    }
    // The test driver's state is per connection: the shell kept its
    // connection through all of it (one shell, reused).
    assert_eq!(v.idle_shells(), 1);
    v.run(&["suspend", "--domain", "test"], T).unwrap();
    assert_eq!(
        v.run(&["domstate", "--domain", "test"], T).unwrap().trim(),
        "paused"
    );
    // An error is virsh's message, and the shell stays.
    let e = v.run(&["no-such-command"], T).unwrap_err();
    assert!(e.message.contains("unknown command"), "{e}");
    assert_eq!(
        v.run(&["domstate", "--domain", "test"], T).unwrap().trim(),
        "paused"
    );
    assert_eq!(v.idle_shells(), 1);
}

#[test]
fn concurrent_commands_each_get_a_shell() {
    if !have_virsh() {
        return;
    }
    let v = Virsh::new("test:///default");
    let threads: Vec<_> = (0..6)
        .map(|i| {
            let v = v.clone();
            std::thread::spawn(move || {
                for j in 0..5 {
                    let word = format!("w{i}-{j}");
                    assert_eq!(v.run(&["echo", &word], T).unwrap().trim(), word);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(
        v.idle_shells() >= 1 && v.idle_shells() <= 4,
        "{}",
        v.idle_shells()
    );
}

#[test]
fn a_libvirt_that_never_answers_costs_one_deadline_and_the_shell() {
    if !have_virsh() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("vmsnapfs-virsh-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("silent.sock");
    // Accepts connections into its backlog and never says a word.
    let _silent = UnixListener::bind(&sock).unwrap();
    let v = Virsh::new(&format!("qemu:///system?socket={}", sock.display()));
    for _ in 0..2 {
        let t = Instant::now();
        let e = v
            .run(&["list", "--name"], Duration::from_secs(2))
            .unwrap_err();
        assert!(e.message.contains("did not finish within"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
        assert_eq!(v.idle_shells(), 0);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
