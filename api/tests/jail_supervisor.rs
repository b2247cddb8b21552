//! The daemon's jailed VMMs for real, with vmm's tiny test guest instead of the Debian
//! image: `Supervisor` boots an environment, snapshots it (staged in the jail, then moved
//! out of its reach) and restores a clone, each VMM as its environment's own uid and
//! seeing only its own files.
//!
//! Needs root and KVM, and the `grove-vmm` binary and the test guest built first:
//! `cargo build -p vmm --bin grove-vmm && cargo test -p vmm --test kvm_jail --no-run`
//! (the guest is found under target/*/build/vmm-*/out, or at $GROVE_TEST_GUEST).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use grove_api::backend::{Backend, RestoreSpec, VmSpec};
use grove_api::jail::JailSettings;
use grove_api::model::SnapshotMode;
use grove_api::supervisor::{Supervisor, SNAPSHOT_STAGING};
use vmm::disk::DiskFormat;

fn require_root_and_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "this test needs KVM: /dev/kvm is missing on this host"
    );
    // SAFETY: geteuid has no preconditions and touches no memory.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this test needs root: it jails VMMs");
}

/// The newest test guest vmm's build script made.
fn test_guest() -> PathBuf {
    if let Some(p) = std::env::var_os("GROVE_TEST_GUEST") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> -> target/<profile>/build
    let build = exe.parent().unwrap().parent().unwrap().join("build");
    std::fs::read_dir(&build)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("vmm-"))
        .map(|e| e.path().join("out/test-guest.elf"))
        .filter(|p| p.exists())
        .max_by_key(|p| std::fs::metadata(p).unwrap().modified().unwrap())
        .expect("no test guest: run `cargo test -p vmm --test kvm_jail --no-run` first")
}

/// The VMM a jailed `grove-vmm` started as `pid` runs (its grandchild).
fn jailed_vmm(pid: u32) -> u32 {
    let children = |pid: u32| -> Vec<u32> {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
                    let after = &s[s.rfind(')').unwrap() + 2..];
                    after.split(' ').nth(1) == Some(&pid.to_string())
                })
            })
            .collect()
    };
    let init = children(pid);
    assert_eq!(init.len(), 1, "{init:?}");
    let vmm = children(init[0]);
    assert_eq!(vmm.len(), 1, "{vmm:?}");
    vmm[0]
}

fn uid_of(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}

/// Everything under `dir` as the process `pid` sees it, relative names.
fn seen(pid: u32, dir: &Path) -> Vec<String> {
    let inside = PathBuf::from(format!("/proc/{pid}/root")).join(dir.strip_prefix("/").unwrap());
    let mut names: Vec<String> = std::fs::read_dir(inside)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_supervisor_jails_boot_snapshot_and_restore() {
    require_root_and_kvm();
    let tmp = std::env::temp_dir().join(format!("grove-jail-supervisor-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    for d in ["envs/1", "envs/2", "snapshots", "images"] {
        std::fs::create_dir_all(tmp.join(d)).unwrap();
    }
    let data = tmp.canonicalize().unwrap();
    let base = data.join("images/base.raw");
    std::fs::write(&base, vec![0u8; 4 << 20]).unwrap();
    let uid_base = 1_600_000 + (std::process::id() % 1000) * 10;
    let vmm_bin = Supervisor::find_vmm_bin();
    assert!(
        vmm_bin.is_file(),
        "build grove-vmm first: cargo build -p vmm --bin grove-vmm"
    );
    let sup = Supervisor::new(vmm_bin).with_jail(JailSettings {
        uid_base,
        jails_dir: data.join("jails"),
    });

    let (env1, env2) = (data.join("envs/1"), data.join("envs/2"));
    sup.create_overlay(&env1.join("disk.qcow2"), &base, DiskFormat::Raw)
        .unwrap();
    let running = sup
        .boot(&VmSpec {
            dir: env1.clone(),
            kernel: test_guest().canonicalize().unwrap(),
            initrd: None,
            vcpus: 1,
            memory_mib: 32,
            netns: None,
            cmdline: Some("test=counter".into()),
        })
        .await
        .unwrap();
    let vmm1 = jailed_vmm(running.pid);
    assert_eq!(uid_of(vmm1), uid_base + 1);
    assert_eq!(std::fs::metadata(&env1).unwrap().uid(), uid_base + 1);
    // Its own directory, and of the images only its base layer.
    assert_eq!(seen(vmm1, &data.join("images")), ["base.raw"]);
    assert_eq!(seen(vmm1, &data.join("envs")), ["1"]);

    let snap = data.join("snapshots/s1-1");
    // Live, as branches take them: pre-copied by the jailed, filtered VMM.
    let frozen = sup
        .snapshot(&env1, &snap, SnapshotMode::Live)
        .await
        .unwrap();
    assert_eq!(frozen.mode, SnapshotMode::Live);
    assert!(
        snap.join("state.bin").exists(),
        "the snapshot was moved into place"
    );
    assert!(!env1.join(SNAPSHOT_STAGING).exists());
    // Out of the parent VMM's reach from now on.
    assert!(!PathBuf::from(format!("/proc/{vmm1}/root"))
        .join(snap.strip_prefix("/").unwrap())
        .exists());
    let frozen = frozen.frozen_layer.expect("the disk was branched");

    let running2 = sup
        .restore(&RestoreSpec {
            dir: env2.clone(),
            snapshot: snap.clone(),
            overlay: env2.join("disk.qcow2"),
            layers: vec![frozen.clone(), base.clone()],
            vcpus: 1,
            memory_mib: 32,
            netns: None,
        })
        .await
        .unwrap();
    let vmm2 = jailed_vmm(running2.pid);
    assert_eq!(uid_of(vmm2), uid_base + 2);
    // Of its parent's directory, the clone sees the frozen layer and nothing else.
    assert_eq!(
        seen(vmm2, &env1),
        [frozen.file_name().unwrap().to_string_lossy().into_owned()]
    );
    assert_eq!(
        std::fs::metadata(env2.join("disk.qcow2")).unwrap().uid(),
        uid_base + 2
    );

    for (dir, pid) in [(&env1, running.pid), (&env2, running2.pid)] {
        sup.stop(dir, pid).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let reason = tokio::time::timeout(Duration::from_secs(10), sup.wait_exit(dir, pid))
            .await
            .expect("the VMM ended");
        assert!(Instant::now() < deadline, "{reason}");
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}
