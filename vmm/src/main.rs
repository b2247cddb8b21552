//! `grove-vmm` command line: `run` a VM from flags or a JSON config until the guest resets.
//!
//! Exit codes: 0 the guest reset or powered off; 1 the VM failed while running; 2 the VM
//! could not be started (bad input, missing kernel, no KVM, ...), with a one-line error;
//! 148 a thread made a system call its seccomp filter forbids (docs/seccomp.md).

use std::fs::OpenOptions;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use vmm::builder::{RestoreOptions, StartOptions};
use vmm::disk::DiskFormat;
use vmm::vstate::cpuid::CpuTemplate;
use vmm::{ConsoleIo, DiskConfig, VmConfig, VsockConfig};
use vmm_sys_util::terminal::Terminal;

mod auth_cmd;
mod disk_cmd;
mod jail_args;

/// The exit codes of `run` and `restore`, for `--help`.
const EXIT_CODES: &str = "Exit codes of run and restore: 0 the guest reset or powered off (or \
                          the VM was stopped); 1 the VM failed while running; 2 the VM could \
                          not be started; 148 a thread made a system call its seccomp filter \
                          forbids (one line on standard error names it; see docs/seccomp.md).";

#[derive(Parser)]
#[command(
    name = "grove-vmm",
    version,
    about = "Grove's KVM micro-VM monitor",
    after_help = EXIT_CODES
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM and run it until the guest resets or powers off.
    #[command(after_help = EXIT_CODES)]
    Run(RunArgs),
    /// Start a VM from a snapshot directory and run it until the guest resets.
    #[command(after_help = EXIT_CODES)]
    Restore(RestoreArgs),
    /// Write a snapshot (a diff with its chain of parents, or a full one) as a full snapshot.
    SnapshotMerge(MergeArgs),
    /// Create, inspect and compact disk images and their chains of layers.
    #[command(subcommand)]
    Disk(disk_cmd::DiskCommand),
    /// Sign a snapshot with a key: writes DIR/manifest.json and DIR/manifest.hmac.
    SnapshotSign(auth_cmd::AuthArgs),
    /// Check that a snapshot (and its parents) is signed with a key and unchanged since.
    SnapshotVerify(auth_cmd::AuthArgs),
}

#[derive(Args)]
struct MergeArgs {
    /// Snapshot directory to merge (a diff snapshot's parents are found through it).
    #[arg(long, value_name = "DIR")]
    snapshot: PathBuf,
    /// Directory of the full snapshot to write; must not exist.
    #[arg(long, value_name = "OUT")]
    output: PathBuf,
}

fn snapshot_merge(args: MergeArgs) -> ExitCode {
    match vmm::snapshot::merge(&args.snapshot, &args.output) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                message.push_str(": ");
                message.push_str(&s.to_string());
                source = s.source();
            }
            eprintln!("grove-vmm: error: {message}");
            ExitCode::from(2)
        }
    }
}

/// Options of every subcommand that runs a VM.
#[derive(Args)]
struct SecurityArgs {
    /// UNSAFE, for debugging only: run without the seccomp filters that limit each VMM
    /// thread to the system calls it needs (docs/seccomp.md).
    #[arg(long)]
    no_seccomp: bool,
}

#[derive(Args)]
struct RestoreArgs {
    /// Snapshot directory (written by the control socket's `snapshot` request).
    #[arg(long, value_name = "DIR")]
    snapshot: PathBuf,
    /// Serve the control socket at this path.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Run a disk on another image (repeatable): ID=PATH, where ID is the disk's id
    /// (disk0 is the root filesystem, then disk1, ... unless the config named them). For a
    /// disk the snapshot branched (a writable qcow2 disk), PATH is where the clone's new
    /// overlay on the frozen layer is created (or an existing overlay on it); by default it
    /// goes next to the frozen layer.
    #[arg(long, value_name = "ID=PATH")]
    disk_override: Vec<String>,
    /// Attach a network device to another TAP (repeatable): ID=TAP, where ID is the device's
    /// id (net0, net1, ... unless the config named them). By default each reopens the TAP of
    /// the saved name in this process's network namespace.
    #[arg(long, value_name = "ID=TAP")]
    net_override: Vec<String>,
    /// Write the guest console to this file instead of standard output.
    #[arg(long, value_name = "FILE")]
    serial: Option<PathBuf>,
    /// Stay paused after restoring (resume through the control socket).
    #[arg(long)]
    paused: bool,
    /// Refuse the snapshot unless it was taken with this CPU template.
    #[arg(long, value_name = "NAME")]
    cpu_template: Option<CpuTemplate>,
    /// Listen for vsock connections at this socket instead of the saved path (a clone
    /// running beside its source needs its own; see docs/vsock.md).
    #[arg(long, value_name = "PATH")]
    vsock_override: Option<PathBuf>,
    /// Refuse the snapshot unless it (and every parent) is signed with this key and
    /// unchanged since (grove-vmm snapshot-sign; docs/snapshot-format.md).
    #[arg(long, value_name = "FILE")]
    verify_key: Option<PathBuf>,
    #[command(flatten)]
    security: SecurityArgs,
    #[command(flatten)]
    jail: jail_args::JailArgs,
}

#[derive(Args)]
struct RunArgs {
    /// JSON VM configuration (see docs/vm-config.md); excludes the VM flags below.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["kernel", "rootfs", "initrd", "vcpus", "memory", "cmdline", "disk", "cpu_template", "no_rng", "net"])]
    config: Option<PathBuf>,
    /// Guest kernel: ELF vmlinux (PVH or 64-bit entry) or bzImage.
    #[arg(long, value_name = "FILE", required_unless_present = "config")]
    kernel: Option<PathBuf>,
    /// Root filesystem image, attached as /dev/vda: PATH[,ro][,raw|qcow2][,backing]
    /// (backing: follow the backing files a qcow2 image names).
    #[arg(long, value_name = "PATH[,OPT]...")]
    rootfs: Option<String>,
    /// Initial ramdisk.
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// Number of vCPUs (1-32) [default: 1].
    #[arg(long, value_name = "N")]
    vcpus: Option<u8>,
    /// Guest memory in MiB [default: 128].
    #[arg(long, value_name = "MiB")]
    memory: Option<u64>,
    /// Kernel command line replacing the default base ("console=ttyS0 reboot=k panic=1 quiet");
    /// root and device arguments are still appended.
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    cmdline: Option<String>,
    /// Extra disk (repeatable), /dev/vdb onwards: PATH[,ro][,raw|qcow2][,backing].
    #[arg(long, value_name = "PATH[,OPT]...")]
    disk: Vec<String>,
    /// Write the guest console to this file instead of standard output.
    #[arg(long, value_name = "FILE")]
    serial: Option<PathBuf>,
    /// CPU template: host or x86-64-v2 [default: host].
    #[arg(long, value_name = "NAME")]
    cpu_template: Option<CpuTemplate>,
    /// Do not attach a virtio-rng device.
    #[arg(long)]
    no_rng: bool,
    /// Serve the control socket (status, pause, resume, snapshot, ...) at this path.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Track dirty pages (KVM dirty log and device writes), enabling diff snapshots.
    #[arg(long)]
    track_dirty_pages: bool,
    /// Attach a virtio-vsock device: the guest's CID (3 or more) and the Unix socket host
    /// clients connect to (see docs/vsock.md); replaces the config file's `vsock`.
    #[arg(long, value_name = "CID,PATH")]
    vsock: Option<String>,
    /// Network device on a TAP (repeatable): TAP[,MAC], e.g. tap0,06:00:ac:10:00:02 (a
    /// random MAC when absent). The TAP is found, or created, in this process's network
    /// namespace.
    #[arg(long, value_name = "TAP[,MAC]")]
    net: Vec<String>,
    #[command(flatten)]
    security: SecurityArgs,
    #[command(flatten)]
    jail: jail_args::JailArgs,
}

/// `CID,PATH`: the guest's context id and the host-side Unix socket.
fn parse_vsock(spec: &str) -> anyhow::Result<VsockConfig> {
    let Some((cid, path)) = spec.split_once(',') else {
        bail!("--vsock {spec:?}: expected CID,PATH");
    };
    let guest_cid = cid
        .parse()
        .with_context(|| format!("--vsock {spec:?}: the CID is not a number"))?;
    if path.is_empty() {
        bail!("--vsock {spec:?}: the socket path is empty");
    }
    Ok(VsockConfig {
        guest_cid,
        uds_path: PathBuf::from(path),
    })
}

/// `TAP[,MAC]`; the MAC is checked with the rest of the configuration.
fn parse_net(spec: &str) -> anyhow::Result<vmm::config::NetConfig> {
    let (tap, mac) = match spec.split_once(',') {
        Some((tap, mac)) => (tap, Some(mac.to_string())),
        None => (spec, None),
    };
    if tap.is_empty() || mac.as_deref() == Some("") {
        bail!("--net {spec:?}: expected TAP[,MAC]");
    }
    Ok(vmm::config::NetConfig {
        tap: tap.to_string(),
        mac,
        id: None,
    })
}

/// `PATH[,OPTION]...`: `ro` / `rw`, `raw` / `qcow2`, and `backing` (follow the backing
/// files a qcow2 image names).
fn parse_disk(spec: &str) -> anyhow::Result<DiskConfig> {
    let mut parts = spec.split(',');
    let path = parts.next().unwrap_or_default();
    let mut disk = DiskConfig::raw(path, false);
    for opt in parts {
        match opt {
            "ro" => disk.read_only = true,
            "rw" => disk.read_only = false,
            "raw" => disk.format = DiskFormat::Raw,
            "qcow2" => disk.format = DiskFormat::Qcow2,
            "backing" => disk.allow_backing = true,
            _ => bail!(
                "unknown disk option {opt:?} in {spec:?} (expected ro, rw, raw, qcow2 or backing)"
            ),
        }
    }
    Ok(disk)
}

impl RunArgs {
    fn into_config(self) -> anyhow::Result<VmConfig> {
        let mut config = match (&self.config, &self.kernel) {
            (Some(path), _) => VmConfig::from_file(path)?,
            (None, Some(kernel)) => {
                let mut c = VmConfig::new(kernel.clone());
                c.rootfs = self.rootfs.as_deref().map(parse_disk).transpose()?;
                c.initrd = self.initrd.clone();
                c.vcpus = self.vcpus.unwrap_or(c.vcpus);
                c.memory_mib = self.memory.unwrap_or(c.memory_mib);
                c.cmdline = self.cmdline.clone();
                c.disks = self
                    .disk
                    .iter()
                    .map(|d| parse_disk(d))
                    .collect::<Result<_, _>>()?;
                c.cpu_template = self.cpu_template.unwrap_or_default();
                c.rng = !self.no_rng;
                c.net = self
                    .net
                    .iter()
                    .map(|n| parse_net(n))
                    .collect::<Result<_, _>>()?;
                c
            }
            (None, None) => bail!("either --kernel or --config is required"),
        };
        if self.serial.is_some() {
            config.serial = self.serial;
        }
        if self.track_dirty_pages {
            config.track_dirty_pages = true;
        }
        if let Some(spec) = &self.vsock {
            config.vsock = Some(parse_vsock(spec)?);
        }
        Ok(config)
    }
}

fn console_io(serial: Option<&PathBuf>) -> anyhow::Result<ConsoleIo> {
    let output: Box<dyn Write + Send> = match serial {
        Some(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open serial output {}", path.display()))?,
        ),
        None => Box::new(std::io::stdout()),
    };
    Ok(ConsoleIo {
        output,
        input: Some(Box::new(std::io::stdin())),
    })
}

/// Puts an interactive terminal in raw mode (keys, Ctrl-C included, go to the guest) and
/// restores it when dropped.
struct RawTerminal(bool);

impl RawTerminal {
    fn enable() -> Self {
        let stdin = std::io::stdin();
        if stdin.is_terminal() && stdin.lock().set_raw_mode().is_ok() {
            return Self(true);
        }
        Self(false)
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if self.0 {
            let _ = std::io::stdin().lock().set_canon_mode();
        }
    }
}

fn init_logging() {
    env_logger::Builder::new()
        .filter_level(log::LevelFilter::Info)
        .parse_env(env_logger::Env::new().filter("GROVE_LOG"))
        .format(|buf, record| {
            writeln!(
                buf,
                "grove-vmm: {}: {}",
                record.level().as_str().to_lowercase(),
                record.args()
            )
        })
        .target(env_logger::Target::Stderr)
        .init();
}

fn run(args: RunArgs, start: Instant) -> ExitCode {
    args.security.apply();
    let options = StartOptions {
        control: args.control.clone(),
    };
    run_vm(move || {
        let config = args.into_config()?;
        let console = console_io(config.serial.as_ref())?;
        Ok(vmm::builder::build_and_start_with(
            &config, console, start, &options,
        )?)
    })
}

fn restore(
    args: RestoreArgs,
    key: Option<vmm::snapshot::auth::SnapshotKey>,
    start: Instant,
) -> ExitCode {
    args.security.apply();
    run_vm(move || {
        // Before anything else reads the snapshot.
        if let Some(key) = &key {
            vmm::snapshot::auth::verify(&args.snapshot, key)
                .map_err(|e| anyhow::anyhow!(auth_cmd::one_line(&e)))?;
        }
        let disk_overrides = args
            .disk_override
            .iter()
            .map(|spec| match spec.split_once('=') {
                Some((id, path)) if !id.is_empty() && !path.is_empty() => {
                    Ok((id.to_string(), PathBuf::from(path)))
                }
                _ => bail!("--disk-override {spec:?}: expected ID=PATH"),
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let net_overrides = args
            .net_override
            .iter()
            .map(|spec| match spec.split_once('=') {
                Some((id, tap)) if !id.is_empty() && !tap.is_empty() => {
                    Ok((id.to_string(), tap.to_string()))
                }
                _ => bail!("--net-override {spec:?}: expected ID=TAP"),
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let options = RestoreOptions {
            snapshot: args.snapshot,
            control: args.control,
            disk_overrides,
            paused: args.paused,
            cpu_template: args.cpu_template,
            vsock_override: args.vsock_override,
            net_overrides,
        };
        let console = console_io(args.serial.as_ref())?;
        Ok(vmm::builder::restore(&options, console, start)?)
    })
}

impl SecurityArgs {
    fn apply(&self) {
        if self.no_seccomp {
            log::warn!("--no-seccomp: running without seccomp filters (unsafe; debugging only)");
            vmm::seccomp::disable();
        }
    }
}

/// Builds a VM with `build`, runs it to its end, and turns the outcome into the exit code:
/// 2 for anything that failed before the VM ran, otherwise the VM's own exit code.
fn run_vm(build: impl FnOnce() -> anyhow::Result<vmm::Vmm>) -> ExitCode {
    let raw = RawTerminal::enable();
    // The other threads filtered themselves while the VM was built; this one is done
    // setting up once it only has to wait and tear down.
    let vmm = match build().and_then(|vmm| {
        vmm::seccomp::apply(vmm::seccomp::ThreadKind::Main)?;
        Ok(vmm)
    }) {
        Ok(v) => v,
        Err(e) => {
            drop(raw);
            eprintln!("grove-vmm: error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let reason = vmm.wait();
    drop(raw);
    let code = reason.exit_code();
    if code == 0 {
        log::info!("VM exited: {reason}");
    } else {
        log::error!("VM exited: {reason}");
    }
    ExitCode::from(code as u8)
}

fn main() -> ExitCode {
    let start = Instant::now();
    init_logging();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line naming the problem: clap's message up to its usage block, folded.
            let text = e.render().to_string();
            let message: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(|l| l.trim().trim_start_matches("error: "))
                .collect();
            eprintln!("grove-vmm: error: {}", message.join(" "));
            return ExitCode::from(2);
        }
    };
    // The key is read before the jail hides it; the snapshot is verified inside.
    let key = match &cli.command {
        Command::Restore(args) => auth_cmd::read_key(args.verify_key.as_deref()),
        _ => Ok(None),
    };
    let key = match key {
        Ok(key) => key,
        Err(code) => return code,
    };
    // The jail goes up before anything reads a config, a snapshot or a guest.
    let jail = match &cli.command {
        Command::Run(args) => jail_args::enter(&args.jail),
        Command::Restore(args) => jail_args::enter(&args.jail),
        _ => Ok(()),
    };
    if let Err(code) = jail {
        return code;
    }
    match cli.command {
        Command::Run(args) => run(args, start),
        Command::Restore(args) => restore(args, key, start),
        Command::SnapshotMerge(args) => snapshot_merge(args),
        Command::Disk(cmd) => disk_cmd::run(cmd),
        Command::SnapshotSign(args) => auth_cmd::sign(args),
        Command::SnapshotVerify(args) => auth_cmd::verify(args),
    }
}
