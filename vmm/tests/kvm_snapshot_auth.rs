//! Signed snapshots end to end with the tiny test guest on a qcow2 disk over a raw base:
//! `grove-vmm snapshot-sign`, `snapshot-verify` and `restore --verify-key`. A signed
//! snapshot restores; one changed byte of the state, the memory file or a disk layer, an
//! unsigned snapshot, another key and a changed manifest are each refused with one line
//! and exit code 2 before any VM exists. Needs /dev/kvm.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm::builder::StartOptions;
use vmm::control::client::ControlClient;
use vmm::control::protocol::{Request, Response, SnapshotRequest, VmRunState};
use vmm::disk::{self, DiskFormat, LayerRecord};
use vmm::snapshot::auth::SnapshotKey;
use vmm::{ConsoleIo, DiskConfig, VmConfig};

use common::{require_kvm, test_guest, Console, TempDir};

const COUNTER: GuestAddress = GuestAddress(0x30_0000);
const MIB: u64 = 1 << 20;

/// Runs grove-vmm to its end; one that is still running after 30 s (a restore that should
/// have been refused, now running its VM) is killed and fails the test.
fn grove_vmm(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_grove-vmm"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("grove-vmm runs");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "grove-vmm {args:?} did not exit: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Exit code 2 and exactly one line of error that contains every `needle`.
fn assert_refused(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.contains(": info: ")).collect();
    assert_eq!(lines.len(), 1, "one line of error, got: {stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "{:?} should mention {n:?}", lines[0]);
    }
}

fn write_key(dir: &TempDir, name: &str, fill: u8) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, [fill; 32]).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn flip_byte(file: &Path, at: u64) {
    let mut b = std::fs::read(file).unwrap();
    b[at as usize] ^= 0x01;
    std::fs::write(file, b).unwrap();
}

/// The counter guest on a qcow2 overlay over a raw base, snapshotted (paused) into `snap`
/// and stopped. Returns the frozen layer and the base.
fn snapshot_of_guest_with_disk(dir: &TempDir, snap: &Path) -> (PathBuf, PathBuf) {
    let base = dir.join("base.raw");
    std::fs::write(&base, vec![0x5a; 4 * MIB as usize]).unwrap();
    let active = dir.join("vm.qcow2");
    let base_layer = LayerRecord {
        path: base.clone(),
        format: DiskFormat::Raw,
    };
    disk::create_overlay(&active, Some(&base_layer), 4 * MIB).unwrap();
    let mut c = VmConfig::new(test_guest());
    c.cmdline = Some("test=counter".into());
    c.memory_mib = 32;
    c.rng = false;
    c.disks = vec![DiskConfig {
        format: DiskFormat::Qcow2,
        allow_backing: true,
        ..DiskConfig::raw(&active, false)
    }];
    let console = ConsoleIo {
        output: Box::new(Console::default()),
        input: None,
    };
    let vm = vmm::builder::build_and_start_with(
        &c,
        console,
        Instant::now(),
        &StartOptions { control: None },
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while vm.memory().read_obj::<u64>(COUNTER).unwrap() == 0 {
        assert!(Instant::now() < deadline, "the guest never counted");
        std::thread::sleep(Duration::from_millis(5));
    }
    let info = vm
        .snapshot(&SnapshotRequest {
            dir: snap.to_path_buf(),
            kind: Default::default(),
            parent: None,
            resume: false,
            mode: Default::default(),
        })
        .unwrap();
    vm.stop();
    vm.wait();
    (info.frozen_layers[0].clone(), base)
}

/// `restore --verify-key`: with a good snapshot the VM comes up paused and answers on its
/// control socket; the child is then killed.
fn restore_verified_runs(dir: &TempDir, snap: &Path, key: &Path, n: u32) {
    let control = dir.join(&format!("control-{n}.sock"));
    let overlay = dir.join(&format!("clone-{n}.qcow2"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_grove-vmm"))
        .args([
            "restore",
            "--snapshot",
            path(snap),
            "--verify-key",
            path(key),
            "--paused",
            "--control",
            path(&control),
            "--serial",
            path(&dir.join("serial.log")),
            "--disk-override",
            &format!("disk0={}", overlay.display()),
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut client = loop {
        if let Ok(c) = ControlClient::connect(&control) {
            break c;
        }
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "restore exited with {status}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(Instant::now() < deadline, "the restored VM never listened");
        std::thread::sleep(Duration::from_millis(20));
    };
    match client.request(Request::Status).unwrap() {
        Response::Status(s) => assert_eq!(s.state, VmRunState::Paused),
        other => panic!("{other:?}"),
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn signed_snapshots_restore_and_any_change_is_refused() {
    require_kvm();
    let dir = TempDir::new("auth");
    let snap = dir.join("snap");
    let (frozen, base) = snapshot_of_guest_with_disk(&dir, &snap);
    let key = write_key(&dir, "key", 0x11);
    let other = write_key(&dir, "other.key", 0x22);
    let (snap_s, key_s) = (path(&snap), path(&key));
    let verify = |k: &str| grove_vmm(&["snapshot-verify", "--snapshot", snap_s, "--key-file", k]);
    let restore = |k: &str| {
        grove_vmm(&[
            "restore",
            "--snapshot",
            snap_s,
            "--verify-key",
            k,
            "--paused",
        ])
    };

    // Unsigned: refused by verify and by restore.
    assert_refused(&verify(key_s), &["not signed", snap_s]);
    assert_refused(&restore(key_s), &["not signed", snap_s]);

    let out = grove_vmm(&["snapshot-sign", "--snapshot", snap_s, "--key-file", key_s]);
    assert!(out.status.success(), "{out:?}");
    let out = verify(key_s);
    assert!(out.status.success(), "{out:?}");
    restore_verified_runs(&dir, &snap, &key, 1);

    // Another key: named, with both key ids.
    let key_id = |p: &Path| SnapshotKey::from_file(p).unwrap().key_id().to_string();
    let (id, other_id) = (key_id(&key), key_id(&other));
    assert_refused(&verify(path(&other)), &["signed with key", &id, &other_id]);
    assert_refused(&restore(path(&other)), &[&id, &other_id]);

    // One byte of each file a restore reads; the memory file's byte is deep inside (the
    // counter page), the disk layers' bytes are data.
    let state = snap.join("state.bin");
    let memory = snap.join("memory.bin");
    for (file, at) in [
        (&state, 100),
        (&memory, COUNTER.0),
        (&frozen, std::fs::metadata(&frozen).unwrap().len() - 1),
        (&base, 3 * MIB),
    ] {
        flip_byte(file, at);
        let name = path(file);
        assert_refused(
            &verify(key_s),
            &[name, "changed since the snapshot was signed"],
        );
        assert_refused(&restore(key_s), &[name, "changed"]);
        flip_byte(file, at);
        let out = verify(key_s);
        assert!(out.status.success(), "{out:?}");
    }

    // A changed manifest: its signature no longer matches.
    let manifest = snap.join("manifest.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, text.replacen("\"size\": ", "\"size\": 1", 1)).unwrap();
    assert_refused(&verify(key_s), &["bad signature", "manifest.json"]);
    assert_refused(&restore(key_s), &["bad signature"]);
    std::fs::write(&manifest, &text).unwrap();

    // A key file others can read, or too short, is refused before anything else.
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_refused(&restore(path(&other)), &["other.key", "chmod 600"]);
    let short = dir.join("short.key");
    std::fs::write(&short, [1u8; 16]).unwrap();
    std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_refused(&verify(path(&short)), &["short.key", "at least 32"]);

    // Everything back as signed: the restore works again.
    restore_verified_runs(&dir, &snap, &key, 2);
}
