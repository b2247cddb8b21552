//! Live snapshots of a busy real guest (the default image, two vCPUs, 1 GiB: big enough
//! that a pause for the whole copy would stand out from the noise of this emulated, 2-core
//! host): one process appends records to a qcow2 data disk with `fdatasync` after each
//! (`grove-disktool fsync-loop`, printing `ACK n` once a record is durable), another dirties
//! memory at 10 MiB/s and reports the longest time it did not run in each second
//! (`grove-disktool dirty`).
//!
//! - Five live branches while both run: each clone's disk at the cut (its frozen layer, read
//!   on the host) holds exactly the records acknowledged before the cut, plus at most the
//!   one in flight; the clone, restored, goes on with the next record; and the source never
//!   stopped for longer than the reported pause (its own clock shows no longer gap, up to
//!   host scheduling noise).
//! - The paused-source variant: the source stays paused after a live snapshot, so its memory
//!   at the cut is known, and the clone's memory digest must equal it.
//! - A stop-and-copy snapshot for comparison: the guest does see that pause, which shows the
//!   gap measurement can fail.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use grove_integration::{
    control_client, data_disk, disktool_acks, disktool_record, grove_vmm_bin, images, qemu_img,
    require_kvm, TempDir, VmProcess, BOOT_TIMEOUT, DISKTOOL_RECORD,
};
use vmm::control::client::ControlClient;
use vmm::control::protocol::{
    Request, Response, SnapshotInfo, SnapshotKind, SnapshotMode, SnapshotRequest,
};

const DATA_DISK: u64 = 64 << 20;
const WAIT: Duration = Duration::from_secs(120);
/// Noise allowed on top of the reported pause and the longest stall seen before the
/// snapshot: on a 2-core host the copy thread competes with two busy vCPU threads, so a
/// vCPU can wait for a core for a while without the VMM pausing it.
const SCHEDULING_SLACK_MS: f64 = 250.0;

/// `max_gap_us` of every complete `DIRTY` line, in order.
fn gaps_ms(console: &str) -> Vec<f64> {
    let complete = &console[..console.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .filter_map(|l| {
            let gap = l
                .trim()
                .strip_prefix("DIRTY ")?
                .split("max_gap_us=")
                .nth(1)?;
            gap.trim().parse::<f64>().ok().map(|us| us / 1000.0)
        })
        .collect()
}

fn wait_until(vm: &mut VmProcess, what: &str, done: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done(&vm.console()) {
        assert!(
            Instant::now() < deadline,
            "waiting for {what}:\n{}",
            vm.console()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn snapshot(c: &mut ControlClient, dir: &Path, mode: SnapshotMode, resume: bool) -> SnapshotInfo {
    match c
        .request(Request::Snapshot(SnapshotRequest {
            dir: dir.to_path_buf(),
            kind: SnapshotKind::Full,
            parent: None,
            resume,
            mode,
        }))
        .expect("snapshot request")
    {
        Response::Snapshot(info) => info,
        other => panic!("snapshot failed: {other:?}"),
    }
}

fn digest(c: &mut ControlClient) -> String {
    match c.request(Request::MemoryDigest).expect("digest request") {
        Response::MemoryDigest { digest, .. } => digest,
        other => panic!("{other:?}"),
    }
}

/// How many records, from record 0 on, the disk chain `image` holds intact (read on the
/// host); panics on a record after them that is neither intact nor never written.
fn records_on_disk(image: &Path, scratch: &Path) -> u64 {
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
    let data = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    let mut n = 0u64;
    for block in data.chunks(DISKTOOL_RECORD) {
        if block == disktool_record(n).as_slice() {
            n += 1;
        } else {
            assert!(
                block.iter().all(|b| *b == 0),
                "{}: block {n} is neither record {n} nor unwritten",
                image.display()
            );
            break;
        }
    }
    n
}

/// Starts a clone of `snap` (it gets its own overlays on the frozen layers) and returns the
/// first record it acknowledges.
fn clone_first_ack(snap: &Path, sock: &Path) -> u64 {
    let mut clone = VmProcess::spawn(
        &grove_vmm_bin(),
        [
            "restore",
            "--snapshot",
            snap.to_str().unwrap(),
            "--control",
            sock.to_str().unwrap(),
        ],
    );
    let deadline = Instant::now() + WAIT;
    while disktool_acks(&clone.console()).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the clone of {} acknowledged no record:\n{}\nits log:\n{}",
            snap.display(),
            clone.console(),
            clone.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let first = disktool_acks(&clone.console())[0];
    let mut c = control_client(sock);
    let _ = c.request(Request::Shutdown);
    clone.wait_exit(WAIT).unwrap_or_else(|r| panic!("{r}"));
    first
}

#[test]
fn live_branches_of_a_busy_guest_are_exact_and_barely_pause_it() {
    require_kvm();
    let set = images();
    let dir = TempDir::new("e2e-live");
    let data = data_disk(dir.path(), DATA_DISK);
    let sock = dir.path().join("source.sock");
    let rootfs = format!("{},ro", set.rootfs.display());
    let disk = format!("{},qcow2,backing", data.display());
    let mut source = VmProcess::spawn(
        &grove_vmm_bin(),
        [
            "run",
            "--kernel",
            set.vmlinux.to_str().unwrap(),
            "--rootfs",
            &rootfs,
            "--disk",
            &disk,
            "--vcpus",
            "2",
            "--memory",
            "1024",
            "--track-dirty-pages",
            "--control",
            sock.to_str().unwrap(),
        ],
    );
    if let Err(report) = source.wait_for("GROVE-INIT-READY", BOOT_TIMEOUT) {
        panic!("{report}");
    }
    source.send_line("echo SHELL-$((20+1))");
    if let Err(report) = source.wait_for("SHELL-21", BOOT_TIMEOUT) {
        panic!("{report}");
    }
    source.send_line("grove-disktool dirty 16 10240 0 & grove-disktool fsync-loop /dev/vdb 0 0 &");
    // Writing every page of its buffer once takes the emulated guest kernel a while.
    wait_until(&mut source, "the writers", |c| {
        disktool_acks(c).len() >= 5 && gaps_ms(c).len() >= 10
    });
    let mut control = control_client(&sock);

    // Five live branches while the guest writes.
    let mut frozen_layers: Vec<PathBuf> = Vec::new();
    for round in 0..5 {
        let before = disktool_acks(&source.console())
            .last()
            .copied()
            .unwrap_or(0);
        let gaps = gaps_ms(&source.console());
        let gaps_before = gaps.len();
        // The longest stall of the last ten seconds without a snapshot: what the guest's
        // own kernel (emulated here) and the host's scheduler cost it anyway.
        let baseline = gaps[gaps_before.saturating_sub(10)..]
            .iter()
            .copied()
            .fold(0.0, f64::max);
        let snap = dir.path().join(format!("live{round}"));
        let info = snapshot(&mut control, &snap, SnapshotMode::Live, true);
        assert_eq!(info.mode, SnapshotMode::Live);
        assert!(info.precopy.is_some(), "{info:?}");
        let frozen = info
            .frozen_layers
            .last()
            .cloned()
            .expect("the data disk froze");
        // The seconds around the snapshot, as the source's clock saw them.
        wait_until(&mut source, "two reports after the snapshot", |c| {
            gaps_ms(c).len() >= gaps_before + 2
        });
        let stalled = gaps_ms(&source.console())[gaps_before..]
            .iter()
            .copied()
            .fold(0.0, f64::max);
        eprintln!(
            "live branch {round}: pause {:.2} ms, longest stall the guest saw {stalled:.1} ms \
             (before: {baseline:.1} ms), {:?}",
            info.pause_ms, info.precopy
        );
        assert!(
            stalled <= info.pause_ms + baseline + SCHEDULING_SLACK_MS,
            "round {round}: the source stalled {stalled} ms; the reported pause was {} ms and \
             stalls before the snapshot reached {baseline} ms",
            info.pause_ms
        );

        // The disk at the cut: every record acknowledged before the request, and exactly
        // up to where the clone (the source at the cut) goes on.
        let on_disk = records_on_disk(&frozen, dir.path());
        let next = clone_first_ack(&snap, &dir.path().join(format!("clone{round}.sock")));
        assert!(
            on_disk > before,
            "round {round}: record {before} was acknowledged before the cut; the disk has {on_disk}"
        );
        assert!(
            on_disk == next || on_disk == next + 1,
            "round {round}: the clone goes on with record {next}, the disk at the cut has {on_disk} records"
        );
        frozen_layers.push(frozen);
        std::fs::remove_dir_all(&snap).unwrap();
    }
    assert!(source
        .console()
        .lines()
        .all(|l| !l.contains("grove-disktool:")));

    // The paused-source variant: the clone is the source at the cut, byte for byte.
    for round in 0..2 {
        let snap = dir.path().join(format!("cut{round}"));
        let info = snapshot(&mut control, &snap, SnapshotMode::Live, false);
        assert_eq!(info.mode, SnapshotMode::Live);
        let at_cut = digest(&mut control);
        let probe_sock = dir.path().join(format!("probe{round}.sock"));
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
        assert_eq!(digest(&mut probe_control), at_cut, "round {round}");
        let _ = probe_control.request(Request::Shutdown);
        probe.wait_exit(WAIT).unwrap_or_else(|r| panic!("{r}"));
        assert!(matches!(control.request(Request::Resume), Ok(Response::Ok)));
        std::fs::remove_dir_all(&snap).unwrap();
    }

    // Stop-and-copy for comparison: the guest sees that pause.
    let gaps_before = gaps_ms(&source.console()).len();
    let info = snapshot(
        &mut control,
        &dir.path().join("paused"),
        SnapshotMode::Paused,
        true,
    );
    wait_until(&mut source, "two reports after the paused snapshot", |c| {
        gaps_ms(c).len() >= gaps_before + 2
    });
    let stalled = gaps_ms(&source.console())[gaps_before..]
        .iter()
        .copied()
        .fold(0.0, f64::max);
    eprintln!(
        "paused snapshot: pause {:.2} ms, longest stall the guest saw {stalled:.1} ms",
        info.pause_ms
    );
    assert!(
        stalled >= info.pause_ms * 0.8,
        "the guest saw a {stalled} ms stall for a {} ms pause",
        info.pause_ms
    );

    let _ = control.request(Request::Shutdown);
    source.wait_exit(WAIT).unwrap_or_else(|r| panic!("{r}"));
}
