//! Snapshot, restore and clones on real KVM with the tiny test guest (tests/guest): the
//! guest's counter continues after a restore, a fresh restore is byte-identical to the
//! source at the snapshot, clones are independent, and corrupt snapshots are refused
//! before any vCPU runs. Needs /dev/kvm.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm::builder::{restore, RestoreOptions, StartOptions};
use vmm::control::client::ControlClient;
use vmm::control::protocol::{Request, Response, SnapshotKind, SnapshotRequest, VmRunState};
use vmm::{ConsoleIo, VmConfig, VmExit, Vmm};

mod common;
use common::{require_kvm, Console, TempDir};

const COUNTER: GuestAddress = GuestAddress(0x30_0000);

fn console() -> ConsoleIo {
    ConsoleIo {
        output: Box::new(Console::default()),
        input: None,
    }
}

fn tempdir(name: &str) -> TempDir {
    require_kvm();
    TempDir::new(name)
}

fn counter_guest(control: Option<PathBuf>) -> Vmm {
    counter_guest_with(control, false)
}

fn counter_guest_with(control: Option<PathBuf>, track_dirty_pages: bool) -> Vmm {
    let mut c = VmConfig::new(env!("GROVE_TEST_GUEST"));
    c.cmdline = Some("test=counter".into());
    c.memory_mib = 32;
    c.rng = false;
    c.track_dirty_pages = track_dirty_pages;
    vmm::builder::build_and_start_with(&c, console(), Instant::now(), &StartOptions { control })
        .unwrap()
}

fn counter(vm: &Vmm) -> u64 {
    vm.memory().read_obj(COUNTER).unwrap()
}

fn wait_change(vm: &Vmm, from: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = counter(vm);
        if now != from || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn snapshot_req(dir: &Path, resume: bool) -> SnapshotRequest {
    SnapshotRequest {
        dir: dir.to_path_buf(),
        kind: Default::default(),
        parent: None,
        resume,
        mode: Default::default(),
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

#[test]
fn restore_is_byte_identical_and_the_guest_continues() {
    let tmp = tempdir("continue");
    let snap = tmp.0.join("snap");
    let source = counter_guest(None);
    wait_change(&source, 0);
    source.pause().unwrap();
    let at_snapshot = counter(&source);
    let source_digest = digest(&source);
    let info = source.snapshot(&snapshot_req(&snap, false)).unwrap();
    assert_eq!(info.memory_bytes, 32 << 20);
    assert_eq!(counter(&source), at_snapshot, "still paused");

    let clone = restore_paused(&snap);
    assert_eq!(
        digest(&clone),
        source_digest,
        "a fresh restore is the source at the snapshot"
    );
    assert_eq!(counter(&clone), at_snapshot);
    clone.resume().unwrap();
    let after = wait_change(&clone, at_snapshot);
    assert!(
        after > at_snapshot,
        "the restored guest counts on: {at_snapshot} -> {after}"
    );
    clone.stop();
    assert_eq!(clone.wait(), VmExit::Stopped);
    source.stop();
    source.wait();
}

#[test]
fn concurrent_clones_are_independent() {
    let tmp = tempdir("clones");
    let snap = tmp.0.join("snap");
    let source = counter_guest(None);
    wait_change(&source, 0);
    source.snapshot(&snapshot_req(&snap, true)).unwrap();
    assert_ne!(
        wait_change(&source, counter(&source)),
        0,
        "source runs on after the snapshot"
    );

    let a = restore_paused(&snap);
    let b = restore_paused(&snap);
    let base = digest(&a);
    assert_eq!(digest(&b), base);
    // What one clone writes, the other does not see.
    a.memory()
        .write_obj(0xdead_beefu64, GuestAddress(0x50_0000))
        .unwrap();
    assert_ne!(digest(&a), base);
    assert_eq!(digest(&b), base);
    let seen: u64 = b.memory().read_obj(GuestAddress(0x50_0000)).unwrap();
    assert_ne!(seen, 0xdead_beef);
    a.resume().unwrap();
    b.resume().unwrap();
    wait_change(&a, counter(&a));
    wait_change(&b, counter(&b));
    for vm in [a, b, source] {
        vm.stop();
        vm.wait();
    }
}

#[test]
fn control_socket_drives_pause_snapshot_and_digest() {
    let tmp = tempdir("control");
    let sock = tmp.0.join("vm.sock");
    let source = counter_guest(Some(sock.clone()));
    let mut client = ControlClient::connect(&sock).unwrap();
    match client.request(Request::Status).unwrap() {
        Response::Status(s) => assert_eq!(s.state, VmRunState::Running),
        other => panic!("{other:?}"),
    }
    // A digest needs a paused VM.
    assert!(matches!(
        client.request(Request::MemoryDigest).unwrap(),
        Response::Error(_)
    ));
    assert_eq!(client.request(Request::Pause).unwrap(), Response::Ok);
    let Response::MemoryDigest { digest: before, .. } =
        client.request(Request::MemoryDigest).unwrap()
    else {
        panic!("no digest")
    };
    let snap = tmp.0.join("snap");
    let Response::Snapshot(info) = client
        .request(Request::Snapshot(snapshot_req(&snap, true)))
        .unwrap()
    else {
        panic!("no snapshot")
    };
    assert!(info.pause_ms >= 0.0 && info.total_ms >= info.pause_ms);
    // Taken while paused: it stays paused and the snapshot is the digest above.
    match client.request(Request::Status).unwrap() {
        Response::Status(s) => assert_eq!(s.state, VmRunState::Paused),
        other => panic!("{other:?}"),
    }
    let clone = restore_paused(&snap);
    assert_eq!(digest(&clone), before);
    // Snapshotting into an existing directory is refused and changes nothing.
    assert!(matches!(
        client
            .request(Request::Snapshot(snapshot_req(&snap, true)))
            .unwrap(),
        Response::Error(_)
    ));
    assert_eq!(client.request(Request::Shutdown).unwrap(), Response::Ok);
    assert_eq!(source.wait(), VmExit::Stopped);
    clone.stop();
    clone.wait();
}

fn take_snapshot(dir: &Path) {
    let source = counter_guest(None);
    wait_change(&source, 0);
    source.snapshot(&snapshot_req(dir, false)).unwrap();
    source.stop();
    source.wait();
}

fn restore_error(dir: &Path) -> String {
    let opts = RestoreOptions {
        snapshot: dir.to_path_buf(),
        ..Default::default()
    };
    match restore(&opts, console(), Instant::now()) {
        Ok(_) => panic!("a bad snapshot was restored"),
        Err(e) => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(c) = src {
                s.push_str(": ");
                s.push_str(&c.to_string());
                src = c.source();
            }
            s
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["state.bin", "memory.bin"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

#[test]
fn corrupt_snapshots_are_refused() {
    let tmp = tempdir("corrupt");
    let good = tmp.0.join("good");
    take_snapshot(&good);
    let case = |name: &str, edit: &dyn Fn(&Path)| -> String {
        let dir = tmp.0.join(name);
        copy_dir(&good, &dir);
        edit(&dir);
        restore_error(&dir)
    };
    let flip = |file: &str, offset: u64| {
        let file = file.to_string();
        move |dir: &Path| {
            let p = dir.join(&file);
            let mut bytes = std::fs::read(&p).unwrap();
            let i = (offset as usize).min(bytes.len() - 1);
            bytes[i] ^= 0x10;
            std::fs::write(&p, bytes).unwrap();
        }
    };
    assert!(case("state-flip", &flip("state.bin", 300)).contains("checksum"));
    assert!(case("memory-flip", &flip("memory.bin", 0x30_0000)).contains("checksum"));
    assert!(case("version", &|d: &Path| {
        let p = d.join("state.bin");
        let mut b = std::fs::read(&p).unwrap();
        b[8] = 9;
        std::fs::write(&p, b).unwrap();
    })
    .contains("format version 9"));
    assert!(case("truncated-state", &|d: &Path| {
        let p = d.join("state.bin");
        let b = std::fs::read(&p).unwrap();
        std::fs::write(&p, &b[..b.len() / 2]).unwrap();
    })
    .contains("truncated"));
    assert!(case("short-memory", &|d: &Path| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(d.join("memory.bin"))
            .unwrap();
        f.set_len(16 << 20).unwrap();
    })
    .contains("bytes but the snapshot describes"));
    assert!(case("no-memory", &|d: &Path| std::fs::remove_file(
        d.join("memory.bin")
    )
    .unwrap())
    .contains("memory.bin"));
    let err = restore_error(&tmp.0.join("missing"));
    assert!(err.contains("not a snapshot directory"), "{err}");
    // A CPU template other than the snapshot's is refused when asked for.
    let opts = RestoreOptions {
        snapshot: good.clone(),
        cpu_template: Some(vmm::vstate::cpuid::CpuTemplate::X86_64V2),
        ..Default::default()
    };
    let e = restore(&opts, console(), Instant::now())
        .err()
        .expect("refused");
    assert!(
        e.to_string().contains("CPU template host, not x86-64-v2"),
        "{e}"
    );
    // The good one still restores.
    let vm = restore_paused(&good);
    vm.stop();
    vm.wait();
}

/// `kill -9` of the VMM while it writes a snapshot: the earlier snapshot stays intact, and
/// what the killed one leaves behind is either complete or refused by restore.
#[test]
fn kill_during_snapshot_leaves_nothing_restorable_half_written() {
    let tmp = tempdir("kill");
    for (round, delay_ms) in [5u64, 40, 120].into_iter().enumerate() {
        let sock = tmp.0.join(format!("vm{round}.sock"));
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_grove-vmm"))
            .args([
                "run",
                "--kernel",
                env!("GROVE_TEST_GUEST"),
                "--memory",
                "512",
                "--no-rng",
            ])
            .args([
                "--cmdline",
                "test=counter",
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
        let earlier = tmp.0.join(format!("earlier{round}"));
        let killed = tmp.0.join(format!("killed{round}"));
        let r = client
            .request(Request::Snapshot(snapshot_req(&earlier, true)))
            .unwrap();
        assert!(matches!(r, Response::Snapshot(_)), "{r:?}");
        let earlier_state = std::fs::read(earlier.join("state.bin")).unwrap();

        // Ask for a second snapshot and kill the VMM while it writes.
        let killed_req = snapshot_req(&killed, true);
        let writer = std::thread::spawn(move || {
            let _ = client.request(Request::Snapshot(killed_req));
        });
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap();
        child.wait().unwrap();
        writer.join().unwrap();

        // The earlier snapshot is untouched and restores.
        assert_eq!(
            std::fs::read(earlier.join("state.bin")).unwrap(),
            earlier_state
        );
        let vm = restore_paused(&earlier);
        vm.stop();
        vm.wait();
        // The killed one is complete (it finished before the kill) or not restorable.
        let partial = vmm::snapshot::tmp_dir(&killed);
        if killed.exists() {
            let vm = restore_paused(&killed);
            vm.stop();
            vm.wait();
        } else {
            assert!(restore_error(&killed).contains("not a snapshot directory"));
            if partial.exists() {
                assert!(restore_error(&partial).contains("unfinished snapshot"));
            }
        }
    }
}

fn diff_req(dir: &Path, parent: &Path, resume: bool) -> SnapshotRequest {
    SnapshotRequest {
        dir: dir.to_path_buf(),
        kind: SnapshotKind::Diff,
        parent: Some(parent.to_path_buf()),
        resume,
        mode: Default::default(),
    }
}

fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Runs the (paused or running) source until its counter moves, pauses it and returns its
/// digest.
fn run_then_pause(vm: &Vmm) -> String {
    vm.resume().unwrap();
    wait_change(vm, counter(vm));
    vm.pause().unwrap();
    digest(vm)
}

#[test]
fn diff_snapshot_chain_restores_and_merges() {
    let tmp = tempdir("diff");
    let (a, b, c) = (tmp.0.join("a"), tmp.0.join("b"), tmp.0.join("c"));
    let source = counter_guest_with(None, true);
    wait_change(&source, 0);
    source.pause().unwrap();
    source.snapshot(&snapshot_req(&a, false)).unwrap();

    // A page only the VMM writes (as a virtio device does) must be in the next diff.
    const VMM_WRITTEN: GuestAddress = GuestAddress(0x70_0000);
    source
        .memory()
        .write_obj(0x1122_3344_5566_7788u64, VMM_WRITTEN)
        .unwrap();
    run_then_pause(&source);
    let info = source.snapshot(&diff_req(&b, &a, false)).unwrap();
    assert_eq!(info.kind, SnapshotKind::Diff);
    assert!(info.memory_bytes < 8 << 20, "{} bytes", info.memory_bytes);
    let (a_size, b_size) = (
        allocated(&a.join("memory.bin")),
        allocated(&b.join("memory.bin")),
    );
    assert!(b_size * 4 < a_size, "diff {b_size} bytes vs full {a_size}");

    let at_c = run_then_pause(&source);
    let at_c_counter = counter(&source);
    source.snapshot(&diff_req(&c, &b, false)).unwrap();

    let clone = restore_paused(&c);
    assert_eq!(digest(&clone), at_c, "C restored is the source at C");
    assert_eq!(counter(&clone), at_c_counter);
    let seen: u64 = clone.memory().read_obj(VMM_WRITTEN).unwrap();
    assert_eq!(seen, 0x1122_3344_5566_7788);
    clone.resume().unwrap();
    assert!(wait_change(&clone, at_c_counter) > at_c_counter);
    clone.stop();
    clone.wait();

    // Merged into a full snapshot: the same memory, no parent needed.
    let merged = tmp.0.join("merged");
    vmm::snapshot::merge(&c, &merged).unwrap();
    let state = vmm::snapshot::read_state(&merged).unwrap();
    assert!(state.memory.parent.is_none() && state.memory.pages.is_none());
    assert!(
        vmm::snapshot::merge(&c, &merged).is_err(),
        "never overwrites"
    );
    let clone = restore_paused(&merged);
    assert_eq!(digest(&clone), at_c);
    clone.stop();
    clone.wait();

    // Only the VM's previous snapshot can be a parent.
    let d = tmp.0.join("d");
    let err = source.snapshot(&diff_req(&d, &a, false)).unwrap_err();
    assert!(err.to_string().contains("previous snapshot"), "{err}");
    assert!(!d.exists());
    let err = source
        .snapshot(&SnapshotRequest {
            parent: None,
            ..diff_req(&d, &c, false)
        })
        .unwrap_err();
    assert!(err.to_string().contains("parent"), "{err}");
    // ...and a refused request leaves C usable as the parent.
    source.snapshot(&diff_req(&d, &c, false)).unwrap();
    source.stop();
    source.wait();

    // A chain that loops back (B's parent edited to be C) is refused.
    let looped = tmp.0.join("looped");
    copy_dir(&b, &looped);
    copy_dir(&c, &tmp.0.join("c2"));
    let mut state = vmm::snapshot::read_state(&looped).unwrap();
    let c_state = vmm::snapshot::read_state(&c).unwrap();
    state.memory.parent = Some(vmm::snapshot::memory::ParentRef {
        dir: tmp.0.join("c2"),
        blake3: c_state.memory.blake3.clone(),
    });
    vmm::snapshot::format::write_file(&looped.join("state.bin"), &state).unwrap();
    let mut c2 = c_state;
    c2.memory.parent = Some(vmm::snapshot::memory::ParentRef {
        dir: looped.clone(),
        blake3: state.memory.blake3.clone(),
    });
    vmm::snapshot::format::write_file(&tmp.0.join("c2").join("state.bin"), &c2).unwrap();
    let err = restore_error(&tmp.0.join("c2"));
    assert!(err.contains("loops back"), "{err}");

    // A missing parent fails the restore, naming it.
    std::fs::rename(&a, tmp.0.join("a-moved")).unwrap();
    let err = restore_error(&c);
    assert!(err.contains(a.to_str().unwrap()), "{err}");
    // A changed parent too.
    std::fs::rename(tmp.0.join("a-moved"), &a).unwrap();
    copy_dir(&merged, &tmp.0.join("x"));
    std::fs::remove_dir_all(&b).unwrap();
    std::fs::rename(tmp.0.join("x"), &b).unwrap();
    let err = restore_error(&c);
    assert!(err.contains(b.to_str().unwrap()), "{err}");
}

#[test]
fn diff_snapshots_need_tracking() {
    let tmp = tempdir("notrack");
    let a = tmp.0.join("a");
    let source = counter_guest(None);
    wait_change(&source, 0);
    source.snapshot(&snapshot_req(&a, true)).unwrap();
    let err = source
        .snapshot(&diff_req(&tmp.0.join("b"), &a, true))
        .unwrap_err();
    assert!(matches!(err, vmm::runtime::VmmError::NotTracking), "{err}");
    assert!(!tmp.0.join("b").exists());
    source.stop();
    source.wait();
}

#[test]
fn snapshot_merge_cli_writes_a_full_snapshot() {
    let tmp = tempdir("mergecli");
    let a = tmp.0.join("a");
    take_snapshot(&a);
    let out = tmp.0.join("out");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_grove-vmm"))
        .args(["snapshot-merge", "--snapshot"])
        .arg(&a)
        .arg("--output")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let vm = restore_paused(&out);
    assert_eq!(
        vmm::snapshot::read_state(&out).unwrap().memory.blake3,
        vmm::snapshot::read_state(&a).unwrap().memory.blake3
    );
    vm.stop();
    vm.wait();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_grove-vmm"))
        .args(["snapshot-merge", "--snapshot"])
        .arg(tmp.0.join("missing"))
        .arg("--output")
        .arg(tmp.0.join("out2"))
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(2));
}

/// The generation ID the VMM reports, as the guest reads it at the reported address.
fn vmgenid(vm: &Vmm) -> String {
    use vmm::control::ControlHandler;
    let Response::Status(status) = vm.shared().handle(Request::Status) else {
        panic!("no status");
    };
    let genid = status.vmgenid.expect("every VM has a generation ID");
    assert_eq!(genid.addr, vmm::boot::layout::VMGENID_ADDR);
    let bytes: [u8; 16] = vm.memory().read_obj(GuestAddress(genid.addr)).unwrap();
    let in_memory: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(genid.id, in_memory, "status reports what the guest reads");
    genid.id
}

/// Waits until the test guest has printed `vmgenid=ID` (it prints its ID at start and
/// whenever it changes).
fn guest_saw(console: &Console, id: &str) -> bool {
    let line = format!("vmgenid={id}\n");
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if console.text().contains(&line) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

#[test]
fn every_restore_gives_the_guest_a_new_generation_id() {
    let tmp = tempdir("vmgenid");
    let snap = tmp.0.join("snap");
    let mut c = VmConfig::new(env!("GROVE_TEST_GUEST"));
    c.cmdline = Some("test=vmgenid".into());
    c.memory_mib = 32;
    c.rng = false;
    let out = Console::default();
    let io = ConsoleIo {
        output: Box::new(out.clone()),
        input: None,
    };
    let source = vmm::builder::build_and_start(&c, io, Instant::now()).unwrap();
    let source_id = vmgenid(&source);
    assert!(guest_saw(&out, &source_id), "{}", out.text());
    source.pause().unwrap();
    source.snapshot(&snapshot_req(&snap, false)).unwrap();

    let mut ids = vec![source_id.clone()];
    for _ in 0..2 {
        let out = Console::default();
        let opts = RestoreOptions {
            snapshot: snap.clone(),
            paused: true,
            ..Default::default()
        };
        let io = ConsoleIo {
            output: Box::new(out.clone()),
            input: None,
        };
        let clone = restore(&opts, io, Instant::now()).unwrap();
        assert_eq!(vmgenid(&clone), source_id, "unchanged while paused");
        clone.resume().unwrap();
        let id = vmgenid(&clone);
        assert!(!ids.contains(&id), "{id} is new");
        assert!(guest_saw(&out, &id), "the guest reads {id}: {}", out.text());
        // Later pauses and resumes keep it.
        clone.pause().unwrap();
        clone.resume().unwrap();
        assert_eq!(vmgenid(&clone), id);
        ids.push(id);
        clone.stop();
        clone.wait();
    }
    assert_eq!(vmgenid(&source), source_id, "the source keeps its ID");
    source.stop();
    source.wait();
}
