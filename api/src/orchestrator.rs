//! The orchestrator: environments, images and snapshots, kept in the [`Store`] and made real
//! through a [`Backend`]. It implements [`Service`], so the HTTP layer never sees VMs.
//!
//! Data directory:
//!
//! ```text
//! DATA/grove.db                the state (SQLite)
//! DATA/envs/<id>/              one per environment (by database id, never by name):
//!     disk.qcow2               its overlay; frozen layers `disk@s<id>-<n>.qcow2` beside it
//!     control.sock console.log vmm.log vm.json vsock.sock
//! DATA/snapshots/s<id>-<n>/    snapshots (memory and state; the disk is the frozen layer)
//! ```
//!
//! Consistency: files are created before the rows that point to them are committed, and
//! rows are removed before their files; [`Orchestrator::recover`] sweeps files without rows
//! and marks environments whose VMM died while the daemon was down. Operations on one
//! environment are serialized by a per-name lock; a branch holds its parent's lock for the
//! snapshot only.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::broadcast;
use vmm::disk::DiskFormat;

use crate::backend::{
    AgentError, Backend, CloneSteps, GuestCommand, GuestIdentity, Prepare, Prepared, RestoreSpec,
    VmSpec, MAX_EXEC_OUTPUT,
};
use crate::error::ApiError;
use crate::model::{
    BranchTimings, CreateEnvironment, CreateImage, EnvState, Environment, EnvironmentCreated,
    Event, ExecRequest, ExecResult, Image, Readiness, Snapshot, SnapshotMode,
};
use crate::names;
use crate::network::{NetworkConfig, Proxies};
use crate::service::{Result, Service};
use crate::signing::SnapshotSigning;
use crate::store::{EnvRow, LayerRow, SnapshotRow, Store, StoreError};
use crate::supervisor::{CONSOLE, DISK};

pub const DEFAULT_VCPUS: u8 = 1;
pub const DEFAULT_MEMORY_MIB: u64 = 256;
/// How long a booting guest's agent may take to answer (a real boot takes ~20 s on the
/// emulated CI hosts, ~0.1 s on bare metal).
pub const BOOT_AGENT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a clone's agent may take to answer after the restore (it was running already).
pub const CLONE_AGENT_TIMEOUT: Duration = Duration::from_secs(30);
/// The default and the longest time a guest command may run.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(60);
pub const MAX_EXEC_TIMEOUT: Duration = Duration::from_secs(3600);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// How the time to readiness divides (`docs/clones.md`, "How long it takes").
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ReadySplit {
    pub guest_ms: Option<f64>,
    pub added_ms: Option<f64>,
    pub guest_wait_ms: Option<f64>,
    pub host_ms: Option<f64>,
    pub guest_transport_ms: Option<f64>,
}

impl ReadySplit {
    /// Divides `ready_ms` by the agent's own time (`guest_us`, summed over its steps) and
    /// the VMM's wait on the guest (`guest_wait_us`). What the agent measured for itself is
    /// the guest's own work and the rest Grove's (`added`); the VMM's wait splits that rest
    /// into the host's time and the guest kernel's transport. Each guest figure is capped at
    /// the whole, and the transport is at least 0: a guest clock, or a guest that overstates,
    /// cannot make a share negative.
    pub(crate) fn of(ready_ms: f64, guest_us: Option<u64>, guest_wait_us: Option<u64>) -> Self {
        let capped = |us: u64| (us as f64 / 1000.0).min(ready_ms);
        let guest_ms = guest_us.map(capped);
        let guest_wait_ms = guest_wait_us.map(capped);
        Self {
            guest_ms,
            added_ms: guest_ms.map(|guest| ready_ms - guest),
            guest_wait_ms,
            host_ms: guest_wait_ms.map(|wait| ready_ms - wait),
            guest_transport_ms: guest_wait_ms
                .zip(guest_ms)
                .map(|(wait, guest)| (wait - guest).max(0.0)),
        }
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

/// `n` bytes from the host's CSPRNG.
fn host_random(n: usize) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| ApiError::internal(format!("cannot read host entropy: {e}")))?;
    Ok(buf)
}

/// A guest path for the file routes: absolute, no NUL, at most 4096 bytes.
fn check_guest_path(path: &str) -> Result<()> {
    if !path.starts_with('/') || path.contains('\0') || path.len() > 4096 {
        return Err(ApiError::bad_request(format!(
            "guest path {:?} must be absolute, without NUL, at most 4096 bytes",
            path.chars().take(200).collect::<String>()
        )));
    }
    Ok(())
}

/// What the caller hears when the guest agent failed environment `name`.
fn agent_api_error(name: &str, e: AgentError) -> ApiError {
    match e {
        AgentError::Unavailable(why) => ApiError::new(
            504,
            "agent_unavailable",
            format!("the guest agent of environment {name} did not answer: {why}"),
        ),
        AgentError::Guest { code, message } => {
            let status = match code.as_str() {
                "not_found" => 404,
                "invalid_argument" => 400,
                "permission_denied" => 403,
                _ => 502,
            };
            ApiError::new(status, "guest_error", format!("{name}: {message}"))
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Exists(what) => ApiError::conflict(format!("{what} already exists")),
            other => ApiError::internal(other.to_string()),
        }
    }
}

/// Counters for `/metrics`.
#[derive(Default)]
struct Metrics {
    branches: u64,
    branch_ms_sum: f64,
    parent_pause_ms_sum: f64,
    restores: u64,
    restore_ms_sum: f64,
    boots: u64,
    ready_ms_sum: f64,
}

/// How images are built (the default set); injected so tests need no kernel build.
pub type ImageBuilder =
    Arc<dyn Fn() -> std::result::Result<(PathBuf, PathBuf), String> + Send + Sync>;

pub struct Orchestrator<B: Backend> {
    store: Store,
    backend: Arc<B>,
    data: PathBuf,
    events: broadcast::Sender<Event>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    metrics: Mutex<Metrics>,
    build_default: ImageBuilder,
    me: std::sync::Weak<Orchestrator<B>>,
    /// How environments are networked; `None`: they have no network.
    net: Option<NetworkConfig>,
    /// The ports published for environments.
    proxies: Proxies,
    /// The daemon's snapshot key, when it signs snapshots (set once, before serving).
    signing: OnceLock<SnapshotSigning>,
}

impl<B: Backend> Orchestrator<B> {
    /// Opens the data directory (creating it) and its database.
    pub fn open(data: &Path, backend: B, build_default: ImageBuilder) -> anyhow::Result<Arc<Self>> {
        Self::open_with_network(data, backend, build_default, None)
    }

    /// [`Self::open`], networking every new environment as `net` says (`docs/networking.md`).
    pub fn open_with_network(
        data: &Path,
        backend: B,
        build_default: ImageBuilder,
        net: Option<NetworkConfig>,
    ) -> anyhow::Result<Arc<Self>> {
        std::fs::create_dir_all(data.join("envs"))?;
        std::fs::create_dir_all(data.join("snapshots"))?;
        let store = Store::open(&data.join("grove.db"))?;
        let (events, _) = broadcast::channel(256);
        Ok(Arc::new_cyclic(|me| Self {
            store,
            backend: Arc::new(backend),
            data: data.to_path_buf(),
            events,
            locks: Mutex::new(HashMap::new()),
            metrics: Mutex::new(Metrics::default()),
            build_default,
            me: me.clone(),
            net,
            proxies: Proxies::default(),
            signing: OnceLock::new(),
        }))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Signs every snapshot taken from now on with `signing`'s key and, if it requires
    /// signatures, verifies each snapshot before a restore (docs/control-plane.md). Set once,
    /// before serving; a second call is an error.
    pub fn set_snapshot_signing(&self, signing: SnapshotSigning) -> anyhow::Result<()> {
        self.signing
            .set(signing)
            .map_err(|_| anyhow::anyhow!("snapshot signing is already configured"))
    }

    /// Before a restore of `snap`: with `--require-signed-snapshots`, refuses a snapshot
    /// that is unsigned, signed with another key or changed since (500
    /// `snapshot_unverified`).
    async fn verify_snapshot(&self, snap: &SnapshotRow) -> Result<()> {
        match self.signing.get() {
            Some(signing) => signing.verify_before_restore(&snap.id, &snap.dir).await,
            None => Ok(()),
        }
    }

    fn lock_for(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    fn emit(&self, kind: &str, name: &str, action: &str, state: Option<EnvState>) {
        let _ = self.events.send(Event {
            kind: kind.into(),
            name: name.into(),
            action: action.into(),
            state,
            time: now(),
        });
    }

    fn env_dir(&self, id: i64) -> PathBuf {
        self.data.join("envs").join(id.to_string())
    }

    fn public(&self, row: &EnvRow) -> Environment {
        let (address, allow_outbound, ports) = self.network_view(row.id);
        Environment {
            name: row.name.clone(),
            parent: row.parent.clone(),
            image: row.image.clone(),
            state: row.state,
            vcpus: row.vcpus,
            memory_mib: row.memory_mib,
            created: row.created,
            snapshot: row.snapshot.clone(),
            exit_reason: row.exit_reason.clone(),
            pid: row.pid,
            address,
            allow_outbound,
            ports,
        }
    }

    fn env_row(&self, name: &str) -> Result<EnvRow> {
        names::validate("environment", name)?;
        self.store
            .env(name)?
            .ok_or_else(|| ApiError::not_found(format!("no environment {name:?}")))
    }

    /// Watches the VMM of `name` and records its end.
    fn watch(&self, name: String, dir: PathBuf, pid: u32) {
        let Some(me) = self.me.upgrade() else { return };
        tokio::spawn(async move {
            let reason = me.backend.wait_exit(&dir, pid).await;
            // Only if the row still describes that process (not deleted, not re-cloned).
            if let Ok(Some(row)) = me.store.env(&name) {
                if row.pid == Some(pid) {
                    let state = if reason.contains("powered off")
                        || reason.contains("reset")
                        || reason.contains("stopped")
                    {
                        EnvState::Stopped
                    } else {
                        EnvState::Failed
                    };
                    let _ = me.store.set_state(&name, state, None, Some(&reason));
                    me.emit("environment", &name, "state", Some(state));
                }
            }
        });
    }

    /// After a start: re-attaches to VMMs still running, marks the others, and deletes files
    /// no row points to.
    pub fn recover(&self) -> anyhow::Result<()> {
        let envs = self.store.envs()?;
        for env in &envs {
            if matches!(
                env.state,
                EnvState::Starting | EnvState::Running | EnvState::Paused
            ) {
                match env.pid {
                    Some(pid) if self.backend.is_running(&env.dir, pid) => {
                        log::info!("re-attached to environment {} (pid {pid})", env.name);
                        self.watch(env.name.clone(), env.dir.clone(), pid);
                    }
                    _ => {
                        let reason = crate::supervisor::exit_reason_from_log(&env.dir)
                            .map(|r| format!("its VMM ended while groved was down: {r}"))
                            .unwrap_or_else(|| "its VMM ended while groved was down".to_string());
                        log::warn!("environment {}: {reason}", env.name);
                        self.store
                            .set_state(&env.name, EnvState::Failed, None, Some(&reason))?;
                    }
                }
            }
        }
        // Directories without rows: an environment or snapshot whose creation crashed.
        let env_dirs: HashSet<PathBuf> = envs.iter().map(|e| e.dir.clone()).collect();
        let layer_dirs: HashSet<PathBuf> = self
            .store
            .layers()?
            .iter()
            .filter_map(|l| l.path.parent().map(Path::to_path_buf))
            .collect();
        for entry in std::fs::read_dir(self.data.join("envs"))?.flatten() {
            let p = entry.path();
            if !env_dirs.contains(&p) && !layer_dirs.contains(&p) {
                log::info!("removing {} (no environment uses it)", p.display());
                self.backend.remove(&p);
            }
        }
        let snaps: HashSet<PathBuf> = self.store.snapshots()?.into_iter().map(|s| s.dir).collect();
        for entry in std::fs::read_dir(self.data.join("snapshots"))?.flatten() {
            if !snaps.contains(&entry.path()) {
                self.backend.remove(&entry.path());
            }
        }
        self.gc()?;
        self.recover_network()?;
        Ok(())
    }

    /// Deletes snapshots and layers nothing needs any more.
    pub fn gc(&self) -> std::result::Result<(), StoreError> {
        let envs = self.store.envs()?;
        let env_names: HashSet<&str> = envs.iter().map(|e| e.name.as_str()).collect();
        let used_snapshots: HashSet<&str> =
            envs.iter().filter_map(|e| e.snapshot.as_deref()).collect();
        let snapshots = self.store.snapshots()?;
        let mut kept = Vec::new();
        for s in snapshots {
            if env_names.contains(s.environment.as_str()) || used_snapshots.contains(s.id.as_str())
            {
                kept.push(s);
            } else {
                self.store.delete_snapshot(&s.id)?;
                self.backend.remove(&s.dir);
            }
        }
        // Layers: what environments sit on and snapshots froze, and everything below.
        let layers = self.store.layers()?;
        let below: HashMap<&Path, &Path> = layers
            .iter()
            .map(|l| (l.path.as_path(), l.backing.as_path()))
            .collect();
        let mut needed: HashSet<&Path> = HashSet::new();
        let mut todo: Vec<&Path> = envs.iter().map(|e| e.base_layer.as_path()).collect();
        todo.extend(kept.iter().filter_map(|s| s.frozen_layer.as_deref()));
        while let Some(p) = todo.pop() {
            if needed.insert(p) {
                if let Some(b) = below.get(p) {
                    todo.push(b);
                }
            }
        }
        for l in &layers {
            if !needed.contains(l.path.as_path()) {
                self.store.delete_layer(&l.path)?;
                self.backend.remove(&l.path);
                if !env_names.contains(l.owner.as_str()) {
                    if let Some(dir) = l.path.parent() {
                        // Removed only when empty: other layers may still live there.
                        let _ = std::fs::remove_dir(dir);
                    }
                }
            }
        }
        Ok(())
    }

    fn check_resources(vcpus: Option<u8>, memory: Option<u64>) -> Result<(u8, u64)> {
        let vcpus = vcpus.unwrap_or(DEFAULT_VCPUS);
        if vcpus == 0 || vcpus > vmm::config::MAX_VCPUS {
            return Err(ApiError::bad_request(format!(
                "vcpus must be between 1 and {}",
                vmm::config::MAX_VCPUS
            )));
        }
        let memory = memory.unwrap_or(DEFAULT_MEMORY_MIB);
        if !(vmm::config::MIN_MEMORY_MIB..=1 << 20).contains(&memory) {
            return Err(ApiError::bad_request(format!(
                "memory_mib must be between {} and {}",
                vmm::config::MIN_MEMORY_MIB,
                1u64 << 20
            )));
        }
        Ok((vcpus, memory))
    }

    /// Reserves the name: a row in state `starting` whose directory exists.
    fn reserve(&self, mut row: EnvRow) -> Result<EnvRow> {
        row.dir = PathBuf::new();
        let id = self.store.reserve_env(&row)?;
        row.id = id;
        row.dir = self.env_dir(id);
        if let Err(e) = std::fs::create_dir_all(&row.dir) {
            let _ = self.store.delete_env(&row.name);
            return Err(ApiError::internal(format!(
                "cannot create {}: {e}",
                row.dir.display()
            )));
        }
        self.store.update_env(&row)?;
        Ok(row)
    }

    /// Undoes a reservation after a failed start.
    async fn abandon(&self, row: &EnvRow) {
        if let Some(pid) = row.pid {
            let _ = self.backend.stop(&row.dir, pid).await;
        }
        let _ = self.store.delete_env(&row.name);
        self.backend.remove(&row.dir.join(DISK));
        for f in [
            CONSOLE,
            crate::supervisor::CONSOLE_IN,
            crate::supervisor::VMM_LOG,
            crate::supervisor::CONTROL,
            crate::supervisor::VSOCK,
            "vm.json",
        ] {
            self.backend.remove(&row.dir.join(f));
        }
        let _ = std::fs::remove_dir(&row.dir);
        self.remove_network(row.id).await;
    }

    async fn boot(&self, req: CreateEnvironment, image_name: String) -> Result<EnvironmentCreated> {
        let image = self
            .store
            .image(&image_name)?
            .ok_or_else(|| ApiError::not_found(format!("no image {image_name:?}")))?;
        let (vcpus, memory_mib) = Self::check_resources(req.vcpus, req.memory_mib)?;
        self.check_network_request(&req)?;
        let mut row = self.reserve(EnvRow {
            id: 0,
            name: req.name.clone(),
            parent: None,
            image: image.name.clone(),
            state: EnvState::Starting,
            vcpus,
            memory_mib,
            created: now(),
            snapshot: None,
            exit_reason: None,
            pid: None,
            dir: PathBuf::new(),
            base_layer: image.rootfs.clone(),
        })?;
        self.emit(
            "environment",
            &row.name,
            "created",
            Some(EnvState::Starting),
        );
        let started = Instant::now();
        let netns = match self
            .create_network(&row, req.allow_outbound.unwrap_or(true), &req.publish)
            .await
        {
            Ok(netns) => netns,
            Err(e) => {
                self.abandon(&row).await;
                self.emit("environment", &req.name, "deleted", None);
                return Err(e);
            }
        };
        let result = async {
            self.backend
                .create_overlay(&row.dir.join(DISK), &image.rootfs, DiskFormat::Raw)?;
            self.backend
                .boot(&VmSpec {
                    dir: row.dir.clone(),
                    kernel: image.kernel.clone(),
                    initrd: image.initrd.clone(),
                    vcpus,
                    memory_mib,
                    netns,
                    cmdline: None,
                })
                .await
        }
        .await;
        match result {
            Ok(running) => {
                row.state = EnvState::Running;
                row.pid = Some(running.pid);
                self.store.update_env(&row)?;
                self.watch(row.name.clone(), row.dir.clone(), running.pid);
                let ready = match req.agent {
                    Some(false) => None,
                    _ => match self.make_ready(&row, false).await {
                        Ok(ready) => Some(ready),
                        Err(e) => {
                            self.abandon(&row).await;
                            self.emit("environment", &req.name, "deleted", None);
                            return Err(e);
                        }
                    },
                };
                self.metrics
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .boots += 1;
                self.emit("environment", &row.name, "state", Some(EnvState::Running));
                log::info!("environment {} booted in {:.1} ms", row.name, ms(started));
                Ok(EnvironmentCreated {
                    environment: self.public(&row),
                    branch: None,
                    ready,
                })
            }
            Err(e) => {
                self.abandon(&row).await;
                self.emit("environment", &req.name, "deleted", None);
                Err(ApiError::internal(format!(
                    "cannot boot environment {}: {e}",
                    req.name
                )))
            }
        }
    }

    /// Has the guest agent of the (running) environment `row` apply its identity and, for a
    /// clone, fresh entropy, the host's clock and the post-clone hooks. A hook that fails
    /// fails the environment (422): a clone whose scrub hook failed must not be handed out.
    async fn make_ready(&self, row: &EnvRow, clone: bool) -> Result<Readiness> {
        let started = Instant::now();
        let hostname = names::hostname_for(&row.name);
        let machine_id = host_random(16)?
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        let prep = Prepare {
            identity: GuestIdentity {
                hostname: hostname.clone(),
                machine_id,
            },
            clone: if clone {
                Some(CloneSteps {
                    entropy: host_random(64)?,
                })
            } else {
                None
            },
            timeout: if clone {
                CLONE_AGENT_TIMEOUT
            } else {
                BOOT_AGENT_TIMEOUT
            },
        };
        let Prepared {
            hooks,
            guest_us,
            guest_wait_us,
        } = self
            .backend
            .agent_prepare(&row.dir, &prep)
            .await
            .map_err(|e| {
                if matches!(e, AgentError::Unavailable(_)) {
                    // What the guest and its VMM last said is what tells an operator why.
                    log::warn!(
                        "environment {}: no answer from its guest agent; the console ends: {:?}; the VMM's log ends: {:?}",
                        row.name,
                        crate::supervisor::last_lines(&row.dir.join(CONSOLE), 8),
                        crate::supervisor::last_lines(&row.dir.join(crate::supervisor::VMM_LOG), 4),
                    );
                }
                agent_api_error(&row.name, e)
            })?;
        if let Some(failed) = hooks.iter().find(|h| h.exit_code != Some(0)) {
            return Err(ApiError::new(
                422,
                "hook_failed",
                format!(
                    "post-clone hook {} of environment {} failed ({}): {}",
                    failed.name,
                    row.name,
                    failed
                        .exit_code
                        .map_or("killed".to_string(), |c| format!("exit status {c}")),
                    failed.output.trim_end()
                ),
            ));
        }
        let ready_ms = ms(started);
        let split = ReadySplit::of(ready_ms, guest_us, guest_wait_us);
        let ready = Readiness {
            ready_ms,
            guest_ms: split.guest_ms,
            added_ms: split.added_ms,
            guest_wait_ms: split.guest_wait_ms,
            host_ms: split.host_ms,
            guest_transport_ms: split.guest_transport_ms,
            hostname,
            reseeded: clone,
            hooks,
        };
        self.metrics
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .ready_ms_sum += ready.ready_ms;
        Ok(ready)
    }

    /// The running environment `name`'s directory, for a request to its agent.
    fn agent_dir(&self, name: &str) -> Result<PathBuf> {
        let row = self.env_row(name)?;
        if row.state != EnvState::Running {
            return Err(ApiError::conflict(format!(
                "environment {name} is {}, not running",
                serde_json::to_value(row.state)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default()
            )));
        }
        Ok(row.dir)
    }

    /// Snapshots running environment `parent` (under its lock; memory copied in `mode`, live
    /// by default) and records the snapshot and its frozen layer. Returns the snapshot, the
    /// time the request took and how memory was copied.
    async fn take_snapshot(
        &self,
        parent: &str,
        mode: Option<SnapshotMode>,
    ) -> Result<(SnapshotRow, f64, SnapshotMode)> {
        let lock = self.lock_for(parent);
        let guard = lock.lock().await;
        let mut prow = self.env_row(parent)?;
        if !matches!(prow.state, EnvState::Running | EnvState::Paused) {
            return Err(ApiError::conflict(format!(
                "environment {parent} is {:?}, not running",
                prow.state
            )));
        }
        let n = self.store.next_snapshot_number(parent)?;
        let dir_name = format!("s{}-{n}", prow.id);
        let dir = self.data.join("snapshots").join(&dir_name);
        let started = Instant::now();
        let frozen = self
            .backend
            .snapshot(&prow.dir, &dir, mode.unwrap_or(SnapshotMode::Live))
            .await
            .map_err(|e| ApiError::internal(format!("cannot snapshot {parent}: {e}")))?;
        let snapshot_ms = ms(started);
        let row = SnapshotRow {
            id: format!("{parent}@{n}"),
            environment: parent.to_string(),
            parent: prow.snapshot.clone(),
            dir,
            created: now(),
            pause_ms: frozen.pause_ms,
            frozen_layer: frozen.frozen_layer.clone(),
        };
        let old_base = prow.base_layer.clone();
        if let Some(layer) = &frozen.frozen_layer {
            prow.base_layer = layer.clone();
        }
        self.store.transaction(|tx| {
            Store::insert_snapshot(tx, &row)?;
            if let Some(layer) = &frozen.frozen_layer {
                Store::insert_layer(
                    tx,
                    &LayerRow {
                        path: layer.clone(),
                        backing: old_base.clone(),
                        owner: parent.to_string(),
                    },
                )?;
            }
            Ok(())
        })?;
        self.store.update_env(&prow)?;
        self.emit("environment", parent, "snapshot", Some(prow.state));
        // The parent may go on: signing reads only the new snapshot and frozen layers. A
        // snapshot that cannot be signed stays recorded (its disk layer is real) but is
        // unsigned, so a daemon that requires signatures never restores it.
        drop(guard);
        if let Some(signing) = self.signing.get() {
            let layers = match &frozen.frozen_layer {
                Some(layer) => self.layer_chain(layer)?,
                None => Vec::new(),
            };
            signing.sign(&row.id, &row.dir, layers).await?;
        }
        Ok((row, snapshot_ms, frozen.mode))
    }

    /// `top` and the layers below it, down to the image's rootfs, from the layer records.
    fn layer_chain(&self, top: &Path) -> Result<Vec<PathBuf>> {
        let layers = self.store.layers()?;
        let mut chain = vec![top.to_path_buf()];
        while let Some(row) = layers.iter().find(|l| Some(&l.path) == chain.last()) {
            if chain.contains(&row.backing) || chain.len() > layers.len() {
                break;
            }
            chain.push(row.backing.clone());
        }
        Ok(chain)
    }

    /// Restores `snap` into the reserved `row` on a new overlay.
    async fn restore_into(&self, row: &mut EnvRow, snap: &SnapshotRow) -> Result<f64> {
        let frozen = snap.frozen_layer.clone().ok_or_else(|| {
            ApiError::internal(format!("snapshot {} froze no disk layer", snap.id))
        })?;
        let overlay = row.dir.join(DISK);
        let netns = self.env_network(row.id)?.map(|n| n.netns);
        let spec = RestoreSpec {
            dir: row.dir.clone(),
            snapshot: snap.dir.clone(),
            overlay,
            layers: self.layer_chain(&frozen)?,
            vcpus: row.vcpus,
            memory_mib: row.memory_mib,
            netns,
        };
        let running = self
            .backend
            .restore(&spec)
            .await
            .map_err(|e| ApiError::internal(format!("cannot restore {}: {e}", row.name)))?;
        row.state = EnvState::Running;
        row.pid = Some(running.pid);
        row.snapshot = Some(snap.id.clone());
        row.base_layer = frozen;
        row.exit_reason = None;
        self.store.update_env(row)?;
        self.watch(row.name.clone(), row.dir.clone(), running.pid);
        {
            let mut m = self.metrics.lock().unwrap_or_else(PoisonError::into_inner);
            m.restores += 1;
            m.restore_ms_sum += running.start_ms;
        }
        self.emit("environment", &row.name, "state", Some(EnvState::Running));
        Ok(running.start_ms)
    }

    async fn branch(&self, req: CreateEnvironment, from: String) -> Result<EnvironmentCreated> {
        let started = Instant::now();
        let parent = self.env_row(&from)?;
        if req.vcpus.is_some_and(|v| v != parent.vcpus)
            || req.memory_mib.is_some_and(|m| m != parent.memory_mib)
        {
            return Err(ApiError::bad_request(
                "a branch has its parent's vcpus and memory; leave them out",
            ));
        }
        self.check_network_request(&req)?;
        let mut row = self.reserve(EnvRow {
            id: 0,
            name: req.name.clone(),
            parent: Some(from.clone()),
            image: parent.image.clone(),
            state: EnvState::Starting,
            vcpus: parent.vcpus,
            memory_mib: parent.memory_mib,
            created: now(),
            snapshot: None,
            exit_reason: None,
            pid: None,
            dir: PathBuf::new(),
            base_layer: parent.base_layer.clone(),
        })?;
        self.emit(
            "environment",
            &row.name,
            "created",
            Some(EnvState::Starting),
        );
        let lock = self.lock_for(&row.name);
        let _guard = lock.lock().await;
        let result = async {
            // The clone's namespace is made while the parent is snapshotted.
            let allow_outbound = req.allow_outbound.unwrap_or(false);
            let (snapshot, network) = tokio::join!(
                self.take_snapshot(&from, req.snapshot_mode),
                self.create_network(&row, allow_outbound, &req.publish)
            );
            let (snap, snapshot_ms, snapshot_mode) = snapshot?;
            network?;
            self.verify_snapshot(&snap).await?;
            let restore_ms = self.restore_into(&mut row, &snap).await?;
            let timings = BranchTimings {
                parent_pause_ms: snap.pause_ms,
                snapshot_mode,
                snapshot_ms,
                restore_ms,
                total_ms: 0.0,
            };
            let ready = match req.agent {
                Some(false) => None,
                _ => Some(self.make_ready(&row, true).await?),
            };
            Ok::<_, ApiError>((timings, ready))
        }
        .await;
        match result {
            Ok((mut timings, ready)) => {
                timings.total_ms = ms(started);
                {
                    let mut m = self.metrics.lock().unwrap_or_else(PoisonError::into_inner);
                    m.branches += 1;
                    m.branch_ms_sum += timings.total_ms;
                    m.parent_pause_ms_sum += timings.parent_pause_ms;
                }
                Ok(EnvironmentCreated {
                    environment: self.public(&row),
                    branch: Some(timings),
                    ready,
                })
            }
            Err(e) => {
                self.abandon(&row).await;
                self.emit("environment", &req.name, "deleted", None);
                let _ = self.gc();
                Err(e)
            }
        }
    }

    /// Pauses (`run` false) or resumes (`run` true) the environment's vCPUs.
    async fn set_running(&self, name: &str, run: bool) -> Result<Environment> {
        let lock = self.lock_for(name);
        let _guard = lock.lock().await;
        let row = self.env_row(name)?;
        let (from, to, verb) = if run {
            (EnvState::Paused, EnvState::Running, "resume")
        } else {
            (EnvState::Running, EnvState::Paused, "pause")
        };
        if row.state != from {
            return Err(ApiError::conflict(format!(
                "cannot {verb} environment {name}: it is {:?}",
                row.state
            )));
        }
        let done = if run {
            self.backend.resume(&row.dir).await
        } else {
            self.backend.pause(&row.dir).await
        };
        done.map_err(|e| ApiError::internal(format!("cannot {verb} {name}: {e}")))?;
        self.store.set_state(name, to, row.pid, None)?;
        self.emit("environment", name, "state", Some(to));
        Ok(self.public(&self.env_row(name)?))
    }

    /// Stops the environment's VMM if it runs and deletes its overlay and run files.
    async fn stop_and_clear(&self, row: &EnvRow) -> Result<()> {
        if let Some(pid) = row.pid {
            self.backend
                .stop(&row.dir, pid)
                .await
                .map_err(|e| ApiError::internal(format!("cannot stop {}: {e}", row.name)))?;
        }
        for f in [
            DISK,
            CONSOLE,
            crate::supervisor::CONSOLE_IN,
            crate::supervisor::VMM_LOG,
            crate::supervisor::CONTROL,
            crate::supervisor::VSOCK,
            "vm.json",
        ] {
            self.backend.remove(&row.dir.join(f));
        }
        // Temporary files of the VMM's disk (the next branch's overlay), if it could not
        // remove them itself.
        for entry in std::fs::read_dir(&row.dir).into_iter().flatten().flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(".disk.qcow2.")
            {
                self.backend.remove(&entry.path());
            }
        }
        Ok(())
    }
}

impl<B: Backend> Service for Orchestrator<B> {
    async fn list_images(&self) -> Result<Vec<Image>> {
        Ok(self.store.images()?)
    }

    async fn create_image(&self, req: CreateImage) -> Result<Image> {
        names::validate("image", &req.name)?;
        let (kernel, rootfs, initrd) = match (&req.build, &req.kernel, &req.rootfs) {
            (Some(b), None, None) if b == "default" => {
                let build = self.build_default.clone();
                let (kernel, rootfs) = tokio::task::spawn_blocking(move || build())
                    .await
                    .map_err(|e| ApiError::internal(e.to_string()))?
                    .map_err(|e| ApiError::internal(format!("image build failed: {e}")))?;
                (kernel, rootfs, None)
            }
            (Some(b), None, None) => {
                return Err(ApiError::bad_request(format!(
                    "unknown build {b:?} (only \"default\")"
                )))
            }
            (None, Some(k), Some(r)) => (k.clone(), r.clone(), req.initrd.clone()),
            _ => {
                return Err(ApiError::bad_request(
                    "give either kernel and rootfs, or build: \"default\"",
                ))
            }
        };
        for p in [Some(&kernel), Some(&rootfs), initrd.as_ref()]
            .into_iter()
            .flatten()
        {
            if !p.is_absolute() || !p.is_file() {
                return Err(ApiError::bad_request(format!(
                    "{} is not an absolute path to a file",
                    p.display()
                )));
            }
        }
        let image = Image {
            name: req.name,
            kernel,
            rootfs,
            initrd,
            created: now(),
        };
        self.store.insert_image(&image)?;
        self.emit("image", &image.name, "created", None);
        Ok(image)
    }

    async fn get_image(&self, name: &str) -> Result<Image> {
        names::validate("image", name)?;
        self.store
            .image(name)?
            .ok_or_else(|| ApiError::not_found(format!("no image {name:?}")))
    }

    async fn delete_image(&self, name: &str) -> Result<()> {
        self.get_image(name).await?;
        let users = self.store.image_users(name)?;
        if !users.is_empty() {
            return Err(ApiError::conflict(format!(
                "image {name} is used by environments: {}",
                users.join(", ")
            )));
        }
        self.store.delete_image(name)?;
        self.emit("image", name, "deleted", None);
        Ok(())
    }

    async fn list_environments(&self) -> Result<Vec<Environment>> {
        // Parents before children: a depth-first walk from the roots.
        let rows = self.store.envs()?;
        let names: HashSet<&str> = rows.iter().map(|r| r.name.as_str()).collect();
        let mut out = Vec::new();
        let mut stack: Vec<&EnvRow> = rows
            .iter()
            .filter(|r| r.parent.as_deref().is_none_or(|p| !names.contains(p)))
            .rev()
            .collect();
        while let Some(r) = stack.pop() {
            out.push(self.public(r));
            stack.extend(
                rows.iter()
                    .filter(|c| c.parent.as_deref() == Some(r.name.as_str()))
                    .rev(),
            );
        }
        Ok(out)
    }

    async fn create_environment(&self, req: CreateEnvironment) -> Result<EnvironmentCreated> {
        names::validate("environment", &req.name)?;
        match (req.image.clone(), req.from.clone()) {
            (Some(image), None) => {
                names::validate("image", &image)?;
                self.boot(req, image).await
            }
            (None, Some(from)) => {
                names::validate("environment", &from)?;
                self.branch(req, from).await
            }
            _ => Err(ApiError::bad_request(
                "give exactly one of image (boot) or from (branch)",
            )),
        }
    }

    async fn get_environment(&self, name: &str) -> Result<Environment> {
        Ok(self.public(&self.env_row(name)?))
    }

    async fn delete_environment(&self, name: &str, force: bool) -> Result<()> {
        let lock = self.lock_for(name);
        let _guard = lock.lock().await;
        let row = self.env_row(name)?;
        let children = self.store.children(name)?;
        if !children.is_empty() && !force {
            return Err(ApiError::conflict(format!(
                "environments {} depend on layers of {name}; delete them first or use force=true",
                children.join(", ")
            )));
        }
        self.stop_and_clear(&row).await?;
        self.store.delete_env(name)?;
        self.gc()?;
        let _ = std::fs::remove_dir(&row.dir);
        self.remove_network(row.id).await;
        self.emit("environment", name, "deleted", None);
        Ok(())
    }

    async fn pause(&self, name: &str) -> Result<Environment> {
        self.set_running(name, false).await
    }

    async fn resume(&self, name: &str) -> Result<Environment> {
        self.set_running(name, true).await
    }

    async fn snapshot(&self, name: &str, mode: Option<SnapshotMode>) -> Result<Snapshot> {
        let (row, _, _) = self.take_snapshot(name, mode).await?;
        Ok(Snapshot {
            id: row.id,
            environment: row.environment,
            parent: row.parent,
            created: row.created,
            pause_ms: row.pause_ms,
        })
    }

    async fn sync(&self, name: &str, mode: Option<SnapshotMode>) -> Result<EnvironmentCreated> {
        let started = Instant::now();
        let lock = self.lock_for(name);
        let _guard = lock.lock().await;
        let mut row = self.env_row(name)?;
        let Some(parent) = row.parent.clone() else {
            return Err(ApiError::conflict(format!(
                "environment {name} was not branched from another; nothing to sync from"
            )));
        };
        let children = self.store.children(name)?;
        if !children.is_empty() {
            return Err(ApiError::conflict(format!(
                "environments {} were branched from {name}; sync would drop what they share",
                children.join(", ")
            )));
        }
        // Snapshot the parent first: if that fails, the environment is untouched.
        let (snap, snapshot_ms, snapshot_mode) = self.take_snapshot(&parent, mode).await?;
        // Likewise a snapshot that does not verify.
        self.verify_snapshot(&snap).await?;
        self.stop_and_clear(&row).await?;
        row.state = EnvState::Starting;
        row.pid = None;
        self.store.update_env(&row)?;
        let restore_ms = self.restore_into(&mut row, &snap).await.inspect_err(|_| {
            let _ = self
                .store
                .set_state(name, EnvState::Failed, None, Some("sync failed"));
        })?;
        self.gc()?;
        // Like a branch whose clone cannot be made ready, a sync that cannot leaves no
        // running clone behind.
        let ready = match self.make_ready(&row, true).await {
            Ok(ready) => ready,
            Err(e) => {
                if let Some(pid) = row.pid {
                    let _ = self.backend.stop(&row.dir, pid).await;
                }
                let _ = self.store.set_state(
                    name,
                    EnvState::Failed,
                    None,
                    Some(&format!("sync: {}", e.message)),
                );
                return Err(e);
            }
        };
        Ok(EnvironmentCreated {
            environment: self.public(&row),
            branch: Some(BranchTimings {
                parent_pause_ms: snap.pause_ms,
                snapshot_mode,
                snapshot_ms,
                restore_ms,
                total_ms: ms(started),
            }),
            ready: Some(ready),
        })
    }

    async fn console(&self, name: &str, offset: u64, limit: usize) -> Result<Vec<u8>> {
        use std::io::{Read, Seek, SeekFrom};
        let row = self.env_row(name)?;
        let path = row.dir.join(CONSOLE);
        let mut file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(ApiError::internal(format!("{}: {e}", path.display()))),
        };
        file.seek(SeekFrom::Start(offset))
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let mut buf = Vec::new();
        file.take(limit as u64)
            .read_to_end(&mut buf)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(buf)
    }

    async fn console_input(&self, name: &str, input: Vec<u8>) -> Result<()> {
        let row = self.env_row(name)?;
        if !matches!(row.state, EnvState::Running | EnvState::Paused) {
            return Err(ApiError::conflict(format!(
                "environment {name} is not running"
            )));
        }
        if input.len() > 4096 {
            return Err(ApiError::bad_request(
                "console input is limited to 4096 bytes",
            ));
        }
        self.backend
            .console_input(&row.dir, &input)
            .map_err(|e| ApiError::internal(format!("{name}: {e}")))
    }

    async fn exec(&self, name: &str, req: ExecRequest) -> Result<ExecResult> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        if req.argv.is_empty() || req.argv[0].is_empty() {
            return Err(ApiError::bad_request("argv needs at least a program"));
        }
        let stdin = match &req.stdin {
            Some(text) => b64
                .decode(text)
                .map_err(|e| ApiError::bad_request(format!("stdin is not base64: {e}")))?,
            None => Vec::new(),
        };
        let timeout = match req.timeout_ms {
            None => EXEC_TIMEOUT,
            Some(0) => return Err(ApiError::bad_request("timeout_ms must be at least 1")),
            Some(t) if Duration::from_millis(t) > MAX_EXEC_TIMEOUT => {
                return Err(ApiError::bad_request(format!(
                    "timeout_ms must be at most {}",
                    MAX_EXEC_TIMEOUT.as_millis()
                )))
            }
            Some(t) => Duration::from_millis(t),
        };
        let dir = self.agent_dir(name)?;
        let out = self
            .backend
            .agent_exec(
                &dir,
                GuestCommand {
                    argv: req.argv,
                    env: req.env.into_iter().collect(),
                    cwd: req.cwd,
                    stdin,
                    timeout,
                },
            )
            .await
            .map_err(|e| agent_api_error(name, e))?;
        Ok(ExecResult {
            exit_code: out.exit_code,
            signal: out.signal,
            timed_out: out.timed_out,
            truncated: out.truncated
                || out.stdout.len() > MAX_EXEC_OUTPUT
                || out.stderr.len() > MAX_EXEC_OUTPUT,
            stdout: b64.encode(&out.stdout[..out.stdout.len().min(MAX_EXEC_OUTPUT)]),
            stderr: b64.encode(&out.stderr[..out.stderr.len().min(MAX_EXEC_OUTPUT)]),
        })
    }

    async fn read_file(&self, name: &str, path: &str) -> Result<Vec<u8>> {
        check_guest_path(path)?;
        let dir = self.agent_dir(name)?;
        self.backend
            .agent_read_file(&dir, path)
            .await
            .map_err(|e| agent_api_error(name, e))
    }

    async fn write_file(
        &self,
        name: &str,
        path: &str,
        data: Vec<u8>,
        mode: Option<u32>,
    ) -> Result<()> {
        check_guest_path(path)?;
        if mode.is_some_and(|m| m > 0o7777) {
            return Err(ApiError::bad_request("mode must be at most 07777"));
        }
        let dir = self.agent_dir(name)?;
        self.backend
            .agent_write_file(&dir, path, data, mode)
            .await
            .map_err(|e| agent_api_error(name, e))
    }

    fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    fn metrics(&self) -> String {
        let mut out = String::new();
        let envs = self.store.envs().unwrap_or_default();
        out.push_str(
            "# HELP grove_environments Environments by state.\n# TYPE grove_environments gauge\n",
        );
        for state in ["starting", "running", "paused", "stopped", "failed"] {
            let n = envs
                .iter()
                .filter(|e| {
                    serde_json::to_value(e.state)
                        .ok()
                        .and_then(|v| v.as_str().map(String::from))
                        == Some(state.to_string())
                })
                .count();
            out.push_str(&format!("grove_environments{{state=\"{state}\"}} {n}\n"));
        }
        let m = self.metrics.lock().unwrap_or_else(PoisonError::into_inner);
        out.push_str(&format!(
            "# TYPE grove_branches_total counter\ngrove_branches_total {}\n\
             # TYPE grove_branch_duration_ms_sum counter\ngrove_branch_duration_ms_sum {:.3}\n\
             # TYPE grove_branch_parent_pause_ms_sum counter\ngrove_branch_parent_pause_ms_sum {:.3}\n\
             # TYPE grove_restores_total counter\ngrove_restores_total {}\n\
             # TYPE grove_restore_duration_ms_sum counter\ngrove_restore_duration_ms_sum {:.3}\n\
             # TYPE grove_boots_total counter\ngrove_boots_total {}\n\
             # TYPE grove_ready_duration_ms_sum counter\ngrove_ready_duration_ms_sum {:.3}\n",
            m.branches,
            m.branch_ms_sum,
            m.parent_pause_ms_sum,
            m.restores,
            m.restore_ms_sum,
            m.boots,
            m.ready_ms_sum
        ));
        out
    }
}

#[path = "orchestrator_network.rs"]
mod network;

#[cfg(test)]
#[path = "orchestrator_tests.rs"]
mod tests;
