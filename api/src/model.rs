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
    /// Guest TCP ports to publish on the host, each on a port of its own.
    #[serde(default)]
    pub publish: Vec<u16>,
    /// Whether the guest may open connections out of its namespace. Default: yes when
    /// booted from an image, no when branched.
    #[serde(default)]
    pub allow_outbound: Option<bool>,
}

/// How long a branch took.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BranchTimings {
    /// How long the parent was paused for the snapshot.
    pub parent_pause_ms: f64,
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
