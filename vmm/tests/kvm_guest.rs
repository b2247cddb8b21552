//! VMM behaviour on real KVM with the tiny test guest (tests/guest): serial output, port and
//! MMIO dispatch, virtio-blk and virtio-rng through real queues, pause/resume, clean and
//! failing exits. Each test boots in milliseconds, even under the PVM host's emulation.
//!
//! These tests need /dev/kvm and fail (not skip) without it, saying so.

use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm::{ConsoleIo, DiskConfig, VmConfig, VmExit};

mod common;
use common::{require_kvm, test_guest, Console, TempDir};

fn config(test: &str) -> VmConfig {
    let mut c = VmConfig::new(test_guest());
    c.cmdline = Some(format!("test={test}"));
    c.memory_mib = 32;
    c.rng = false;
    c
}

fn start(c: &VmConfig) -> (vmm::Vmm, Console) {
    require_kvm();
    let console = Console::default();
    let io = ConsoleIo {
        output: Box::new(console.clone()),
        input: None,
    };
    let vmm = vmm::build_and_start(c, io, Instant::now()).expect("VM starts");
    (vmm, console)
}

/// Runs the guest to its exit, with a watchdog so a broken test cannot hang the suite.
fn run(c: &VmConfig) -> (VmExit, String) {
    let (vmm, console) = start(c);
    let notifier = vmm.exit_notifier();
    let watchdog = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if notifier.reason().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        notifier.notify(VmExit::VcpuError {
            index: 255,
            message: "test watchdog expired".into(),
        });
    });
    let exit = vmm.wait();
    watchdog.join().unwrap();
    (exit, console.text())
}

#[test]
fn serial_output_and_clean_reset() {
    let (exit, out) = run(&config("serial"));
    assert_eq!(exit, VmExit::GuestReset, "console: {out}");
    assert!(out.contains("grove-test-guest: serial\n"), "{out}");
    assert!(out.contains("hello from the test guest\n"), "{out}");
    assert!(out.ends_with("done\n"), "{out}");
}

#[test]
fn boot_complete_port_is_timed() {
    let (vmm, _console) = start(&config("counter"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while vmm.boot_time().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(vmm.boot_time().is_some(), "guest wrote 123 to port 0x3f0");
    vmm.stop();
    assert_eq!(vmm.wait(), VmExit::Stopped);
}

#[test]
fn port_and_mmio_dispatch() {
    let dir = TempDir::new("pio");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    let mut c = config("pio-mmio");
    c.disks.push(DiskConfig::raw(disk, true));
    let (exit, out) = run(&c);
    assert_eq!(exit, VmExit::GuestReset, "{out}");
    // Nothing at port 0x80 or at 0xe0000000: all ones. A virtio-blk device at the first
    // virtio-MMIO window: magic "virt", device id 2.
    assert!(
        out.contains(
            "unclaimed-pio=ff unclaimed-mmio=ffffffff virtio-magic=74726976 virtio-device=00000002"
        ),
        "{out}"
    );
}

#[test]
fn virtio_blk_read_write_flush_get_id() {
    let dir = TempDir::new("blk");
    let disk = dir.join("disk.img");
    let mut content = vec![0u8; 64 * 512];
    content[512..1024].fill(0x5a);
    std::fs::write(&disk, &content).unwrap();
    let mut c = config("blk");
    c.disks.push(DiskConfig {
        id: Some("grove-test-disk".into()),
        ..DiskConfig::raw(disk.clone(), false)
    });
    let (exit, out) = run(&c);
    assert_eq!(exit, VmExit::GuestReset, "{out}");
    assert!(out.contains("blk-init=00 capacity=00000040"), "{out}");
    // Read: status OK (00), 513 bytes used (512 data + status), the host's pattern.
    assert!(
        out.contains("read1 status=00 used=0201 byte0=5a byte511=5a"),
        "{out}"
    );
    assert!(out.contains("write2 status=00 used=0001"), "{out}");
    assert!(out.contains("flush status=00 used=0001"), "{out}");
    assert!(out.contains("read2 status=00 used=0201 byte0=c3"), "{out}");
    // Past the end: VIRTIO_BLK_S_IOERR (01).
    assert!(out.contains("beyond status=01"), "{out}");
    assert!(out.contains("getid status=00"), "{out}");
    assert!(out.contains("id=grove-test-disk"), "{out}");
    // The guest's write reached the file, and nothing else changed.
    let after = std::fs::read(&disk).unwrap();
    assert!(after[1024..1536].iter().all(|b| *b == 0xc3));
    assert_eq!(after[..1024], content[..1024]);
    assert_eq!(after[1536..], content[1536..]);
}

#[test]
fn virtio_blk_read_only_refuses_writes() {
    let dir = TempDir::new("blk-ro");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 64 * 512]).unwrap();
    let mut c = config("blk");
    c.disks.push(DiskConfig::raw(disk.clone(), true));
    let (exit, out) = run(&c);
    assert_eq!(exit, VmExit::GuestReset, "{out}");
    assert!(out.contains("write2 status=01"), "{out}");
    assert!(std::fs::read(&disk).unwrap().iter().all(|b| *b == 0));
}

#[test]
fn virtio_rng_fills_buffers() {
    let mut c = config("rng");
    c.rng = true;
    let (exit, out) = run(&c);
    assert_eq!(exit, VmExit::GuestReset, "{out}");
    assert!(out.contains("rng-init=00"), "{out}");
    assert!(out.contains("rng used=0010 nonzero=1"), "{out}");
}

fn read_counter(vmm: &vmm::Vmm) -> u64 {
    vmm.memory().read_obj(GuestAddress(0x30_0000)).unwrap()
}

fn wait_for_counter_change(vmm: &vmm::Vmm, from: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = read_counter(vmm);
        if now != from || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    let (vmm, console) = start(&config("counter"));
    let first = wait_for_counter_change(&vmm, 0);
    assert_ne!(first, 0, "guest counts: {}", console.text());
    for _ in 0..3 {
        vmm.pause().unwrap();
        let paused_at = read_counter(&vmm);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            read_counter(&vmm),
            paused_at,
            "no guest progress while paused"
        );
        vmm.resume().unwrap();
        assert_ne!(
            wait_for_counter_change(&vmm, paused_at),
            paused_at,
            "progress after resume"
        );
    }
    vmm.stop();
    assert_eq!(vmm.wait(), VmExit::Stopped);
}

#[test]
fn pause_and_resume_with_several_vcpus() {
    let mut c = config("counter");
    c.vcpus = 4;
    let (vmm, _console) = start(&c);
    assert_eq!(vmm.vcpu_count(), 4);
    wait_for_counter_change(&vmm, 0);
    vmm.pause().unwrap();
    vmm.resume().unwrap();
    vmm.stop();
    assert_eq!(vmm.wait(), VmExit::Stopped);
}

#[test]
fn triple_fault_is_an_error_exit() {
    let (exit, out) = run(&config("triple-fault"));
    match exit {
        VmExit::VcpuError { index: 0, message } => {
            assert!(message.contains("triple fault"), "{message}")
        }
        other => panic!("expected a vCPU error, got {other:?}; console: {out}"),
    }
    assert_eq!(
        VmExit::VcpuError {
            index: 0,
            message: String::new()
        }
        .exit_code(),
        1
    );
}

#[test]
fn a_halted_guest_can_still_be_stopped() {
    let (vmm, console) = start(&config("halt"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !console.text().contains("grove-test-guest: halt") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    vmm.pause().unwrap();
    vmm.stop();
    assert_eq!(vmm.wait(), VmExit::Stopped);
}

#[test]
fn guest_cpuid_names_the_hypervisor() {
    let (exit, out) = run(&config("cpuid"));
    assert_eq!(exit, VmExit::GuestReset, "{out}");
    assert!(out.contains("hv=KVMKVMKVM"), "{out}");
    // The hypervisor bit (leaf 1 ECX bit 31) is set: the top hex digit of ecx is 8-f.
    let ecx = out.split("ecx=").nth(1).expect("leaf 1 printed");
    assert!(
        u32::from_str_radix(&ecx[..8], 16).unwrap() & (1 << 31) != 0,
        "{out}"
    );
}
