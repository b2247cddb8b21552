//! The API's resources, as JSON. Request types reject unknown fields.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A bootable image: a kernel and a root filesystem (raw ext4) that environments boot from
/// and whose root filesystem is the shared read-only base of their disks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Image {
    pub name: String,
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Seconds since the Unix epoch.
    pub created: u64,
}

/// `POST /v1/images`: register files, or `{"name": ..., "build": "default"}` to build the
/// default image set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateImage {
    pub name: String,
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    #[serde(default)]
    pub rootfs: Option<PathBuf>,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// `"default"`: build (or reuse from the cache) the default image set.
    #[serde(default)]
    pub build: Option<String>,
}

/// Where an environment is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnvState {
    /// Its VMM is starting (booting or restoring).
    Starting,
    Running,
    Paused,
    /// Its VMM ended (the guest powered off, or it was stopped).
    Stopped,
    /// Its VMM failed or died; `exit_reason` says how.
    Failed,
}

/// A named microVM, booted from an image or branched from another environment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Environment {
    pub name: String,
    /// The environment it was branched from, if any (the tree's edge).
    pub parent: Option<String>,
    /// The image its disk descends from.
    pub image: String,
    pub state: EnvState,
    pub vcpus: u8,
    pub memory_mib: u64,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// The snapshot it was restored from, if it was branched.
    pub snapshot: Option<String>,
    /// Why its VMM ended, when it did.
    pub exit_reason: Option<String>,
    /// Its VMM process, while it runs.
    pub pid: Option<u32>,
    /// Its address on the daemon's host (every port of the guest is reached there), when
    /// the daemon networks environments (`docs/networking.md`).
    #[serde(default)]
    pub address: Option<String>,
    /// Whether the guest may open connections out of its namespace; null without a network.
    #[serde(default)]
    pub allow_outbound: Option<bool>,
    /// Guest TCP ports published on the host.
    #[serde(default)]
    pub ports: Vec<PublishedPort>,
}

/// A guest TCP port the daemon forwards from a host address (a preview address).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishedPort {
    pub guest_port: u16,
    /// `ip:port` where the daemon's host listens.
    pub host_addr: String,
}

/// `POST /v1/environments`: `{name, image, vcpus, memory_mib}` boots a new environment;
/// `{name, from}` branches one from a running environment. Either may add `publish` and
/// `allow_outbound`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateEnvironment {
    pub name: String,
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub vcpus: Option<u8>,
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// Whether the guest runs Grove's agent (the default image does). When it does, the
    /// answer waits until the agent has acknowledged the environment's identity (and, for a
    /// branch, the reseed, the clock and the post-clone hooks). `false` skips all of that:
    /// the environment is answered as soon as its VM runs, and a branch of it is not made
    /// unique.
    #[serde(default)]
    pub agent: Option<bool>,
    /// Guest TCP ports to publish on the host, each on a port of its own.
    #[serde(default)]
    pub publish: Vec<u16>,
    /// Whether the guest may open connections out of its namespace. Default: yes when
    /// booted from an image, no when branched.
    #[serde(default)]
    pub allow_outbound: Option<bool>,
    /// For a branch: how the parent's memory is copied (`?mode=` on the request, not part
    /// of the body); `None` is live.
    #[serde(skip)]
    pub snapshot_mode: Option<SnapshotMode>,
}

/// How a running environment's memory is copied for a snapshot or branch: `live` (the
/// default: pre-copied while it runs, paused only for the last dirty pages and the device
/// state) or `paused` (stop-and-copy, for comparison). Chosen with `?mode=`.
pub use vmm::control::protocol::SnapshotMode;

/// How long a branch took.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BranchTimings {
    /// How long the parent was paused for the snapshot.
    pub parent_pause_ms: f64,
    /// How the parent's memory was copied.
    #[serde(default)]
    pub snapshot_mode: SnapshotMode,
    /// The snapshot request, from the daemon's side.
    pub snapshot_ms: f64,
    /// From starting the clone's VMM to its vCPUs running.
    pub restore_ms: f64,
    /// The whole request.
    pub total_ms: f64,
}

/// The answer to creating (or syncing) an environment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentCreated {
    pub environment: Environment,
    /// Present when the environment was branched.
    pub branch: Option<BranchTimings>,
    /// Present when the guest agent made the environment ready.
    #[serde(default)]
    pub ready: Option<Readiness>,
}

/// What the guest agent did before the environment was reported ready.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Readiness {
    /// From the VM running to the agent acknowledging the last step.
    pub ready_ms: f64,
    /// Of `ready_ms`, the guest's own work: the agent's handling time of each step, as it
    /// measured it, summed (`docs/clones.md`). `None` when the agent reports no times.
    #[serde(default)]
    pub guest_ms: Option<f64>,
    /// Of `ready_ms`, what Grove added: `ready_ms - guest_ms` (the daemon, the host socket,
    /// the VMM's vsock device, the guest kernel's vsock transport and the agent's reading
    /// and writing of the connection).
    #[serde(default)]
    pub added_ms: Option<f64>,
    /// Of `ready_ms`, how long the VMM waited on the guest for the readiness connection (and
    /// any the guest accepted and ended before it): from handing it the connection request or
    /// the steps to its last answer (the VMM's `vsock_connection` figure, `docs/vsock.md`).
    /// `None` when the VMM could not say.
    #[serde(default)]
    pub guest_wait_ms: Option<f64>,
    /// Of `ready_ms`, the host's time: `ready_ms - guest_wait_ms` (the daemon, the Unix
    /// socket, the VMM's vsock device and its threads waiting for a CPU).
    #[serde(default)]
    pub host_ms: Option<f64>,
    /// Of `ready_ms`, the guest's time outside the agent's steps: `guest_wait_ms - guest_ms`,
    /// at least 0 (the guest kernel's interrupt and vsock work, the agent's reading and
    /// writing of the connection). `added_ms` = `host_ms` + `guest_transport_ms`.
    #[serde(default)]
    pub guest_transport_ms: Option<f64>,
    /// The hostname the guest now has (the environment's name, made a valid hostname).
    pub hostname: String,
    /// Whether fresh host entropy was mixed into the guest's pool and its clock set (branches).
    pub reseeded: bool,
    /// The post-clone hooks, in the order they ran (branches).
    pub hooks: Vec<HookResult>,
}

/// One post-clone hook (`/etc/grove/hooks.d/*` in the guest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookResult {
    pub name: String,
    /// `None` when it was killed by a signal or timed out.
    pub exit_code: Option<i32>,
    /// The tail of its output.
    pub output: String,
}

/// The largest guest file `PUT /v1/environments/{name}/files` takes (one agent frame).
pub const MAX_FILE: usize = 512 * 1024;

/// `POST /v1/environments/{name}/exec`: a command to run in the guest, through its agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in the guest's `PATH`.
    pub argv: Vec<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// Standard input, base64.
    #[serde(default)]
    pub stdin: Option<String>,
    /// Killed after this long (default 60 s, at most 3600 s).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// How a command run in the guest ended, and what it printed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecResult {
    /// `None` when it was killed by a signal (see `signal`).
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// Output beyond 4 MiB per stream was dropped.
    pub truncated: bool,
    /// Standard output, base64.
    pub stdout: String,
    /// Standard error, base64.
    pub stderr: String,
}

/// A snapshot of an environment: memory and disk at one instant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// Unique id (`<environment>@<n>` style, assigned by the daemon).
    pub id: String,
    pub environment: String,
    /// The snapshot its environment was restored from, if any (the snapshot tree's edge).
    pub parent: Option<String>,
    pub created: u64,
    pub pause_ms: f64,
}

/// A state change, as `GET /v1/events` streams it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// `environment` or `image`.
    pub kind: String,
    pub name: String,
    /// What happened: `created`, `state`, `deleted`, ...
    pub action: String,
    #[serde(default)]
    pub state: Option<EnvState>,
    pub time: u64,
}
