//! A small real VM with no guest OS: qcow2 disks, two QMP sockets (one for
//! vmsnapfs, one for whoever drives the guest), KVM when `/dev/kvm` opens,
//! TCG otherwise. Used by `vmsnapfs demo`, the tests and the benchmarks.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::backend::qmp::Qmp;
use crate::backend::{process, qemu_img};
use crate::error::{Error, Result};

/// What to build.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Domain name.
    pub name: String,
    /// Disks: target name and virtual size in MiB.
    pub disks: Vec<(String, u64)>,
    /// Guest RAM in MiB.
    pub memory_mb: u64,
    /// Targets of the disks made as raw images (the others are qcow2).
    pub raw: Vec<String>,
}

impl VmSpec {
    /// `name` with two qcow2 disks (vda 64 MiB, vdb 32 MiB) and 128 MiB of RAM.
    pub fn small(name: &str) -> Self {
        VmSpec {
            name: name.into(),
            disks: vec![("vda".into(), 64), ("vdb".into(), 32)],
            memory_mb: 128,
            raw: Vec::new(),
        }
    }
}

/// A disk of a [`Vm`].
#[derive(Debug, Clone)]
pub struct VmDisk {
    /// Target name, e.g. `vda`.
    pub target: String,
    /// Image file.
    pub image: PathBuf,
    /// The virtio-blk device id (`qemu-io -d <id>/virtio-backend`).
    pub device: String,
    /// Image format: `qcow2` or `raw`.
    pub format: String,
}

/// A running QEMU started by [`Vm::start`]; killed (by pid) on drop.
pub struct Vm {
    /// Domain name.
    pub name: String,
    /// Directory holding the images and sockets.
    pub dir: PathBuf,
    /// The QMP socket vmsnapfs uses.
    pub monitor: PathBuf,
    /// A second QMP socket for tests and the demo's own commands.
    pub control: PathBuf,
    /// The disks.
    pub disks: Vec<VmDisk>,
    /// The QEMU command line.
    pub argv: Vec<String>,
    /// RAM in MiB.
    pub memory_mb: u64,
    pid: Option<i32>,
    /// `<snapshot policy=...>` written into the definition, if set.
    pub policy: Option<String>,
}

/// True when KVM can be used here.
pub fn kvm_usable() -> bool {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

impl Vm {
    /// Creates the images in `dir` and starts QEMU (`qemu-system-x86_64`
    /// from PATH).
    pub fn start(spec: &VmSpec, dir: &Path) -> Result<Vm> {
        Self::start_with_qemu(spec, dir, "qemu-system-x86_64")
    }

    /// Like [`Vm::start`], with the QEMU binary `qemu` (a path, or a name
    /// looked up in PATH), which the command line then names.
    pub fn start_with_qemu(spec: &VmSpec, dir: &Path, qemu: &str) -> Result<Vm> {
        let mut vm = Self::create(spec, dir, qemu)?;
        vm.launch()?;
        Ok(vm)
    }

    /// Creates the images and the command line without starting QEMU, for
    /// a caller that changes them first (then [`Vm::launch`]).
    pub fn create(spec: &VmSpec, dir: &Path, qemu: &str) -> Result<Vm> {
        fs::create_dir_all(dir)?;
        let mut disks = Vec::new();
        for (target, mb) in &spec.disks {
            let format = if spec.raw.contains(target) {
                "raw"
            } else {
                "qcow2"
            };
            let image = dir.join(format!("{}-{target}.{format}", spec.name));
            qemu_img::run(&[
                "create",
                "-q",
                "-f",
                format,
                &image.to_string_lossy(),
                &format!("{mb}M"),
            ])?;
            disks.push(VmDisk {
                target: target.clone(),
                image,
                device: format!("{target}-dev"),
                format: format.into(),
            });
        }
        let mut vm = Vm {
            name: spec.name.clone(),
            dir: dir.to_owned(),
            monitor: dir.join(format!("{}.qmp", spec.name)),
            control: dir.join(format!("{}.control.qmp", spec.name)),
            disks,
            argv: Vec::new(),
            memory_mb: spec.memory_mb,
            policy: None,
            pid: None,
        };
        vm.argv = vm.command_line();
        vm.argv[0] = qemu.to_owned();
        Ok(vm)
    }

    fn command_line(&self) -> Vec<String> {
        let accel = if kvm_usable() { "kvm" } else { "tcg" };
        let mut a: Vec<String> = [
            "qemu-system-x86_64",
            "-name",
            &self.name,
            "-accel",
            accel,
            "-machine",
            "q35",
            "-m",
            &self.memory_mb.to_string(),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "none",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for d in &self.disks {
            a.push("-drive".into());
            a.push(format!(
                "file={},format={},if=none,id={},node-name={}-fmt,cache=writeback",
                d.image.display(),
                d.format,
                d.target,
                d.target
            ));
            a.push("-device".into());
            a.push(format!("virtio-blk-pci,drive={},id={}", d.target, d.device));
        }
        for sock in [&self.monitor, &self.control] {
            a.push("-qmp".into());
            a.push(format!("unix:{},server=on,wait=off", sock.display()));
        }
        a
    }

    /// Starts QEMU from [`Vm::argv`] and waits until the control socket answers.
    pub fn launch(&mut self) -> Result<()> {
        let log = fs::File::create(self.dir.join(format!("{}.qemu.log", self.name)))?;
        let child = Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| Error::io(format!("cannot start QEMU: {e}")))?;
        let pid = child.id() as i32;
        self.pid = Some(pid);
        std::thread::spawn(move || {
            let mut child = child;
            let _ = child.wait();
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if Qmp::connect(&self.control, Duration::from_secs(5)).is_ok() {
                return Ok(());
            }
            if !process::is_alive(pid, None) {
                let said = fs::read_to_string(self.dir.join(format!("{}.qemu.log", self.name)))
                    .unwrap_or_default();
                return Err(Error::io(format!("QEMU exited at start: {}", said.trim())));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(Error::io("QEMU did not open its monitor"))
    }

    /// The pid of the QEMU this handle started (a restarted QEMU is found
    /// through the monitor socket instead).
    pub fn pid(&self) -> Option<i32> {
        self.pid
    }

    /// A new QMP session on the control socket.
    pub fn control(&self) -> Result<Qmp> {
        Qmp::connect(&self.control, Duration::from_secs(30)).map_err(|e| Error::io(e.to_string()))
    }

    /// Runs `qemu-io` on a disk through the guest's device, e.g.
    /// `write -P 0xab 0 64k`. Output goes to QEMU's log, not here.
    pub fn qemu_io(&self, target: &str, cmd: &str) -> Result<()> {
        let disk = self
            .disks
            .iter()
            .find(|d| d.target == target)
            .ok_or_else(|| Error::not_found(format!("no disk {target}")))?;
        let out = self
            .control()?
            .hmp(&format!(
                "qemu-io -d {}/virtio-backend \"{cmd}\"",
                disk.device
            ))
            .map_err(|e| Error::io(e.to_string()))?;
        if out.trim().is_empty() {
            Ok(())
        } else {
            Err(Error::io(format!("qemu-io {cmd}: {}", out.trim())))
        }
    }

    /// The whole guest-visible content of a disk, read through an NBD
    /// export of the running QEMU's node (or from the image when QEMU is
    /// not running).
    pub fn read_disk(&self, target: &str) -> Result<Vec<u8>> {
        let disk = self
            .disks
            .iter()
            .find(|d| d.target == target)
            .ok_or_else(|| Error::not_found(format!("no disk {target}")))?;
        let out = self.dir.join(format!("{target}.read.raw"));
        let src = match self.control() {
            Ok(mut q) => {
                let sock = self.dir.join("read.nbd");
                let start: qapi::qmp::nbd_server_start = typed(serde_json::json!({
                    "addr": {"type": "unix", "data": {"path": sock.to_string_lossy()}}
                }))?;
                let _ = q.execute(&start);
                let id = format!("read-{target}");
                let del = qapi::qmp::block_export_del {
                    id: id.clone(),
                    mode: None,
                };
                let _ = q.execute(&del);
                // The device's active layer (an overlay after external snapshots).
                let qdev = format!("/machine/peripheral/{}/virtio-backend", disk.device);
                let blocks = q.block_devices().map_err(|e| Error::io(e.to_string()))?;
                let node = blocks
                    .into_iter()
                    .find(|b| b.qdev.as_deref() == Some(qdev.as_str()))
                    .and_then(|b| b.inserted?.node_name)
                    .unwrap_or_default();
                let add: qapi::qmp::block_export_add = typed(serde_json::json!({
                    "type": "nbd", "id": id, "node-name": node, "name": target, "writable": false
                }))?;
                q.execute(&add).map_err(|e| Error::io(e.to_string()))?;
                let src = format!("nbd+unix:///{target}?socket={}", sock.display());
                let r = qemu_img::run(&[
                    "convert",
                    "-f",
                    "raw",
                    "-O",
                    "raw",
                    &src,
                    &out.to_string_lossy(),
                ]);
                let _ = q.execute(&del);
                r?;
                None
            }
            Err(_) => Some(disk.image.to_string_lossy().into_owned()),
        };
        if let Some(image) = src {
            return read_image_as(Path::new(&image), &disk.format);
        }
        let data = fs::read(&out)?;
        let _ = fs::remove_file(&out);
        Ok(data)
    }

    /// Fills `mib` MiB of guest RAM, from guest-physical 16 MiB up, with
    /// pseudo-random bytes (so that a RAM save has real work to do),
    /// writing QEMU's memory through `/proc/PID/mem` at the host address
    /// that HMP `gpa2hva` reports.
    pub fn fill_ram(&self, mib: u64) -> Result<()> {
        use std::io::{Seek, SeekFrom, Write};
        let start_gpa: u64 = 16 << 20;
        let pid = self
            .current_pid()
            .ok_or_else(|| Error::io("QEMU is not running"))?;
        let out = self
            .control()?
            .hmp(&format!("gpa2hva 0x{start_gpa:x}"))
            .map_err(|e| Error::io(e.to_string()))?;
        let hva = out
            .rsplit("0x")
            .next()
            .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
            .ok_or_else(|| Error::io(format!("gpa2hva said {out:?}")))?;
        let mut mem = fs::OpenOptions::new()
            .write(true)
            .open(format!("/proc/{pid}/mem"))?;
        mem.seek(SeekFrom::Start(hva))?;
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..mib {
            for chunk in buf.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
            }
            mem.write_all(&buf)?;
        }
        Ok(())
    }

    /// The domain definition vmsnapfs reads.
    pub fn definition_xml(&self) -> String {
        let mut x = format!(
            "<domain type='kvm'>\n  <name>{}</name>\n  <memory unit='MiB'>{}</memory>\n  \
             <monitor path='{}'/>\n  <devices>\n",
            self.name,
            self.memory_mb,
            self.monitor.display()
        );
        for d in &self.disks {
            x.push_str(&format!(
                "    <disk type='file' device='disk'>\n      <driver name='qemu' type='{}'/>\n      \
                 <source file='{}'/>\n      <target dev='{}' bus='virtio'/>\n    </disk>\n",
                d.format,
                d.image.display(),
                d.target
            ));
        }
        x.push_str("  </devices>\n  <commandline>\n");
        for a in &self.argv {
            x.push_str(&format!("    <arg value='{}'/>\n", xml_escape(a)));
        }
        x.push_str("  </commandline>\n");
        if let Some(p) = &self.policy {
            x.push_str(&format!("  <snapshot policy='{p}'/>\n"));
        }
        x.push_str("</domain>\n");
        x
    }

    /// Writes the definition to `<domains_dir>/<name>.xml`.
    pub fn write_definition(&self, domains_dir: &Path) -> Result<PathBuf> {
        fs::create_dir_all(domains_dir)?;
        let path = domains_dir.join(format!("{}.xml", self.name));
        fs::write(&path, self.definition_xml())?;
        Ok(path)
    }

    /// The pid of whatever QEMU now answers on the control socket.
    pub fn current_pid(&self) -> Option<i32> {
        self.control().ok().and_then(|q| q.peer_pid())
    }

    /// Kills the QEMU that serves this VM now (by pid, never by name).
    pub fn kill(&mut self) {
        let pid = self.current_pid().or(self.pid.take());
        if let Some(pid) = pid {
            // A pid this handle started or found on its socket.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            process::wait_exit(pid, Duration::from_secs(10));
            wait_threads_gone(pid, Duration::from_secs(10));
            // The last thread closes the images: wait for their locks too.
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline
                && self
                    .disks
                    .iter()
                    .any(|d| crate::backend::liveness::write_locked(&d.image).unwrap_or(false))
            {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.pid = None;
    }
}

/// Waits until every thread of process `pid` has ended: its main thread
/// may already be a zombie while other threads still close its images
/// (and release their locks).
fn wait_threads_gone(pid: i32, timeout: Duration) {
    let tasks = PathBuf::from(format!("/proc/{pid}/task"));
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let threads = fs::read_dir(&tasks).map_or(0, |e| e.count());
        if threads <= 1 {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The guest-visible content of a qcow2 image file (with its backing
/// chain), read with `-U`: for a stopped VM, or a frozen image.
pub fn read_image(image: &Path) -> Result<Vec<u8>> {
    read_image_as(image, "qcow2")
}

/// [`read_image`] of an image of format `format`.
pub fn read_image_as(image: &Path, format: &str) -> Result<Vec<u8>> {
    let out = image.with_extension(format!("read-{}.raw", std::process::id()));
    qemu_img::run(&[
        "convert",
        "-U",
        "-f",
        format,
        "-O",
        "raw",
        &image.to_string_lossy(),
        &out.to_string_lossy(),
    ])?;
    let data = fs::read(&out);
    let _ = fs::remove_file(&out);
    Ok(data?)
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// QMP arguments of type `T` from their JSON, checked against the schema.
fn typed<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T> {
    serde_json::from_value(v).map_err(|e| Error::io(format!("QMP arguments: {e}")))
}
