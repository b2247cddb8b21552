//! Chain compaction: merging frozen layers nobody else needs into one.
//!
//! Every snapshot of a VM with a qcow2 disk adds a layer to its chain; reads of clusters
//! that were never rewritten walk further down it with every layer. `compact` takes a
//! frozen layer `T` and merges into it the layers below it that only `T` uses, so that
//!
//! ```text
//!   T -> L1 -> L2 -> L3 -> base          becomes          T' -> L3 -> base
//! ```
//!
//! when nothing but `T` names `L1`, nothing but `L1` names `L2`, and `L3` is named by
//! something else too (another image, or a snapshot that froze it). `T'` shows exactly what
//! `T` showed: the clusters any of `T`, `L1`, `L2` had, in `T`'s view, and everything else
//! from `L3`. It is written under a temporary name, synced, and renamed over `T`, so images
//! and snapshots naming `T` stay valid; `L1` and `L2` are then deleted. A crash leaves either
//! the old chain or the new one (and perhaps a stray temporary file or unreferenced layers).
//!
//! References are found by scanning directories: every qcow2 image's backing file, and
//! every snapshot directory's recorded disk layers. The layer's own directory is always
//! scanned. A VM still running on the old layers keeps reading them (their files stay open
//! until it ends or branches again, when it reopens the compacted chain).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use imago::ShallowMapping;

use super::chain::{self, backing_name, create_qcow2, imago_layer, open_layers, sync_dir};
use super::{qcow2_check, DiskError, DiskFormat, Layer, LayerRecord, OpenOptions};
use crate::devices::virtio::block::BlockState;

/// What a compaction did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactReport {
    /// The layer that now holds the merged data (the `top` given).
    pub top: PathBuf,
    /// The layers merged into it and deleted, top first.
    pub merged: Vec<PathBuf>,
    /// The layer below it now, if any.
    pub backing: Option<LayerRecord>,
    /// Chain depth before and after, `top` included.
    pub depth_before: usize,
    pub depth_after: usize,
    /// Guest bytes copied into the new layer.
    pub bytes_copied: u64,
}

fn canonical(path: &Path) -> PathBuf {
    fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Who names each layer: canonical layer path -> descriptions of the referrers.
fn references(dirs: &[PathBuf]) -> Result<HashMap<PathBuf, Vec<PathBuf>>, DiskError> {
    let mut refs: HashMap<PathBuf, Vec<PathBuf>> = HashMap::new();
    let mut scanned = HashSet::new();
    for dir in dirs {
        let dir = canonical(dir);
        if !scanned.insert(dir.clone()) {
            continue;
        }
        let entries = fs::read_dir(&dir).map_err(|source| DiskError::Io {
            action: "list",
            path: dir.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                if !path.join(crate::snapshot::STATE_FILE).exists() {
                    continue;
                }
                // A snapshot: it needs the layers its disks were recorded with.
                let state = crate::snapshot::read_state(&path).map_err(|e| {
                    DiskError::Refused(format!(
                        "cannot read snapshot {} to find the layers it uses: {e}",
                        path.display()
                    ))
                })?;
                for block in state.devices.virtio.iter().filter_map(|d| match &d.kind {
                    crate::device_manager::VirtioKindState::Block(b) => Some(b),
                    _ => None,
                }) {
                    for layer in snapshot_layers(block) {
                        refs.entry(canonical(&layer))
                            .or_default()
                            .push(path.clone());
                    }
                }
            } else if kind.is_file() {
                let Ok(mut file) = fs::File::open(&path) else {
                    continue;
                };
                let mut magic = [0u8; 4];
                if file.read_exact(&mut magic).is_err() || &magic != b"QFI\xfb" {
                    continue;
                }
                let Ok(header) = qcow2_check::read_header(&file) else {
                    continue;
                };
                if let Some(name) = header.backing_file {
                    let backing = chain::resolve_backing(&path, &name);
                    refs.entry(canonical(&backing))
                        .or_default()
                        .push(canonical(&path));
                }
            }
        }
    }
    Ok(refs)
}

/// The layer a snapshot's disk names directly: the frozen layer of a branched disk, else
/// the image itself. The layers below are reached through image headers, so a compaction
/// that keeps the named layer's contents keeps the snapshot valid.
fn snapshot_layers(block: &BlockState) -> Vec<PathBuf> {
    match (block.branched, block.backing.first()) {
        (true, Some(frozen)) => vec![frozen.path.clone()],
        _ => vec![block.path.clone()],
    }
}

/// Merges into `top` every layer below it that only the layer above it references (see the
/// module documentation). `scan` lists directories whose images and snapshots count as
/// references besides `top`'s own directory.
pub fn compact(top: &Path, scan: &[PathBuf]) -> Result<CompactReport, DiskError> {
    let mut opts = OpenOptions::new(top, DiskFormat::Qcow2, true);
    opts.allow_backing = true;
    opts.max_depth = super::MAX_CHAIN_DEPTH_LIMIT;
    let layers = open_layers(&opts)?;
    let records: Vec<LayerRecord> = layers.iter().map(|l| l.record.clone()).collect();

    let top_dir = top
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."))
        .to_path_buf();
    let mut dirs = vec![top_dir.clone()];
    dirs.extend(scan.iter().cloned());
    let refs = references(&dirs)?;

    // The layers to merge: below `top`, qcow2, named only by the layer right above.
    let mut merged = 0;
    for i in 1..records.len() {
        let layer = &records[i];
        if layer.format != DiskFormat::Qcow2 {
            break;
        }
        let upper = canonical(&records[i - 1].path);
        let others: Vec<&PathBuf> = refs
            .get(&canonical(&layer.path))
            .map(|r| r.iter().filter(|p| **p != upper).collect())
            .unwrap_or_default();
        if !others.is_empty() {
            break;
        }
        merged = i;
    }
    if merged == 0 {
        return Ok(CompactReport {
            top: top.to_path_buf(),
            merged: Vec::new(),
            backing: records.get(1).cloned(),
            depth_before: records.len(),
            depth_after: records.len(),
            bytes_copied: 0,
        });
    }
    let bottom = records.get(merged + 1).cloned();
    let size = layers[0].size;

    // Open the whole chain through imago, keeping the bottom's handle to recognise it.
    let mut layers = layers;
    let mut below: Option<Layer> = None;
    let mut bottom_layer: Option<Layer> = None;
    while layers.len() > 1 {
        let Some(layer) = layers.pop() else { break };
        let index = layers.len();
        let access: Layer = Arc::new(imago_layer(layer, false, below)?);
        if index == merged + 1 {
            bottom_layer = Some(access.clone());
        }
        below = Some(access);
    }
    let source = imago_layer(layers.remove(0), false, below)?;

    let tmp = top_dir.join(format!(
        ".{}.compact-{}",
        top.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let _ = fs::remove_file(&tmp);
    let name = bottom
        .as_ref()
        .map(|b| backing_name(&tmp, &b.path).map(|n| (n, b.format)))
        .transpose()?;
    create_qcow2(&tmp, name, size, false)?;
    let result = (|| {
        let new_layer = chain::open_layer_for_write(&tmp)?;
        let dest = imago_layer(new_layer, true, bottom_layer.clone())?;
        let copied =
            copy_merged(&source, &dest, bottom_layer.as_ref(), size).map_err(|source| {
                DiskError::Io {
                    action: "copy merged layers into",
                    path: tmp.clone(),
                    source,
                }
            })?;
        dest.flush()
            .and_then(|()| dest.sync())
            .map_err(|source| DiskError::Io {
                action: "flush",
                path: tmp.clone(),
                source,
            })?;
        Ok(copied)
    })();
    let copied = match result {
        Ok(c) => c,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    drop(source);
    let mode = fs::metadata(top)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0o444);
    let _ = fs::set_permissions(&tmp, fs::Permissions::from_mode(mode));
    fs::rename(&tmp, top).map_err(|source| {
        let _ = fs::remove_file(&tmp);
        DiskError::Io {
            action: "replace",
            path: top.to_path_buf(),
            source,
        }
    })?;
    sync_dir(&top_dir)?;
    let mut removed = Vec::new();
    for layer in &records[1..=merged] {
        if let Err(e) = fs::remove_file(&layer.path) {
            log::warn!("cannot delete merged layer {}: {e}", layer.path.display());
        }
        removed.push(layer.path.clone());
    }
    Ok(CompactReport {
        top: top.to_path_buf(),
        merged: removed,
        backing: bottom,
        depth_before: records.len(),
        depth_after: records.len() - merged,
        bytes_copied: copied,
    })
}

/// What the new layer needs for a range.
enum Action {
    /// Data from one of the merged layers.
    Copy,
    /// Zeroes that must hide the bottom layer.
    Zero,
    /// Nothing: the bottom layer (or unallocated space without one) shows through.
    Skip,
}

/// Copies into `dest` every range `source` does not take from `bottom`.
fn copy_merged(
    source: &imago::FormatAccess<super::ImagoFile>,
    dest: &imago::FormatAccess<super::ImagoFile>,
    bottom: Option<&Layer>,
    size: u64,
) -> std::io::Result<u64> {
    const CHUNK: u64 = 1 << 20;
    let is_bottom = |l: &imago::FormatAccess<super::ImagoFile>| {
        bottom.is_some_and(|b| std::ptr::eq(l, Arc::as_ptr(b)))
    };
    let mut buf = vec![0u8; CHUNK as usize];
    let mut copied = 0;
    let mut offset = 0;
    while offset < size {
        let mut len = (size - offset).min(1 << 30);
        let mut layer = source;
        let mut layer_offset = offset;
        let action = loop {
            let (mapping, l) = layer.get_shallow_mapping(layer_offset, len)?;
            len = len.min(l.max(1));
            match mapping {
                ShallowMapping::Raw { .. } | ShallowMapping::Special { .. } => break Action::Copy,
                ShallowMapping::Zero { explicit, .. } => {
                    break if explicit && bottom.is_some() {
                        Action::Zero
                    } else {
                        Action::Skip
                    }
                }
                ShallowMapping::Eof { .. } => {
                    break if bottom.is_some() {
                        Action::Zero
                    } else {
                        Action::Skip
                    }
                }
                ShallowMapping::Indirect {
                    layer: next,
                    offset: next_offset,
                    ..
                } => {
                    if is_bottom(next) {
                        break Action::Skip;
                    }
                    layer = next;
                    layer_offset = next_offset;
                }
                _ => {
                    return Err(std::io::Error::other(
                        "unsupported mapping in a merged layer",
                    ))
                }
            }
        };
        match action {
            Action::Copy => {
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(CHUNK) as usize;
                    source.read(&mut buf[..n], offset + done)?;
                    dest.write(&buf[..n], offset + done)?;
                    done += n as u64;
                }
                copied += len;
            }
            Action::Zero => dest.write_zeroes(offset, len)?,
            Action::Skip => {}
        }
        offset += len;
    }
    Ok(copied)
}
