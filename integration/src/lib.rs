//! The harness shared by Grove's end-to-end tests, benchmarks and `cargo boot-default`:
//! find the image set and the `grove-vmm` binary, run a VM as a child process, and talk to
//! its serial console.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use grove_images::ImageSet;

/// How long a boot of the real image may take here. Under the PVM host's emulation a boot
/// takes 15-20 s alone and longer with tests running side by side on two cores.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

/// Panics with a clear message when this host has no KVM.
pub fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "this test needs KVM: /dev/kvm is missing on this host"
    );
}

/// The default image set, built first if it is not in the cache yet (minutes: kernel build).
pub fn images() -> ImageSet {
    let cache = grove_images::default_cache_dir().expect("cache directory");
    match grove_images::locate_default(&cache) {
        Ok(set) => set,
        Err(_) => {
            eprintln!("default images not built yet: building them (several minutes)");
            grove_images::build_default(&cache)
                .unwrap_or_else(|e| panic!("cannot build the default images: {e}"))
        }
    }
}

/// The `grove-vmm` binary: `$GROVE_VMM_BIN`, else the one cargo built beside the running
/// test or benchmark (target/<profile>/grove-vmm).
pub fn grove_vmm_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("GROVE_VMM_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("grove-vmm");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p vmm` (cargo test --workspace does)",
        bin.display()
    );
    bin
}

/// Builds `grove-vmm` in release mode through the cargo running us, and returns its path.
pub fn build_release_vmm() -> anyhow::Result<PathBuf> {
    Ok(build_release_bins(&[("vmm", "grove-vmm")])?.join("grove-vmm"))
}

/// Builds binaries (`(package, binary)`) in release mode through the cargo running us, and
/// returns the directory they are in (the one this executable is in).
pub fn build_release_bins(bins: &[(&str, &str)]) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "--release"]);
    for (package, bin) in bins {
        cmd.args(["-p", package, "--bin", bin]);
    }
    let status = cmd.status()?;
    anyhow::ensure!(status.success(), "cargo build of {bins:?} failed");
    let exe = std::env::current_exe()?;
    let dir = exe.parent().ok_or_else(|| anyhow::anyhow!("no exe dir"))?;
    Ok(dir.to_path_buf())
}

const HOST_PACKAGES: &str = include_str!("../../images/host-packages.txt");

fn missing_host_packages() -> Vec<&'static str> {
    HOST_PACKAGES
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter(|pkg| {
            let out = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", pkg])
                .output();
            !matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect()
}

/// Installs the Debian packages of `images/host-packages.txt` that are missing, when run as
/// root; otherwise fails saying which to install. `tool` prefixes the progress line.
pub fn ensure_host_packages(tool: &str) -> anyhow::Result<()> {
    let missing = missing_host_packages();
    if missing.is_empty() {
        return Ok(());
    }
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    if !is_root {
        anyhow::bail!(
            "missing host packages: {}; install them with: sudo apt-get install -y {}",
            missing.join(" "),
            missing.join(" ")
        );
    }
    eprintln!("{tool}: installing host packages: {}", missing.join(" "));
    let ok = Command::new("apt-get").arg("update").status()?.success()
        && Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .status()?
            .success();
    anyhow::ensure!(ok, "apt-get could not install: {}", missing.join(" "));
    Ok(())
}

/// A directory removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("grove-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies a disk image keeping holes (root filesystems are mostly empty).
pub fn sparse_copy(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp runs");
    assert!(status.success(), "cp {} {}", from.display(), to.display());
}

/// Creates an empty ext4 image of `mib` MiB (no root needed).
pub fn make_ext4(path: &Path, mib: u64) {
    let f = std::fs::File::create(path).expect("create disk image");
    f.set_len(mib << 20).expect("size disk image");
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
        .arg(path)
        .status()
        .expect("mkfs.ext4 runs");
    assert!(status.success(), "mkfs.ext4 {}", path.display());
}

/// A `grove-vmm` child process with its console captured and its stdin open for input.
pub struct VmProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    console: Arc<Mutex<Vec<u8>>>,
    log: Arc<Mutex<Vec<u8>>>,
    started: Instant,
}

fn pump(mut from: impl Read + Send + 'static, into: Arc<Mutex<Vec<u8>>>) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            into.lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(&buf[..n]);
        }
    });
}

impl VmProcess {
    /// Starts `grove-vmm` with `args`.
    pub fn spawn<I, S>(bin: &Path, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let started = Instant::now();
        let mut child = Command::new(bin)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let console = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::new(Mutex::new(Vec::new()));
        pump(child.stdout.take().expect("piped stdout"), console.clone());
        pump(child.stderr.take().expect("piped stderr"), log.clone());
        let stdin = child.stdin.take();
        Self {
            child,
            stdin,
            console,
            log,
            started,
        }
    }

    /// Everything the guest printed so far.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&self.console.lock().unwrap_or_else(|e| e.into_inner()))
            .into_owned()
    }

    /// Everything the VMM logged so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&self.log.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// Time since the process was started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits until the console shows `needle`; Err with the console and log on timeout or
    /// when the VMM exits first.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.console().contains(needle) {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the pumps drain what is left before deciding.
                std::thread::sleep(Duration::from_millis(100));
                if self.console().contains(needle) {
                    return Ok(());
                }
                return Err(self.report(&format!("VMM exited ({status}) before {needle:?}")));
            }
            if Instant::now() > deadline {
                return Err(self.report(&format!("no {needle:?} within {timeout:?}")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Types `line` and a newline on the guest console.
    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin
            .write_all(line.as_bytes())
            .expect("write console input");
        stdin.write_all(b"\n").expect("write console input");
        stdin.flush().expect("flush console input");
    }

    /// Waits for the VMM to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(50));
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err(self.report(&format!("VMM still running after {timeout:?}")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Process id, for /proc inspection.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the VMM with SIGKILL (no chance to flush or clean up) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Let the pumps drain what the VMM wrote before it died.
        std::thread::sleep(Duration::from_millis(50));
    }

    fn report(&self, what: &str) -> String {
        format!(
            "{what}\n--- console ---\n{}\n--- vmm log ---\n{}",
            self.console(),
            self.log()
        )
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Connects to a VMM's control socket, waiting up to 30 s for the VMM to create it.
/// Bytes of one `grove-disktool fsync-loop` record.
pub const DISKTOOL_RECORD: usize = 4096;

/// What `grove-disktool fsync-loop` writes as record `i` (images/rootfs/grove-disktool.c).
pub fn disktool_record(i: u64) -> Vec<u8> {
    let mut r = format!("GROVE-REC{i:016x}").into_bytes();
    r.resize(32, b'\n');
    r.resize(DISKTOOL_RECORD, ((i * 31 + 0xa5) & 0xff) as u8);
    r
}

/// Every `n` of a complete `ACK n` line (what `grove-disktool fsync-loop` prints once record
/// `n` is durable), in order.
pub fn disktool_acks(console: &str) -> Vec<u64> {
    let complete = &console[..console.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .filter_map(|l| l.trim().strip_prefix("ACK ")?.parse().ok())
        .collect()
}

/// A data disk for a test: a sparse raw base of `size` bytes in `dir` and a qcow2 overlay on
/// it, whose path is returned (attach it as `PATH,qcow2,backing`).
pub fn data_disk(dir: &Path, size: u64) -> PathBuf {
    let base = dir.join("data-base.raw");
    std::fs::File::create(&base)
        .and_then(|f| f.set_len(size))
        .expect("create the data disk's base");
    let data = dir.join("data.qcow2");
    vmm::disk::create_overlay(
        &data,
        Some(&vmm::disk::LayerRecord {
            path: base,
            format: vmm::disk::DiskFormat::Raw,
        }),
        size,
    )
    .expect("create the data disk's overlay");
    data
}

pub fn control_client(sock: &Path) -> vmm::control::client::ControlClient {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match vmm::control::client::ControlClient::connect(sock) {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => {
                panic!("no control socket {}: {e}", sock.display())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Runs `qemu-img` (Debian package qemu-utils) and returns its output; panics with the
/// command and its output if it fails.
pub fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img").args(args).output().expect(
        "this test needs qemu-img (Debian package qemu-utils, in images/host-packages.txt)",
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "qemu-img {args:?} failed: {text}");
    text
}

/// `qemu-img check` must find nothing wrong with the qcow2 image, leaks included.
pub fn qemu_img_check(path: &Path) {
    let text = qemu_img(&["check", "-f", "qcow2", &path.to_string_lossy()]);
    assert!(
        text.contains("No errors were found"),
        "{}: {text}",
        path.display()
    );
}

/// Parses the VMM's "guest boot complete: X ms after VMM start" log line.
pub fn boot_time_ms(log: &str) -> Option<f64> {
    let line = log.lines().find(|l| l.contains("guest boot complete:"))?;
    let after = line.split("guest boot complete:").nth(1)?;
    after.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_boot_time_line() {
        let log = "grove-vmm: info: x\ngrove-vmm: info: guest boot complete: 1234.567 ms after VMM start\n";
        assert_eq!(boot_time_ms(log), Some(1234.567));
        assert_eq!(boot_time_ms("nothing"), None);
    }
}
