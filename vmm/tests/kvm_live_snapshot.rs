//! Live (pre-copy) snapshots on real KVM with the tiny test guest dirtying memory as fast as
//! it can: the snapshot holds exactly the memory of the cut (checked against the source
//! kept paused at the cut), the source keeps running, and a snapshot that cannot finish
//! (full disk, VMM killed) leaves the source running and nothing restorable half-written.
//! Needs /dev/kvm.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm::builder::{restore, RestoreOptions, StartOptions};
use vmm::control::client::ControlClient;
use vmm::control::protocol::{
    Request, Response, SnapshotInfo, SnapshotKind, SnapshotMode, SnapshotRequest, VmRunState,
};
use vmm::{ConsoleIo, VmConfig, Vmm};

mod common;
use common::{require_kvm, Console, TempDir};

const COUNTER: GuestAddress = GuestAddress(0x30_0000);
/// The test guest's `dirty` scenario writes one word per page here, every sweep.
const DIRTY_START: u64 = 0x100_0000;
const DIRTY_PAGES: u64 = (0x300_0000 - DIRTY_START) / 4096;

fn console() -> ConsoleIo {
    ConsoleIo {
        output: Box::new(Console::default()),
        input: None,
    }
}

fn dirty_guest(memory_mib: u64, track: bool) -> Vmm {
    require_kvm();
    let mut c = VmConfig::new(env!("GROVE_TEST_GUEST"));
    c.cmdline = Some("test=dirty".into());
    c.memory_mib = memory_mib;
    // Two vCPUs (the second waits for a SIPI that never comes): a snapshot of a VM of
    // several vCPUs restores on the host that took it.
    c.vcpus = 2;
    c.rng = false;
    c.track_dirty_pages = track;
    let vm = vmm::builder::build_and_start_with(
        &c,
        console(),
        Instant::now(),
        &StartOptions { control: None },
    )
    .unwrap();
    // Wait until the guest has swept its whole range at least twice.
    let deadline = Instant::now() + Duration::from_secs(60);
    while counter(&vm) < 3 {
        assert!(
            Instant::now() < deadline,
            "the guest never started dirtying"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    vm
}

fn counter(vm: &Vmm) -> u64 {
    vm.memory().read_obj(COUNTER).unwrap()
}

fn live(dir: &Path, resume: bool) -> SnapshotRequest {
    SnapshotRequest {
        dir: dir.to_path_buf(),
        kind: SnapshotKind::Full,
        parent: None,
        resume,
        mode: SnapshotMode::Live,
    }
}

fn restore_paused(dir: &Path) -> Vmm {
    let opts = RestoreOptions {
        snapshot: dir.to_path_buf(),
        paused: true,
        ..Default::default()
    };
    restore(&opts, console(), Instant::now()).unwrap()
}

fn digest(vm: &Vmm) -> String {
    vm.shared().memory_digest().unwrap()
}

fn check_live(info: &SnapshotInfo) {
    eprintln!(
        "live snapshot: pause {:.2} ms, {:?}",
        info.pause_ms, info.precopy
    );
    assert_eq!(info.mode, SnapshotMode::Live);
    let precopy = info
        .precopy
        .as_ref()
        .expect("a live snapshot reports its passes");
    assert!(!precopy.passes.is_empty());
    // The guest rewrites its whole range in every sweep: whatever the pre-copy left, the
    // pause copied it.
    assert!(precopy.final_pages <= DIRTY_PAGES + 64, "{precopy:?}");
}

/// The paused-source variant: the source stays paused at the cut, so its memory then is
/// known exactly, and every clone must be byte for byte that memory. Done as full and as
/// diff live snapshots, with the guest dirtying memory throughout every pre-copy.
#[test]
fn a_live_snapshot_holds_exactly_the_memory_of_the_cut() {
    let tmp = TempDir::new("live-cut");
    let source = dirty_guest(64, true);
    let mut previous: Option<PathBuf> = None;
    for round in 0..4 {
        let dir = tmp.join(&format!("snap{round}"));
        let mut req = live(&dir, false);
        if let Some(parent) = previous.as_ref().filter(|_| round >= 2) {
            req.kind = SnapshotKind::Diff;
            req.parent = Some(parent.clone());
        }
        let info = source.snapshot(&req).unwrap();
        check_live(&info);
        assert_eq!(source.shared().run_state(), VmRunState::Paused);
        let at_cut = counter(&source);
        let source_digest = digest(&source);

        let clone = restore_paused(&dir);
        assert_eq!(
            digest(&clone),
            source_digest,
            "round {round} ({:?}): the clone is the source at the cut",
            req.kind
        );
        assert_eq!(clone.memory().read_obj::<u64>(COUNTER).unwrap(), at_cut);
        clone.stop();
        clone.wait();

        previous = Some(dir);
        source.resume().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while counter(&source) < at_cut + 2 {
            assert!(Instant::now() < deadline, "the source stopped dirtying");
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    source.stop();
    source.wait();
}

/// With `resume`, the source runs on; the clone starts from the cut and runs too.
#[test]
fn a_live_snapshot_leaves_the_source_running() {
    let tmp = TempDir::new("live-run");
    let source = dirty_guest(64, true);
    let dir = tmp.join("snap");
    let info = source.snapshot(&live(&dir, true)).unwrap();
    check_live(&info);
    assert_eq!(source.shared().run_state(), VmRunState::Running);
    let after = counter(&source);
    let deadline = Instant::now() + Duration::from_secs(30);
    while counter(&source) == after {
        assert!(
            Instant::now() < deadline,
            "the source stopped after the snapshot"
        );
        std::thread::sleep(Duration::from_millis(2));
    }

    let clone = restore_paused(&dir);
    let at_cut = clone.memory().read_obj::<u64>(COUNTER).unwrap();
    assert!(
        at_cut <= after,
        "the cut ({at_cut}) is before the reply ({after})"
    );
    clone.resume().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while clone.memory().read_obj::<u64>(COUNTER).unwrap() == at_cut {
        assert!(Instant::now() < deadline, "the clone does not run");
        std::thread::sleep(Duration::from_millis(2));
    }
    clone.stop();
    clone.wait();
    source.stop();
    source.wait();
}

#[test]
fn a_live_snapshot_needs_dirty_tracking() {
    let tmp = TempDir::new("live-untracked");
    let source = dirty_guest(64, false);
    let dir = tmp.join("snap");
    let err = source.snapshot(&live(&dir, true)).unwrap_err();
    assert!(err.to_string().contains("dirty page tracking"), "{err}");
    assert!(!dir.exists() && !vmm::snapshot::tmp_dir(&dir).exists());
    assert_eq!(source.shared().run_state(), VmRunState::Running);
    source.stop();
    source.wait();
}

/// A tmpfs too small for the guest's memory: the copy fails while the guest runs, the
/// source never stops, and neither the snapshot nor its temporary directory is left.
#[test]
fn a_full_disk_mid_copy_leaves_the_source_running_and_nothing_behind() {
    let tmp = TempDir::new("live-full");
    let small = tmp.join("small");
    std::fs::create_dir_all(&small).unwrap();
    let mounted = std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=8m",
            "grove-test",
            small.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(
        mounted.success(),
        "this test needs to mount a tmpfs (run as root, as CI does)"
    );
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(small.clone());

    // 32 MiB of pages the guest keeps non-zero: more than the tmpfs holds.
    let source = dirty_guest(64, true);
    let dir = small.join("snap");
    let before = counter(&source);
    let err = source.snapshot(&live(&dir, true)).unwrap_err();
    let message = format!("{err:#}: {:?}", std::error::Error::source(&err));
    assert!(message.contains("No space left"), "{message}");
    assert_eq!(source.shared().run_state(), VmRunState::Running);
    let deadline = Instant::now() + Duration::from_secs(30);
    while counter(&source) == before {
        assert!(Instant::now() < deadline, "the source stopped");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(
        std::fs::read_dir(&small).unwrap().count(),
        0,
        "nothing is left on the full disk"
    );
    // The disk has room again for a smaller VM's snapshot: the failure left no state behind
    // in the VMM either (the next live snapshot of the same VM, elsewhere, works).
    let elsewhere = tmp.join("snap");
    check_live(&source.snapshot(&live(&elsewhere, true)).unwrap());
    source.stop();
    source.wait();
}

/// `kill -9` of the VMM during the pre-copy: the snapshot directory never appears, and
/// what the copy left is an unfinished `.tmp` directory that restore refuses.
#[test]
fn killing_the_vmm_mid_copy_leaves_nothing_restorable() {
    require_kvm();
    let tmp = TempDir::new("live-kill");
    for (round, delay_ms) in [20u64, 150].into_iter().enumerate() {
        let sock = tmp.join(&format!("vm{round}.sock"));
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_grove-vmm"))
            .args(["run", "--kernel", env!("GROVE_TEST_GUEST")])
            .args(["--memory", "1024", "--no-rng", "--track-dirty-pages"])
            .args([
                "--cmdline",
                "test=dirty",
                "--control",
                sock.to_str().unwrap(),
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut client = loop {
            match ControlClient::connect(&sock) {
                Ok(c) => break c,
                Err(e) => {
                    assert!(Instant::now() < deadline, "no control socket: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        };
        let dir = tmp.join(&format!("killed{round}"));
        let req = live(&dir, true);
        let writer = std::thread::spawn(move || client.request(Request::Snapshot(req)));
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap();
        child.wait().unwrap();
        let answer = writer.join().unwrap();
        if !matches!(answer, Ok(Response::Snapshot(_))) {
            assert!(!dir.exists(), "round {round}: {answer:?}");
            let partial = vmm::snapshot::tmp_dir(&dir);
            if partial.exists() {
                let opts = RestoreOptions {
                    snapshot: partial.clone(),
                    ..Default::default()
                };
                let err = restore(&opts, console(), Instant::now()).err().unwrap();
                assert!(err.to_string().contains("unfinished"), "{err}");
            }
        }
    }
}
