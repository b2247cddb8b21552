//! The orchestrator against a fake backend: no VMs, no HTTP; real SQLite and real files in a
//! temporary data directory.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use vmm::disk::DiskFormat;

use crate::backend::{
    AgentError, BResult, Backend, Frozen, GuestCommand, GuestOutput, Prepare, Prepared,
    RestoreSpec, Running, VmSpec,
};
use crate::model::{
    CreateEnvironment, CreateImage, EnvState, ExecRequest, HookResult, SnapshotMode,
};
use crate::network::{EnvNetwork, NetworkConfig};
use crate::orchestrator::{Orchestrator, ReadySplit};
use crate::service::Service;

/// Fake VMMs: a pid per start, alive until `exit` is called.
struct Fake {
    next_pid: AtomicU32,
    alive: Mutex<HashSet<u32>>,
    exits: Mutex<HashMap<u32, (Arc<Notify>, String)>>,
    calls: Mutex<Vec<String>>,
    /// What the fake agents answer `agent_prepare` with (hook results, guest time), or why
    /// they fail.
    prepare: Mutex<Result<Prepared, AgentError>>,
    /// How long the fake agents take to answer `agent_prepare`.
    prepare_delay: Mutex<Duration>,
    /// Guest files, by (environment directory, path).
    files: Mutex<HashMap<(PathBuf, String), Vec<u8>>>,
    /// Network namespaces made and not yet removed.
    namespaces: Mutex<HashSet<String>>,
}

impl Default for Fake {
    fn default() -> Self {
        Self {
            next_pid: AtomicU32::new(0),
            alive: Mutex::default(),
            exits: Mutex::default(),
            calls: Mutex::default(),
            prepare: Mutex::new(Ok(Prepared::default())),
            prepare_delay: Mutex::new(Duration::ZERO),
            files: Mutex::default(),
            namespaces: Mutex::default(),
        }
    }
}

impl Fake {
    fn start(&self) -> Running {
        let pid = 1000 + self.next_pid.fetch_add(1, Ordering::SeqCst);
        self.alive.lock().unwrap().insert(pid);
        self.exits
            .lock()
            .unwrap()
            .insert(pid, (Arc::new(Notify::new()), String::new()));
        Running { pid, start_ms: 1.0 }
    }

    fn exit(&self, pid: u32, reason: &str) {
        self.alive.lock().unwrap().remove(&pid);
        let mut exits = self.exits.lock().unwrap();
        if let Some(e) = exits.get_mut(&pid) {
            e.1 = reason.to_string();
            e.0.notify_one();
        }
    }

    fn log(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }
}

/// The backend handed to the orchestrator, sharing the fake with the test.
struct FakeBackend(Arc<Fake>);

impl Backend for FakeBackend {
    fn create_overlay(&self, path: &Path, backing: &Path, _format: DiskFormat) -> BResult<()> {
        self.0.log(format!("overlay {}", path.display()));
        std::fs::write(path, backing.to_string_lossy().as_bytes()).map_err(|e| e.to_string())
    }

    async fn boot(&self, spec: &VmSpec) -> BResult<Running> {
        self.0.log(format!(
            "boot {} netns={:?}",
            spec.dir.display(),
            spec.netns
        ));
        Ok(self.0.start())
    }

    async fn restore(&self, spec: &RestoreSpec) -> BResult<Running> {
        self.0.log(format!(
            "restore {} {} netns={:?}",
            spec.dir.display(),
            spec.snapshot.display(),
            spec.netns
        ));
        std::fs::write(&spec.overlay, b"clone").map_err(|e| e.to_string())?;
        Ok(self.0.start())
    }

    async fn snapshot(&self, dir: &Path, into: &Path, mode: SnapshotMode) -> BResult<Frozen> {
        self.0.log(format!("snapshot {}", dir.display()));
        std::fs::create_dir_all(into).map_err(|e| e.to_string())?;
        let name = into.file_name().unwrap().to_string_lossy().into_owned();
        let frozen = dir.join(format!("disk@{name}.qcow2"));
        std::fs::write(&frozen, b"frozen").map_err(|e| e.to_string())?;
        // State and memory files like a VMM's, so that the daemon can sign and verify them.
        crate::signing::tests::write_test_snapshot(into, &frozen).map_err(|e| e.to_string())?;
        Ok(Frozen {
            pause_ms: if mode == SnapshotMode::Live { 0.5 } else { 2.0 },
            mode,
            frozen_layer: Some(frozen),
        })
    }

    async fn pause(&self, _dir: &Path) -> BResult<()> {
        Ok(())
    }

    async fn resume(&self, _dir: &Path) -> BResult<()> {
        Ok(())
    }

    async fn stop(&self, _dir: &Path, pid: u32) -> BResult<()> {
        self.0.exit(pid, "the VM was stopped");
        Ok(())
    }

    async fn wait_exit(&self, _dir: &Path, pid: u32) -> String {
        let notify = self.0.exits.lock().unwrap().get(&pid).map(|e| e.0.clone());
        if let Some(n) = notify {
            if self.0.alive.lock().unwrap().contains(&pid) {
                n.notified().await;
            }
        }
        self.0
            .exits
            .lock()
            .unwrap()
            .get(&pid)
            .map(|e| e.1.clone())
            .unwrap_or_default()
    }

    fn console_input(&self, dir: &Path, input: &[u8]) -> BResult<()> {
        self.0.log(format!(
            "input {} {}",
            dir.display(),
            String::from_utf8_lossy(input)
        ));
        Ok(())
    }

    fn is_running(&self, _dir: &Path, pid: u32) -> bool {
        self.0.alive.lock().unwrap().contains(&pid)
    }

    fn remove(&self, path: &Path) {
        if path.is_dir() {
            let _ = std::fs::remove_dir_all(path);
        } else {
            let _ = std::fs::remove_file(path);
        }
    }

    async fn agent_prepare(&self, dir: &Path, prep: &Prepare) -> Result<Prepared, AgentError> {
        self.0.log(format!(
            "prepare {} {} {} entropy={}",
            dir.display(),
            prep.identity.hostname,
            prep.identity.machine_id,
            prep.clone.as_ref().map_or(0, |c| c.entropy.len())
        ));
        let delay = *self.0.prepare_delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        self.0.prepare.lock().unwrap().clone()
    }

    async fn agent_exec(&self, dir: &Path, cmd: GuestCommand) -> Result<GuestOutput, AgentError> {
        self.0
            .log(format!("exec {} {}", dir.display(), cmd.argv.join(" ")));
        Ok(GuestOutput {
            exit_code: Some(3),
            stdout: cmd.argv.join(" ").into_bytes(),
            stderr: cmd.stdin,
            ..GuestOutput::default()
        })
    }

    async fn agent_read_file(&self, dir: &Path, path: &str) -> Result<Vec<u8>, AgentError> {
        self.0
            .files
            .lock()
            .unwrap()
            .get(&(dir.to_path_buf(), path.to_string()))
            .cloned()
            .ok_or_else(|| AgentError::Guest {
                code: "not_found".into(),
                message: format!("{path}: no such file"),
            })
    }

    async fn agent_write_file(
        &self,
        dir: &Path,
        path: &str,
        data: Vec<u8>,
        _mode: Option<u32>,
    ) -> Result<(), AgentError> {
        self.0
            .files
            .lock()
            .unwrap()
            .insert((dir.to_path_buf(), path.to_string()), data);
        Ok(())
    }
    fn setup_network(&self, net: &EnvNetwork) -> BResult<()> {
        self.0.log(format!(
            "net-up {} {} outbound={}",
            net.netns, net.ns_addr, net.allow_outbound
        ));
        self.0.namespaces.lock().unwrap().insert(net.netns.clone());
        Ok(())
    }

    fn teardown_network(&self, net: &EnvNetwork) -> BResult<()> {
        self.0.log(format!("net-down {}", net.netns));
        self.0.namespaces.lock().unwrap().remove(&net.netns);
        Ok(())
    }

    fn network_namespaces(&self, prefix: &str) -> Vec<String> {
        let namespaces = self.0.namespaces.lock().unwrap();
        namespaces
            .iter()
            .filter(|n| n.starts_with(prefix))
            .cloned()
            .collect()
    }
}

struct Setup {
    data: PathBuf,
    fake: Arc<Fake>,
    orch: Arc<Orchestrator<FakeBackend>>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

fn setup(tag: &str) -> Setup {
    let data = std::env::temp_dir().join(format!("grove-orch-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data).unwrap();
    let fake = Arc::new(Fake::default());
    let orch = open(&data, &fake);
    Setup { data, fake, orch }
}

fn open(data: &Path, fake: &Arc<Fake>) -> Arc<Orchestrator<FakeBackend>> {
    open_net(data, fake, None)
}

fn open_net(
    data: &Path,
    fake: &Arc<Fake>,
    net: Option<NetworkConfig>,
) -> Arc<Orchestrator<FakeBackend>> {
    let files = data.join("image");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::write(files.join("vmlinux"), b"k").unwrap();
    std::fs::write(files.join("rootfs.ext4"), b"r").unwrap();
    let (k, r) = (files.join("vmlinux"), files.join("rootfs.ext4"));
    Orchestrator::open_with_network(
        data,
        FakeBackend(fake.clone()),
        Arc::new(move || Ok((k.clone(), r.clone()))),
        net,
    )
    .unwrap()
}

async fn with_image(s: &Setup) {
    s.orch
        .create_image(CreateImage {
            name: "default".into(),
            kernel: None,
            rootfs: None,
            initrd: None,
            build: Some("default".into()),
        })
        .await
        .unwrap();
}

fn boot_req(name: &str) -> CreateEnvironment {
    CreateEnvironment {
        name: name.into(),
        image: Some("default".into()),
        from: None,
        vcpus: None,
        memory_mib: None,
        agent: None,
        publish: Vec::new(),
        allow_outbound: None,
        snapshot_mode: None,
    }
}

fn branch_req(name: &str, from: &str) -> CreateEnvironment {
    CreateEnvironment {
        name: name.into(),
        image: None,
        from: Some(from.into()),
        vcpus: None,
        memory_mib: None,
        agent: None,
        publish: Vec::new(),
        allow_outbound: None,
        snapshot_mode: None,
    }
}

/// Files under `dir`, relative, sorted.
fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn boot_branch_and_delete_leave_nothing_behind() {
    let s = setup("lifecycle");
    with_image(&s).await;
    let main = s.orch.create_environment(boot_req("main")).await.unwrap();
    assert_eq!(main.environment.state, EnvState::Running);
    assert!(main.branch.is_none());
    let x = s
        .orch
        .create_environment(branch_req("feature/x", "main"))
        .await
        .unwrap();
    assert_eq!(x.environment.parent.as_deref(), Some("main"));
    assert_eq!(x.environment.snapshot.as_deref(), Some("main@1"));
    let t = x.branch.unwrap();
    assert_eq!(
        t.snapshot_mode,
        SnapshotMode::Live,
        "branches are live by default"
    );
    assert_eq!(
        t.parent_pause_ms, 0.5,
        "the backend's pause for a live snapshot"
    );
    let paused = s
        .orch
        .create_environment(CreateEnvironment {
            snapshot_mode: Some(SnapshotMode::Paused),
            ..branch_req("feature/paused", "main")
        })
        .await
        .unwrap();
    let t = paused.branch.unwrap();
    assert_eq!(
        (t.snapshot_mode, t.parent_pause_ms),
        (SnapshotMode::Paused, 2.0)
    );
    s.orch
        .delete_environment("feature/paused", false)
        .await
        .unwrap();
    let list = s.orch.list_environments().await.unwrap();
    let names: Vec<&str> = list.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["main", "feature/x"]);

    // main's frozen layer is what feature/x sits on: main cannot go without force.
    let e = s.orch.delete_environment("main", false).await.unwrap_err();
    assert_eq!(e.status, 409);
    s.orch.delete_environment("main", true).await.unwrap();
    let x = s.orch.get_environment("feature/x").await.unwrap();
    assert_eq!(x.parent, None);
    let left = files(&s.data.join("envs"));
    assert!(left.iter().any(|f| f.contains("disk@")), "{left:?}");
    s.orch.delete_environment("feature/x", false).await.unwrap();
    assert_eq!(files(&s.data.join("envs")), Vec::<String>::new());
    assert_eq!(files(&s.data.join("snapshots")), Vec::<String>::new());
    assert!(s.orch.store().envs().unwrap().is_empty());
    assert!(s.orch.store().snapshots().unwrap().is_empty());
    assert!(s.orch.store().layers().unwrap().is_empty());
    assert!(s.fake.alive.lock().unwrap().is_empty(), "every VMM stopped");
}

#[tokio::test]
async fn bad_requests_are_4xx() {
    let s = setup("errors");
    let e = s
        .orch
        .create_environment(boot_req("main"))
        .await
        .unwrap_err();
    assert_eq!((e.status, e.code), (404, "not_found"));
    with_image(&s).await;
    for (req, status) in [
        (boot_req("../etc"), 400),
        (boot_req(""), 400),
        (
            CreateEnvironment {
                from: Some("x".into()),
                ..boot_req("y")
            },
            400,
        ),
        (
            CreateEnvironment {
                vcpus: Some(0),
                ..boot_req("y")
            },
            400,
        ),
        (
            CreateEnvironment {
                memory_mib: Some(u64::MAX),
                ..boot_req("y")
            },
            400,
        ),
        (branch_req("y", "nope"), 404),
    ] {
        let e = s.orch.create_environment(req.clone()).await.unwrap_err();
        assert_eq!(e.status, status, "{req:?}: {e}");
    }
    s.orch.create_environment(boot_req("main")).await.unwrap();
    let e = s
        .orch
        .create_environment(boot_req("main"))
        .await
        .unwrap_err();
    assert_eq!(e.status, 409);
    let e = s.orch.delete_image("default").await.unwrap_err();
    assert_eq!(e.status, 409);
    let e = s.orch.resume("main").await.unwrap_err();
    assert_eq!(e.status, 409);
    s.orch.pause("main").await.unwrap();
    let e = s.orch.pause("main").await.unwrap_err();
    assert_eq!(e.status, 409);
    let e = s.orch.sync("main", None).await.unwrap_err();
    assert_eq!(e.status, 409);
    // No half-made environment after the failures.
    assert_eq!(s.orch.list_environments().await.unwrap().len(), 1);
}

#[tokio::test]
async fn sync_reclones_from_the_parent_and_drops_the_old_snapshot() {
    let s = setup("sync");
    with_image(&s).await;
    s.orch.create_environment(boot_req("main")).await.unwrap();
    s.orch
        .create_environment(branch_req("staging", "main"))
        .await
        .unwrap();
    let synced = s.orch.sync("staging", None).await.unwrap();
    assert_eq!(synced.environment.snapshot.as_deref(), Some("main@2"));
    assert_eq!(synced.environment.state, EnvState::Running);
    // main@1 belongs to main, which still exists: kept. Only one VMM per environment runs.
    assert_eq!(s.fake.alive.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn concurrent_branches_of_one_parent_all_succeed() {
    let s = setup("concurrent");
    with_image(&s).await;
    s.orch.create_environment(boot_req("main")).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let o = s.orch.clone();
        tasks.push(tokio::spawn(async move {
            o.create_environment(branch_req(&format!("b{i}"), "main"))
                .await
        }));
    }
    let mut snapshots = HashSet::new();
    for t in tasks {
        let c = t.await.unwrap().unwrap();
        assert!(snapshots.insert(c.environment.snapshot.unwrap()));
    }
    assert_eq!(snapshots.len(), 8);
}

#[tokio::test]
async fn a_vmm_exit_is_recorded_and_a_restart_reattaches_or_reports() {
    let s = setup("restart");
    with_image(&s).await;
    let a = s.orch.create_environment(boot_req("a")).await.unwrap();
    let b = s.orch.create_environment(boot_req("b")).await.unwrap();
    s.fake.exit(a.environment.pid.unwrap(), "guest powered off");
    for _ in 0..100 {
        if s.orch.get_environment("a").await.unwrap().state == EnvState::Stopped {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let a = s.orch.get_environment("a").await.unwrap();
    assert_eq!(a.state, EnvState::Stopped);
    assert_eq!(a.exit_reason.as_deref(), Some("guest powered off"));

    // "Restart": a new orchestrator on the same data; b's VMM lives on, c's died meanwhile.
    let c = s.orch.create_environment(boot_req("c")).await.unwrap();
    s.fake
        .alive
        .lock()
        .unwrap()
        .remove(&c.environment.pid.unwrap());
    std::fs::create_dir_all(s.data.join("envs/999")).unwrap();
    let again = open(&s.data, &s.fake);
    again.recover().unwrap();
    assert_eq!(
        again.get_environment("b").await.unwrap().state,
        EnvState::Running
    );
    assert_eq!(
        b.environment.pid,
        again.get_environment("b").await.unwrap().pid
    );
    let c = again.get_environment("c").await.unwrap();
    assert_eq!(c.state, EnvState::Failed);
    assert!(c.exit_reason.unwrap().contains("while groved was down"));
    assert!(
        !s.data.join("envs/999").exists(),
        "stray directories are swept"
    );
}

#[tokio::test]
async fn events_report_state_changes() {
    let s = setup("events");
    with_image(&s).await;
    let mut rx = s.orch.subscribe();
    s.orch.create_environment(boot_req("main")).await.unwrap();
    let first = rx.recv().await.unwrap();
    assert_eq!(
        (first.name.as_str(), first.action.as_str()),
        ("main", "created")
    );
    let second = rx.recv().await.unwrap();
    assert_eq!(second.state, Some(EnvState::Running));
    assert!(s
        .orch
        .metrics()
        .contains("grove_environments{state=\"running\"} 1"));
}

fn hook(name: &str, code: Option<i32>) -> HookResult {
    HookResult {
        name: name.into(),
        exit_code: code,
        output: format!("{name} said hi\n"),
    }
}

fn hooks(hooks: Vec<HookResult>) -> Prepared {
    Prepared {
        hooks,
        guest_us: None,
        guest_wait_us: None,
    }
}

#[tokio::test]
async fn readiness_splits_the_guests_own_work_from_what_grove_added() {
    let s = setup("ready-split");
    with_image(&s).await;
    s.orch.create_environment(boot_req("main")).await.unwrap();
    // The agent takes 30 ms in all, 12.5 ms of it its own handling.
    *s.fake.prepare_delay.lock().unwrap() = Duration::from_millis(30);
    *s.fake.prepare.lock().unwrap() = Ok(Prepared {
        hooks: Vec::new(),
        guest_us: Some(12_500),
        guest_wait_us: Some(20_000),
    });
    let x = s
        .orch
        .create_environment(branch_req("x", "main"))
        .await
        .unwrap();
    let ready = x.ready.expect("ready");
    assert!(ready.ready_ms >= 30.0, "{ready:?}");
    assert_eq!(ready.guest_ms, Some(12.5));
    let added = ready.added_ms.expect("added");
    assert!((added + 12.5 - ready.ready_ms).abs() < 1e-9, "{ready:?}");
    // The VMM waited 20 ms on the guest: 7.5 ms of it outside the agent's steps, the rest
    // of the whole is the host's.
    assert_eq!(ready.guest_wait_ms, Some(20.0));
    assert_eq!(ready.guest_transport_ms, Some(7.5));
    let host = ready.host_ms.expect("host");
    assert!((host + 20.0 - ready.ready_ms).abs() < 1e-9, "{ready:?}");
    assert!(
        (host + 7.5 - added).abs() < 1e-9,
        "added = host + transport: {ready:?}"
    );

    // A guest claiming more than the whole is capped: Grove's share is never negative.
    *s.fake.prepare.lock().unwrap() = Ok(Prepared {
        hooks: Vec::new(),
        guest_us: Some(u64::MAX),
        guest_wait_us: None,
    });
    let y = s
        .orch
        .create_environment(branch_req("y", "main"))
        .await
        .unwrap();
    let ready = y.ready.expect("ready");
    assert_eq!(ready.guest_ms, Some(ready.ready_ms));
    assert_eq!(ready.added_ms, Some(0.0));
    // A VMM that gave no figures: no host or transport share.
    assert_eq!((ready.guest_wait_ms, ready.host_ms), (None, None));
    assert_eq!(ready.guest_transport_ms, None);

    // An agent that reports no times: neither figure.
    *s.fake.prepare.lock().unwrap() = Ok(Prepared::default());
    let z = s
        .orch
        .create_environment(branch_req("z", "main"))
        .await
        .unwrap();
    let ready = z.ready.expect("ready");
    assert_eq!((ready.guest_ms, ready.added_ms), (None, None));
}

#[tokio::test]
async fn the_agent_makes_boots_and_branches_ready_and_unique() {
    let s = setup("ready");
    with_image(&s).await;
    let main = s.orch.create_environment(boot_req("main")).await.unwrap();
    let ready = main.ready.expect("a boot waits for the agent");
    assert_eq!((ready.hostname.as_str(), ready.reseeded), ("main", false));
    *s.fake.prepare.lock().unwrap() = Ok(hooks(vec![hook("10-scrub", Some(0))]));
    let x = s
        .orch
        .create_environment(branch_req("Feature/X_1", "main"))
        .await
        .unwrap();
    let ready = x.ready.expect("a branch waits for the agent");
    assert_eq!(ready.hostname, "feature-x-1");
    assert!(ready.reseeded);
    assert_eq!(ready.hooks, vec![hook("10-scrub", Some(0))]);
    let y = s
        .orch
        .create_environment(branch_req("y", "main"))
        .await
        .unwrap();
    assert!(y.ready.is_some());

    // Boots get an identity only; clones 64 bytes of entropy as well; every machine id
    // differs.
    let calls: Vec<String> = s
        .fake
        .calls
        .lock()
        .unwrap()
        .iter()
        .filter(|c| c.starts_with("prepare "))
        .cloned()
        .collect();
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert!(calls[0].ends_with(" entropy=0") && calls[0].contains(" main "));
    assert!(calls[1].ends_with(" entropy=64") && calls[1].contains(" feature-x-1 "));
    let ids: HashSet<&str> = calls.iter().map(|c| c.split(' ').nth(3).unwrap()).collect();
    assert_eq!(ids.len(), 3);
    assert!(ids.iter().all(|id| id.len() == 32));

    // `agent: false` skips it all.
    let mut req = boot_req("plain");
    req.agent = Some(false);
    let plain = s.orch.create_environment(req).await.unwrap();
    assert!(plain.ready.is_none());
}

#[tokio::test]
async fn a_clone_that_cannot_be_made_ready_is_not_kept() {
    let s = setup("unready");
    with_image(&s).await;
    s.orch.create_environment(boot_req("main")).await.unwrap();

    *s.fake.prepare.lock().unwrap() = Ok(hooks(vec![
        hook("10-ok", Some(0)),
        hook("20-scrub", Some(1)),
    ]));
    let e = s
        .orch
        .create_environment(branch_req("x", "main"))
        .await
        .unwrap_err();
    assert_eq!((e.status, e.code), (422, "hook_failed"));
    assert!(e.message.contains("20-scrub") && e.message.contains("exit status 1"));
    assert!(e.message.contains("20-scrub said hi"), "{}", e.message);

    *s.fake.prepare.lock().unwrap() = Err(AgentError::Unavailable("connection refused".into()));
    let e = s
        .orch
        .create_environment(branch_req("x", "main"))
        .await
        .unwrap_err();
    assert_eq!((e.status, e.code), (504, "agent_unavailable"));
    // Neither clone is left: no row, no VMM, no files.
    let names: Vec<String> = s
        .orch
        .list_environments()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["main"]);
    assert_eq!(s.fake.alive.lock().unwrap().len(), 1, "only main runs");
    // A boot whose agent never answers fails the same way.
    let e = s
        .orch
        .create_environment(boot_req("other"))
        .await
        .unwrap_err();
    assert_eq!(e.status, 504);
    assert_eq!(s.fake.alive.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn exec_and_files_go_through_the_agent_of_a_running_environment() {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let s = setup("exec");
    with_image(&s).await;
    s.orch.create_environment(boot_req("main")).await.unwrap();
    let req = |argv: &[&str]| ExecRequest {
        argv: argv.iter().map(|a| a.to_string()).collect(),
        env: Default::default(),
        cwd: None,
        stdin: Some(b64.encode(b"in")),
        timeout_ms: None,
    };
    let out = s.orch.exec("main", req(&["echo", "hi"])).await.unwrap();
    assert_eq!(out.exit_code, Some(3));
    assert_eq!(b64.decode(&out.stdout).unwrap(), b"echo hi");
    assert_eq!(b64.decode(&out.stderr).unwrap(), b"in");
    assert!(!out.truncated);

    for bad in [
        ExecRequest {
            stdin: Some("not base64!".into()),
            ..req(&["x"])
        },
        req(&[]),
        req(&[""]),
        ExecRequest {
            timeout_ms: Some(0),
            ..req(&["x"])
        },
        ExecRequest {
            timeout_ms: Some(3_600_001),
            ..req(&["x"])
        },
    ] {
        let e = s.orch.exec("main", bad.clone()).await.unwrap_err();
        assert_eq!(e.status, 400, "{bad:?}");
    }
    assert_eq!(
        s.orch.exec("nope", req(&["x"])).await.unwrap_err().status,
        404
    );

    let e = s.orch.read_file("main", "/etc/x").await.unwrap_err();
    assert_eq!((e.status, e.code), (404, "guest_error"));
    s.orch
        .write_file("main", "/etc/x", b"data".to_vec(), Some(0o600))
        .await
        .unwrap();
    assert_eq!(s.orch.read_file("main", "/etc/x").await.unwrap(), b"data");
    for path in ["etc/x", "", "/a\0b"] {
        let e = s.orch.read_file("main", path).await.unwrap_err();
        assert_eq!(e.status, 400, "{path:?}");
    }
    let e = s
        .orch
        .write_file("main", "/x", Vec::new(), Some(0o10000))
        .await
        .unwrap_err();
    assert_eq!(e.status, 400);

    // Only a running environment's agent is asked.
    s.orch.pause("main").await.unwrap();
    let e = s.orch.exec("main", req(&["x"])).await.unwrap_err();
    assert_eq!(e.status, 409);
    assert_eq!(
        s.orch.read_file("main", "/etc/x").await.unwrap_err().status,
        409
    );
}

/// A networked daemon whose pool holds two environments.
fn setup_net(tag: &str) -> Setup {
    let mut s = setup(tag);
    s.orch = open_net(&s.data, &s.fake, Some(net_config()));
    s
}

fn net_config() -> NetworkConfig {
    NetworkConfig {
        pool: "10.99.0.0/29".parse().unwrap(),
        netns_prefix: "grove-t-".into(),
        ..NetworkConfig::default()
    }
}

fn calls(s: &Setup, prefix: &str) -> Vec<String> {
    let calls = s.fake.calls.lock().unwrap();
    calls
        .iter()
        .filter(|c| c.starts_with(prefix))
        .cloned()
        .collect()
}

async fn refused(addr: &str) -> bool {
    tokio::net::TcpStream::connect(addr).await.is_err()
}

#[tokio::test]
async fn networked_environments_get_an_address_a_namespace_and_ports() {
    let s = setup_net("net");
    with_image(&s).await;
    let main = s
        .orch
        .create_environment(CreateEnvironment {
            publish: vec![8080, 5432],
            ..boot_req("main")
        })
        .await
        .unwrap()
        .environment;
    assert_eq!(main.address.as_deref(), Some("10.99.0.2"));
    assert_eq!(
        main.allow_outbound,
        Some(true),
        "a boot may go out by default"
    );
    let ports: Vec<u16> = main.ports.iter().map(|p| p.guest_port).collect();
    assert_eq!(ports, [5432, 8080]);
    for p in &main.ports {
        assert!(p.host_addr.starts_with("127.0.0.1:"), "{p:?}");
        // The daemon listens there (the fake guest is unreachable, so the proxy hangs up).
        tokio::net::TcpStream::connect(&p.host_addr).await.unwrap();
    }
    let boot = calls(&s, "boot ");
    assert!(boot[0].ends_with("netns=Some(\"grove-t-1\")"), "{boot:?}");
    assert_eq!(
        calls(&s, "net-up"),
        ["net-up grove-t-1 10.99.0.2 outbound=true"]
    );

    // A branch: its own namespace and address, no outbound unless asked, the guest the same.
    let x = s
        .orch
        .create_environment(CreateEnvironment {
            publish: vec![8080],
            ..branch_req("x", "main")
        })
        .await
        .unwrap()
        .environment;
    assert_eq!(x.address.as_deref(), Some("10.99.0.6"));
    assert_eq!(x.allow_outbound, Some(false));
    assert_ne!(x.ports[0].host_addr, main.ports[1].host_addr);
    let restore = calls(&s, "restore ");
    assert!(
        restore[0].ends_with("netns=Some(\"grove-t-2\")"),
        "{restore:?}"
    );
    assert_eq!(s.orch.get_environment("x").await.unwrap(), x);
    let listed = s.orch.list_environments().await.unwrap();
    assert_eq!(listed[1], x);

    // The pool is full: refused, and nothing of the attempt stays.
    let e = s
        .orch
        .create_environment(branch_req("y", "main"))
        .await
        .unwrap_err();
    assert_eq!(e.status, 409, "{e}");
    assert!(s.orch.get_environment("y").await.is_err());
    let e = s.orch.create_environment(boot_req("y")).await.unwrap_err();
    assert_eq!(e.status, 409, "{e}");
    assert!(s.orch.get_environment("y").await.is_err());
    assert_eq!(s.fake.namespaces.lock().unwrap().len(), 2);

    // Sync keeps the namespace, the address and the ports.
    let synced = s.orch.sync("x", None).await.unwrap().environment;
    assert_eq!((synced.address, synced.ports), (x.address, x.ports.clone()));
    let restore = calls(&s, "restore ");
    assert!(
        restore[1].ends_with("netns=Some(\"grove-t-2\")"),
        "{restore:?}"
    );

    // Delete: the namespace goes, the ports close, the address is free again.
    s.orch.delete_environment("x", false).await.unwrap();
    assert!(refused(&x.ports[0].host_addr).await);
    assert!(!s.fake.namespaces.lock().unwrap().contains("grove-t-2"));
    let z = s
        .orch
        .create_environment(CreateEnvironment {
            allow_outbound: Some(true),
            ..branch_req("z", "main")
        })
        .await
        .unwrap()
        .environment;
    assert_eq!(z.address.as_deref(), Some("10.99.0.6"));
    assert_eq!(z.allow_outbound, Some(true));
}

#[tokio::test]
async fn network_requests_are_checked() {
    let s = setup("net-off");
    with_image(&s).await;
    for req in [
        CreateEnvironment {
            publish: vec![80],
            ..boot_req("a")
        },
        CreateEnvironment {
            allow_outbound: Some(false),
            ..boot_req("a")
        },
    ] {
        let e = s.orch.create_environment(req).await.unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("--network"), "{e}");
    }
    let main = s.orch.create_environment(boot_req("main")).await.unwrap();
    assert_eq!(main.environment.address, None);
    assert_eq!(main.environment.allow_outbound, None);
    assert!(main.environment.ports.is_empty());
    assert!(calls(&s, "boot ")[0].ends_with("netns=None"));

    let s = setup_net("net-bad");
    with_image(&s).await;
    for publish in [vec![0], vec![80, 80], (1..=33).collect()] {
        let req = CreateEnvironment {
            publish,
            ..boot_req("a")
        };
        let e = s.orch.create_environment(req).await.unwrap_err();
        assert_eq!(e.status, 400, "{e}");
    }
    assert!(s.fake.namespaces.lock().unwrap().is_empty());
    assert!(s.orch.store().networks().unwrap().is_empty());
}

#[tokio::test]
async fn a_restart_publishes_ports_again_and_sweeps_stray_namespaces() {
    let s = setup_net("net-restart");
    with_image(&s).await;
    let main = s
        .orch
        .create_environment(CreateEnvironment {
            publish: vec![80],
            ..boot_req("main")
        })
        .await
        .unwrap()
        .environment;
    let addr = main.ports[0].host_addr.clone();
    // The old daemon goes away with its listeners; a namespace without an environment and
    // one of another daemon's prefix are on the host.
    s.orch.proxies.remove(1);
    assert!(refused(&addr).await);
    s.fake
        .namespaces
        .lock()
        .unwrap()
        .extend(["grove-t-77".to_string(), "other-3".to_string()]);
    let again = open_net(&s.data, &s.fake, Some(net_config()));
    again.recover().unwrap();
    let main = again.get_environment("main").await.unwrap();
    assert_eq!(main.ports[0].host_addr, addr, "the same preview address");
    tokio::net::TcpStream::connect(&addr).await.unwrap();
    let left: HashSet<String> = s.fake.namespaces.lock().unwrap().clone();
    let expected: HashSet<String> = ["grove-t-1", "other-3"].map(String::from).into();
    assert_eq!(left, expected);
}

fn setup_signed(tag: &str) -> Setup {
    let s = setup(tag);
    let key = vmm::snapshot::auth::SnapshotKey::from_bytes(vec![0x5e; 32]).unwrap();
    s.orch
        .set_snapshot_signing(crate::signing::SnapshotSigning::new(key, true))
        .unwrap();
    s
}

/// Changes every snapshot right after the daemon signed it, with `tamper`.
fn tamper_after_signing(s: &Setup, tamper: impl Fn(&Path) + Send + 'static) {
    let signing = s.orch.signing.get().unwrap();
    *signing.after_sign.lock().unwrap() = Some(Box::new(tamper));
}

fn restores(s: &Setup) -> usize {
    calls(s, "restore").len()
}

#[tokio::test]
async fn a_signing_daemon_signs_every_snapshot_and_restores_verified_ones() {
    let s = setup_signed("signed");
    with_image(&s).await;
    s.orch.create_environment(boot_req("main")).await.unwrap();
    let x = s
        .orch
        .create_environment(branch_req("x", "main"))
        .await
        .unwrap();
    assert_eq!(x.environment.state, EnvState::Running);
    s.orch.sync("x", None).await.unwrap();
    s.orch.snapshot("main", None).await.unwrap();
    let key = vmm::snapshot::auth::SnapshotKey::from_bytes(vec![0x5e; 32]).unwrap();
    let snaps = s.orch.store().snapshots().unwrap();
    assert!(!snaps.is_empty());
    for snap in snaps {
        let m = vmm::snapshot::auth::verify(&snap.dir, &key).unwrap();
        assert_eq!(m.layers.len(), 1, "the frozen layer is covered");
    }
}

#[tokio::test]
async fn a_branch_of_a_changed_or_unsigned_snapshot_is_refused() {
    let s = setup_signed("tampered-branch");
    with_image(&s).await;
    s.orch.create_environment(boot_req("main")).await.unwrap();
    let before = restores(&s);
    tamper_after_signing(&s, |dir| {
        let mut m = std::fs::read(dir.join("memory.bin")).unwrap();
        m[7] ^= 1;
        std::fs::write(dir.join("memory.bin"), m).unwrap();
    });
    let e = s
        .orch
        .create_environment(branch_req("x", "main"))
        .await
        .unwrap_err();
    assert_eq!((e.status, e.code), (500, "snapshot_unverified"), "{e}");
    assert!(e.message.contains("memory.bin"), "{e}");
    assert_eq!(restores(&s), before, "nothing was restored");
    let names: Vec<String> = s
        .orch
        .list_environments()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["main"], "the clone was removed");

    tamper_after_signing(&s, |dir| {
        std::fs::remove_file(dir.join("manifest.hmac")).unwrap();
    });
    let e = s
        .orch
        .create_environment(branch_req("y", "main"))
        .await
        .unwrap_err();
    assert_eq!(e.code, "snapshot_unverified");
    assert!(e.message.contains("not signed"), "{e}");
    assert_eq!(restores(&s), before);
}

#[tokio::test]
async fn a_sync_to_a_changed_snapshot_leaves_the_environment_untouched() {
    let s = setup_signed("tampered-sync");
    with_image(&s).await;
    s.orch.create_environment(boot_req("main")).await.unwrap();
    s.orch
        .create_environment(branch_req("staging", "main"))
        .await
        .unwrap();
    let row = s.orch.store().env("staging").unwrap().unwrap();
    let before = restores(&s);
    tamper_after_signing(&s, |dir| {
        let text = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
        std::fs::write(dir.join("manifest.json"), text.replacen("4096", "4097", 1)).unwrap();
    });
    let e = s.orch.sync("staging", None).await.unwrap_err();
    assert_eq!((e.status, e.code), (500, "snapshot_unverified"), "{e}");
    assert!(e.message.contains("bad signature"), "{e}");
    assert_eq!(restores(&s), before, "nothing was restored");
    let after = s.orch.store().env("staging").unwrap().unwrap();
    assert_eq!(
        (
            after.state,
            after.pid,
            after.snapshot.clone(),
            after.base_layer.clone()
        ),
        (
            row.state,
            row.pid,
            row.snapshot.clone(),
            row.base_layer.clone()
        ),
        "staging runs on as before"
    );
    assert!(s.fake.alive.lock().unwrap().contains(&row.pid.unwrap()));
}

#[test]
fn the_ready_time_splits_into_host_guest_transport_and_guest_work() {
    let s = ReadySplit::of(300.0, Some(10_000), Some(295_000));
    assert_eq!(s.guest_ms, Some(10.0));
    assert_eq!(s.added_ms, Some(290.0));
    assert_eq!(s.guest_wait_ms, Some(295.0));
    assert_eq!(s.host_ms, Some(5.0));
    assert_eq!(s.guest_transport_ms, Some(285.0));
    // A wait beyond the whole is capped; an agent claiming more than the wait leaves no
    // transport, never a negative one.
    let s = ReadySplit::of(100.0, Some(90_000), Some(500_000));
    assert_eq!((s.guest_wait_ms, s.host_ms), (Some(100.0), Some(0.0)));
    assert_eq!(s.guest_transport_ms, Some(10.0));
    let s = ReadySplit::of(100.0, Some(60_000), Some(50_000));
    assert_eq!(s.guest_transport_ms, Some(0.0));
    // Without the agent's times there is no transport figure, but the host's still is.
    let s = ReadySplit::of(100.0, None, Some(40_000));
    assert_eq!(
        (s.guest_ms, s.added_ms, s.guest_transport_ms),
        (None, None, None)
    );
    assert_eq!(s.host_ms, Some(60.0));
    // Without the VMM's: the figures there were before.
    let s = ReadySplit::of(100.0, Some(40_000), None);
    assert_eq!((s.guest_ms, s.added_ms), (Some(40.0), Some(60.0)));
    assert_eq!(
        (s.guest_wait_ms, s.host_ms, s.guest_transport_ms),
        (None, None, None)
    );
}
