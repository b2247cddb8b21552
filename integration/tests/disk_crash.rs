//! Crash safety of qcow2 disks under the real guest: a VM writes records to a qcow2 overlay
//! in a loop (write a 4 KiB record, `fdatasync`, print `ACK n`), and the VMM is killed with
//! SIGKILL at a random moment, 20 times. After every kill the overlay must check clean with
//! `qemu-img check`, and every record the guest saw acknowledged must be in it.
//!
//! The VM boots once; each round restores it from a snapshot onto a new overlay of the data
//! disk's frozen layer, so the rounds are independent and fast. The random delays come from
//! a seed printed at the start (set `GROVE_CRASH_SEED` to replay a run).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use grove_integration::{
    control_client, data_disk, disktool_acks, disktool_record, grove_vmm_bin, images, qemu_img,
    qemu_img_check, require_kvm, TempDir, VmProcess, BOOT_TIMEOUT, DISKTOOL_RECORD,
};
use vmm::control::protocol::{Request, Response, SnapshotRequest};

const ROUNDS: usize = 20;
const DATA_DISK: u64 = 64 << 20;

/// The highest `n` of a complete `ACK n` line.
fn last_ack(console: &str) -> Option<u64> {
    disktool_acks(console).into_iter().max()
}

/// xorshift64*: enough randomness for kill moments, and reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn kill_9_under_fsync_write_load_loses_no_acknowledged_write() {
    require_kvm();
    let set = images();
    let dir = TempDir::new("e2e-disk-crash");
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
            "--control",
            sock.to_str().unwrap(),
        ],
    );
    if let Err(report) = source.wait_for("GROVE-INIT-READY", BOOT_TIMEOUT) {
        panic!("{report}");
    }
    // A prompt is up once the shell answers.
    source.send_line("echo SHELL-$((20+1))");
    if let Err(report) = source.wait_for("SHELL-21", BOOT_TIMEOUT) {
        panic!("{report}");
    }
    let snap = dir.path().join("snap");
    let mut control = control_client(&sock);
    let frozen = match control
        .request(Request::Snapshot(SnapshotRequest {
            dir: snap.clone(),
            kind: Default::default(),
            parent: None,
            resume: false,
            mode: Default::default(),
        }))
        .expect("snapshot request")
    {
        Response::Snapshot(info) => info.frozen_layers[0].clone(),
        other => panic!("{other:?}"),
    };
    let _ = control.request(Request::Shutdown);
    source
        .wait_exit(Duration::from_secs(60))
        .unwrap_or_else(|r| panic!("{r}"));

    let seed = std::env::var("GROVE_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
                | 1
        });
    eprintln!("disk crash test: GROVE_CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let mut total_acked = 0;
    for round in 0..ROUNDS {
        let overlay = dir.path().join(format!("round-{round}.qcow2"));
        let mut vm = VmProcess::spawn(
            &grove_vmm_bin(),
            [
                "restore",
                "--snapshot",
                snap.to_str().unwrap(),
                "--disk-override",
                &format!("disk1={}", overlay.display()),
            ],
        );
        vm.send_line("grove-disktool fsync-loop /dev/vdb 0 0");
        if let Err(report) = vm.wait_for("ACK 0", Duration::from_secs(120)) {
            panic!("round {round}: {report}");
        }
        // Somewhere in the next 0-3 s: allocation, data writes, metadata flushes.
        let delay = Duration::from_millis(rng.next() % 3000);
        std::thread::sleep(delay);
        vm.kill();
        let acked = last_ack(&vm.console()).expect("at least ACK 0");
        total_acked += acked + 1;

        qemu_img_check(&overlay);
        let raw = dir.path().join(format!("round-{round}.raw"));
        qemu_img(&[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            overlay.to_str().unwrap(),
            raw.to_str().unwrap(),
        ]);
        let contents = std::fs::read(&raw).unwrap();
        for i in 0..=acked {
            let at = i as usize * DISKTOOL_RECORD;
            assert!(
                contents[at..at + DISKTOOL_RECORD] == disktool_record(i)[..],
                "round {round} (seed {seed}, killed after {delay:?}): record {i} of the \
                 {} acknowledged is missing or wrong",
                acked + 1
            );
        }
        eprintln!(
            "round {round}: killed after {delay:?}, {} records acknowledged and present",
            acked + 1
        );
        std::fs::remove_file(&raw).unwrap();
        std::fs::remove_file(&overlay).unwrap();
    }
    assert!(total_acked >= ROUNDS as u64);
    qemu_img_check(&frozen);
    qemu_img_check(&data);
}
