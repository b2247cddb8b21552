//! Branching a running disk: its active layer becomes a frozen, read-only layer and the VM
//! goes on writing a new, empty overlay on top of it. This is what makes a disk branch O(1):
//! nothing is copied, whatever the disk's size.
//!
//! Frozen layers are named `<stem>@<n>.qcow2` next to the active layer, `n` counting up.
//! Because the next name is known in advance, the next overlay is prepared outside the
//! snapshot's pause ([`DiskImage::prepare_spare`]): created under a temporary name, backed by
//! that name, synced. Inside the pause a branch then does only this:
//!
//! 1. the active layer is flushed (data, then metadata, then `fsync`; already clean when the
//!    snapshot flushed the disks just before);
//! 2. `link(active, frozen)`: the active layer's inode gets its second name, the frozen one
//!    (`link` never replaces a file);
//! 3. `rename(spare, active)`: the new overlay takes the active name, atomically;
//! 4. the directory is synced, the frozen layer made read-only (mode 0444);
//! 5. the new chain is opened: the frozen layer (written by this process, so its metadata is
//!    not checked again) and the new overlay, on the layers below, which stay open unless
//!    their files changed (a compaction): then the chain is reopened from its files.
//!
//! Without a spare (the first branch) the overlay is created and synced in the pause.
//!
//! A crash at any point leaves either the old active layer under its name (plus perhaps an
//! extra name for it and a stray temporary file) or the new overlay backed by the frozen
//! layer: the VM's configured path always opens. The VM, paused throughout by the caller,
//! then continues on the new chain.

use std::collections::HashSet;
use std::fs::{self, File};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::warn;

use super::chain::{create_qcow2, imago_layer, open_layer_with, resolve_backing, sync_dir};
use super::qcow2_check;
use super::{
    open, DiskError, DiskFormat, DiskImage, Layer, LayerRecord, OpenBelow, OpenOptions, Top,
    MAX_CHAIN_DEPTH_LIMIT,
};

/// The first free frozen-layer name next to `active`: `<stem>@<n>.qcow2`, from `n = from`.
pub fn next_frozen_name(active: &Path, from: usize) -> PathBuf {
    let dir = active.parent().unwrap_or_else(|| Path::new(""));
    let stem = active
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "disk".into());
    let mut n = from.max(1);
    loop {
        let candidate = dir.join(format!("{stem}@{n}.qcow2"));
        if candidate.symlink_metadata().is_err() {
            return candidate;
        }
        n += 1;
    }
}

/// A temporary name next to `active`.
fn temp_name(active: &Path, what: &str) -> PathBuf {
    let dir = active.parent().unwrap_or_else(|| Path::new(""));
    dir.join(format!(
        ".{}.{what}-{}",
        active
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ))
}

fn file_name_str(path: &Path) -> Result<String, DiskError> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| DiskError::Refused(format!("layer name {} is not UTF-8", path.display())))
}

/// The chain below a layer as its files say now: each layer's record and identity, reading
/// only headers (no locks, no metadata checks: every layer here was checked when first
/// opened, or written by Grove since).
/// A layer and its file's (device, inode).
type LayerId = (LayerRecord, (u64, u64));

fn headers_below(start: &LayerRecord) -> Result<Vec<LayerId>, DiskError> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut next = Some(start.clone());
    while let Some(layer) = next.take() {
        if out.len() >= MAX_CHAIN_DEPTH_LIMIT {
            return Err(DiskError::TooDeep {
                path: start.path.clone(),
                depth: out.len() + 1,
                limit: MAX_CHAIN_DEPTH_LIMIT,
            });
        }
        let file = File::open(&layer.path).map_err(|source| DiskError::Open {
            path: layer.path.clone(),
            source,
        })?;
        let meta = file.metadata().map_err(|source| DiskError::Io {
            action: "stat",
            path: layer.path.clone(),
            source,
        })?;
        let id = (meta.dev(), meta.ino());
        if !seen.insert(id) {
            return Err(DiskError::BackingLoop {
                path: start.path.clone(),
                repeated: layer.path,
            });
        }
        if layer.format == DiskFormat::Qcow2 {
            let header = qcow2_check::read_header(&file).map_err(|source| DiskError::Corrupt {
                path: layer.path.clone(),
                source,
            })?;
            if let Some(name) = header.backing_file {
                let format = header
                    .backing_format
                    .as_deref()
                    .and_then(DiskFormat::from_name)
                    .ok_or_else(|| DiskError::BackingFormatMissing {
                        path: layer.path.clone(),
                        backing: name.clone(),
                    })?;
                next = Some(LayerRecord {
                    path: resolve_backing(&layer.path, &name),
                    format,
                });
            }
        }
        out.push((layer, id));
    }
    Ok(out)
}

/// A spare overlay to create for a disk's next branch (see [`DiskImage::spare_plan`]).
#[derive(Debug)]
pub struct SparePlan {
    active: PathBuf,
    tmp: PathBuf,
    frozen: PathBuf,
    size: u64,
}

impl SparePlan {
    /// Creates and syncs the overlay file; needs no access to the disk itself.
    pub fn create(&self) -> Result<(), DiskError> {
        let _ = fs::remove_file(&self.tmp);
        create_qcow2(
            &self.tmp,
            Some((file_name_str(&self.frozen)?, DiskFormat::Qcow2)),
            self.size,
            true,
        )?;
        Ok(())
    }
}

impl DiskImage {
    /// Creates the overlay the next branch will use (see the module documentation), unless
    /// there is one. Call outside the snapshot pause; a no-op for raw or read-only disks.
    pub fn prepare_spare(&mut self) -> Result<(), DiskError> {
        if let Some(plan) = self.spare_plan() {
            plan.create()?;
            self.install_spare(plan);
        }
        Ok(())
    }

    /// What [`prepare_spare`](Self::prepare_spare) would create, if anything: split out so
    /// that a running VM's device lock is not held while the file is created and synced
    /// (the guest's I/O on the disk would wait for it).
    pub fn spare_plan(&self) -> Option<SparePlan> {
        if self.read_only || self.format() != DiskFormat::Qcow2 || self.spare.is_some() {
            return None;
        }
        let active = self.path().to_path_buf();
        Some(SparePlan {
            frozen: next_frozen_name(&active, 1),
            tmp: temp_name(&active, "spare"),
            active,
            size: self.size,
        })
    }

    /// Takes the spare `plan` created, if it still fits (no branch or spare since the plan);
    /// otherwise removes its file.
    pub fn install_spare(&mut self, plan: SparePlan) {
        if self.spare.is_none() && self.path() == plan.active && !self.read_only {
            self.spare = Some((plan.tmp, plan.frozen));
        } else {
            let _ = fs::remove_file(&plan.tmp);
        }
    }

    /// Freezes the active layer under a new `<stem>@<n>.qcow2` and continues on a new empty
    /// overlay at the active layer's path. Returns the frozen layer. On error the disk is as
    /// it was.
    pub fn branch(&mut self) -> Result<LayerRecord, DiskError> {
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

        // The chain below as its files say now, and whether it is what is open.
        let on_disk = match self.below.first() {
            Some(b) => headers_below(&b.record)?,
            None => Vec::new(),
        };
        let unchanged = on_disk.len() == self.below.len()
            && on_disk
                .iter()
                .zip(&self.below)
                .all(|((r, id), b)| *r == b.record && *id == b.id);
        let depth = on_disk.len() + 2;
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
        // The prepared overlay, if its frozen name is still free; else make one now.
        let (tmp, frozen) = match self.spare.take() {
            Some((tmp, frozen)) if tmp.exists() && frozen.symlink_metadata().is_err() => {
                (tmp, frozen)
            }
            stale => {
                if let Some((tmp, _)) = stale {
                    let _ = fs::remove_file(tmp);
                }
                let frozen = next_frozen_name(&active, 1);
                let tmp = temp_name(&active, "branch");
                let _ = fs::remove_file(&tmp);
                create_qcow2(
                    &tmp,
                    Some((file_name_str(&frozen)?, DiskFormat::Qcow2)),
                    self.size,
                    false,
                )?;
                (tmp, frozen)
            }
        };
        if let Err(source) = fs::hard_link(&active, &frozen) {
            let _ = fs::remove_file(&tmp);
            return Err(if source.kind() == std::io::ErrorKind::AlreadyExists {
                DiskError::Exists { path: frozen }
            } else {
                DiskError::Io {
                    action: "link the frozen layer",
                    path: frozen,
                    source,
                }
            });
        }
        if let Err(source) = fs::rename(&tmp, &active) {
            let _ = fs::remove_file(&frozen);
            let _ = fs::remove_file(&tmp);
            return Err(DiskError::Io {
                action: "install the new overlay at",
                path: active,
                source,
            });
        }
        let synced = sync_dir(&dir);
        if let Err(e) = fs::set_permissions(&frozen, fs::Permissions::from_mode(0o444)) {
            warn!("cannot make {} read-only: {e}", frozen.display());
        }
        // Readers of the frozen layer (the new chain, clones) take shared locks on it.
        let reopened = synced
            .and_then(|()| {
                self.lock_file
                    .lock_shared()
                    .map_err(|source| DiskError::Lock {
                        path: frozen.clone(),
                        source,
                    })
            })
            .and_then(|()| {
                if unchanged {
                    self.open_on_frozen(&active, &frozen)
                } else {
                    let mut opts = OpenOptions::new(&active, DiskFormat::Qcow2, false);
                    // Grove wrote the new link; the links below were accepted when the disk
                    // opened (or written by a compaction).
                    opts.allow_backing = true;
                    opts.max_depth = self.max_depth;
                    open(&opts)
                }
            });
        match reopened {
            Ok(mut image) => {
                image.allow_backing = self.allow_backing;
                image.max_depth = self.max_depth;
                // The old chain (and its descriptors) goes here; it holds nothing unwritten.
                *self = image;
                Ok(LayerRecord {
                    path: frozen,
                    format: DiskFormat::Qcow2,
                })
            }
            Err(e) => {
                self.undo_branch(&active, &frozen);
                Err(e)
            }
        }
    }

    /// The new chain after a branch when the layers below are unchanged: the new overlay on
    /// the frozen layer on the layers already open.
    fn open_on_frozen(&self, active: &Path, frozen: &Path) -> Result<DiskImage, DiskError> {
        let frozen_record = LayerRecord {
            path: frozen.to_path_buf(),
            format: DiskFormat::Qcow2,
        };
        let frozen_layer = open_layer_with(frozen_record.clone(), false, false)?;
        let frozen_id = frozen_layer.id;
        let frozen_access: Layer = Arc::new(imago_layer(
            frozen_layer,
            false,
            self.below.first().map(|b| b.access.clone()),
        )?);
        let top = open_layer_with(
            LayerRecord {
                path: active.to_path_buf(),
                format: DiskFormat::Qcow2,
            },
            true,
            true,
        )?;
        let lock_file = top.file.try_clone().map_err(|source| DiskError::Io {
            action: "duplicate the descriptor of",
            path: active.to_path_buf(),
            source,
        })?;
        let top_record = top.record.clone();
        let top = imago_layer(top, true, Some(frozen_access.clone()))?;
        let mut below = vec![OpenBelow {
            record: frozen_record,
            id: frozen_id,
            access: frozen_access,
        }];
        below.extend(self.below.iter().map(|b| OpenBelow {
            record: b.record.clone(),
            id: b.id,
            access: b.access.clone(),
        }));
        let mut chain = vec![top_record];
        chain.extend(below.iter().map(|b| b.record.clone()));
        Ok(DiskImage {
            top: Top::Qcow2(top),
            lock_file,
            read_only: false,
            size: self.size,
            chain,
            allow_backing: self.allow_backing,
            max_depth: self.max_depth,
            below,
            spare: None,
        })
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
