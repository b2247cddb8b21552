//! Snapshots: the [`persist::Persist`] trait every stateful component implements, the state
//! file format ([`format`]), guest memory files ([`memory`]), CPU compatibility ([`cpu`]),
//! and the aggregate state of a whole VM.
//!
//! A snapshot is a directory:
//!
//! ```text
//! <dir>/state.bin        header + checksummed JSON of [`SnapshotState`]
//! <dir>/memory.bin       guest RAM, regions back to back (BLAKE3 in the state)
//! <dir>/memory.verified  proof that memory.bin was hashed and has not changed since
//! <dir>/manifest.json    when signed: what a restore reads, with hashes ([`auth`])
//! <dir>/manifest.hmac    when signed: HMAC-SHA256 of manifest.json
//! ```
//!
//! It is written as `<dir>.tmp`, every file fsynced, then renamed to `<dir>` and the parent
//! fsynced: a snapshot exists complete or not at all, and a leftover `.tmp` is never restored.

pub mod auth;
pub mod cpu;
pub mod format;
pub mod memory;
pub mod persist;

use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use persist::Persist;

use crate::config::VmConfig;
use crate::device_manager::DevicesState;
use crate::vstate::vcpu_state::VcpuArchState;
use crate::vstate::vm::VmState;

pub const STATE_FILE: &str = "state.bin";
pub const MEMORY_FILE: &str = "memory.bin";

/// Everything needed to rebuild a VM except its memory contents and disks.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotState {
    /// The grove-vmm version that wrote it (informational; compatibility is the format
    /// version's job).
    pub written_by: String,
    /// The configuration the VM was started with.
    pub config: VmConfig,
    pub cpu: cpu::CpuInfo,
    pub memory: memory::MemoryState,
    /// Saved before the vCPUs (see the save order in the runtime).
    pub devices: DevicesState,
    pub vcpus: Vec<VcpuArchState>,
    pub vm: VmState,
}

/// Errors creating or opening a snapshot directory.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot directory {0} already exists")]
    Exists(String),
    #[error("{0} is an unfinished snapshot (a .tmp directory) and cannot be restored")]
    Unfinished(String),
    #[error("{0} is not a snapshot directory")]
    NotADirectory(String),
    #[error("cannot {step} {path}")]
    Io {
        step: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Format(#[from] format::FormatError),
    #[error(transparent)]
    Memory(#[from] memory::MemoryFileError),
    #[error("parent snapshot {parent} of {child} cannot be used: {reason}")]
    Parent {
        parent: String,
        child: String,
        reason: String,
    },
    #[error("snapshot chain of {0} is longer than {MAX_CHAIN} snapshots")]
    ChainTooLong(String),
    #[error("snapshot chain of {dir} loops back to {parent}")]
    ChainLoop { dir: String, parent: String },
}

/// Most snapshots in a diff chain (the full base included).
pub const MAX_CHAIN: usize = 64;

/// One snapshot of a chain: its directory and memory description.
#[derive(Debug)]
pub struct ChainLink {
    pub dir: PathBuf,
    pub memory: memory::MemoryState,
}

/// Resolves the chain of `dir` (whose state is `state`), newest first and ending with the
/// full snapshot it is based on, and verifies every memory file (size and hash). Each parent
/// must exist, have the memory hash its child recorded and the same layout.
pub fn resolve_chain(
    dir: &Path,
    memory_state: &memory::MemoryState,
) -> Result<Vec<ChainLink>, SnapshotError> {
    let mut chain = vec![ChainLink {
        dir: dir.to_path_buf(),
        memory: memory_state.clone(),
    }];
    let mut seen = vec![std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf())];
    while let Some(child) = chain.last() {
        let Some(parent) = child.memory.parent.clone() else {
            break;
        };
        let child_dir = child.dir.display().to_string();
        let parent_display = parent.dir.display().to_string();
        let bad = |reason: String| SnapshotError::Parent {
            parent: parent_display.clone(),
            child: child_dir.clone(),
            reason,
        };
        if child.memory.pages.is_none() {
            return Err(bad("the child has a parent but no page list".into()));
        }
        if chain.len() >= MAX_CHAIN {
            return Err(SnapshotError::ChainTooLong(dir.display().to_string()));
        }
        let canonical = std::fs::canonicalize(&parent.dir).unwrap_or_else(|_| parent.dir.clone());
        if seen.contains(&canonical) {
            return Err(SnapshotError::ChainLoop {
                dir: dir.display().to_string(),
                parent: parent_display,
            });
        }
        seen.push(canonical);
        let state = read_state(&parent.dir).map_err(|e| bad(e.to_string()))?;
        if state.memory.blake3 != parent.blake3 {
            return Err(bad(
                "its memory is not the one the child was taken from".into()
            ));
        }
        if state.memory.regions != child.memory.regions
            || state.memory.file_size != child.memory.file_size
        {
            return Err(bad("its memory layout differs from the child's".into()));
        }
        chain.push(ChainLink {
            dir: parent.dir,
            memory: state.memory,
        });
    }
    if let Some(base) = chain.last().filter(|l| l.memory.pages.is_some()) {
        return Err(SnapshotError::Parent {
            parent: base.dir.display().to_string(),
            child: dir.display().to_string(),
            reason: "it lists diff pages but has no parent".into(),
        });
    }
    for link in &chain {
        memory::verify(&link.dir.join(MEMORY_FILE), &link.memory).map_err(|e| {
            if link.dir == dir {
                SnapshotError::from(e)
            } else {
                SnapshotError::Parent {
                    parent: link.dir.display().to_string(),
                    child: dir.display().to_string(),
                    reason: e.to_string(),
                }
            }
        })?;
    }
    Ok(chain)
}

/// Builds the guest memory of a snapshot: its chain's full base mapped `MAP_PRIVATE`, then
/// each diff's pages copied over it, oldest first. `chain` comes from [`resolve_chain`].
pub fn map_chain(
    chain: &[ChainLink],
    track: bool,
) -> Result<crate::vstate::memory::GuestMemoryMmap, SnapshotError> {
    let Some((base, diffs)) = chain.split_last() else {
        return Err(SnapshotError::NotADirectory(
            "an empty snapshot chain".into(),
        ));
    };
    let mem = memory::map(&base.dir.join(MEMORY_FILE), &base.memory, track)?;
    for link in diffs.iter().rev() {
        memory::apply_diff(&mem, &link.dir.join(MEMORY_FILE), &link.memory)?;
    }
    Ok(mem)
}

/// Writes the snapshot `dir` (full or diff) as the full snapshot `output`, atomically: the
/// same state with its memory resolved through the chain. Returns the memory file's size.
pub fn merge(dir: &Path, output: &Path) -> Result<u64, SnapshotError> {
    let mut state = read_state(dir)?;
    let chain = resolve_chain(dir, &state.memory)?;
    let mem = map_chain(&chain, false)?;
    write_atomically(output, |tmp| {
        state.memory = memory::write(&mem, &tmp.join(MEMORY_FILE))?;
        format::write_file(&tmp.join(STATE_FILE), &state)?;
        Ok(state.memory.file_size)
    })
}

fn io(step: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.display().to_string();
    move |source| SnapshotError::Io { step, path, source }
}

/// `<dir>.tmp`, where a snapshot is written before it is renamed into place.
pub fn tmp_dir(dir: &Path) -> PathBuf {
    let mut name = dir.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

fn fsync_dir(dir: &Path) -> Result<(), SnapshotError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync", dir))
}

/// Runs `write` to fill `<dir>.tmp`, then publishes it atomically as `<dir>`. On any error
/// the temporary directory is removed and `<dir>` does not exist.
pub fn write_atomically<T, E: From<SnapshotError>>(
    dir: &Path,
    write: impl FnOnce(&Path) -> Result<T, E>,
) -> Result<T, E> {
    if dir.exists() {
        return Err(SnapshotError::Exists(dir.display().to_string()).into());
    }
    let tmp = tmp_dir(dir);
    if tmp.exists() {
        // Left by a VMM killed mid-snapshot: never restorable, safe to replace.
        std::fs::remove_dir_all(&tmp).map_err(io("remove stale", &tmp))?;
    }
    let result = std::fs::create_dir_all(&tmp)
        .map_err(|e| io("create", &tmp)(e).into())
        .and_then(|()| write(&tmp))
        .and_then(|value| {
            fsync_dir(&tmp)?;
            std::fs::rename(&tmp, dir).map_err(io("rename into place", dir))?;
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                fsync_dir(parent)?;
            }
            Ok(value)
        });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Reads and checks a snapshot directory's state file; refuses unfinished directories.
pub fn read_state(dir: &Path) -> Result<SnapshotState, SnapshotError> {
    let display = dir.display().to_string();
    if dir.extension().is_some_and(|e| e == "tmp") {
        return Err(SnapshotError::Unfinished(display));
    }
    if !dir.is_dir() {
        return Err(SnapshotError::NotADirectory(display));
    }
    Ok(format::read_file(&dir.join(STATE_FILE))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("grove-snapdir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn publishes_complete_directories_only() {
        let root = scratch("atomic");
        let dir = root.join("snap");
        write_atomically(&dir, |tmp| {
            std::fs::write(tmp.join("a"), b"x").map_err(io("write", tmp))
        })
        .unwrap();
        assert!(dir.join("a").exists());
        assert!(!tmp_dir(&dir).exists());
        assert!(matches!(
            write_atomically(&dir, |_| Ok::<_, SnapshotError>(())),
            Err(SnapshotError::Exists(_))
        ));

        let failed = root.join("failed");
        let r: Result<(), SnapshotError> = write_atomically(&failed, |tmp| {
            std::fs::write(tmp.join("half"), b"x").unwrap();
            Err(SnapshotError::NotADirectory("simulated failure".into()))
        });
        assert!(r.is_err());
        assert!(!failed.exists() && !tmp_dir(&failed).exists());

        // A leftover .tmp (a killed VMM) is refused by restore and replaced by a new write.
        let stale = tmp_dir(&root.join("again"));
        std::fs::create_dir_all(&stale).unwrap();
        assert!(matches!(
            read_state(&stale),
            Err(SnapshotError::Unfinished(_))
        ));
        write_atomically(&root.join("again"), |_| Ok::<_, SnapshotError>(())).unwrap();
        assert!(!stale.exists());
        std::fs::remove_dir_all(root).unwrap();
    }
}
