//! End-to-end snapshot and clones with the real default image, on a qcow2 overlay of the
//! base root filesystem: a guest process keeps state (a running loop that counts, a file in
//! tmpfs, a file on the disk); the snapshot freezes the disk's active layer; three clones
//! each continue the count from the snapshot on their own overlays and show the same files,
//! writes in one clone or in the source are seen by no other VM (each disk's file is read
//! back on the host after the VMs end), a fresh restore's memory is byte-identical to the source at the
//! snapshot and its disk identical to the frozen layer, and every image checks clean.

use std::path::{Path, PathBuf};
use std::time::Duration;

use grove_integration::{
    control_client, grove_vmm_bin, images, qemu_img, qemu_img_check, require_kvm, TempDir,
    VmProcess, BOOT_TIMEOUT,
};
use vmm::control::client::ControlClient;
use vmm::control::protocol::{Request, Response, SnapshotRequest};
use vmm::disk::{DiskFormat, LayerRecord};

const WAIT: Duration = Duration::from_secs(120);

fn expect(vm: &mut VmProcess, needle: &str) {
    if let Err(report) = vm.wait_for(needle, WAIT) {
        panic!("{report}");
    }
}

/// Connects to a control socket, waiting for the VMM to create it.
fn ok(c: &mut ControlClient, r: Request) -> Response {
    let resp = c.request(r).expect("control request");
    if let Response::Error(e) = &resp {
        panic!("control request failed: {e:?}");
    }
    resp
}

/// The layers of the VM's root disk, the active one first.
fn root_chain(c: &mut ControlClient) -> Vec<LayerRecord> {
    match ok(c, Request::Status) {
        Response::Status(s) => s.disks[0].chain.clone(),
        other => panic!("{other:?}"),
    }
}

/// The contents of `file` in the ext4 file system on the qcow2 chain `image`, read on the
/// host: the chain is converted to a raw scratch copy, its journal replayed (`e2fsck -E
/// journal_only`), and the file read with `debugfs`.
fn file_on_disk(image: &Path, file: &str, scratch: &Path) -> String {
    let raw = scratch.join("inspect.raw");
    let _ = std::fs::remove_file(&raw);
    qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        image.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let fsck = std::process::Command::new("e2fsck")
        .args(["-f", "-y", "-E", "journal_only"])
        .arg(&raw)
        .output()
        .expect("this test needs e2fsck (e2fsprogs)");
    assert!(
        fsck.status.code().is_some_and(|c| c <= 1),
        "e2fsck on {}: {}",
        image.display(),
        String::from_utf8_lossy(&fsck.stderr)
    );
    let out = std::process::Command::new("debugfs")
        .args(["-R", &format!("cat {file}")])
        .arg(&raw)
        .output()
        .expect("this test needs debugfs (e2fsprogs)");
    std::fs::remove_file(&raw).unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn digest(c: &mut ControlClient) -> String {
    match ok(c, Request::MemoryDigest) {
        Response::MemoryDigest { digest, .. } => digest,
        other => panic!("{other:?}"),
    }
}

/// The last complete `TICK-n` line in `text`.
fn last_tick(text: &str) -> Option<u64> {
    text.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("TICK-")?.parse().ok())
}

fn first_tick(text: &str) -> Option<u64> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("TICK-")?.parse().ok())
        .next()
}

#[test]
fn clones_continue_from_the_snapshot_and_diverge() {
    require_kvm();
    let set = images();
    let dir = TempDir::new("e2e-snapshot");
    let sock = dir.path().join("source.sock");
    let base_modified = std::fs::metadata(&set.rootfs).unwrap().modified().unwrap();
    // The source runs on its own overlay of the shared, read-only base image.
    let overlay = dir.path().join("source.qcow2");
    vmm::disk::create_overlay(
        &overlay,
        Some(&LayerRecord {
            path: set.rootfs.clone(),
            format: DiskFormat::Raw,
        }),
        std::fs::metadata(&set.rootfs).unwrap().len(),
    )
    .unwrap();
    let rootfs = format!("{},qcow2,backing", overlay.display());
    let mut source = VmProcess::spawn(
        &grove_vmm_bin(),
        [
            "run",
            "--kernel",
            set.vmlinux.to_str().unwrap(),
            "--rootfs",
            &rootfs,
            "--control",
            sock.to_str().unwrap(),
        ],
    );
    if let Err(report) = source.wait_for("GROVE-INIT-READY", BOOT_TIMEOUT) {
        panic!("{report}");
    }
    source.send_line("echo disk-$((6*7)) > /data.txt; sync; echo SYNCED-$((2+2))");
    expect(&mut source, "SYNCED-4");
    source.send_line("echo state-$((17*3)) > /tmp/data; (i=0; while :; do i=$((i+1)); echo TICK-$i; sleep 1; done) &");
    expect(&mut source, "TICK-2");

    let mut control = control_client(&sock);
    ok(&mut control, Request::Pause);
    let tick_at_snapshot = last_tick(&source.console()).expect("ticks before the snapshot");
    let source_digest = digest(&mut control);
    let snap = dir.path().join("snap");
    let resp = ok(
        &mut control,
        Request::Snapshot(SnapshotRequest {
            dir: snap.clone(),
            kind: Default::default(),
            parent: None,
            resume: true,
            mode: Default::default(),
        }),
    );
    let frozen = match resp {
        Response::Snapshot(info) => {
            assert_eq!(info.frozen_layers.len(), 1, "{info:?}");
            info.frozen_layers[0].clone()
        }
        other => panic!("{other:?}"),
    };
    // Still paused (it was paused before the request): check the digest did not move.
    assert_eq!(digest(&mut control), source_digest);
    // The source now writes a new overlay on the frozen layer.
    let chain = root_chain(&mut control);
    assert_eq!(chain.len(), 3, "{chain:?}");
    assert_eq!((&chain[0].path, &chain[1].path), (&overlay, &frozen));

    // A paused restore is byte-identical to the source at the snapshot.
    let probe_sock = dir.path().join("probe.sock");
    let mut probe = VmProcess::spawn(
        &grove_vmm_bin(),
        [
            "restore",
            "--snapshot",
            snap.to_str().unwrap(),
            "--control",
            probe_sock.to_str().unwrap(),
            "--paused",
        ],
    );
    let mut probe_control = control_client(&probe_sock);
    assert_eq!(digest(&mut probe_control), source_digest);
    let probe_chain = root_chain(&mut probe_control);
    assert_eq!(
        probe_chain[1..],
        chain[1..],
        "the probe's overlay is on the frozen layer"
    );
    let probe_overlay = probe_chain[0].path.clone();
    ok(&mut probe_control, Request::Shutdown);
    assert_eq!(
        probe
            .wait_exit(WAIT)
            .map_err(|e| e.to_string())
            .unwrap()
            .code(),
        Some(0)
    );

    ok(&mut control, Request::Resume);

    // Three clones run at once, each from the same snapshot.
    let mut clones: Vec<VmProcess> = (0..3)
        .map(|i| {
            let sock = dir.path().join(format!("clone{i}.sock"));
            VmProcess::spawn(
                &grove_vmm_bin(),
                [
                    "restore",
                    "--snapshot",
                    snap.to_str().unwrap(),
                    "--control",
                    sock.to_str().unwrap(),
                ],
            )
        })
        .collect();
    let mut overlays: Vec<PathBuf> = vec![overlay.clone(), probe_overlay.clone()];
    for (i, clone) in clones.iter_mut().enumerate() {
        let mut c = control_client(&dir.path().join(format!("clone{i}.sock")));
        let clone_chain = root_chain(&mut c);
        assert_eq!(clone_chain[1..], chain[1..]);
        assert!(!overlays.contains(&clone_chain[0].path), "{clone_chain:?}");
        overlays.push(clone_chain[0].path.clone());
        expect(clone, &format!("TICK-{}", tick_at_snapshot + 1));
        let first = first_tick(&clone.console());
        assert_eq!(
            first,
            Some(tick_at_snapshot + 1),
            "clone continues the count:\n{}",
            clone.console()
        );
        assert!(clone.log().contains("vCPUs running:"), "{}", clone.log());
    }
    for (i, clone) in clones.iter_mut().enumerate() {
        clone.send_line(&format!("echo DATA{i}-$(cat /tmp/data)-$(cat /data.txt)"));
        expect(clone, &format!("DATA{i}-state-51-disk-42"));
    }
    // Writes in clone 0 (memory and disk) and in the source are seen by no one else.
    clones[0].send_line(
        "echo clone0-wrote > /tmp/data; echo clone0-wrote > /data.txt; sync; echo WROTE-$((1+1))",
    );
    expect(&mut clones[0], "WROTE-2");
    source.send_line("echo source-wrote > /data.txt; sync; echo SWROTE-$((1+2))");
    expect(&mut source, "SWROTE-3");
    clones[1].send_line("echo AFTER1-$(cat /tmp/data)-$(cat /data.txt)");
    expect(&mut clones[1], "AFTER1-state-51-disk-42");
    source.send_line("echo AFTERS-$(cat /tmp/data)");
    expect(&mut source, "AFTERS-state-51");

    for vm in clones.iter_mut().chain(std::iter::once(&mut source)) {
        vm.send_line("reboot -f");
        let status = vm.wait_exit(WAIT).unwrap_or_else(|r| panic!("{r}"));
        assert_eq!(status.code(), Some(0), "{}", vm.log());
    }
    // Every image checks clean; the clone that never ran has the source's disk at the
    // snapshot, byte for byte.
    qemu_img_check(&frozen);
    for o in &overlays {
        qemu_img_check(o);
    }
    qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        probe_overlay.to_str().unwrap(),
        frozen.to_str().unwrap(),
    ]);
    // What each disk holds, read on the host (the guests' page caches prove nothing about
    // the disks): the writes reached exactly the disk of the VM that made them.
    let expected = [
        (&frozen, "disk-42"),
        (&overlays[0], "source-wrote"),
        (&overlays[1], "disk-42"),
        (&overlays[2], "clone0-wrote"),
        (&overlays[3], "disk-42"),
        (&overlays[4], "disk-42"),
    ];
    for (image, want) in expected {
        assert_eq!(
            file_on_disk(image, "/data.txt", dir.path()),
            want,
            "{}",
            image.display()
        );
    }
    // The base image was only ever read.
    assert_eq!(
        std::fs::metadata(&set.rootfs).unwrap().modified().unwrap(),
        base_modified
    );
}
