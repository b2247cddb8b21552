//! The real [`Backend`]: one `grove-vmm` process per environment, driven through its control
//! socket, and the disk files beside it.
//!
//! Each environment's directory holds `disk.qcow2` (its overlay), `control.sock`,
//! `console.log` (the guest console), `vmm.log` (the VMM's own log), `vsock.sock` (the
//! guest's vsock, where its agent is reached) and `vm.json`. VMMs run
//! in their own process group, so they outlive a restart of the daemon; the daemon reaps
//! the ones it started and watches the others (after a restart) through a pidfd.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::process::{Child, Command};
use vmm::config::NetConfig;
use vmm::control::client::ControlClient;
use vmm::control::protocol::{Request, Response, SnapshotRequest};
use vmm::disk::{DiskFormat, LayerRecord};
use vmm::{DiskConfig, VmConfig};

use crate::backend::{
    AgentError, Backend, Frozen, GuestCommand, GuestOutput, Prepare, Prepared, RestoreSpec,
    Running, VmSpec, MAX_EXEC_OUTPUT,
};
use crate::guest_agent::{
    agent_error, connect as connect_agent, AGENT_CONNECT_TIMEOUT, AGENT_IO_TIMEOUT,
};
use crate::jail::{JailSettings, VmFiles};
use crate::model::SnapshotMode;
use crate::network::{self, EnvNetwork};

pub const DISK: &str = "disk.qcow2";
pub const CONTROL: &str = "control.sock";
pub const CONSOLE: &str = "console.log";
pub const VMM_LOG: &str = "vmm.log";
/// A FIFO the VMM reads as its standard input (the guest console's input).
pub const CONSOLE_IN: &str = "console.in";
/// The VM's vsock Unix socket (`docs/vsock.md`), through which the daemon reaches the agent.
pub const VSOCK: &str = "vsock.sock";
/// The guest's vsock CID: the same in every VM, each VM having its own socket.
pub const GUEST_CID: u32 = 3;
/// Where a jailed VMM writes a snapshot before the daemon moves it out of the jail's
/// reach, to the directory the orchestrator chose.
pub const SNAPSHOT_STAGING: &str = "snapshot.new";
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `grove-vmm` processes.
pub struct Supervisor {
    vmm_bin: PathBuf,
    /// Processes this daemon started, to reap.
    children: Mutex<HashMap<u32, Arc<tokio::sync::Mutex<Child>>>>,
    /// Jail every VMM (docs/jail.md); `None`: VMMs run as the daemon's user.
    jail: Option<JailSettings>,
}

impl Supervisor {
    pub fn new(vmm_bin: PathBuf) -> Self {
        Self {
            vmm_bin,
            children: Mutex::new(HashMap::new()),
            jail: None,
        }
    }

    /// Runs every VMM jailed with `settings`.
    pub fn with_jail(mut self, settings: JailSettings) -> Self {
        self.jail = Some(settings);
        self
    }

    /// `$GROVE_VMM_BIN`, else `grove-vmm` beside this executable, else from `PATH`.
    pub fn find_vmm_bin() -> PathBuf {
        if let Some(p) = std::env::var_os("GROVE_VMM_BIN") {
            return PathBuf::from(p);
        }
        if let Ok(exe) = std::env::current_exe() {
            for dir in exe.ancestors().skip(1).take(2) {
                let candidate = dir.join("grove-vmm");
                if candidate.is_file() {
                    return candidate;
                }
            }
        }
        PathBuf::from("grove-vmm")
    }

    /// Starts `grove-vmm ARGS` for `dir`, in the network namespace `netns` if given;
    /// jailed with `files` when the daemon jails its VMMs.
    fn spawn(
        &self,
        dir: &Path,
        args: &[String],
        netns: Option<&str>,
        files: VmFiles,
    ) -> Result<(u32, Arc<tokio::sync::Mutex<Child>>), String> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut args = args.to_vec();
        let mut netns = netns;
        if let Some(jail) = &self.jail {
            args.extend(jail.prepare(&VmFiles {
                netns: netns.map(network::netns_path),
                ..files
            })?);
            // The jail joins the namespace itself (--jail-netns).
            netns = None;
        }
        // The directory belongs to the jailed VMM: never follow a link it may have left.
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(dir.join(VMM_LOG))
            .map_err(|e| format!("cannot open {}: {e}", dir.join(VMM_LOG).display()))?;
        let fifo = dir.join(CONSOLE_IN);
        if !fifo.exists() {
            let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes())
                .map_err(|_| format!("bad path {}", fifo.display()))?;
            // SAFETY: mkfifo reads the NUL-terminated path and creates a FIFO; nothing else.
            if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
                return Err(format!(
                    "cannot create {}: {}",
                    fifo.display(),
                    std::io::Error::last_os_error()
                ));
            }
        }
        // Opened for reading and writing, so the VMM never sees end-of-file between writers.
        let input = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&fifo)
            .map_err(|e| format!("cannot open {}: {e}", fifo.display()))?;
        let mut cmd = Command::new(&self.vmm_bin);
        cmd.args(&args)
            .stdin(input)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .process_group(0)
            .kill_on_drop(false);
        // Kept open until the child has started: it joins the namespace through it.
        let ns = netns
            .map(|name| network::open_netns(name).map_err(|e| e.to_string()))
            .transpose()?;
        if let Some(ns) = &ns {
            let fd = ns.as_raw_fd();
            // SAFETY: the closure runs in the child between fork and exec and only calls
            // setns(2), which is async-signal-safe; `fd` stays open in the parent (and so in
            // the child) until spawn returns.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.vmm_bin.display()))?;
        drop(ns);
        let pid = child.id().ok_or("the VMM exited at once")?;
        let child = Arc::new(tokio::sync::Mutex::new(child));
        self.children
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(pid, child.clone());
        Ok((pid, child))
    }

    /// Waits until the VMM in `dir` answers `status`, or fails with its log's last lines.
    async fn wait_ready(
        &self,
        dir: &Path,
        child: &Arc<tokio::sync::Mutex<Child>>,
    ) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        let sock = dir.join(CONTROL);
        loop {
            if let Ok(Some(status)) = child.lock().await.try_wait() {
                return Err(format!(
                    "the VMM exited ({status}) while starting: {}",
                    last_lines(&dir.join(VMM_LOG), 3)
                ));
            }
            let s = sock.clone();
            let ok = tokio::task::spawn_blocking(move || {
                ControlClient::connect(&s)
                    .and_then(|mut c| c.request(Request::Status))
                    .map(|r| matches!(r, Response::Status(_)))
                    .unwrap_or(false)
            })
            .await
            .unwrap_or(false);
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("the VMM did not answer within {START_TIMEOUT:?}"));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn request(dir: &Path, request: Request) -> Result<Response, String> {
        let sock = dir.join(CONTROL);
        let response = tokio::task::spawn_blocking(move || {
            ControlClient::connect(&sock)
                .and_then(|mut c| c.request(request))
                .map_err(|e| format!("control socket {}: {e}", sock.display()))
        })
        .await
        .map_err(|e| e.to_string())??;
        match response {
            Response::Error(e) => Err(e.message),
            other => Ok(other),
        }
    }
}

/// The last `n` lines of a log file (at most its last 4 KiB), joined with " | ".
pub fn last_lines(path: &Path, n: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(4096)));
    let mut text = String::new();
    let _ = f.read_to_string(&mut text);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Why the VMM in `dir` ended, from its log ("VM exited: ...").
pub fn exit_reason_from_log(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(VMM_LOG)).ok()?;
    text.lines()
        .rev()
        .find_map(|l| l.split("VM exited: ").nth(1))
        .map(str::to_string)
}

/// Whether process `pid` is a `grove-vmm` serving `dir` (guards against pid reuse).
fn is_vmm_of(pid: u32, dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let sock = dir.join(CONTROL);
    let sock = sock.to_string_lossy();
    cmdline.split(|b| *b == 0).any(|arg| arg == sock.as_bytes())
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; nothing
    // is borrowed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

impl Backend for Supervisor {
    fn create_overlay(
        &self,
        path: &Path,
        backing: &Path,
        format: DiskFormat,
    ) -> Result<(), String> {
        vmm::disk::create_overlay(
            path,
            Some(&LayerRecord {
                path: backing.to_path_buf(),
                format,
            }),
            vmm::disk::chain::virtual_size(backing, format).map_err(|e| e.to_string())?,
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    }

    async fn boot(&self, spec: &VmSpec) -> Result<Running, String> {
        let mut config = VmConfig::new(&spec.kernel);
        config.initrd = spec.initrd.clone();
        config.vcpus = spec.vcpus;
        config.memory_mib = spec.memory_mib;
        // Live snapshots (the default for branches) need the dirty log; clones inherit it.
        config.track_dirty_pages = true;
        config.cmdline = spec.cmdline.clone();
        config.serial = Some(spec.dir.join(CONSOLE));
        config.rootfs = Some(DiskConfig {
            format: DiskFormat::Qcow2,
            allow_backing: true,
            ..DiskConfig::raw(spec.dir.join(DISK), false)
        });
        config.vsock = Some(vmm::VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: spec.dir.join(VSOCK),
        });
        if spec.netns.is_some() {
            config.net = vec![NetConfig {
                tap: network::TAP_NAME.into(),
                mac: Some(network::GUEST_MAC.into()),
                id: None,
            }];
        }
        let json = serde_json::to_vec_pretty(&config).map_err(|e| e.to_string())?;
        let config_path = spec.dir.join("vm.json");
        std::fs::write(&config_path, json)
            .map_err(|e| format!("cannot write {}: {e}", config_path.display()))?;
        let started = Instant::now();
        let files = if self.jail.is_some() {
            // The overlay is the daemon's own, just made: its chain is trustworthy.
            let overlay = vmm::disk::OpenOptions {
                allow_backing: true,
                ..vmm::disk::OpenOptions::new(spec.dir.join(DISK), DiskFormat::Qcow2, false)
            };
            let chain = vmm::disk::chain::walk_chain(&overlay).map_err(|e| e.to_string())?;
            let mut read_only = vec![spec.kernel.clone()];
            read_only.extend(spec.initrd.clone());
            read_only.extend(chain.into_iter().map(|l| l.path));
            VmFiles {
                env_dir: spec.dir.clone(),
                read_only,
                netns: None,
                vcpus: spec.vcpus,
                memory_mib: spec.memory_mib,
                disk_bytes: vmm::disk::chain::virtual_size(&spec.dir.join(DISK), DiskFormat::Qcow2)
                    .map_err(|e| e.to_string())?,
            }
        } else {
            VmFiles::default()
        };
        let (pid, child) = self.spawn(
            &spec.dir,
            &[
                "run".into(),
                "--config".into(),
                config_path.to_string_lossy().into_owned(),
                "--control".into(),
                spec.dir.join(CONTROL).to_string_lossy().into_owned(),
            ],
            spec.netns.as_deref(),
            files,
        )?;
        self.wait_ready(&spec.dir, &child).await?;
        Ok(Running {
            pid,
            start_ms: started.elapsed().as_secs_f64() * 1000.0,
        })
    }

    async fn restore(&self, spec: &RestoreSpec) -> Result<Running, String> {
        let (dir, snapshot, overlay) = (&spec.dir, &spec.snapshot, &spec.overlay);
        let started = Instant::now();
        let files = if self.jail.is_some() {
            let frozen = spec
                .layers
                .first()
                .ok_or("the snapshot has no disk layer")?;
            VmFiles {
                env_dir: dir.clone(),
                read_only: [snapshot.clone()]
                    .into_iter()
                    .chain(spec.layers.iter().cloned())
                    .collect(),
                netns: None,
                vcpus: spec.vcpus,
                memory_mib: spec.memory_mib,
                disk_bytes: vmm::disk::chain::virtual_size(frozen, DiskFormat::Qcow2)
                    .map_err(|e| e.to_string())?,
            }
        } else {
            VmFiles::default()
        };
        let (pid, child) = self.spawn(
            dir,
            &[
                "restore".into(),
                "--snapshot".into(),
                snapshot.to_string_lossy().into_owned(),
                "--control".into(),
                dir.join(CONTROL).to_string_lossy().into_owned(),
                "--serial".into(),
                dir.join(CONSOLE).to_string_lossy().into_owned(),
                "--disk-override".into(),
                format!("disk0={}", overlay.display()),
                "--vsock-override".into(),
                dir.join(VSOCK).to_string_lossy().into_owned(),
            ],
            spec.netns.as_deref(),
            files,
        )?;
        self.wait_ready(dir, &child).await?;
        Ok(Running {
            pid,
            start_ms: started.elapsed().as_secs_f64() * 1000.0,
        })
    }

    async fn snapshot(
        &self,
        dir: &Path,
        into: &Path,
        mode: SnapshotMode,
    ) -> Result<Frozen, String> {
        // A jailed VMM can write only in its own directory; the finished snapshot is then
        // moved out of its reach (a snapshot's files name no directory of their own).
        let target = match &self.jail {
            Some(_) => {
                let staging = dir.join(SNAPSHOT_STAGING);
                for leftover in [staging.clone(), vmm::snapshot::tmp_dir(&staging)] {
                    if leftover.symlink_metadata().is_ok() {
                        self.remove(&leftover);
                    }
                }
                staging
            }
            None => into.to_path_buf(),
        };
        let response = Self::request(
            dir,
            Request::Snapshot(SnapshotRequest {
                dir: target.clone(),
                kind: Default::default(),
                parent: None,
                resume: true,
                mode,
            }),
        )
        .await;
        // A VMM killed mid-snapshot leaves its unfinished directory: remove it, so that a
        // failed snapshot leaves nothing behind.
        let partial = vmm::snapshot::tmp_dir(&target);
        if response.is_err() && partial.exists() {
            let _ = std::fs::remove_dir_all(&partial);
        }
        let response = response?;
        if target != into {
            if let Response::Snapshot(_) = response {
                if !std::fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
                    return Err(format!("the VMM left no snapshot at {}", target.display()));
                }
                std::fs::rename(&target, into).map_err(|e| {
                    format!(
                        "cannot move {} to {}: {e}",
                        target.display(),
                        into.display()
                    )
                })?;
            }
        }
        match response {
            Response::Snapshot(info) => Ok(Frozen {
                pause_ms: info.pause_ms,
                mode: info.mode,
                frozen_layer: info.frozen_layers.into_iter().next(),
            }),
            other => Err(format!("unexpected answer {other:?}")),
        }
    }

    async fn pause(&self, dir: &Path) -> Result<(), String> {
        Self::request(dir, Request::Pause).await.map(|_| ())
    }

    async fn resume(&self, dir: &Path) -> Result<(), String> {
        Self::request(dir, Request::Resume).await.map(|_| ())
    }

    async fn stop(&self, dir: &Path, pid: u32) -> Result<(), String> {
        if !is_vmm_of(pid, dir) {
            return Ok(());
        }
        let _ = Self::request(dir, Request::Shutdown).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while is_vmm_of(pid, dir) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if is_vmm_of(pid, dir) {
            // SAFETY: kill takes a pid and a signal number; nothing is borrowed.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        Ok(())
    }

    async fn wait_exit(&self, dir: &Path, pid: u32) -> String {
        let child = self
            .children
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&pid)
            .cloned();
        if let Some(child) = child {
            let status = child.lock().await.wait().await;
            self.children
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&pid);
            if let Some(jail) = &self.jail {
                jail.cleanup(dir);
            }
            return exit_reason_from_log(dir).unwrap_or_else(|| match status {
                Ok(s) => format!("the VMM exited ({s})"),
                Err(e) => format!("the VMM could not be waited for: {e}"),
            });
        }
        // Not our child (the daemon restarted): a pidfd becomes readable when it exits.
        if is_vmm_of(pid, dir) {
            if let Ok(fd) = pidfd_open(pid) {
                // SAFETY: `fd` is an OwnedFd moved into the AsyncFd, so its descriptor stays
                // open and the same for the AsyncFd's whole life.
                if let Ok(afd) = unsafe { AsyncFd::register(fd) } {
                    let _ = afd.readable().await;
                }
            }
        }
        if let Some(jail) = &self.jail {
            jail.cleanup(dir);
        }
        exit_reason_from_log(dir).unwrap_or_else(|| "the VMM ended".to_string())
    }

    fn is_running(&self, dir: &Path, pid: u32) -> bool {
        is_vmm_of(pid, dir)
    }

    fn console_input(&self, dir: &Path, input: &[u8]) -> Result<(), String> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let fifo = dir.join(CONSOLE_IN);
        let mut f = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .map_err(|e| format!("cannot open {}: {e}", fifo.display()))?;
        f.write_all(input)
            .map_err(|e| format!("cannot write to the console: {e}"))
    }

    fn remove(&self, path: &Path) {
        let r = if path.is_dir() {
            std::fs::remove_dir_all(path)
        } else {
            std::fs::remove_file(path)
        };
        if let Err(e) = r {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::warn!("cannot remove {}: {e}", path.display());
            }
        }
    }

    async fn agent_prepare(&self, dir: &Path, prep: &Prepare) -> Result<Prepared, AgentError> {
        let socket = dir.join(VSOCK);
        let control = dir.join(CONTROL);
        let prep = prep.clone();
        blocking(move || crate::guest_agent::prepare(&socket, Some(&control), &prep)).await
    }

    async fn agent_exec(&self, dir: &Path, cmd: GuestCommand) -> Result<GuestOutput, AgentError> {
        let socket = dir.join(VSOCK);
        blocking(move || {
            let mut agent = connect_agent(&socket, AGENT_CONNECT_TIMEOUT)?;
            // The agent kills the command at its timeout; allow it that long to stay silent.
            agent
                .set_timeout(Some(cmd.timeout + AGENT_IO_TIMEOUT))
                .map_err(agent_error)?;
            let request = agent::protocol::ExecRequest {
                argv: cmd.argv,
                env: cmd.env.into_iter().collect(),
                cwd: cmd.cwd,
                stdin: cmd.stdin,
                timeout_ms: Some(u64::try_from(cmd.timeout.as_millis()).unwrap_or(u64::MAX)),
            };
            let mut out = GuestOutput::default();
            let status = agent
                .exec(&request, |stream, data| {
                    let buf = match stream {
                        agent::protocol::Stream::Stdout => &mut out.stdout,
                        agent::protocol::Stream::Stderr => &mut out.stderr,
                    };
                    let room = MAX_EXEC_OUTPUT.saturating_sub(buf.len());
                    if data.len() > room {
                        out.truncated = true;
                    }
                    buf.extend_from_slice(&data[..data.len().min(room)]);
                })
                .map_err(agent_error)?;
            out.exit_code = status.code;
            out.signal = status.signal;
            out.timed_out = status.timed_out;
            Ok(out)
        })
        .await
    }

    async fn agent_read_file(&self, dir: &Path, path: &str) -> Result<Vec<u8>, AgentError> {
        let socket = dir.join(VSOCK);
        let path = path.to_string();
        blocking(move || {
            connect_agent(&socket, AGENT_CONNECT_TIMEOUT)?
                .read_file(&path)
                .map_err(agent_error)
        })
        .await
    }

    async fn agent_write_file(
        &self,
        dir: &Path,
        path: &str,
        data: Vec<u8>,
        mode: Option<u32>,
    ) -> Result<(), AgentError> {
        let socket = dir.join(VSOCK);
        let path = path.to_string();
        blocking(move || {
            connect_agent(&socket, AGENT_CONNECT_TIMEOUT)?
                .write_file(&path, &data, mode)
                .map_err(agent_error)
        })
        .await
    }

    fn setup_network(&self, net: &EnvNetwork) -> Result<(), String> {
        network::setup(net).map_err(|e| error_chain(&e))
    }

    fn teardown_network(&self, net: &EnvNetwork) -> Result<(), String> {
        network::teardown(net).map_err(|e| error_chain(&e))
    }

    fn network_namespaces(&self, prefix: &str) -> Vec<String> {
        network::namespaces(prefix)
    }
}

/// Runs blocking agent I/O off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AgentError> + Send + 'static,
) -> Result<T, AgentError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(AgentError::Unavailable(format!("agent task failed: {e}"))))
}

/// An error and its causes, `: `-separated.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
