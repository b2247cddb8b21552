//! The daemon's verify-before-restore on real snapshot files in a temporary directory.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::json;

use super::*;

/// Writes a snapshot the signing code reads like a VMM's: a state naming a 4 KiB memory
/// file (with its BLAKE3) and a disk branched on `frozen`, and the memory file.
pub(crate) fn write_test_snapshot(dir: &Path, frozen: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let memory = vec![0x42u8; 4096];
    std::fs::write(dir.join("memory.bin"), &memory)?;
    let state = json!({
        "written_by": "test",
        "memory": {
            "regions": [{"guest_addr": 0, "size": 4096, "file_offset": 0}],
            "file_size": 4096,
            "blake3": blake3::hash(&memory).to_hex().to_string(),
        },
        "devices": {"virtio": [{"kind": {"Block": {
            "path": frozen.with_file_name("disk.qcow2"),
            "read_only": false,
            "id": "disk0",
            "capacity": 8,
            "acked_features": 0,
            "format": "qcow2",
            "backing": [{"path": frozen, "format": "qcow2"}],
            "branched": true,
        }}}]},
    });
    vmm::snapshot::format::write_file(&dir.join("state.bin"), &state).map_err(std::io::Error::other)
}

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(name: &str) -> Scratch {
    let d = std::env::temp_dir().join(format!("grove-signing-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Scratch(d)
}

fn key(fill: u8) -> SnapshotKey {
    SnapshotKey::from_bytes(vec![fill; 32]).unwrap()
}

#[tokio::test]
async fn restores_of_unsigned_changed_or_foreign_snapshots_are_refused() {
    let s = scratch("verify");
    let frozen = s.0.join("disk@1.qcow2");
    std::fs::write(&frozen, b"frozen layer").unwrap();
    let snap = s.0.join("s1-1");
    write_test_snapshot(&snap, &frozen).unwrap();
    let daemon = SnapshotSigning::new(key(1), true);

    let e = daemon
        .verify_before_restore("main@1", &snap)
        .await
        .unwrap_err();
    assert_eq!((e.status, e.code), (500, SNAPSHOT_UNVERIFIED));
    assert!(
        e.message.contains("main@1") && e.message.contains("not signed"),
        "{e}"
    );

    // Only the daemon's own layers may be named.
    let e = daemon.sign("main@1", &snap, vec![]).await.unwrap_err();
    assert!(e.message.contains("disk@1.qcow2"), "{e}");
    daemon
        .sign("main@1", &snap, vec![frozen.clone()])
        .await
        .unwrap();
    daemon.verify_before_restore("main@1", &snap).await.unwrap();
    // Verified once, the layer's hash is cached; a change is still seen (its ctime moved).
    std::fs::write(&frozen, b"frozen layeR").unwrap();
    let e = daemon
        .verify_before_restore("main@1", &snap)
        .await
        .unwrap_err();
    assert_eq!(e.code, SNAPSHOT_UNVERIFIED);
    assert!(
        e.message.contains("disk@1.qcow2") && e.message.contains("changed"),
        "{e}"
    );
    std::fs::write(&frozen, b"frozen layer").unwrap();
    daemon.verify_before_restore("main@1", &snap).await.unwrap();

    // Another daemon's key.
    let other = SnapshotSigning::new(key(2), true);
    let e = other
        .verify_before_restore("main@1", &snap)
        .await
        .unwrap_err();
    assert!(e.message.contains(daemon.key_id()), "{e}");
    // A daemon that signs without requiring signatures restores anything.
    let lenient = SnapshotSigning::new(key(2), false);
    lenient
        .verify_before_restore("main@1", &snap)
        .await
        .unwrap();
    // Signing a directory that is no snapshot is an internal error naming it.
    let e = daemon
        .sign("x@1", &s.0.join("absent"), vec![])
        .await
        .unwrap_err();
    assert_eq!((e.status, e.code), (500, "internal"));
    assert!(
        e.message.contains("x@1") && e.message.contains("state.bin"),
        "{e}"
    );
}

#[test]
fn the_key_file_is_checked_at_startup() {
    let s = scratch("keyfile");
    let path = s.0.join("key");
    std::fs::write(&path, [7u8; 40]).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = SnapshotSigning::from_key_file(&path, true).unwrap_err();
    assert!(e.to_string().contains("chmod 600"), "{e}");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let signing = SnapshotSigning::from_key_file(&path, true).unwrap();
    assert!(signing.required());
    let same = SnapshotKey::from_bytes(vec![7u8; 40]).unwrap();
    assert_eq!(signing.key_id(), same.key_id());
}
