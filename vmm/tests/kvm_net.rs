//! A VM with a network device through snapshot and restore on real KVM: every clone reopens
//! the TAP of the saved name in its own network namespace, so clones of one snapshot each
//! get a `tap0` of their own at the same time; `--net-override` moves a clone to another
//! TAP. The tiny test guest does not drive the device; the device tests in
//! `vmm/src/devices/virtio/net/tests.rs` move frames.
//!
//! Needs /dev/kvm and root (network namespaces, TAPs), and fails, saying so, without them.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm::builder::{restore, RestoreOptions, StartOptions};
use vmm::config::NetConfig;
use vmm::control::protocol::SnapshotRequest;
use vmm::{BuildError, ConsoleIo, VmConfig, VmExit, Vmm};

mod common;
use common::{require_kvm, Console, TempDir};

const COUNTER: GuestAddress = GuestAddress(0x30_0000);

fn console() -> ConsoleIo {
    ConsoleIo {
        output: Box::new(Console::default()),
        input: None,
    }
}

/// Runs `f` on a thread in a new network namespace; the VM threads it starts stay there.
fn in_fresh_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: unshare moves only this thread into a new network namespace.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "this test needs root to create network namespaces: {}",
            std::io::Error::last_os_error()
        );
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// Whether this thread's network namespace has the interface `name`.
fn has_interface(name: &str) -> bool {
    let name = std::ffi::CString::new(name).unwrap();
    // SAFETY: if_nametoindex reads the NUL-terminated name.
    unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
}

/// An error with its causes, as `grove-vmm` prints it.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn counter(vm: &Vmm) -> u64 {
    vm.memory().read_obj(COUNTER).unwrap()
}

fn counts_on(vm: &Vmm) {
    let from = counter(vm);
    let deadline = Instant::now() + Duration::from_secs(30);
    while counter(vm) == from {
        assert!(Instant::now() < deadline, "the guest does not run");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn restore_from(snap: &Path, net_overrides: Vec<(String, String)>) -> Result<Vmm, BuildError> {
    let opts = RestoreOptions {
        snapshot: snap.to_path_buf(),
        net_overrides,
        ..Default::default()
    };
    restore(&opts, console(), Instant::now())
}

#[test]
fn clones_reopen_tap0_each_in_its_own_namespace() {
    require_kvm();
    assert!(
        Path::new("/dev/net/tun").exists(),
        "this test needs /dev/net/tun (the tun module)"
    );
    let tmp = TempDir::new("net");
    let snap: PathBuf = tmp.0.join("snap");

    let at = snap.clone();
    in_fresh_netns(move || {
        let mut c = VmConfig::new(env!("GROVE_TEST_GUEST"));
        c.cmdline = Some("test=counter".into());
        c.memory_mib = 32;
        c.rng = false;
        c.net = vec![NetConfig {
            tap: "tap0".into(),
            mac: Some("06:00:ac:10:00:02".into()),
            id: None,
        }];
        let vm = vmm::builder::build_and_start_with(
            &c,
            console(),
            Instant::now(),
            &StartOptions::default(),
        )
        .expect("boot with a network device (needs root for the TAP)");
        assert!(has_interface("tap0"));
        counts_on(&vm);
        vm.snapshot(&SnapshotRequest {
            dir: at,
            kind: Default::default(),
            parent: None,
            resume: true,
            mode: Default::default(),
        })
        .unwrap();
        vm.stop();
        assert_eq!(vm.wait(), VmExit::Stopped);
        // The VMM made the TAP, so it went with it.
        assert!(!has_interface("tap0"));
    });

    // Two clones at once, each with its own tap0; one more in the same namespace as a
    // running clone finds tap0 taken.
    let both_running = Arc::new(Barrier::new(2));
    let clones: Vec<_> = [
        ("tap0", vec![]),
        ("tap7", vec![("net0".to_string(), "tap7".to_string())]),
    ]
    .into_iter()
    .map(|(tap, overrides)| {
        let (snap, both_running) = (snap.clone(), both_running.clone());
        std::thread::spawn(move || {
            in_fresh_netns(move || {
                let clone = restore_from(&snap, overrides).expect("restore with a TAP");
                assert!(has_interface(tap), "{tap} in the clone's namespace");
                assert_eq!(has_interface("tap0"), tap == "tap0");
                counts_on(&clone);
                both_running.wait();
                if tap == "tap0" {
                    let e = restore_from(&snap, vec![]).err().expect("tap0 is taken");
                    let text = chain(&e);
                    assert!(
                        text.contains("TAP tap0") && text.contains("resource busy"),
                        "{text}"
                    );
                }
                clone.stop();
                assert_eq!(clone.wait(), VmExit::Stopped);
            })
        })
    })
    .collect();
    for c in clones {
        c.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
    }

    let e = restore_from(&snap, vec![("net9".into(), "tap1".into())])
        .err()
        .expect("an unknown device id is refused");
    assert!(chain(&e).contains("net9"), "{}", chain(&e));
}
