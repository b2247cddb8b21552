//! Branching a running disk: its active layer becomes a frozen, read-only layer and the VM
//! goes on writing a new, empty overlay on top of it. This is what makes a disk branch O(1):
//! nothing is copied, whatever the disk's size.
//!
//! On disk, in the active layer's directory:
//!
//! 1. the active layer is flushed (data, then metadata, then `fsync`);
//! 2. a new overlay is created under a temporary name, backed by the frozen name;
//! 3. the active layer's inode gets its second name, the frozen one (`link`, which never
//!    replaces a file);
//! 4. the new overlay is renamed over the active name (`rename`, atomic);
//! 5. the directory is synced and the frozen layer made read-only (mode 0444).
//!
//! A crash at any point leaves either the old active layer under its name (plus perhaps an
//! extra name for it and a stray temporary file) or the new overlay backed by the frozen
//! layer: the VM's configured path always opens. The VM, paused throughout by the caller,
//! then continues on the reopened chain; the layers below are reopened from their files, so a
//! chain compacted since the VM started is picked up here.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use log::warn;

use super::chain::{create_qcow2, sync_dir};
use super::{open, walk_chain, DiskError, DiskFormat, DiskImage, LayerRecord, OpenOptions};

/// A free name for the layer frozen at snapshot `snapshot`: next to the active layer,
/// `<stem>@<snapshot name>.qcow2`, with `.1`, `.2`, ... added when taken.
pub fn frozen_layer_path(active: &Path, snapshot: &Path) -> PathBuf {
    let dir = active.parent().unwrap_or_else(|| Path::new(""));
    let stem = active
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "disk".into());
    let snap = snapshot
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "snapshot".into());
    let mut candidate = dir.join(format!("{stem}@{snap}.qcow2"));
    let mut n = 1;
    while candidate.symlink_metadata().is_ok() {
        candidate = dir.join(format!("{stem}@{snap}.{n}.qcow2"));
        n += 1;
    }
    candidate
}

impl DiskImage {
    /// Freezes the active layer under the name `frozen` (in the same directory) and continues
    /// on a new empty overlay at the active layer's path. Returns the frozen layer. On error
    /// the disk is as it was.
    pub fn branch(&mut self, frozen: &Path) -> Result<LayerRecord, DiskError> {
        let active = self.path().to_path_buf();
        if self.read_only {
            return Err(DiskError::NotBranchable {
                path: active,
                what: "read-only",
            });
        }
        if self.format() != DiskFormat::Qcow2 {
            return Err(DiskError::NotBranchable {
                path: active,
                what: "raw",
            });
        }
        let dir = active
            .parent()
            .unwrap_or_else(|| Path::new(""))
            .to_path_buf();
        if frozen.parent().unwrap_or_else(|| Path::new("")) != dir {
            return Err(DiskError::Refused(format!(
                "a frozen layer must be in its disk's directory ({}), not at {}",
                dir.display(),
                frozen.display()
            )));
        }
        let frozen_name = frozen
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| {
                DiskError::Refused(format!(
                    "frozen layer name {} is not UTF-8",
                    frozen.display()
                ))
            })?
            .to_string();

        // The depth after branching: the new overlay, the frozen layer and what is below it
        // on disk now (which a compaction may have shortened).
        let below = match self.chain.get(1) {
            Some(b) => {
                let mut opts = OpenOptions::new(&b.path, b.format, true);
                opts.allow_backing = true;
                opts.max_depth = super::MAX_CHAIN_DEPTH_LIMIT;
                walk_chain(&opts)?.len()
            }
            None => 0,
        };
        let depth = below + 2;
        if depth > self.max_depth {
            return Err(DiskError::TooDeep {
                path: active,
                depth,
                limit: self.max_depth,
            });
        }

        self.flush().map_err(|source| DiskError::Io {
            action: "flush",
            path: active.clone(),
            source,
        })?;
        let tmp = dir.join(format!(
            ".{}.branch-{}",
            active
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default(),
            std::process::id()
        ));
        let _ = fs::remove_file(&tmp);
        create_qcow2(&tmp, Some((frozen_name, DiskFormat::Qcow2)), self.size)?;
        if let Err(source) = fs::hard_link(&active, frozen) {
            let _ = fs::remove_file(&tmp);
            return Err(if source.kind() == std::io::ErrorKind::AlreadyExists {
                DiskError::Exists {
                    path: frozen.to_path_buf(),
                }
            } else {
                DiskError::Io {
                    action: "link the frozen layer",
                    path: frozen.to_path_buf(),
                    source,
                }
            });
        }
        if let Err(source) = fs::rename(&tmp, &active) {
            let _ = fs::remove_file(frozen);
            let _ = fs::remove_file(&tmp);
            return Err(DiskError::Io {
                action: "install the new overlay at",
                path: active,
                source,
            });
        }
        let synced = sync_dir(&dir);
        if let Err(e) = fs::set_permissions(frozen, fs::Permissions::from_mode(0o444)) {
            warn!("cannot make {} read-only: {e}", frozen.display());
        }
        // Readers of the frozen layer (the new chain, clones) take shared locks on it.
        let reopened = synced
            .and_then(|()| {
                self.lock_file
                    .lock_shared()
                    .map_err(|source| DiskError::Lock {
                        path: frozen.to_path_buf(),
                        source,
                    })
            })
            .and_then(|()| {
                let mut opts = OpenOptions::new(&active, DiskFormat::Qcow2, false);
                // Grove wrote the new link; the links below were accepted when the disk opened.
                opts.allow_backing = true;
                opts.max_depth = self.max_depth;
                open(&opts)
            });
        match reopened {
            Ok(mut image) => {
                image.allow_backing = self.allow_backing;
                // The old chain (and its descriptors) goes here; it holds nothing unwritten.
                *self = image;
                Ok(LayerRecord {
                    path: frozen.to_path_buf(),
                    format: DiskFormat::Qcow2,
                })
            }
            Err(e) => {
                self.undo_branch(&active, frozen);
                Err(e)
            }
        }
    }

    /// Puts the frozen layer back under the active name after a failed branch.
    fn undo_branch(&mut self, active: &Path, frozen: &Path) {
        let _ = fs::set_permissions(frozen, fs::Permissions::from_mode(0o644));
        if let Err(e) = fs::rename(frozen, active) {
            warn!(
                "cannot move {} back to {}: {e}; the disk's data is in the former",
                frozen.display(),
                active.display()
            );
        }
        if let Err(e) = self.lock_file.try_lock() {
            warn!("cannot lock {} again: {e}", active.display());
        }
    }
}
