//! Signing and verifying snapshot directories made of real files: a minimal state (memory
//! record and block devices), a memory file and disk layers.

use std::path::{Path, PathBuf};

use serde_json::json;

use super::*;

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("grove-auth-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn key(fill: u8) -> SnapshotKey {
    SnapshotKey::from_bytes(vec![fill; 32]).unwrap()
}

/// A block device record as the VMM saves it: `branched` disks restore on a new overlay
/// over `backing[0]`, others reopen `path`.
fn block(path: &Path, backing: &[&Path], branched: bool) -> serde_json::Value {
    json!({"kind": {"Block": {
        "path": path,
        "read_only": !branched,
        "id": "disk0",
        "capacity": 8,
        "acked_features": 0,
        "format": "qcow2",
        "backing": backing.iter().map(|p| json!({"path": p, "format": "raw"})).collect::<Vec<_>>(),
        "branched": branched,
    }}, "transport": {}, "mmio_base": 0, "irq": 5})
}

/// Writes a snapshot into `dir`: 8 KiB of memory filled with `fill`, the given devices, and
/// for a diff the parent it applies to. Returns the memory hash.
fn write_snapshot(
    dir: &Path,
    fill: u8,
    devices: Vec<serde_json::Value>,
    parent: Option<&Path>,
) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let memory = vec![fill; 8192];
    std::fs::write(dir.join(MEMORY_FILE), &memory).unwrap();
    let hash = blake3::hash(&memory).to_hex().to_string();
    let mut mem = json!({
        "regions": [{"guest_addr": 0, "size": 8192, "file_offset": 0}],
        "file_size": 8192,
        "blake3": hash,
    });
    if let Some(p) = parent {
        let parent_state: serde_json::Value = format::read_file(&p.join(STATE_FILE)).unwrap();
        mem["parent"] = json!({"dir": p, "blake3": parent_state["memory"]["blake3"]});
        mem["pages"] = json!([[0, 1]]);
    }
    let state = json!({"written_by": "test", "memory": mem, "devices": {"virtio": devices}});
    format::write_file(&dir.join(STATE_FILE), &state).unwrap();
    hash
}

/// A snapshot `snap` with a branched disk on `frozen` over `base`, and a raw read-only
/// disk `data`.
fn signed_fixture(s: &Scratch, k: &SnapshotKey) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let (base, frozen, data) = (
        s.0.join("base.raw"),
        s.0.join("vm@1.qcow2"),
        s.0.join("data.raw"),
    );
    std::fs::write(&base, vec![1u8; 4096]).unwrap();
    std::fs::write(&frozen, vec![2u8; 1000]).unwrap();
    std::fs::write(&data, vec![3u8; 512]).unwrap();
    let snap = s.0.join("snap");
    write_snapshot(
        &snap,
        7,
        vec![
            block(&s.0.join("vm.qcow2"), &[&frozen, &base], true),
            block(&data, &[], false),
        ],
        None,
    );
    sign(&snap, k).unwrap();
    (snap, base, frozen, data)
}

fn flip_byte(path: &Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    b[at] ^= 0x40;
    std::fs::write(path, b).unwrap();
}

/// Rewrites the manifest with `edit` and signs it properly with `k`.
fn resign_edited(dir: &Path, k: &SnapshotKey, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(MANIFEST_FILE)).unwrap()).unwrap();
    edit(&mut m);
    let bytes = serde_json::to_vec(&m).unwrap();
    let mut mac = k.mac();
    mac.update(&bytes);
    std::fs::write(dir.join(MANIFEST_FILE), &bytes).unwrap();
    std::fs::write(dir.join(HMAC_FILE), hex(&mac.finalize().into_bytes())).unwrap();
}

#[test]
fn a_signed_snapshot_verifies_and_lists_what_a_restore_opens() {
    let s = Scratch::new("roundtrip");
    let k = key(9);
    let (snap, base, frozen, data) = signed_fixture(&s, &k);
    let m = verify(&snap, &k).unwrap();
    assert_eq!(m.key_id, k.key_id());
    assert_eq!(m.version, MANIFEST_VERSION);
    let paths: Vec<_> = m.layers.iter().map(|l| l.path.clone()).collect();
    // The branched disk's own active layer is not opened by a restore.
    assert_eq!(paths, vec![frozen, base.clone(), data]);
    assert_eq!(m.layers[1].size, 4096);
    assert_eq!(
        m.layers[1].blake3,
        blake3::hash(&[1u8; 4096]).to_hex().to_string()
    );
    assert_eq!(m.memory.size, 8192);
    assert!(m.parent.is_none());
    // The signed bytes are the file's: the tag is the HMAC of manifest.json.
    let bytes = std::fs::read(snap.join(MANIFEST_FILE)).unwrap();
    let mut mac = k.mac();
    mac.update(&bytes);
    let tag = std::fs::read_to_string(snap.join(HMAC_FILE)).unwrap();
    assert_eq!(tag.trim(), hex(&mac.finalize().into_bytes()));
    // Signing again replaces the signature with an identical one; no temporary files stay.
    sign(&snap, &k).unwrap();
    verify(&snap, &k).unwrap();
    assert!(!snap.join("manifest.json.tmp").exists());
    assert!(!snap.join("manifest.hmac.tmp").exists());
}

#[test]
fn keys_must_be_long_and_private() {
    let s = Scratch::new("keys");
    let path = s.0.join("key");
    std::fs::write(&path, [5u8; 31]).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let e = SnapshotKey::from_file(&path).unwrap_err();
    assert!(matches!(e, AuthError::KeyTooShort { len: 31, .. }), "{e}");
    assert!(e.to_string().contains(&path.display().to_string()));
    std::fs::write(&path, [5u8; 32]).unwrap();
    let k = SnapshotKey::from_file(&path).unwrap();
    assert_eq!(k.key_id(), key(5).key_id());
    assert_eq!(k.key_id().len(), 16);
    assert_ne!(k.key_id(), key(6).key_id());
    assert!(
        !format!("{k:?}").contains("5, 5"),
        "Debug shows no key bytes"
    );
    for mode in [0o640, 0o604, 0o644] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        let e = SnapshotKey::from_file(&path).unwrap_err();
        assert!(matches!(e, AuthError::KeyPermissions { .. }), "{e}");
        assert!(e.to_string().contains("chmod 600"), "{e}");
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
    SnapshotKey::from_file(&path).unwrap();
    assert!(matches!(
        SnapshotKey::from_file(&s.0.join("absent")),
        Err(AuthError::KeyRead { .. })
    ));
    assert!(matches!(
        SnapshotKey::from_file(&s.0),
        Err(AuthError::KeyNotAFile { .. } | AuthError::KeyPermissions { .. })
    ));
}

#[test]
fn unsigned_snapshots_are_refused() {
    let s = Scratch::new("unsigned");
    let k = key(9);
    let (snap, ..) = signed_fixture(&s, &k);
    std::fs::remove_file(snap.join(HMAC_FILE)).unwrap();
    let e = verify(&snap, &k).unwrap_err();
    assert!(
        matches!(
            e,
            AuthError::Unsigned {
                file: HMAC_FILE,
                ..
            }
        ),
        "{e}"
    );
    std::fs::remove_file(snap.join(MANIFEST_FILE)).unwrap();
    let e = verify(&snap, &k).unwrap_err();
    assert!(
        matches!(
            e,
            AuthError::Unsigned {
                file: MANIFEST_FILE,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("not signed"), "{e}");
}

#[test]
fn a_changed_manifest_has_a_bad_signature() {
    let s = Scratch::new("badsig");
    let k = key(9);
    let (snap, ..) = signed_fixture(&s, &k);
    let path = snap.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("4096", "4097")).unwrap();
    let e = verify(&snap, &k).unwrap_err();
    assert!(matches!(e, AuthError::BadSignature { .. }), "{e}");
    assert!(e.to_string().contains("manifest.json"), "{e}");
    // A garbage tag too.
    std::fs::write(&path, text).unwrap();
    verify(&snap, &k).unwrap();
    std::fs::write(snap.join(HMAC_FILE), "zz").unwrap();
    assert!(matches!(
        verify(&snap, &k),
        Err(AuthError::BadSignature { .. })
    ));
}

#[test]
fn another_key_is_named() {
    let s = Scratch::new("wrongkey");
    let k = key(9);
    let (snap, ..) = signed_fixture(&s, &k);
    let other = key(10);
    let e = verify(&snap, &other).unwrap_err();
    assert!(matches!(e, AuthError::WrongKey { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains(k.key_id()) && text.contains(other.key_id()),
        "{text}"
    );
}

#[test]
fn unknown_manifest_fields_and_versions_are_refused() {
    let s = Scratch::new("fields");
    let k = key(9);
    let (snap, ..) = signed_fixture(&s, &k);
    resign_edited(&snap, &k, |m| m["extra"] = json!(1));
    let e = verify(&snap, &k).unwrap_err();
    assert!(matches!(e, AuthError::Manifest { .. }), "{e}");
    assert!(e.to_string().contains("extra"), "{e}");
    sign(&snap, &k).unwrap();
    resign_edited(&snap, &k, |m| m["version"] = json!(2));
    assert!(matches!(verify(&snap, &k), Err(AuthError::Manifest { .. })));
}

#[test]
fn a_changed_state_memory_or_layer_is_refused_naming_the_file() {
    let s = Scratch::new("changed");
    let k = key(9);
    let (snap, base, frozen, data) = signed_fixture(&s, &k);
    let cache = HashCache::default();
    verify_cached(&snap, &k, &cache).unwrap();
    let expect_changed = |file: &Path| {
        let e = verify_cached(&snap, &k, &cache).unwrap_err();
        assert!(matches!(e, AuthError::Changed { .. }), "{e}");
        assert!(e.to_string().contains(&file.display().to_string()), "{e}");
    };
    let state = snap.join(STATE_FILE);
    let original = std::fs::read(&state).unwrap();
    flip_byte(&state, 30);
    expect_changed(&state);
    std::fs::write(&state, &original).unwrap();
    verify_cached(&snap, &k, &cache).unwrap();

    // Same size, different contents: caught although the cache had the old hash (the write
    // changed the file's ctime).
    let memory = snap.join(MEMORY_FILE);
    flip_byte(&memory, 100);
    expect_changed(&memory);
    flip_byte(&memory, 100);
    verify_cached(&snap, &k, &cache).unwrap();

    for layer in [&frozen, &base, &data] {
        flip_byte(layer, 3);
        expect_changed(layer);
        flip_byte(layer, 3);
        verify_cached(&snap, &k, &cache).unwrap();
    }
    // A different size is a change too; a missing layer is named.
    std::fs::write(&data, [3u8; 100]).unwrap();
    expect_changed(&data);
    std::fs::remove_file(&base).unwrap();
    let e = verify_cached(&snap, &k, &cache).unwrap_err();
    assert!(matches!(e, AuthError::Missing { .. }), "{e}");
    assert!(e.to_string().contains("base.raw"), "{e}");
}

#[test]
fn a_layer_the_state_opens_must_be_covered() {
    let s = Scratch::new("covered");
    let k = key(9);
    let (snap, base, ..) = signed_fixture(&s, &k);
    resign_edited(&snap, &k, |m| {
        let layers = m["layers"].as_array_mut().unwrap();
        layers.retain(|l| l["path"] != json!(base));
    });
    let e = verify(&snap, &k).unwrap_err();
    assert!(matches!(e, AuthError::LayerNotCovered { .. }), "{e}");
    assert!(e.to_string().contains("base.raw"), "{e}");
}

#[test]
fn a_state_whose_memory_record_differs_from_the_manifest_is_refused() {
    let s = Scratch::new("memrecord");
    let k = key(9);
    let (snap, ..) = signed_fixture(&s, &k);
    resign_edited(&snap, &k, |m| m["memory"]["blake3"] = json!("00"));
    let e = verify(&snap, &k).unwrap_err();
    assert!(matches!(e, AuthError::Changed { .. }), "{e}");
    assert!(e.to_string().contains("memory.bin"), "{e}");
}

#[test]
fn a_diff_is_only_as_trusted_as_its_signed_parents() {
    let s = Scratch::new("chain");
    let k = key(9);
    let (parent, ..) = signed_fixture(&s, &k);
    let child = s.0.join("child");
    write_snapshot(&child, 8, vec![], Some(&parent));
    let m = sign(&child, &k).unwrap();
    let signed_parent = m.parent.clone().unwrap();
    assert_eq!(signed_parent.dir, parent);
    verify(&child, &k).unwrap();
    let grandchild = s.0.join("grandchild");
    write_snapshot(&grandchild, 9, vec![], Some(&child));
    sign(&grandchild, &k).unwrap();
    verify(&grandchild, &k).unwrap();

    // A changed file of the parent (or grandparent) makes the child untrusted.
    flip_byte(&parent.join(MEMORY_FILE), 5);
    for dir in [&child, &grandchild] {
        let e = verify(dir, &k).unwrap_err();
        assert!(matches!(e, AuthError::Parent { .. }), "{e}");
        assert!(e.to_string().contains("snap"), "{e}");
    }
    flip_byte(&parent.join(MEMORY_FILE), 5);
    verify(&grandchild, &k).unwrap();

    // The parent signed again with other contents: its manifest is not the one the child
    // was signed over.
    resign_edited(&parent, &k, |m| m["layers"][0]["size"] = json!(1000));
    let e = verify(&child, &k).unwrap_err();
    assert!(e.to_string().contains("manifest changed"), "{e}");
    // An unsigned parent: the child cannot be signed or verified.
    std::fs::remove_file(parent.join(MANIFEST_FILE)).unwrap();
    let e = verify(&child, &k).unwrap_err();
    assert!(e.to_string().contains("not signed"), "{e}");
    let e = sign(&child, &k).unwrap_err();
    assert!(matches!(e, AuthError::Parent { .. }), "{e}");
}

#[test]
fn unfinished_and_stateless_directories_cannot_be_signed() {
    let s = Scratch::new("unfinished");
    let k = key(9);
    let tmp = s.0.join("snap.tmp");
    write_snapshot(&tmp, 1, vec![], None);
    assert!(matches!(sign(&tmp, &k), Err(AuthError::Unfinished(_))));
    let empty = s.0.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = sign(&empty, &k).unwrap_err();
    assert!(matches!(e, AuthError::Missing { .. }), "{e}");
    assert!(e.to_string().contains("state.bin"), "{e}");
    // A memory file of another size than the state says is not signed.
    let short = s.0.join("short");
    write_snapshot(&short, 1, vec![], None);
    std::fs::write(short.join(MEMORY_FILE), [0u8; 10]).unwrap();
    assert!(matches!(sign(&short, &k), Err(AuthError::Changed { .. })));
}

#[test]
fn only_regular_and_allowed_layers_are_hashed() {
    let s = Scratch::new("allowed");
    let k = key(9);
    let (snap, base, ..) = signed_fixture(&s, &k);
    let e = sign_allowed(&snap, &k, &HashCache::default(), &|p| p != base).unwrap_err();
    assert!(matches!(e, AuthError::LayerNotAllowed { .. }), "{e}");
    assert!(e.to_string().contains("base.raw"), "{e}");
    // A state naming a device as a disk layer: refused, not read forever.
    let dev = s.0.join("dev");
    write_snapshot(
        &dev,
        1,
        vec![block(Path::new("/dev/zero"), &[], false)],
        None,
    );
    let e = sign(&dev, &k).unwrap_err();
    assert!(matches!(e, AuthError::NotAFile { .. }), "{e}");
    assert!(e.to_string().contains("/dev/zero"), "{e}");
}
