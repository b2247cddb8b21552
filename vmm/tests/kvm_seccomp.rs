//! seccomp through the `grove-vmm` binary and the test guest: every thread of a running VMM
//! is filtered (and still does its work: control requests, a snapshot that branches a
//! qcow2 disk, vsock, shutdown), `--no-seccomp` turns the filters off, and a forbidden
//! system call ends the VMM with the documented exit code and one line on standard error.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmm::control::protocol::{Request, Response, SnapshotKind, SnapshotMode, SnapshotRequest};

mod common;
use common::{connect_control, require_kvm, test_guest, TempDir};

const VMM: &str = env!("CARGO_BIN_EXE_grove-vmm");

/// `grove-vmm run` of the counter test guest (it runs until stopped) with a control
/// socket, a vsock device and a writable qcow2 disk, so every kind of thread exists.
fn start_vmm(tmp: &TempDir, extra: &[&str], env: Option<(&str, &str)>) -> (Child, PathBuf) {
    let disk = tmp.join("disk.qcow2");
    if !disk.exists() {
        let status = Command::new(VMM)
            .args(["disk", "create", "--size", "1048576"])
            .arg(&disk)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "disk create: {status}");
    }
    let sock = tmp.join("vm.sock");
    let vsock = format!("3,{}", tmp.join("vsock.sock").display());
    let mut cmd = Command::new(VMM);
    cmd.args(["run", "--kernel"])
        .arg(test_guest())
        .args(["--no-rng", "--cmdline", "test=counter", "--vsock", &vsock])
        .arg("--disk")
        .arg(format!("{},qcow2", disk.display()))
        .arg("--control")
        .arg(&sock)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some((k, v)) = env {
        cmd.env(k, v);
    }
    (cmd.spawn().unwrap(), sock)
}

/// (thread name, `Seccomp:` value) of every thread of `pid`. A filtered thread carries its
/// own allowlist and, if it opens no files, the open refusal: never filters inherited from
/// the thread that started it on top.
fn thread_modes(pid: u32) -> Vec<(String, String)> {
    let mut modes = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let Ok(status) = std::fs::read_to_string(dir.join("status")) else {
            continue; // the thread ended meanwhile
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let mode = field("Seccomp:");
        let filters = field("Seccomp_filters:");
        if mode == "2" && !filters.is_empty() {
            assert!(
                filters == "1" || filters == "2",
                "{} carries {filters} filters",
                field("Name:")
            );
        }
        modes.push((field("Name:"), mode));
    }
    modes.sort();
    modes
}

/// Waits until every thread reports `mode` (the main thread filters itself just after the
/// control socket appears).
fn wait_for_modes(pid: u32, mode: &str) -> Vec<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let modes = thread_modes(pid);
        if modes.iter().all(|(_, m)| m == mode) {
            return modes;
        }
        assert!(
            Instant::now() < deadline,
            "not every thread reports Seccomp: {mode}: {modes:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn stderr_of(child: Child) -> (i32, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_thread_of_a_running_vmm_is_filtered_and_works() {
    require_kvm();
    let tmp = TempDir::new("seccomp-all");
    let (mut child, sock) = start_vmm(&tmp, &["--track-dirty-pages"], None);
    let mut client = connect_control(&sock, &mut child);
    let modes = wait_for_modes(child.id(), "2");
    let names: Vec<&str> = modes.iter().map(|(n, _)| n.as_str()).collect();
    for expected in ["grove-vmm", "vcpu0", "event-loop"] {
        assert!(names.contains(&expected), "no {expected} thread: {modes:?}");
    }

    // The filtered threads still do their work: status, pause, a snapshot that branches
    // the qcow2 disk (files, fsync, rename, flock, KVM state reads), resume.
    assert!(matches!(
        client.request(Request::Status).unwrap(),
        Response::Status(_)
    ));
    let snap = tmp.join("snap");
    let diff = tmp.join("diff");
    let requests = [
        Request::Snapshot(SnapshotRequest {
            dir: snap.clone(),
            kind: SnapshotKind::Full,
            parent: None,
            resume: true,
            // Pre-copy on the control thread while the guest runs.
            mode: SnapshotMode::Live,
        }),
        // A diff reads and clears the KVM dirty log.
        Request::Snapshot(SnapshotRequest {
            dir: diff.clone(),
            kind: SnapshotKind::Diff,
            parent: Some(snap.clone()),
            resume: false,
            mode: SnapshotMode::Paused,
        }),
        Request::MemoryDigest,
        Request::Resume,
        Request::Pause,
        Request::Resume,
    ];
    for request in requests {
        let what = format!("{request:?}");
        let r = client.request(request);
        let ok = matches!(
            r,
            Ok(Response::Ok | Response::Snapshot(_) | Response::MemoryDigest { .. })
        );
        if !ok {
            let _ = child.kill();
            panic!("{what}: {r:?}; grove-vmm stderr:\n{}", stderr_of(child).1);
        }
    }
    assert!(snap.join("state.bin").exists());
    assert!(diff.join("state.bin").exists());
    // A vsock host connection is accepted by the event loop (nobody listens in the test
    // guest, so the device answers with a reset; the VMM must survive it).
    if let Ok(mut s) = std::os::unix::net::UnixStream::connect(tmp.join("vsock.sock")) {
        use std::io::Write;
        let _ = s.write_all(b"CONNECT 52\n");
    }
    assert!(matches!(
        client.request(Request::Status).unwrap(),
        Response::Status(_)
    ));
    // Every thread is still filtered, including any started meanwhile.
    wait_for_modes(child.id(), "2");

    // Shutdown and teardown run under the main thread's filter: a clean exit, not 148.
    assert!(matches!(
        client.request(Request::Shutdown).unwrap(),
        Response::Ok
    ));
    let (code, stderr) = stderr_of(child);
    assert_eq!(code, 0, "grove-vmm stderr:\n{stderr}");
    assert!(!stderr.contains("error: seccomp"), "{stderr}");
}

/// `grove-vmm restore` as the daemon runs it (--disk-override for the branched qcow2 disk,
/// --vsock-override, --serial, --paused, then resumed through the control socket) under
/// the filters.
#[test]
fn a_restored_vmm_is_filtered_and_works() {
    require_kvm();
    let tmp = TempDir::new("seccomp-restore");
    let (mut child, sock) = start_vmm(&tmp, &[], None);
    let mut client = connect_control(&sock, &mut child);
    let snap = tmp.join("snap");
    let r = client.request(Request::Snapshot(SnapshotRequest {
        dir: snap.clone(),
        kind: SnapshotKind::Full,
        parent: None,
        resume: false,
        mode: SnapshotMode::Paused,
    }));
    assert!(matches!(r, Ok(Response::Snapshot(_))), "{r:?}");
    client.request(Request::Shutdown).unwrap();
    let (code, stderr) = stderr_of(child);
    assert_eq!(code, 0, "{stderr}");

    let clone_sock = tmp.join("clone.sock");
    let mut clone = Command::new(VMM)
        .args(["restore", "--paused", "--snapshot"])
        .arg(&snap)
        .arg("--control")
        .arg(&clone_sock)
        .arg("--serial")
        .arg(tmp.join("clone.serial"))
        .arg("--disk-override")
        .arg(format!("disk0={}", tmp.join("clone.qcow2").display()))
        .arg("--vsock-override")
        .arg(tmp.join("clone-vsock.sock"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut client = connect_control(&clone_sock, &mut clone);
    let modes = wait_for_modes(clone.id(), "2");
    assert!(modes.iter().any(|(n, _)| n == "vcpu0"), "{modes:?}");
    for request in [Request::Resume, Request::Status, Request::Shutdown] {
        let r = client.request(request);
        if !matches!(r, Ok(Response::Ok | Response::Status(_))) {
            let _ = clone.kill();
            panic!("{r:?}; grove-vmm stderr:\n{}", stderr_of(clone).1);
        }
    }
    let (code, stderr) = stderr_of(clone);
    assert_eq!(code, 0, "{stderr}");
}

/// The test guest's block test on a qcow2 disk: reads, writes, flushes through the filtered
/// event loop, then resets the VM; the filtered main thread tears down (flushing the disk).
#[test]
fn a_guest_using_a_qcow2_disk_runs_to_its_reset_under_the_filters() {
    require_kvm();
    let tmp = TempDir::new("seccomp-blk");
    let disk = tmp.join("blk.qcow2");
    let status = Command::new(VMM)
        .args(["disk", "create", "--size", "1048576"])
        .arg(&disk)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let serial = tmp.join("serial.txt");
    let out = Command::new(VMM)
        .args(["run", "--no-rng", "--cmdline", "test=blk", "--kernel"])
        .arg(test_guest())
        .arg("--rootfs")
        .arg(format!("{},qcow2", disk.display()))
        .arg("--serial")
        .arg(&serial)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let console = std::fs::read_to_string(&serial).unwrap();
    for step in [
        "write2 status=00",
        "flush status=00",
        "used=0201 byte0=c3",
        "done",
    ] {
        assert!(
            console.contains(step),
            "no {step:?} in the console:\n{console}"
        );
    }
}

#[test]
fn no_seccomp_leaves_every_thread_unfiltered() {
    require_kvm();
    let tmp = TempDir::new("seccomp-off");
    let (mut child, sock) = start_vmm(&tmp, &["--no-seccomp"], None);
    let mut client = connect_control(&sock, &mut child);
    // Give the main thread the moment it would take to filter itself.
    std::thread::sleep(Duration::from_millis(200));
    let modes = thread_modes(child.id());
    assert!(modes.iter().all(|(_, m)| m == "0"), "{modes:?}");
    client.request(Request::Shutdown).unwrap();
    let (code, stderr) = stderr_of(child);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("--no-seccomp"), "{stderr}");
}

/// The hook (debug builds only) makes the first thread of a kind call getppid(2) right
/// after its filter is installed.
#[test]
#[cfg_attr(
    not(debug_assertions),
    ignore = "the seccomp test hook exists in debug builds only"
)]
fn a_forbidden_call_ends_the_vmm_with_exit_code_148() {
    require_kvm();
    let tmp = TempDir::new("seccomp-kill");
    for (kind, thread) in [
        ("vcpu", "vcpu"),
        ("event-loop", "event-loop"),
        ("control", "control"),
        ("main", "main"),
    ] {
        let (child, _) = start_vmm(&tmp, &[], Some((vmm::seccomp::TEST_HOOK_VAR, kind)));
        let (code, stderr) = stderr_of(child);
        assert_eq!(
            code,
            i32::from(vmm::seccomp::EXIT_CODE),
            "{kind}: stderr:\n{stderr}"
        );
        let line = format!(
            "grove-vmm: error: seccomp: the {thread} thread made a forbidden system call: \
             {} (getppid)",
            libc::SYS_getppid
        );
        assert!(stderr.contains(&line), "{kind}: stderr:\n{stderr}");
        assert_eq!(
            stderr
                .lines()
                .filter(|l| l.contains("error: seccomp"))
                .count(),
            1,
            "{stderr}"
        );
    }
}
