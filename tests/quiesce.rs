//! Quiesced snapshots: the guest agent freezes the guest's file systems
//! right before the disks switch and thaws them right after. On a real
//! Linux guest (tests/common/guest.rs): the snapshot's ext4 is clean
//! without journal replay, the guest writes on, a daemon killed inside the
//! frozen window leaves the guest thawed after its restart. On a VM
//! without an OS: `yes` without an agent is refused with nothing made,
//! `auto` goes on crash-consistent, and an agent that never answers
//! neither blocks `ls` nor the snapshot for longer than its timeout.

mod common;

use std::fs;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::guest::*;
use common::*;

/// The agent's `guest-fsfreeze-status` (the test's own short session).
fn freeze_status(guest: &Guest) -> String {
    guest
        .agent(Duration::from_secs(30))
        .fsfreeze_status()
        .unwrap()
}

/// The `.log` line of `what` that says how long the guest was frozen.
fn frozen_line(log: &str, what: &str) -> String {
    log.lines()
        .find(|l| l.contains(what) && l.contains("quiesced: the guest's file systems were frozen"))
        .unwrap_or_else(|| panic!("no quiesce line for {what} in .log:\n{log}"))
        .to_owned()
}

/// The intent records in vm1's journal.
fn journal(state: &Path) -> Vec<String> {
    let dir = state.join("vm1/journal");
    fs::read_dir(&dir)
        .map(|r| {
            r.map(|e| fs::read_to_string(e.unwrap().path()).unwrap_or_default())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn quiesced_snapshots_are_clean_the_guest_runs_on_and_a_crash_mid_freeze_thaws_it() {
    let mut rg = RealGuest::start("qz-guest", "external-disk-only", &[]);
    let images = rg.vm.dir.clone();

    // External, by mkdir: the definition has an agent channel, so its
    // default is `auto`, and the agent answers.
    fs::create_dir(rg.path("ext1")).unwrap();
    // (vda's ext4 freezes; qemu-ga skips vdb's vfat, which cannot.)
    let line = frozen_line(&rg.read(".log"), "mkdir \"ext1\"");
    assert!(line.contains("(1 frozen, 1 thawed"), "{line}");
    assert_clean(&rg.path("ext1/disks/vda"));

    // Internal, disks only, asked for in .create.
    write_file(
        &rg.path(".create"),
        b"<domainsnapshot><name>int1</name><memory snapshot='no'/><disks>\
          <disk name='vda' snapshot='internal'/><disk name='vdb' snapshot='internal'/>\
          </disks><quiesce/></domainsnapshot>",
    )
    .unwrap();
    frozen_line(&rg.read(".log"), ".create \"int1\"");
    assert_eq!(
        fs::read_to_string(rg.path("int1/state")).unwrap(),
        "disk-snapshot\n"
    );
    assert_clean(&rg.path("int1/disks/vda"));

    // The check tells the difference: a crash-consistent snapshot of the
    // same guest (quiesce='no') has a journal to replay.
    write_file(
        &rg.path(".create"),
        b"<domainsnapshot quiesce='no'><name>crash1</name><memory snapshot='no'/><disks>\
          <disk name='vda' snapshot='external'/><disk name='vdb' snapshot='external'/>\
          </disks></domainsnapshot>",
    )
    .unwrap();
    let (_, text, features) = fsck(&rg.path("crash1/disks/vda"));
    assert!(
        features.contains("needs_recovery") && text.contains("journal recovery"),
        "{features}\n{text}"
    );
    assert!(!rg.read(".log").contains(".create \"crash1\": quiesced"));

    // The guest runs on, thawed.
    let n = rg.guest.wrote();
    rg.guest.wait_wrote(n, Duration::from_secs(60));
    assert_eq!(freeze_status(&rg.guest), "thawed");

    // The daemon killed inside the frozen window (after the freeze,
    // before the disks switch).
    rg.restart_daemon(&[("VMSNAPFS_FAILPOINTS", "create.frozen=crash")]);
    let files_before = names(&images);
    assert!(fs::create_dir(rg.path("k1")).is_err());
    assert!(rg.daemon.wait_exit(Duration::from_secs(30)));
    rg.daemon.kill9();
    assert!(
        journal(&rg.daemon.state)
            .iter()
            .any(|r| r.contains("\"op\": \"thaw\"") || r.contains("\"op\":\"thaw\"")),
        "{:?}",
        journal(&rg.daemon.state)
    );
    // It died with the guest frozen.
    assert_eq!(freeze_status(&rg.guest), "frozen");
    let base = rg.dir.0.clone();
    rg.daemon = Daemon::start(&base, &[]);
    // Start-up recovery thawed it before the mount answered.
    assert_eq!(freeze_status(&rg.guest), "thawed");
    let log = rg.read(".log");
    assert!(
        log.contains("recovery: interrupted freeze of the guest's file systems")
            && log.contains("thawed 1 file system(s), after the daemon restarted"),
        "{log}"
    );
    // The snapshot is absent (the switch never came), and so are its files.
    assert!(!rg.ls().contains(&"k1".to_owned()), "{:?}", rg.ls());
    assert_eq!(names(&images), files_before);
    assert!(journal(&rg.daemon.state).is_empty());
    let n = rg.guest.wrote();
    rg.guest.wait_wrote(n, Duration::from_secs(60));

    // And the next quiesced snapshot works as before.
    fs::create_dir(rg.path("ext2")).unwrap();
    frozen_line(&rg.read(".log"), "mkdir \"ext2\"");
    assert_clean(&rg.path("ext2/disks/vda"));
}

/// A VM without an OS whose definition has an agent channel at `socket`
/// and `<snapshot policy='external-disk-only' {attrs}/>`.
fn fixture_with_channel(tag: &str, attrs: &str) -> (Fixture, PathBuf) {
    let dir = TempDir::new(tag);
    let mut vm = Vm::start(&VmSpec::small("vm1"), &dir.0.join("images")).expect("start VM");
    vm.policy = Some("external-disk-only".into());
    let socket = vm.dir.join("vm1.qga");
    write_definition(&vm, &dir.0.join("domains"), &socket, attrs);
    let daemon = Daemon::start(&dir.0, &[]);
    (Fixture { daemon, vm, dir }, socket)
}

fn write_definition(vm: &Vm, domains: &Path, socket: &Path, attrs: &str) {
    let channel = format!(
        "    <channel type='unix'>\n      <source mode='bind' path='{}'/>\n      \
         <target type='virtio' name='{AGENT_PORT}'/>\n    </channel>\n  </devices>",
        socket.display()
    );
    let xml = vm
        .definition_xml()
        .replacen("  </devices>", &channel, 1)
        .replacen(
            "<snapshot policy='external-disk-only'/>",
            &format!("<snapshot policy='external-disk-only' {attrs}/>"),
            1,
        );
    fs::create_dir_all(domains).unwrap();
    fs::write(domains.join("vm1.xml"), xml).unwrap();
}

/// Every image file beside the disks, with the internal tags of each qcow2.
fn image_state(fx: &Fixture) -> Vec<(String, Vec<String>)> {
    names(&fx.vm.dir)
        .into_iter()
        .filter(|n| n.ends_with(".qcow2"))
        .map(|n| {
            let tags = image_tags(&fx.vm.dir.join(&n));
            (n, tags)
        })
        .collect()
}

#[test]
fn yes_without_an_answering_agent_is_refused_and_auto_goes_on_crash_consistent() {
    // Nothing listens on the channel's socket.
    let (mut fx, _socket) = fixture_with_channel("qz-noagent", "");
    let before = image_state(&fx);
    for (name, spec) in [
        (
            "y-int",
            "<domainsnapshot><name>y-int</name><memory snapshot='no'/><quiesce/></domainsnapshot>",
        ),
        (
            "y-ext",
            "<domainsnapshot><name>y-ext</name><memory snapshot='no'/><disks>\
             <disk name='vda' snapshot='external'/><disk name='vdb' snapshot='external'/>\
             </disks><quiesce/></domainsnapshot>",
        ),
    ] {
        assert_eq!(
            write_file(&fx.path(".create"), spec.as_bytes()),
            Err(libc::ENOTCONN),
            "{name}"
        );
        let log = fx.read(".log");
        assert!(
            log.contains(&format!(
                ".create \"{name}\": refused (ENOTCONN): quiesce: cannot connect to the \
                 guest agent socket"
            )),
            "{log}"
        );
        assert!(!fx.path(name).exists());
        assert_eq!(image_state(&fx), before, "nothing made for {name}");
    }
    // A checkpoint cannot be quiesced (libvirt's rule): EINVAL.
    assert_eq!(
        write_file(
            &fx.path(".create"),
            b"<domainsnapshot><name>y-mem</name><quiesce/></domainsnapshot>"
        ),
        Err(libc::EINVAL)
    );
    assert!(fx
        .read(".log")
        .contains("quiesce applies to disk-only snapshots"));

    // The domain's default (auto: the definition has a channel): the
    // snapshot is taken crash-consistent, and .log says so.
    fs::create_dir(fx.path("a1")).unwrap();
    let log = fx.read(".log");
    assert!(
        log.contains("mkdir \"a1\": not quiesced, crash-consistent: cannot connect to the guest agent socket"),
        "{log}"
    );
    assert!(
        log.contains("mkdir \"a1\": created (disk-snapshot)"),
        "{log}"
    );

    // quiesce='yes' in the definition: mkdir is refused the same way.
    let domains = fx.daemon.domains.clone();
    write_definition(&fx.vm, &domains, &_socket, "quiesce='yes'");
    fx.restart_daemon(&[]);
    let before = image_state(&fx);
    assert_eq!(errno(fs::create_dir(fx.path("y2"))), libc::ENOTCONN);
    assert!(fx
        .read(".log")
        .contains("mkdir \"y2\": refused (ENOTCONN): quiesce:"));
    assert!(!fx.path("y2").exists());
    assert_eq!(image_state(&fx), before);
    assert_eq!(fx.ls(), vec!["a1".to_owned()]);
    check_no_orphans(&fx);
}

/// A socket that accepts every connection and never says anything.
struct SilentAgent {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SilentAgent {
    fn listen(path: &Path) -> SilentAgent {
        let listener = UnixListener::bind(path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((c, _)) => held.push(c),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        SilentAgent {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for SilentAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs `op` on a thread while the mount is listed over and over: `ls`
/// of the mount root, `/.jobs`, `vm1/.state` (looked up before), and
/// with `domain_dir` `ls vm1` (a mkdir holds vm1's lock in the kernel,
/// which makes `ls vm1` wait whatever the daemon does; see
/// docs/guarantees.md). Returns what `op` returned, how long it took and
/// the longest round of reads.
fn while_listing<T: Send + 'static>(
    fx: &Fixture,
    domain_dir: bool,
    op: impl FnOnce() -> T + Send + 'static,
) -> (T, Duration, Duration) {
    fs::metadata(fx.path(".state")).unwrap();
    let t0 = Instant::now();
    let worker = std::thread::spawn(op);
    let mut longest = Duration::ZERO;
    while !worker.is_finished() {
        let t = Instant::now();
        assert!(names(&fx.daemon.mnt).contains(&"vm1".to_owned()));
        fs::read_to_string(fx.daemon.mnt.join(".jobs")).unwrap();
        fx.read(".state");
        if domain_dir {
            fs::read_dir(fx.path("")).unwrap().for_each(drop);
        }
        longest = longest.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = worker.join().unwrap();
    (r, t0.elapsed(), longest)
}

#[test]
fn an_agent_that_never_answers_times_out_and_ls_stays_responsive() {
    let (fx, socket) = fixture_with_channel("qz-silent", "");
    let _agent = SilentAgent::listen(&socket);

    // auto: falls back to crash-consistent once the agent's sync times out.
    let dir = fx.path("s1");
    let (r, took, longest) = while_listing(&fx, false, move || fs::create_dir(dir));
    r.unwrap();
    assert!(took < Duration::from_secs(20), "mkdir took {took:?}");
    assert!(longest < Duration::from_secs(2), "ls took {longest:?}");
    let log = fx.read(".log");
    assert!(
        log.contains(
            "mkdir \"s1\": not quiesced, crash-consistent: the guest agent did not answer \
             guest-sync-delimited within 3 s"
        ),
        "{log}"
    );

    // yes: refused within the timeout, nothing made.
    let before = image_state(&fx);
    let create = fx.path(".create");
    let (r, took, longest) = while_listing(&fx, true, move || {
        write_file(
            &create,
            b"<domainsnapshot><name>s2</name><memory snapshot='no'/><quiesce/></domainsnapshot>",
        )
    });
    assert_eq!(r, Err(libc::ENOTCONN));
    assert!(took < Duration::from_secs(20), ".create took {took:?}");
    assert!(longest < Duration::from_secs(2), "ls took {longest:?}");
    assert!(fx
        .read(".log")
        .contains(".create \"s2\": refused (ENOTCONN): quiesce: the guest agent did not answer"));
    assert!(!fx.path("s2").exists());
    assert_eq!(image_state(&fx), before);
}

/// A scripted agent on a socket (the test's own; the real guest's agent
/// cannot be told to fail): answers the sync, `thawed` and freezes, but
/// the first thaw is never answered and the next two close the
/// connection; later thaws are answered. Counts the thaws it saw.
struct StubbornAgent {
    stop: Arc<AtomicBool>,
    thaws: Arc<std::sync::atomic::AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StubbornAgent {
    fn listen(path: &Path) -> StubbornAgent {
        use std::io::{BufRead, Write};
        use std::sync::atomic::AtomicUsize;
        let listener = UnixListener::bind(path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let thaws = Arc::new(AtomicUsize::new(0));
        let (s, t) = (stop.clone(), thaws.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok((c, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                c.set_nonblocking(false).unwrap();
                let t = t.clone();
                std::thread::spawn(move || {
                    let mut w = c.try_clone().unwrap();
                    let mut r = std::io::BufReader::new(c);
                    let mut line = Vec::new();
                    while r.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
                        let text = String::from_utf8_lossy(&line).replace('\u{fffd}', "");
                        line.clear();
                        let Ok(v) = serde_json::from_str::<serde_json::Value>(text.trim()) else {
                            let _ = w.write_all(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"parse\"}}\n");
                            continue;
                        };
                        let answer = match v["execute"].as_str().unwrap_or("") {
                            "guest-sync-delimited" => {
                                format!("\u{0}{{\"return\": {}}}\n", v["arguments"]["id"])
                            }
                            "guest-fsfreeze-status" => "{\"return\": \"thawed\"}\n".into(),
                            "guest-fsfreeze-freeze" => "{\"return\": 1}\n".into(),
                            "guest-fsfreeze-thaw" => match t.fetch_add(1, Ordering::SeqCst) {
                                0 => continue,
                                1 | 2 => return,
                                _ => "{\"return\": 1}\n".into(),
                            },
                            _ => "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"\"}}\n"
                                .into(),
                        };
                        // The sync answer starts with the 0xFF sentinel.
                        let mut bytes = answer.into_bytes();
                        if bytes[0] == 0 {
                            bytes[0] = 0xff;
                        }
                        if w.write_all(&bytes).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        StubbornAgent {
            stop,
            thaws,
            thread: Some(thread),
        }
    }
}

impl Drop for StubbornAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn a_thaw_that_fails_is_retried_until_it_is_done() {
    let (fx, socket) = fixture_with_channel("qz-thaw", "");
    let agent = StubbornAgent::listen(&socket);
    fs::create_dir(fx.path("s1")).unwrap();
    let log = fx.read(".log");
    for l in [
        "mkdir \"s1\": thaw attempt 1 failed: the guest agent did not answer guest-fsfreeze-thaw within 5 s",
        "mkdir \"s1\": thaw attempt 2 failed: the guest agent closed the connection",
        "mkdir \"s1\": the guest's file systems may still be frozen",
        "mkdir \"s1\": created (disk-snapshot)",
    ] {
        assert!(log.contains(l), "{l:?} not in .log:\n{log}");
    }
    // The thaw record stays until a thaw is answered; the domain's
    // thread tries again (every 10 s).
    assert_eq!(journal(&fx.daemon.state).len(), 1);
    let deadline = Instant::now() + Duration::from_secs(40);
    while !fx.read(".log").contains("thawed 1 file system(s)") {
        assert!(
            Instant::now() < deadline,
            "never thawed:\n{}",
            fx.read(".log")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(agent.thaws.load(Ordering::SeqCst), 4);
    assert!(journal(&fx.daemon.state).is_empty());
    assert_eq!(fx.ls(), vec!["s1".to_owned()]);
}
