//! The vsock device's wiring on real KVM with the tiny test guest (which has no vsock
//! driver: packet handling is covered by the unit tests against mock queues): the socket is
//! created and reported by `status`, a snapshot records it, a clone running beside its
//! source must listen elsewhere (`vsock_override`), and the sockets go with their VMs; the
//! `vsock_connection` query reaches the device (or says there is none).
//! Needs /dev/kvm.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use vmm::builder::{restore, RestoreOptions, StartOptions};
use vmm::control::protocol::{
    ErrorCode, Request, Response, SnapshotRequest, VsockConnectionRequest, VsockStatus,
};
use vmm::control::ControlHandler;
use vmm::{ConsoleIo, VmConfig, Vmm, VsockConfig};

mod common;
use common::{require_kvm, Console, TempDir};

fn console() -> ConsoleIo {
    ConsoleIo {
        output: Box::new(Console::default()),
        input: None,
    }
}

fn guest(vsock: Option<VsockConfig>) -> Vmm {
    let mut c = VmConfig::new(env!("GROVE_TEST_GUEST"));
    c.cmdline = Some("test=counter".into());
    c.memory_mib = 32;
    c.rng = false;
    c.vsock = vsock;
    vmm::builder::build_and_start_with(&c, console(), Instant::now(), &StartOptions::default())
        .unwrap()
}

fn vsock_status(vm: &Vmm) -> Option<VsockStatus> {
    match vm.shared().handle(Request::Status) {
        Response::Status(s) => s.vsock,
        other => panic!("{other:?}"),
    }
}

/// The error code of a `vsock_connection` query for `host_port`.
fn vsock_connection_error(vm: &Vmm, host_port: u32) -> ErrorCode {
    match vm
        .shared()
        .handle(Request::VsockConnection(VsockConnectionRequest {
            host_port,
        })) {
        Response::Error(e) => e.code,
        other => panic!("{other:?}"),
    }
}

fn snapshot(vm: &Vmm, dir: &Path) {
    vm.snapshot(&SnapshotRequest {
        dir: dir.to_path_buf(),
        kind: Default::default(),
        parent: None,
        resume: true,
        mode: Default::default(),
    })
    .unwrap();
}

fn restore_with(dir: &Path, vsock_override: Option<PathBuf>) -> Result<Vmm, String> {
    let opts = RestoreOptions {
        snapshot: dir.to_path_buf(),
        vsock_override,
        ..Default::default()
    };
    restore(&opts, console(), Instant::now()).map_err(|e| format!("{:#}", anyhow::Error::from(e)))
}

#[test]
fn the_socket_follows_boot_snapshot_and_clones() {
    require_kvm();
    let tmp = TempDir::new("vsock");
    let sock = tmp.join("v.sock");
    let source = guest(Some(VsockConfig {
        guest_cid: 9,
        uds_path: sock.clone(),
    }));
    assert_eq!(
        vsock_status(&source),
        Some(VsockStatus {
            guest_cid: 9,
            uds_path: sock.clone(),
        })
    );
    // No host client connected (the test guest has no driver): no connection figures.
    assert_eq!(
        vsock_connection_error(&source, 1 << 30),
        ErrorCode::NotFound
    );
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let snap = tmp.join("snap");
    snapshot(&source, &snap);

    let e = restore_with(&snap, None)
        .err()
        .expect("the source's socket");
    assert!(e.contains("in use"), "{e}");
    let clone_sock = tmp.join("clone.sock");
    let clone = restore_with(&snap, Some(clone_sock.clone())).unwrap();
    assert_eq!(
        vsock_status(&clone).map(|s| s.uds_path),
        Some(clone_sock.clone())
    );
    // The clone's own snapshot records where it listens.
    let snap2 = tmp.join("snap2");
    snapshot(&clone, &snap2);
    clone.stop();
    clone.wait();
    assert!(!clone_sock.exists(), "the clone's socket goes with it");
    let again = restore_with(&snap2, None).unwrap();
    assert_eq!(vsock_status(&again).map(|s| s.uds_path), Some(clone_sock));
    again.stop();
    again.wait();
    source.stop();
    source.wait();
    assert!(!sock.exists());
}

#[test]
fn an_override_needs_a_vsock_device_and_bad_cids_are_refused() {
    require_kvm();
    let tmp = TempDir::new("vsock-none");
    let vm = guest(None);
    assert_eq!(vsock_status(&vm), None);
    assert_eq!(
        vsock_connection_error(&vm, 1 << 30),
        ErrorCode::InvalidState
    );
    let snap = tmp.join("snap");
    snapshot(&vm, &snap);
    vm.stop();
    vm.wait();
    let e = restore_with(&snap, Some(tmp.join("x.sock")))
        .err()
        .expect("nothing to override");
    assert!(e.contains("no vsock device"), "{e}");

    let mut c = VmConfig::new(env!("GROVE_TEST_GUEST"));
    c.vsock = Some(VsockConfig {
        guest_cid: 2,
        uds_path: tmp.join("v.sock"),
    });
    let e = vmm::builder::build_and_start(&c, console(), Instant::now())
        .err()
        .expect("CID 2 is the host's");
    assert!(e.to_string().contains("guest_cid"), "{e}");
}
