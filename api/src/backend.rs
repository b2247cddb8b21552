//! What the orchestrator needs from the host: VMM processes and disk files. The daemon uses
//! [`crate::supervisor::Supervisor`]; the orchestrator's unit tests a fake.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vmm::disk::DiskFormat;

use crate::model::{HookResult, SnapshotMode};
use crate::network::EnvNetwork;

/// A snapshot to restore into a new environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreSpec {
    /// The new environment's directory.
    pub dir: PathBuf,
    pub snapshot: PathBuf,
    /// Where the clone's disk overlay is created, on the snapshot's frozen layer.
    pub overlay: PathBuf,
    /// The disk layers the overlay sits on, the frozen layer first and the image's
    /// rootfs last, from the daemon's own records (what the jail lets the VM read).
    pub layers: Vec<PathBuf>,
    pub vcpus: u8,
    pub memory_mib: u64,
    /// The network namespace to run in (a saved network device reopens its TAP there).
    pub netns: Option<String>,
}

/// A VM to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    /// The environment's directory (its overlay is `disk.qcow2` in it).
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub vcpus: u8,
    pub memory_mib: u64,
    /// The network namespace to run in, with a virtio-net device on its `tap0` (the guest's
    /// fixed MAC); `None` for a VM without network.
    pub netns: Option<String>,
    /// Kernel command line replacing the VMM's default base; `None` for the default.
    pub cmdline: Option<String>,
}

/// A VMM that answers on its control socket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Running {
    pub pid: u32,
    /// From starting the process to its control socket answering.
    pub start_ms: f64,
}

/// What a snapshot did.
#[derive(Debug, Clone, PartialEq)]
pub struct Frozen {
    pub pause_ms: f64,
    /// How memory was copied (a paused VM is always copied paused).
    pub mode: SnapshotMode,
    /// The layer the disk was frozen into.
    pub frozen_layer: Option<PathBuf>,
}

pub type BResult<T> = Result<T, String>;

/// Who a guest is told it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestIdentity {
    pub hostname: String,
    /// 32 lowercase hex digits, new for every environment.
    pub machine_id: String,
}

/// What the guest agent must acknowledge before an environment is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepare {
    pub identity: GuestIdentity,
    /// A clone: also mix `entropy` into the guest's pool, set its clock from the host's and
    /// run its post-clone hooks.
    pub clone: Option<CloneSteps>,
    /// How long to wait for the agent to answer at all.
    pub timeout: Duration,
}

/// What the guest agent reported after applying a [`Prepare`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Prepared {
    /// The post-clone hooks' results, in the order they ran (clones only).
    pub hooks: Vec<HookResult>,
    /// The agent's own handling time of the steps, summed, in microseconds: the guest's
    /// own work (`docs/clones.md`). `None` when the agent reports no times (one older than
    /// `report_timing`).
    pub guest_us: Option<u64>,
    /// How long the VMM waited on the guest for the readiness connection (and any the guest
    /// accepted and then ended before it), in microseconds
    /// (its `vsock_connection` figure, `docs/vsock.md`): the agent's work plus the guest
    /// kernel's vsock transport. `None` when the VMM could not say (an older VMM).
    pub guest_wait_us: Option<u64>,
}

/// The steps that make a clone unique beyond its identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneSteps {
    /// Fresh host entropy for the guest's pool.
    pub entropy: Vec<u8>,
}

/// A command for the guest agent to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestCommand {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub stdin: Vec<u8>,
    pub timeout: Duration,
}

/// The most output kept per stream of a guest command.
pub const MAX_EXEC_OUTPUT: usize = 4 << 20;

/// How a guest command ended.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GuestOutput {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// Output beyond [`MAX_EXEC_OUTPUT`] per stream was dropped.
    pub truncated: bool,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Why the guest agent did not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    /// It did not answer (not started, not installed, the VM is gone, a broken connection).
    #[error("the guest agent did not answer: {0}")]
    Unavailable(String),
    /// It answered with an error: `code` is the agent's stable code (`not_found`, ...).
    #[error("the guest agent refused: {message}")]
    Guest { code: String, message: String },
}

pub trait Backend: Send + Sync + 'static {
    /// Creates the qcow2 overlay `path` on `backing`.
    fn create_overlay(&self, path: &Path, backing: &Path, format: DiskFormat) -> BResult<()>;
    /// Boots a VM on `spec.dir/disk.qcow2`; resolves once its control socket answers.
    fn boot(&self, spec: &VmSpec) -> impl Future<Output = BResult<Running>> + Send;
    /// Restores `spec.snapshot` in `spec.dir` with its disk on a new overlay at
    /// `spec.overlay`, in the network namespace `spec.netns` if given.
    fn restore(&self, spec: &RestoreSpec) -> impl Future<Output = BResult<Running>> + Send;
    /// Snapshots the VM in `dir` into the directory `into` (memory and disk together),
    /// copying memory in `mode`; the VM keeps running. On failure nothing is left at `into`.
    fn snapshot(
        &self,
        dir: &Path,
        into: &Path,
        mode: SnapshotMode,
    ) -> impl Future<Output = BResult<Frozen>> + Send;
    fn pause(&self, dir: &Path) -> impl Future<Output = BResult<()>> + Send;
    fn resume(&self, dir: &Path) -> impl Future<Output = BResult<()>> + Send;
    /// Stops the VMM `pid` serving `dir` (shutdown, then SIGKILL); Ok if it is gone.
    fn stop(&self, dir: &Path, pid: u32) -> impl Future<Output = BResult<()>> + Send;
    /// Resolves when the VMM ends, with why.
    fn wait_exit(&self, dir: &Path, pid: u32) -> impl Future<Output = String> + Send;
    /// Whether `pid` is still the VMM serving `dir`.
    fn is_running(&self, dir: &Path, pid: u32) -> bool;
    /// Writes `input` to the console of the VMM in `dir`.
    fn console_input(&self, dir: &Path, input: &[u8]) -> BResult<()>;
    /// Deletes a file or directory tree (best effort; logs failures).
    fn remove(&self, path: &Path);

    /// Waits (up to `prep.timeout`) for the guest agent of the VM in `dir` to answer, then has
    /// it apply `prep`, in order: entropy, clock, identity, hooks. Returns the hooks' results
    /// and the guest's own time for it all.
    fn agent_prepare(
        &self,
        dir: &Path,
        prep: &Prepare,
    ) -> impl Future<Output = Result<Prepared, AgentError>> + Send;
    /// Runs `cmd` in the guest.
    fn agent_exec(
        &self,
        dir: &Path,
        cmd: GuestCommand,
    ) -> impl Future<Output = Result<GuestOutput, AgentError>> + Send;
    /// Reads the guest file `path`.
    fn agent_read_file(
        &self,
        dir: &Path,
        path: &str,
    ) -> impl Future<Output = Result<Vec<u8>, AgentError>> + Send;
    /// Writes the guest file `path` (created with `mode`, or 0644).
    fn agent_write_file(
        &self,
        dir: &Path,
        path: &str,
        data: Vec<u8>,
        mode: Option<u32>,
    ) -> impl Future<Output = Result<(), AgentError>> + Send;
    /// Creates an environment's network namespace, TAP, veth pair and firewall
    /// ([`crate::network::setup`]). Blocks for a few milliseconds.
    fn setup_network(&self, net: &EnvNetwork) -> BResult<()>;
    /// Removes an environment's network namespace and veth; Ok if they are gone.
    fn teardown_network(&self, net: &EnvNetwork) -> BResult<()>;
    /// The network namespaces whose names start with `prefix`.
    fn network_namespaces(&self, prefix: &str) -> Vec<String>;
}
