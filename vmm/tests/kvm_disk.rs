//! Disk layers with the test guest: virtio-blk on a qcow2 overlay, and the disk branch a
//! snapshot makes (frozen layer, new overlay for the running VM, one overlay per restore).
//! Every image is checked with `qemu-img check` and compared with `qemu-img compare`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm::builder::{restore, RestoreOptions, StartOptions};
use vmm::control::protocol::{DiskStatus, SnapshotRequest};
use vmm::control::ControlHandler;
use vmm::disk::{self, DiskFormat, LayerRecord, OpenOptions};
use vmm::{ConsoleIo, DiskConfig, VmConfig, VmExit, Vmm};

use common::{require_kvm, test_guest, Console, TempDir};

const COUNTER: GuestAddress = GuestAddress(0x30_0000);
const MIB: u64 = 1 << 20;

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("this test needs qemu-img (Debian package qemu-utils)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "qemu-img {args:?}: {text}");
    text
}

fn check_clean(path: &Path) {
    let text = qemu_img(&["check", "-f", "qcow2", path.to_str().unwrap()]);
    assert!(
        text.contains("No errors were found"),
        "{}: {text}",
        path.display()
    );
}

fn compare(a: &Path, a_fmt: &str, b: &Path, b_fmt: &str) {
    qemu_img(&[
        "compare",
        "-f",
        a_fmt,
        "-F",
        b_fmt,
        a.to_str().unwrap(),
        b.to_str().unwrap(),
    ]);
}

/// An error and its causes on one line.
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

fn qcow2_disk(path: &Path) -> DiskConfig {
    DiskConfig {
        format: DiskFormat::Qcow2,
        allow_backing: true,
        ..DiskConfig::raw(path, false)
    }
}

fn layer(path: &Path, format: DiskFormat) -> LayerRecord {
    LayerRecord {
        path: path.to_path_buf(),
        format,
    }
}

/// A raw base of `size` bytes of `fill` and a qcow2 overlay `vm.qcow2` on it holding `data`
/// at `at` (written before any VM opens it). Returns (base, overlay).
fn base_and_overlay(
    dir: &TempDir,
    size: u64,
    fill: u8,
    data: &[u8],
    at: u64,
) -> (PathBuf, PathBuf) {
    let base = dir.join("base.raw");
    std::fs::write(&base, vec![fill; size as usize]).unwrap();
    let active = dir.join("vm.qcow2");
    disk::create_overlay(&active, Some(&layer(&base, DiskFormat::Raw)), size).unwrap();
    let mut o = OpenOptions::new(&active, DiskFormat::Qcow2, false);
    o.allow_backing = true;
    let image = disk::open(&o).unwrap();
    image.write_at(data, at).unwrap();
    image.flush().unwrap();
    (base, active)
}

#[test]
fn virtio_blk_on_a_qcow2_overlay_never_writes_the_base() {
    require_kvm();
    let dir = TempDir::new("blk-qcow2");
    let base = dir.join("base.raw");
    let mut content = vec![0u8; 64 * 512];
    content[512..1024].fill(0x5a);
    std::fs::write(&base, &content).unwrap();
    let overlay = dir.join("vm.qcow2");
    disk::create_overlay(&overlay, Some(&layer(&base, DiskFormat::Raw)), 64 * 512).unwrap();

    let mut c = VmConfig::new(test_guest());
    c.cmdline = Some("test=blk".into());
    c.memory_mib = 32;
    c.rng = false;
    c.disks.push(qcow2_disk(&overlay));
    let console = Console::default();
    let vm = vmm::build_and_start(
        &c,
        ConsoleIo {
            output: Box::new(console.clone()),
            input: None,
        },
        Instant::now(),
    )
    .unwrap();
    assert_eq!(vm.wait(), VmExit::GuestReset);
    let out = console.text();
    // The same answers as on a raw disk: reads come from the base through the overlay.
    assert!(out.contains("blk-init=00 capacity=00000040"), "{out}");
    assert!(
        out.contains("read1 status=00 used=0201 byte0=5a byte511=5a"),
        "{out}"
    );
    assert!(out.contains("write2 status=00 used=0001"), "{out}");
    assert!(out.contains("flush status=00 used=0001"), "{out}");
    assert!(out.contains("read2 status=00 used=0201 byte0=c3"), "{out}");
    assert!(out.contains("beyond status=01"), "{out}");

    assert_eq!(
        std::fs::read(&base).unwrap(),
        content,
        "the base is untouched"
    );
    check_clean(&overlay);
    let mut want = content.clone();
    want[1024..1536].fill(0xc3);
    let want_path = dir.join("want.raw");
    std::fs::write(&want_path, &want).unwrap();
    compare(&overlay, "qcow2", &want_path, "raw");
}

fn counter_guest(disks: Vec<DiskConfig>) -> Vmm {
    let mut c = VmConfig::new(test_guest());
    c.cmdline = Some("test=counter".into());
    c.memory_mib = 32;
    c.rng = false;
    c.disks = disks;
    vmm::builder::build_and_start_with(
        &c,
        ConsoleIo {
            output: Box::new(Console::default()),
            input: None,
        },
        Instant::now(),
        &StartOptions { control: None },
    )
    .unwrap()
}

fn wait_change(vm: &Vmm) {
    let from: u64 = vm.memory().read_obj(COUNTER).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while vm.memory().read_obj::<u64>(COUNTER).unwrap() == from {
        assert!(Instant::now() < deadline, "the guest stopped counting");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn snapshot(vm: &Vmm, dir: &Path) -> vmm::control::protocol::SnapshotInfo {
    vm.snapshot(&SnapshotRequest {
        dir: dir.to_path_buf(),
        kind: Default::default(),
        parent: None,
        resume: true,
        mode: Default::default(),
    })
    .unwrap()
}

fn disks(vm: &Vmm) -> Vec<DiskStatus> {
    match vm.shared().handle(vmm::control::protocol::Request::Status) {
        vmm::control::protocol::Response::Status(s) => s.disks,
        other => panic!("{other:?}"),
    }
}

fn restore_with(snap: &Path, overrides: Vec<(String, PathBuf)>) -> Vmm {
    let opts = RestoreOptions {
        snapshot: snap.to_path_buf(),
        disk_overrides: overrides,
        ..Default::default()
    };
    restore(
        &opts,
        ConsoleIo {
            output: Box::new(Console::default()),
            input: None,
        },
        Instant::now(),
    )
    .unwrap()
}

#[test]
fn a_snapshot_branches_the_disk_and_every_restore_gets_its_own_overlay() {
    require_kvm();
    let dir = TempDir::new("branch");
    // Data in the active layer before the VM starts.
    let (base, active) = base_and_overlay(&dir, 4 * MIB, 0x11, &[0x22; 4096], MIB);
    let at_snapshot = dir.join("at-snapshot.raw");
    qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        active.to_str().unwrap(),
        at_snapshot.to_str().unwrap(),
    ]);

    let source = counter_guest(vec![qcow2_disk(&active)]);
    wait_change(&source);
    let snap = dir.join("snap1");
    let info = snapshot(&source, &snap);
    let frozen = dir.join("vm@1.qcow2");
    assert_eq!(info.frozen_layers, vec![frozen.clone()]);
    let chain = |s: &[DiskStatus]| s[0].chain.clone();
    assert_eq!(
        chain(&disks(&source)),
        vec![
            layer(&active, DiskFormat::Qcow2),
            layer(&frozen, DiskFormat::Qcow2),
            layer(&base, DiskFormat::Raw)
        ]
    );
    wait_change(&source);

    // Two clones: one on an overlay named for it, one on a default name next to the layer.
    let named = dir.join("clone-a.qcow2");
    let a = restore_with(&snap, vec![("disk0".into(), named.clone())]);
    let b = restore_with(&snap, Vec::new());
    let a_chain = chain(&disks(&a));
    let b_chain = chain(&disks(&b));
    assert_eq!(a_chain[0], layer(&named, DiskFormat::Qcow2));
    assert_eq!(a_chain[1..], b_chain[1..]);
    assert_eq!(a_chain[1], layer(&frozen, DiskFormat::Qcow2));
    assert_ne!(b_chain[0].path, named);
    assert_ne!(b_chain[0].path, active);
    assert_eq!(b_chain[0].path.parent(), Some(dir.0.as_path()));
    wait_change(&a);
    wait_change(&b);

    // An override that exists must be an overlay on the frozen layer.
    let stranger = dir.join("stranger.qcow2");
    disk::create_overlay(&stranger, Some(&layer(&base, DiskFormat::Raw)), 4 * MIB).unwrap();
    let opts = RestoreOptions {
        snapshot: snap.clone(),
        disk_overrides: vec![("disk0".into(), stranger.clone())],
        ..Default::default()
    };
    let e = restore(
        &opts,
        ConsoleIo {
            output: Box::new(Console::default()),
            input: None,
        },
        Instant::now(),
    )
    .err()
    .expect("an overlay on another layer");
    let text = error_chain(&e);
    assert!(text.contains("snapshot recorded"), "{text}");

    let b_overlay = b_chain[0].path.clone();
    for vm in [a, b, source] {
        vm.stop();
        vm.wait();
    }
    // Every overlay shows the disk as it was at the snapshot; all images check clean.
    compare(&frozen, "qcow2", &at_snapshot, "raw");
    for overlay in [&named, &b_overlay, &active] {
        check_clean(overlay);
        compare(overlay, "qcow2", &at_snapshot, "raw");
    }
    check_clean(&frozen);
}

#[test]
fn a_snapshot_past_the_depth_limit_fails_and_the_vm_runs_on() {
    require_kvm();
    let dir = TempDir::new("depth");
    let base = dir.join("base.raw");
    std::fs::write(&base, vec![0u8; MIB as usize]).unwrap();
    let active = dir.join("vm.qcow2");
    disk::create_overlay(&active, Some(&layer(&base, DiskFormat::Raw)), MIB).unwrap();
    let vm = counter_guest(vec![DiskConfig {
        max_chain_depth: 3,
        ..qcow2_disk(&active)
    }]);
    wait_change(&vm);
    snapshot(&vm, &dir.join("s1"));
    let before = disks(&vm);
    assert_eq!(before[0].chain.len(), 3);
    let e = vm
        .snapshot(&SnapshotRequest {
            dir: dir.join("s2"),
            kind: Default::default(),
            parent: None,
            resume: true,
            mode: Default::default(),
        })
        .unwrap_err();
    let text = error_chain(&e);
    assert!(text.contains("limit of 3"), "{text}");
    assert!(!dir.join("s2").exists());
    assert_eq!(disks(&vm), before);
    wait_change(&vm);
    vm.stop();
    vm.wait();
    check_clean(&active);
}

#[test]
fn compaction_respects_snapshots_and_a_running_vm_picks_it_up_at_its_next_branch() {
    require_kvm();
    let dir = TempDir::new("compact");
    let (base, active) = base_and_overlay(&dir, 2 * MIB, 0x33, &[0x44; 65536], 0);
    let vm = counter_guest(vec![qcow2_disk(&active)]);
    wait_change(&vm);
    let f1 = snapshot(&vm, &dir.join("s1")).frozen_layers[0].clone();
    assert_eq!(f1, dir.join("vm@1.qcow2"));
    let f2 = snapshot(&vm, &dir.join("s2")).frozen_layers[0].clone();
    assert_eq!(disks(&vm)[0].chain.len(), 4);
    let want = dir.join("want.raw");
    qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        f2.to_str().unwrap(),
        want.to_str().unwrap(),
    ]);

    // Snapshot s1 recorded f1: it stays.
    let report = disk::compact::compact(&f2, &[]).unwrap();
    assert!(report.merged.is_empty(), "{report:?}");
    assert!(f1.exists());
    // Without s1, nothing but f2 uses f1: it is merged into f2.
    std::fs::remove_dir_all(dir.join("s1")).unwrap();
    let report = disk::compact::compact(&f2, &[]).unwrap();
    assert_eq!(report.merged, vec![f1.clone()]);
    assert_eq!((report.depth_before, report.depth_after), (3, 2));
    assert!(!f1.exists());
    check_clean(&f2);
    compare(&f2, "qcow2", &want, "raw");

    // The running VM still reads the old layers; its next branch reopens the short chain.
    wait_change(&vm);
    let f3 = snapshot(&vm, &dir.join("s3")).frozen_layers[0].clone();
    let chain: Vec<PathBuf> = disks(&vm)[0].chain.iter().map(|l| l.path.clone()).collect();
    assert_eq!(chain, vec![active.clone(), f3, f2.clone(), base.clone()]);
    // s2 still restores onto the compacted f2.
    let clone = restore_with(&dir.join("s2"), Vec::new());
    let clone_overlay = disks(&clone)[0].chain[0].path.clone();
    wait_change(&clone);
    for v in [clone, vm] {
        v.stop();
        v.wait();
    }
    check_clean(&clone_overlay);
    compare(&clone_overlay, "qcow2", &want, "raw");
    check_clean(&active);
}
