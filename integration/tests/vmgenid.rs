//! End-to-end VM generation ID with the real default image (one boot, one restore): the
//! guest kernel finds the ACPI VMGenID device and binds its `vmgenid` driver, reads the ID the
//! VMM reports at the reported address, and a restored clone gets a new ID that its kernel
//! takes as a VM fork (it reseeds its RNG). docs/acpi.md describes the flow.

use std::time::Duration;

use grove_integration::{
    control_client, grove_vmm_bin, images, require_kvm, sparse_copy, TempDir, VmProcess,
    BOOT_TIMEOUT,
};
use vmm::control::client::ControlClient;
use vmm::control::protocol::{Request, Response, SnapshotRequest, VmGenIdStatus};

const WAIT: Duration = Duration::from_secs(120);

fn expect(vm: &mut VmProcess, needle: &str, timeout: Duration) {
    if let Err(report) = vm.wait_for(needle, timeout) {
        panic!("{report}");
    }
}

fn ok(c: &mut ControlClient, r: Request) -> Response {
    let resp = c.request(r).expect("control request");
    if let Response::Error(e) = &resp {
        panic!("control request failed: {e:?}");
    }
    resp
}

fn vmgenid(c: &mut ControlClient) -> VmGenIdStatus {
    match ok(c, Request::Status) {
        Response::Status(s) => s.vmgenid.expect("status reports the VM generation ID"),
        other => panic!("{other:?}"),
    }
}

/// Makes the guest print `GENID-<hex>`: the 16 bytes at `addr`, read through /dev/mem.
fn read_id_in_guest(vm: &mut VmProcess, addr: u64) {
    vm.send_line(&format!(
        "echo GENID-$(dd if=/dev/mem bs=16 skip=$(({addr}/16)) count=1 2>/dev/null | od -An -tx1 | tr -d ' \\n')"
    ));
}

#[test]
fn the_guest_kernel_sees_a_new_generation_id_after_a_restore() {
    require_kvm();
    let set = images();
    let dir = TempDir::new("e2e-vmgenid");
    let rootfs = dir.path().join("rootfs.ext4");
    sparse_copy(&set.rootfs, &rootfs);
    let sock = dir.path().join("source.sock");
    let mut source = VmProcess::spawn(
        &grove_vmm_bin(),
        [
            "run",
            "--kernel",
            set.vmlinux.to_str().unwrap(),
            "--rootfs",
            rootfs.to_str().unwrap(),
            "--control",
            sock.to_str().unwrap(),
        ],
    );
    expect(&mut source, "GROVE-INIT-READY", BOOT_TIMEOUT);
    // The ACPI device exists and Linux's vmgenid driver is bound to it.
    source.send_line(
        "echo DRV-$(basename $(readlink /sys/bus/acpi/devices/VMGENCTR:00/driver))-$((6*7))",
    );
    expect(&mut source, "DRV-vmgenid-42", WAIT);
    let mut control = control_client(&sock);
    let source_id = vmgenid(&mut control);
    assert_eq!(source_id.addr, vmm::boot::layout::VMGENID_ADDR);
    read_id_in_guest(&mut source, source_id.addr);
    expect(&mut source, &format!("GENID-{}", source_id.id), WAIT);

    ok(&mut control, Request::Pause);
    let snap = dir.path().join("snap");
    ok(
        &mut control,
        Request::Snapshot(SnapshotRequest {
            dir: snap.clone(),
            kind: Default::default(),
            parent: None,
            resume: false,
            mode: Default::default(),
        }),
    );
    ok(&mut control, Request::Shutdown);
    let status = source.wait_exit(WAIT).unwrap_or_else(|r| panic!("{r}"));
    assert_eq!(status.code(), Some(0), "{}", source.log());

    let clone_sock = dir.path().join("clone.sock");
    let mut clone = VmProcess::spawn(
        &grove_vmm_bin(),
        [
            "restore",
            "--snapshot",
            snap.to_str().unwrap(),
            "--control",
            clone_sock.to_str().unwrap(),
        ],
    );
    let mut clone_control = control_client(&clone_sock);
    // The socket may answer before the first resume, which changes the ID.
    let deadline = std::time::Instant::now() + WAIT;
    let clone_id = loop {
        let id = vmgenid(&mut clone_control);
        if id.id != source_id.id || std::time::Instant::now() > deadline {
            break id;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(clone_id.addr, source_id.addr);
    assert_ne!(clone_id.id, source_id.id, "the clone has a new ID");
    read_id_in_guest(&mut clone, clone_id.addr);
    expect(&mut clone, &format!("GENID-{}", clone_id.id), WAIT);
    // The GED interrupt reached the driver, which saw a new ID and reseeded the RNG.
    clone.send_line("echo FORKS-$(dmesg | grep -c 'reseeded due to virtual machine fork')");
    expect(&mut clone, "FORKS-1", WAIT);
    clone.send_line("reboot -f");
    let status = clone.wait_exit(WAIT).unwrap_or_else(|r| panic!("{r}"));
    assert_eq!(status.code(), Some(0), "{}", clone.log());
}
