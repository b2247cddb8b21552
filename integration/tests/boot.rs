//! End-to-end: the real default image (Debian kernel + busybox root filesystem) booted by the
//! `grove-vmm` binary. Needs KVM and the default images (built on first use, minutes).
//!
//! Under the PVM host's emulation each boot takes 15-20 s, so each test does as much as it
//! can per boot, and the guest work stays fork-light.

use std::time::Duration;

use grove_integration::{
    boot_time_ms, grove_vmm_bin, images, make_ext4, require_kvm, sparse_copy, TempDir, VmProcess,
    BOOT_TIMEOUT,
};

const READY: &str = "GROVE-INIT-READY";
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// A bzImage first decompresses the kernel (gzip) in the guest's kernel mode, which the PVM
/// host emulates in software: on these machines boot-complete came after 177 s against 24 s
/// for the vmlinux (the kernel's own part about 21 s in both), and three boots in parallel
/// on a busy machine took longer than `BOOT_TIMEOUT`. A deadline, not a measurement: on
/// bare metal decompression takes milliseconds.
const BZIMAGE_BOOT_TIMEOUT: Duration = Duration::from_secs(2 * BOOT_TIMEOUT.as_secs());

fn boot(args: &[&str]) -> VmProcess {
    require_kvm();
    VmProcess::spawn(&grove_vmm_bin(), args)
}

fn expect(vm: &mut VmProcess, needle: &str, timeout: Duration) {
    if let Err(report) = vm.wait_for(needle, timeout) {
        panic!("{report}");
    }
}

fn expect_exit_zero(vm: &mut VmProcess) {
    match vm.wait_exit(COMMAND_TIMEOUT) {
        Ok(status) => assert_eq!(
            status.code(),
            Some(0),
            "console:\n{}\nlog:\n{}",
            vm.console(),
            vm.log()
        ),
        Err(report) => panic!("{report}"),
    }
}

/// Boots the image, writes a file to a second disk from the guest, powers off; boots again
/// and reads the file back; then a guest-triggered reboot ends the VMM with exit code 0.
#[test]
fn disk_writes_survive_poweroff_and_reboot_exits_zero() {
    let set = images();
    let dir = TempDir::new("e2e-disk");
    let rootfs = dir.path().join("rootfs.ext4");
    let data = dir.path().join("data.ext4");
    sparse_copy(&set.rootfs, &rootfs);
    make_ext4(&data, 32);
    let nonce = format!("{:x}", std::process::id() as u64 * 7919 + 17);
    let args = [
        "run",
        "--kernel",
        set.vmlinux.to_str().unwrap(),
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--disk",
        data.to_str().unwrap(),
    ];

    let mut vm = boot(&args);
    expect(&mut vm, READY, BOOT_TIMEOUT);
    assert!(
        boot_time_ms(&vm.log()).is_some(),
        "boot-complete port was hit: {}",
        vm.log()
    );
    // Markers use shell arithmetic so the echoed command line never matches them.
    vm.send_line(&format!(
        "mount /dev/vdb /mnt && echo persisted-{nonce} > /mnt/hello && umount /mnt && echo WROTE-$((40+2))"
    ));
    expect(&mut vm, "WROTE-42", COMMAND_TIMEOUT);
    vm.send_line("poweroff");
    expect_exit_zero(&mut vm);

    let mut vm = boot(&args);
    expect(&mut vm, READY, BOOT_TIMEOUT);
    vm.send_line("mount -o ro /dev/vdb /mnt && cat /mnt/hello");
    expect(&mut vm, &format!("persisted-{nonce}"), COMMAND_TIMEOUT);
    vm.send_line("reboot");
    expect_exit_zero(&mut vm);

    // The host sees the guest's file too.
    let out = std::process::Command::new("debugfs")
        .args(["-R", "cat /hello"])
        .arg(&data)
        .output()
        .expect("debugfs runs");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("persisted-{nonce}")));
}

/// With `--vcpus 2` both CPUs come online (SMP through the MP table).
#[test]
fn two_vcpus_are_both_online() {
    let set = images();
    let args = [
        "run",
        "--kernel",
        set.vmlinux.to_str().unwrap(),
        "--rootfs",
        &format!("{},ro", set.rootfs.display()),
        "--vcpus",
        "2",
    ];
    let mut vm = boot(&args);
    expect(&mut vm, READY, BOOT_TIMEOUT);
    vm.send_line(
        "echo CPUS-$(cat /sys/devices/system/cpu/online)-$(grep -c ^processor /proc/cpuinfo)",
    );
    expect(&mut vm, "CPUS-0-1-2", COMMAND_TIMEOUT);
    vm.send_line("reboot -f");
    expect_exit_zero(&mut vm);
}

/// The bzImage boots through the Linux 64-bit boot protocol; with `grove.bench=boot` the init
/// resets the VM right after signalling boot completion, so the VMM exits 0 by itself.
#[test]
fn bzimage_boots_and_bench_mode_exits_by_itself() {
    let set = images();
    let args = [
        "run",
        "--kernel",
        set.bzimage.to_str().unwrap(),
        "--rootfs",
        &format!("{},ro", set.rootfs.display()),
        "--cmdline",
        "console=ttyS0 reboot=k panic=1 quiet grove.bench=boot",
    ];
    let mut vm = boot(&args);
    expect(&mut vm, READY, BZIMAGE_BOOT_TIMEOUT);
    expect_exit_zero(&mut vm);
    assert!(boot_time_ms(&vm.log()).is_some(), "{}", vm.log());
}
