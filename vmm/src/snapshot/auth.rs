//! Snapshot authenticity: a key holder signs a snapshot directory, and a restore that is
//! asked to refuses a snapshot that is unsigned, signed with another key, or changed since.
//!
//! Signing writes two files next to `state.bin`:
//!
//! ```text
//! DIR/manifest.json   versioned JSON: what a restore will read, with sizes and hashes
//! DIR/manifest.hmac   hex HMAC-SHA256 of manifest.json's exact bytes
//! ```
//!
//! The manifest lists `state.bin` (size, BLAKE3 of the file), `memory.bin` (size and the
//! BLAKE3 the state records for it; it is not hashed again at signing), every disk layer a
//! restore opens (path as the state records it, size, BLAKE3) and, for a diff snapshot, the
//! parent directory and the BLAKE3 of the parent's `manifest.json`, so a chain is only as
//! trusted as its signed parents. `key_id` (the first 8 bytes of SHA-256 of the key, hex)
//! names the key without revealing it.
//!
//! [`verify`] checks the HMAC in constant time, then parses the manifest (unknown fields
//! refused), then every file it lists, then that the state makes a restore open nothing the
//! manifest does not list, then the parent chain. `memory.bin` is hashed in full (the
//! `memory.verified` stamp next to it is a cache anyone who can write the directory could
//! forge, so it is not trusted here). Hashing large immutable layers at every verification
//! is slow: a [`HashCache`] kept by a long-running process remembers each file's hash by
//! (device, inode, size, mtime, ctime); any write changes the ctime, which no user can set
//! back, so a changed file is always hashed again.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::memory::MemoryState;
use super::{format, MAX_CHAIN, MEMORY_FILE, STATE_FILE};
use crate::device_manager::VirtioKindState;

pub const MANIFEST_FILE: &str = "manifest.json";
pub const HMAC_FILE: &str = "manifest.hmac";
/// The manifest format this build writes and reads.
pub const MANIFEST_VERSION: u32 = 1;
/// Shortest key accepted: 256 bits.
pub const MIN_KEY_BYTES: usize = 32;
/// Longest key file read (a key is a few dozen bytes; this only bounds the read).
pub const MAX_KEY_BYTES: u64 = 4096;
/// Largest manifest read (one entry per layer: a few KiB in practice).
const MAX_MANIFEST_BYTES: u64 = 1 << 20;

type HmacSha256 = Hmac<Sha256>;

/// Why a key cannot be used, or a snapshot cannot be signed or is not trusted. Every
/// message is one line naming the file.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read snapshot key {path}")]
    KeyRead {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot key {path} is not a regular file")]
    KeyNotAFile { path: String },
    #[error(
        "snapshot key {path} can be read by group or others (mode {mode:03o}); \
         make it private (chmod 600)"
    )]
    KeyPermissions { path: String, mode: u32 },
    #[error("snapshot key {path} has {len} bytes; a key needs at least {MIN_KEY_BYTES}")]
    KeyTooShort { path: String, len: usize },
    #[error("snapshot key {path} is larger than {MAX_KEY_BYTES} bytes")]
    KeyTooLong { path: String },
    #[error("snapshot {dir} is not signed (no {file})")]
    Unsigned { dir: String, file: &'static str },
    #[error("snapshot {dir} is signed with key {signed_with}, not with this key ({key_id})")]
    WrongKey {
        dir: String,
        signed_with: String,
        key_id: String,
    },
    #[error(
        "snapshot {path} has a bad signature: the manifest was changed or not signed by this key"
    )]
    BadSignature { path: String },
    #[error("snapshot manifest {path} is invalid: {reason}")]
    Manifest { path: String, reason: String },
    #[error("{path} is missing")]
    Missing {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} changed since the snapshot was signed ({what})")]
    Changed { path: String, what: String },
    #[error("{path} is not a regular file")]
    NotAFile { path: String },
    #[error("snapshot {dir} names disk layer {layer}, which is not one the signer allows")]
    LayerNotAllowed { dir: String, layer: String },
    #[error("disk layer {layer} that a restore of {dir} opens is not covered by its signature")]
    LayerNotCovered { dir: String, layer: String },
    #[error("parent snapshot {parent} of {dir} is not trusted: {reason}")]
    Parent {
        dir: String,
        parent: String,
        reason: String,
    },
    #[error("snapshot chain of {0} is longer than {MAX_CHAIN} snapshots")]
    ChainTooLong(String),
    #[error("{0} is an unfinished snapshot (a .tmp directory)")]
    Unfinished(String),
    #[error(transparent)]
    State(#[from] format::FormatError),
    #[error("cannot {step} {path}")]
    Io {
        step: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A signing key: the raw bytes of a private key file.
pub struct SnapshotKey {
    bytes: Vec<u8>,
    id: String,
}

impl std::fmt::Debug for SnapshotKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key itself.
        f.debug_struct("SnapshotKey").field("id", &self.id).finish()
    }
}

impl SnapshotKey {
    /// Reads a key file: a regular file of at least [`MIN_KEY_BYTES`] bytes that neither
    /// group nor others can access (mode & 0o077 == 0). Its raw bytes are the key.
    pub fn from_file(path: &Path) -> Result<Self, AuthError> {
        let display = path.display().to_string();
        let err = |source| AuthError::KeyRead {
            path: display.clone(),
            source,
        };
        let file = File::open(path).map_err(err)?;
        let meta = file.metadata().map_err(err)?;
        if !meta.is_file() {
            return Err(AuthError::KeyNotAFile { path: display });
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(AuthError::KeyPermissions {
                path: display,
                mode,
            });
        }
        let mut bytes = Vec::new();
        file.take(MAX_KEY_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(err)?;
        if bytes.len() as u64 > MAX_KEY_BYTES {
            return Err(AuthError::KeyTooLong { path: display });
        }
        Self::from_bytes(bytes).map_err(|len| AuthError::KeyTooShort { path: display, len })
    }

    /// A key from its bytes; `Err(length)` when shorter than [`MIN_KEY_BYTES`].
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, usize> {
        if bytes.len() < MIN_KEY_BYTES {
            return Err(bytes.len());
        }
        let id = hex(&Sha256::digest(&bytes)[..8]);
        Ok(Self { bytes, id })
    }

    /// The first 8 bytes of SHA-256 of the key, hex: names the key in manifests and errors.
    pub fn key_id(&self) -> &str {
        &self.id
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC takes keys of any length; ours are at least 32 bytes.
        <HmacSha256 as Mac>::new_from_slice(&self.bytes).expect("HMAC accepts any key length")
    }
}

/// A file's size and BLAKE3 (hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub size: u64,
    pub blake3: String,
}

/// A disk layer a restore opens: its path as the state records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerEntry {
    pub path: PathBuf,
    pub size: u64,
    pub blake3: String,
}

/// The parent of a diff snapshot and the BLAKE3 of its `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParentEntry {
    pub dir: PathBuf,
    pub manifest_blake3: String,
}

/// The signed description of a snapshot (`manifest.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub version: u32,
    pub key_id: String,
    pub state: FileEntry,
    pub memory: FileEntry,
    pub layers: Vec<LayerEntry>,
    pub parent: Option<ParentEntry>,
}

/// The parts of the state that name files a restore reads. The restore parses (and checks)
/// the whole state; signing needs only these, and the state file's hash covers the rest.
#[derive(Deserialize)]
struct StateView {
    memory: MemoryState,
    #[serde(default)]
    devices: DevicesView,
}

#[derive(Deserialize, Default)]
struct DevicesView {
    #[serde(default)]
    virtio: Vec<VirtioView>,
}

#[derive(Deserialize)]
struct VirtioView {
    kind: VirtioKindState,
}

impl StateView {
    /// Every disk layer file a restore opens, in device order, without repeats: for a
    /// branched disk the frozen layer and everything below it (the restore's own overlay is
    /// new), for any other disk its image and the layers below it. The layers below the top
    /// one are the chain the VMM followed when it saved them; they are found again through
    /// the (hashed) qcow2 headers, so unchanged files lead to the same chain.
    fn layers(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = Vec::new();
        for device in &self.devices.virtio {
            let VirtioKindState::Block(block) = &device.kind else {
                continue;
            };
            let top = (!block.branched).then(|| block.path.clone());
            for path in top
                .into_iter()
                .chain(block.backing.iter().map(|l| l.path.clone()))
            {
                if !out.contains(&path) {
                    out.push(path);
                }
            }
        }
        out
    }
}

/// File hashes by identity and change times, for a process that verifies the same large
/// immutable files again and again (the daemon). See the module documentation.
#[derive(Default)]
pub struct HashCache {
    hashes: Mutex<HashMap<FileId, String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileId {
    fn of(meta: &std::fs::Metadata) -> Self {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }
}

impl HashCache {
    /// The size and BLAKE3 of the file at `path`, from the cache when its identity and
    /// change times are unchanged.
    fn file(&self, path: &Path) -> Result<FileEntry, AuthError> {
        let display = path.display().to_string();
        // Non-blocking: a FIFO named by a state must not hang the open (it is refused below).
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)
            .map_err(|source| AuthError::Missing {
                path: display.clone(),
                source,
            })?;
        let io = |step| {
            let path = display.clone();
            move |source| AuthError::Io { step, path, source }
        };
        let meta = file.metadata().map_err(io("stat"))?;
        // Only regular files: a device (/dev/zero) would never end.
        if !meta.is_file() {
            return Err(AuthError::NotAFile { path: display });
        }
        let before = FileId::of(&meta);
        let cached = self
            .hashes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&before)
            .cloned();
        if let Some(blake3) = cached {
            return Ok(FileEntry {
                size: before.size,
                blake3,
            });
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update_reader(&file).map_err(io("read"))?;
        let blake3 = hasher.finalize().to_hex().to_string();
        // Only a file that did not change while it was read is remembered.
        if FileId::of(&file.metadata().map_err(io("stat"))?) == before {
            self.hashes
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(before.clone(), blake3.clone());
        }
        Ok(FileEntry {
            size: before.size,
            blake3,
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

fn check_dir(dir: &Path) -> Result<(), AuthError> {
    if dir.extension().is_some_and(|e| e == "tmp") {
        return Err(AuthError::Unfinished(dir.display().to_string()));
    }
    Ok(())
}

/// Reads `path` whole, refusing files over `limit` bytes. A missing file is `missing()`.
fn read_limited(
    path: &Path,
    limit: u64,
    missing: impl FnOnce() -> AuthError,
) -> Result<Vec<u8>, AuthError> {
    let display = path.display().to_string();
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(missing()),
        Err(source) => {
            return Err(AuthError::Io {
                step: "open",
                path: display,
                source,
            })
        }
    };
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| AuthError::Io {
            step: "read",
            path: display.clone(),
            source,
        })?;
    if bytes.len() as u64 > limit {
        return Err(AuthError::Manifest {
            path: display,
            reason: format!("larger than {limit} bytes"),
        });
    }
    Ok(bytes)
}

/// Reads the state file once: its entry (size, hash) and its bytes, to be decoded with
/// [`decode_state`] (after the hash is checked, when verifying).
fn read_state(dir: &Path) -> Result<(FileEntry, Vec<u8>), AuthError> {
    let path = dir.join(STATE_FILE);
    let bytes = read_limited(&path, format::MAX_STATE_BYTES, || AuthError::Missing {
        path: path.display().to_string(),
        source: std::io::ErrorKind::NotFound.into(),
    })?;
    let entry = FileEntry {
        size: bytes.len() as u64,
        blake3: blake3::hash(&bytes).to_hex().to_string(),
    };
    Ok((entry, bytes))
}

fn decode_state(dir: &Path, bytes: &[u8]) -> Result<StateView, AuthError> {
    Ok(format::decode(
        bytes,
        &dir.join(STATE_FILE).display().to_string(),
    )?)
}

/// Writes `bytes` to `dir/name` atomically: a temporary file, fsynced, renamed over.
fn write_file_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), AuthError> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let io = |step, p: &Path| {
        let path = p.display().to_string();
        move |source| AuthError::Io { step, path, source }
    };
    let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
    f.write_all(bytes).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("fsync", &tmp))?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(io("rename into place", &path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync", dir))
}

/// Signs the snapshot `dir` with `key` (see [`sign_cached`]); hashes every layer.
pub fn sign(dir: &Path, key: &SnapshotKey) -> Result<Manifest, AuthError> {
    sign_cached(dir, key, &HashCache::default())
}

/// Signs the snapshot `dir`: writes `manifest.json` and then `manifest.hmac`, each
/// atomically, replacing an earlier signature. A diff snapshot's parent must verify with
/// the same key first. `memory.bin` is checked for its size only: its hash is the one the
/// state records (which every restore and [`verify`] check against the file).
pub fn sign_cached(
    dir: &Path,
    key: &SnapshotKey,
    cache: &HashCache,
) -> Result<Manifest, AuthError> {
    sign_allowed(dir, key, cache, &|_| true)
}

/// [`sign_cached`], refusing (before opening it) any disk layer the state names for which
/// `allowed` is false. The daemon signs states its VMMs wrote: it allows only its own
/// layers, so a state cannot make it hash (and publish the hash of) another file.
pub fn sign_allowed(
    dir: &Path,
    key: &SnapshotKey,
    cache: &HashCache,
    allowed: &dyn Fn(&Path) -> bool,
) -> Result<Manifest, AuthError> {
    check_dir(dir)?;
    let (state, bytes) = read_state(dir)?;
    let view = decode_state(dir, &bytes)?;
    let memory_path = dir.join(MEMORY_FILE);
    let memory_size = std::fs::metadata(&memory_path)
        .map_err(|source| AuthError::Missing {
            path: memory_path.display().to_string(),
            source,
        })?
        .len();
    if memory_size != view.memory.file_size {
        return Err(AuthError::Changed {
            path: memory_path.display().to_string(),
            what: format!(
                "{memory_size} bytes, the state says {}",
                view.memory.file_size
            ),
        });
    }
    let layers = view
        .layers()
        .into_iter()
        .map(|path| {
            if !allowed(&path) {
                return Err(AuthError::LayerNotAllowed {
                    dir: dir.display().to_string(),
                    layer: path.display().to_string(),
                });
            }
            let f = cache.file(&path)?;
            Ok(LayerEntry {
                path,
                size: f.size,
                blake3: f.blake3,
            })
        })
        .collect::<Result<Vec<_>, AuthError>>()?;
    let parent = match &view.memory.parent {
        None => None,
        Some(p) => {
            let bad = |reason: String| AuthError::Parent {
                dir: dir.display().to_string(),
                parent: p.dir.display().to_string(),
                reason,
            };
            verify_chain(&p.dir, key, cache, &mut Vec::new()).map_err(|e| bad(e.to_string()))?;
            let bytes = std::fs::read(p.dir.join(MANIFEST_FILE))
                .map_err(|e| bad(format!("cannot read its manifest: {e}")))?;
            Some(ParentEntry {
                dir: p.dir.clone(),
                manifest_blake3: blake3::hash(&bytes).to_hex().to_string(),
            })
        }
    };
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        key_id: key.key_id().to_string(),
        state,
        memory: FileEntry {
            size: memory_size,
            blake3: view.memory.blake3.clone(),
        },
        layers,
        parent,
    };
    let mut bytes = serde_json::to_vec_pretty(&manifest).map_err(|e| AuthError::Manifest {
        path: dir.join(MANIFEST_FILE).display().to_string(),
        reason: e.to_string(),
    })?;
    bytes.push(b'\n');
    let mut mac = key.mac();
    mac.update(&bytes);
    let tag = hex(&mac.finalize().into_bytes());
    write_file_atomically(dir, MANIFEST_FILE, &bytes)?;
    write_file_atomically(dir, HMAC_FILE, format!("{tag}\n").as_bytes())?;
    Ok(manifest)
}

/// Verifies the snapshot `dir` against `key` (see [`verify_cached`]); hashes every file.
pub fn verify(dir: &Path, key: &SnapshotKey) -> Result<Manifest, AuthError> {
    verify_cached(dir, key, &HashCache::default())
}

/// Verifies that the snapshot `dir` is signed with `key` and unchanged since, its parents
/// included. Returns its manifest. See the module documentation for the order of checks.
pub fn verify_cached(
    dir: &Path,
    key: &SnapshotKey,
    cache: &HashCache,
) -> Result<Manifest, AuthError> {
    verify_chain(dir, key, cache, &mut Vec::new())
}

fn verify_chain(
    dir: &Path,
    key: &SnapshotKey,
    cache: &HashCache,
    seen: &mut Vec<PathBuf>,
) -> Result<Manifest, AuthError> {
    check_dir(dir)?;
    if seen.len() >= MAX_CHAIN {
        return Err(AuthError::ChainTooLong(dir.display().to_string()));
    }
    seen.push(std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf()));
    let manifest = verify_signature(dir, key)?;
    let (state, bytes) = read_state(dir)?;
    let state_path = dir.join(STATE_FILE).display().to_string();
    check_entry(&state_path, &manifest.state, &state)?;
    let view = decode_state(dir, &bytes)?;
    // The memory file: the signed hash must be the state's, and the file must have it.
    let memory_path = dir.join(MEMORY_FILE);
    let memory_display = memory_path.display().to_string();
    if manifest.memory.blake3 != view.memory.blake3 || manifest.memory.size != view.memory.file_size
    {
        return Err(AuthError::Changed {
            path: memory_display,
            what: "the state's memory record differs from the signed one".into(),
        });
    }
    check_entry(
        &memory_display,
        &manifest.memory,
        &cache.file(&memory_path)?,
    )?;
    for layer in &manifest.layers {
        let display = layer.path.display().to_string();
        let entry = FileEntry {
            size: layer.size,
            blake3: layer.blake3.clone(),
        };
        check_entry(&display, &entry, &cache.file(&layer.path)?)?;
    }
    for path in view.layers() {
        if !manifest.layers.iter().any(|l| l.path == path) {
            return Err(AuthError::LayerNotCovered {
                dir: dir.display().to_string(),
                layer: path.display().to_string(),
            });
        }
    }
    match (&view.memory.parent, &manifest.parent) {
        (None, None) => {}
        (Some(p), Some(signed)) if p.dir == signed.dir => {
            let bad = |reason: String| AuthError::Parent {
                dir: dir.display().to_string(),
                parent: p.dir.display().to_string(),
                reason,
            };
            let canonical = std::fs::canonicalize(&p.dir).unwrap_or_else(|_| p.dir.clone());
            if seen.contains(&canonical) {
                return Err(bad("the chain loops back to it".into()));
            }
            let bytes = read_limited(&p.dir.join(MANIFEST_FILE), MAX_MANIFEST_BYTES, || {
                bad("it is not signed".into())
            })?;
            if blake3::hash(&bytes).to_hex().as_str() != signed.manifest_blake3 {
                return Err(bad("its manifest changed since the child was signed".into()));
            }
            verify_chain(&p.dir, key, cache, seen).map_err(|e| match e {
                e @ (AuthError::Parent { .. } | AuthError::ChainTooLong(_)) => e,
                e => bad(e.to_string()),
            })?;
        }
        (state_parent, _) => {
            return Err(AuthError::Manifest {
                path: dir.join(MANIFEST_FILE).display().to_string(),
                reason: format!(
                    "its parent does not match the state's ({})",
                    state_parent
                        .as_ref()
                        .map_or("none".into(), |p| p.dir.display().to_string())
                ),
            })
        }
    }
    Ok(manifest)
}

fn check_entry(path: &str, signed: &FileEntry, actual: &FileEntry) -> Result<(), AuthError> {
    let what = if signed.size != actual.size {
        format!("{} bytes, signed with {}", actual.size, signed.size)
    } else if signed.blake3 != actual.blake3 {
        "its contents differ".to_string()
    } else {
        return Ok(());
    };
    Err(AuthError::Changed {
        path: path.to_string(),
        what,
    })
}

/// Checks `manifest.hmac` against `manifest.json` in constant time, then parses the
/// manifest. A signature that fails under another key's id says so.
fn verify_signature(dir: &Path, key: &SnapshotKey) -> Result<Manifest, AuthError> {
    let unsigned = |file| AuthError::Unsigned {
        dir: dir.display().to_string(),
        file,
    };
    let manifest_path = dir.join(MANIFEST_FILE);
    let display = manifest_path.display().to_string();
    let bytes = read_limited(&manifest_path, MAX_MANIFEST_BYTES, || {
        unsigned(MANIFEST_FILE)
    })?;
    let tag = read_limited(&dir.join(HMAC_FILE), 1024, || unsigned(HMAC_FILE))?;
    let tag = std::str::from_utf8(&tag)
        .ok()
        .and_then(|t| unhex(t.trim()))
        .unwrap_or_default();
    let mut mac = key.mac();
    mac.update(&bytes);
    if mac.verify_slice(&tag).is_err() {
        // Unauthenticated, read only to say which key it claims: a wrong key is the most
        // common operator error.
        let claimed = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("key_id")?.as_str().map(String::from));
        return Err(match claimed {
            Some(id) if id != key.key_id() => AuthError::WrongKey {
                dir: dir.display().to_string(),
                signed_with: id,
                key_id: key.key_id().to_string(),
            },
            _ => AuthError::BadSignature { path: display },
        });
    }
    let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| AuthError::Manifest {
        path: display.clone(),
        reason: e.to_string(),
    })?;
    if manifest.version != MANIFEST_VERSION {
        return Err(AuthError::Manifest {
            path: display,
            reason: format!(
                "version {}; this build reads version {MANIFEST_VERSION}",
                manifest.version
            ),
        });
    }
    if manifest.key_id != key.key_id() {
        return Err(AuthError::Manifest {
            path: display,
            reason: format!("signed by this key but names key {}", manifest.key_id),
        });
    }
    Ok(manifest)
}

#[cfg(test)]
#[path = "auth_tests.rs"]
mod tests;
