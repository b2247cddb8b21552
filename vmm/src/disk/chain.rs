//! Opening a disk's chain of layers and creating overlays.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{
    DenyImplicitOpenGate, FormatAccess, FormatCreateBuilder, FormatDriverBuilder,
    StorageOpenOptions,
};

use super::qcow2_check::{self, Qcow2Header};
use super::{
    DiskError, DiskFormat, DiskImage, ImagoFile, Layer, LayerRecord, OpenBelow, Top,
    MAX_CHAIN_DEPTH_LIMIT,
};

/// What to open and what to allow.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// The active layer (the image the VM writes, or reads when `read_only`).
    pub path: PathBuf,
    pub format: DiskFormat,
    pub read_only: bool,
    /// Follow the backing files qcow2 headers name. Without it, a qcow2 image with a backing
    /// file is refused (unless `frozen_backing` vouches for the link).
    pub allow_backing: bool,
    /// Most layers the chain may have, the active one included.
    pub max_depth: usize,
    /// The layer a Grove snapshot froze below this image: the image's backing file must be
    /// this file in this format. The chain below it was accepted when the snapshot's VM
    /// opened it and is followed as its headers say.
    pub frozen_backing: Option<LayerRecord>,
}

impl OpenOptions {
    /// Defaults for one image: no backing files followed, the default depth limit.
    pub fn new(path: impl Into<PathBuf>, format: DiskFormat, read_only: bool) -> Self {
        Self {
            path: path.into(),
            format,
            read_only,
            allow_backing: false,
            max_depth: super::DEFAULT_MAX_CHAIN_DEPTH,
            frozen_backing: None,
        }
    }
}

/// One layer, opened, locked and checked, not yet handed to imago.
pub(crate) struct OpenedLayer {
    pub(crate) record: LayerRecord,
    pub(crate) file: File,
    /// Virtual size (the file size for raw).
    pub(crate) size: u64,
    pub(crate) header: Option<Qcow2Header>,
    /// Device and inode.
    pub(crate) id: (u64, u64),
}

/// Opens `path` for reading (and writing), taking an advisory lock that lives as long as the
/// open file: exclusive for a writer, shared for readers, so any number of VMs may read a
/// layer but only one may write an image and nobody writes one that others read.
pub(crate) fn open_locked(path: &Path, writable: bool) -> Result<File, DiskError> {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| DiskError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    let locked = if writable {
        file.try_lock()
    } else {
        file.try_lock_shared()
    };
    match locked {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(DiskError::Locked {
            path: path.to_path_buf(),
            read_only: !writable,
        }),
        Err(fs::TryLockError::Error(source)) => Err(DiskError::Lock {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Size of a regular file or a block device (whose metadata says 0).
fn file_size(file: &File, path: &Path) -> Result<u64, DiskError> {
    use std::io::Seek;
    let mut f = file;
    let size = f
        .seek(io::SeekFrom::End(0))
        .map_err(|source| DiskError::Size {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(size)
}

/// Opens and checks one layer.
fn open_layer(record: LayerRecord, writable: bool) -> Result<OpenedLayer, DiskError> {
    open_layer_with(record, writable, true)
}

/// Opens one layer; `check` runs the qcow2 metadata checks (skipped only for a layer this
/// process wrote itself, such as the active layer it just froze).
pub(crate) fn open_layer_with(
    record: LayerRecord,
    writable: bool,
    check: bool,
) -> Result<OpenedLayer, DiskError> {
    let file = open_locked(&record.path, writable)?;
    let id = identity(&file, &record.path)?;
    let (size, header) = match record.format {
        DiskFormat::Raw => {
            let size = file_size(&file, &record.path)?;
            if size % 512 != 0 {
                return Err(DiskError::UnalignedSize {
                    path: record.path,
                    size,
                });
            }
            (size, None)
        }
        DiskFormat::Qcow2 => {
            let corrupt = |source| DiskError::Corrupt {
                path: record.path.clone(),
                source,
            };
            let header = qcow2_check::read_header(&file).map_err(corrupt)?;
            if check {
                qcow2_check::check_metadata(&file, &header).map_err(corrupt)?;
            }
            (header.size, Some(header))
        }
    };
    Ok(OpenedLayer {
        record,
        file,
        size,
        header,
        id,
    })
}

/// Opens a qcow2 image Grove just created, for writing.
pub(crate) fn open_layer_for_write(path: &Path) -> Result<OpenedLayer, DiskError> {
    open_layer(
        LayerRecord {
            path: path.to_path_buf(),
            format: DiskFormat::Qcow2,
        },
        true,
    )
}

/// Where a backing file name points: absolute names as they are, relative ones from the
/// directory of the image naming them (qemu's rule).
pub fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let name = Path::new(name);
    if name.is_absolute() {
        name.to_path_buf()
    } else {
        image.parent().unwrap_or_else(|| Path::new(".")).join(name)
    }
}

pub(crate) fn identity(file: &File, path: &Path) -> Result<(u64, u64), DiskError> {
    let meta = file.metadata().map_err(|source| DiskError::Io {
        action: "stat",
        path: path.to_path_buf(),
        source,
    })?;
    Ok((meta.dev(), meta.ino()))
}

/// Opens every layer of the chain, top first, checking each link against the options.
pub(crate) fn open_layers(opts: &OpenOptions) -> Result<Vec<OpenedLayer>, DiskError> {
    if opts.max_depth == 0 || opts.max_depth > MAX_CHAIN_DEPTH_LIMIT {
        return Err(DiskError::DepthLimit(opts.max_depth));
    }
    let top = open_layer(
        LayerRecord {
            path: opts.path.clone(),
            format: opts.format,
        },
        !opts.read_only,
    )?;
    let mut seen = HashSet::new();
    seen.insert(identity(&top.file, &top.record.path)?);
    let mut layers = vec![top];
    loop {
        let upper = &layers[layers.len() - 1];
        // Only the first link is checked against the snapshot's record.
        let expected = match layers.len() {
            1 => opts.frozen_backing.clone(),
            _ => None,
        };
        let upper_path = upper.record.path.clone();
        let Some(name) = upper.header.as_ref().and_then(|h| h.backing_file.clone()) else {
            if let Some(expected) = expected {
                return Err(DiskError::BackingMissing {
                    path: upper_path,
                    expected: expected.path,
                });
            }
            break;
        };
        let backing_format = upper.header.as_ref().and_then(|h| h.backing_format.clone());
        if !opts.allow_backing && opts.frozen_backing.is_none() {
            return Err(DiskError::BackingNotAllowed {
                path: upper_path,
                backing: name,
            });
        }
        let format = match backing_format.as_deref() {
            None => {
                return Err(DiskError::BackingFormatMissing {
                    path: upper_path,
                    backing: name,
                })
            }
            Some(f) => DiskFormat::from_name(f).ok_or_else(|| DiskError::BackingFormatUnknown {
                path: upper_path.clone(),
                format: f.to_string(),
            })?,
        };
        if layers.len() + 1 > opts.max_depth {
            return Err(DiskError::TooDeep {
                path: opts.path.clone(),
                depth: layers.len() + 1,
                limit: opts.max_depth,
            });
        }
        let path = resolve_backing(&upper_path, &name);
        if let Some(expected) = expected {
            let same = match (fs::canonicalize(&path), fs::canonicalize(&expected.path)) {
                (Ok(a), Ok(b)) => a == b,
                _ => false,
            };
            if !same || expected.format != format {
                return Err(DiskError::BackingMismatch {
                    path: upper_path,
                    found: path,
                    found_format: format,
                    expected: expected.path,
                    expected_format: expected.format,
                });
            }
        }
        let layer = open_layer(LayerRecord { path, format }, false)?;
        if !seen.insert(identity(&layer.file, &layer.record.path)?) {
            return Err(DiskError::BackingLoop {
                path: opts.path.clone(),
                repeated: layer.record.path,
            });
        }
        layers.push(layer);
    }
    Ok(layers)
}

/// The chain `opts` describes, as files, top first; opens (and locks) every layer for the
/// duration of the call.
pub fn walk_chain(opts: &OpenOptions) -> Result<Vec<LayerRecord>, DiskError> {
    Ok(open_layers(opts)?.into_iter().map(|l| l.record).collect())
}

/// Hands a checked layer to imago, with `below` as its backing layer.
pub(crate) fn imago_layer(
    layer: OpenedLayer,
    writable: bool,
    below: Option<Layer>,
) -> Result<FormatAccess<ImagoFile>, DiskError> {
    let path = layer.record.path.clone();
    let imago_err = |source| DiskError::Imago {
        path: path.clone(),
        source,
    };
    let storage = ImagoFile::from_open_file(
        layer.file,
        StorageOpenOptions::new()
            .write(writable)
            .filename(layer.record.path.clone()),
    )
    .map_err(imago_err)?;
    let gate = DenyImplicitOpenGate::default();
    Ok(match layer.record.format {
        DiskFormat::Raw => FormatAccess::new(
            Raw::builder(storage)
                .write(writable)
                .open(gate)
                .map_err(imago_err)?,
        ),
        DiskFormat::Qcow2 => FormatAccess::new(
            Qcow2::<ImagoFile, Layer>::builder(storage)
                .write(writable)
                .backing(below)
                .open(gate)
                .map_err(imago_err)?,
        ),
    })
}

/// Opens a disk: the active layer and, for qcow2, the chain below it.
pub fn open(opts: &OpenOptions) -> Result<DiskImage, DiskError> {
    let mut layers = open_layers(opts)?;
    let chain: Vec<LayerRecord> = layers.iter().map(|l| l.record.clone()).collect();
    let size = layers[0].size;
    if size % 512 != 0 {
        return Err(DiskError::UnalignedSize {
            path: opts.path.clone(),
            size,
        });
    }
    let lock_file = layers[0].file.try_clone().map_err(|source| DiskError::Io {
        action: "duplicate the descriptor of",
        path: opts.path.clone(),
        source,
    })?;
    let mut open_below = Vec::new();
    let top = match opts.format {
        DiskFormat::Raw => Top::Raw(layers.remove(0).file),
        DiskFormat::Qcow2 => {
            let mut below: Option<Layer> = None;
            while layers.len() > 1 {
                let Some(layer) = layers.pop() else { break };
                let (record, id) = (layer.record.clone(), layer.id);
                let access: Layer = Arc::new(imago_layer(layer, false, below)?);
                open_below.push(OpenBelow {
                    record,
                    id,
                    access: access.clone(),
                });
                below = Some(access);
            }
            open_below.reverse();
            let top = layers.remove(0);
            Top::Qcow2(imago_layer(top, !opts.read_only, below)?)
        }
    };
    Ok(DiskImage {
        top,
        lock_file,
        read_only: opts.read_only,
        size,
        chain,
        allow_backing: opts.allow_backing,
        max_depth: opts.max_depth,
        below: open_below,
        spare: None,
    })
}

/// Syncs a directory, so a file created or renamed in it survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), DiskError> {
    let d = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(d)
        .and_then(|f| f.sync_all())
        .map_err(|source| DiskError::Io {
            action: "sync directory",
            path: d.to_path_buf(),
            source,
        })
}

/// The name to write into an overlay at `overlay` for its backing layer `backing`: just the
/// file name when both are in one directory (the pair can then move together), else the
/// absolute path.
pub(crate) fn backing_name(overlay: &Path, backing: &Path) -> Result<String, DiskError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DiskError::Io {
            action: "resolve",
            path,
            source,
        }
    };
    let backing_abs = fs::canonicalize(backing).map_err(io_err(backing))?;
    let overlay_dir = overlay
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    let overlay_dir = fs::canonicalize(overlay_dir).map_err(io_err(overlay_dir))?;
    let name = if backing_abs.parent() == Some(overlay_dir.as_path()) {
        PathBuf::from(backing_abs.file_name().unwrap_or_default())
    } else {
        backing_abs
    };
    name.into_os_string().into_string().map_err(|_| {
        DiskError::Refused(format!(
            "backing file path {} is not UTF-8, which qcow2 cannot record",
            backing.display()
        ))
    })
}

/// Creates an empty qcow2 image at `path` (which must not exist) of `size` bytes, backed by
/// `backing` when given, and makes it durable. O(1): a header, an L1 table and a refcount
/// table, whatever the size.
pub fn create_overlay(
    path: &Path,
    backing: Option<&LayerRecord>,
    size: u64,
) -> Result<LayerRecord, DiskError> {
    let name = backing
        .map(|b| backing_name(path, &b.path).map(|n| (n, b.format)))
        .transpose()?;
    create_qcow2(path, name, size, true)?;
    Ok(LayerRecord {
        path: path.to_path_buf(),
        format: DiskFormat::Qcow2,
    })
}

/// Creates a qcow2 image whose header names `backing` (file name as written, format).
/// `durable_name`: also sync the directory, so the new name survives a crash (a caller that
/// renames the file afterwards syncs the directory itself).
pub(crate) fn create_qcow2(
    path: &Path,
    backing: Option<(String, DiskFormat)>,
    size: u64,
    durable_name: bool,
) -> Result<(), DiskError> {
    if !size.is_multiple_of(512) {
        return Err(DiskError::UnalignedSize {
            path: path.to_path_buf(),
            size,
        });
    }
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| {
            if source.kind() == io::ErrorKind::AlreadyExists {
                DiskError::Exists {
                    path: path.to_path_buf(),
                }
            } else {
                DiskError::Create {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
    let result = (|| {
        let sync_file = file.try_clone()?;
        let storage =
            ImagoFile::from_open_file(file, StorageOpenOptions::new().write(true).filename(path))?;
        let mut builder = Qcow2::<ImagoFile>::create_builder(storage).size(size);
        if let Some((name, format)) = backing {
            builder = builder.backing(name, format.as_str().to_string());
        }
        builder.create()?;
        sync_file.sync_all()
    })();
    if let Err(source) = result {
        let _ = fs::remove_file(path);
        return Err(DiskError::Create {
            path: path.to_path_buf(),
            source,
        });
    }
    if durable_name {
        sync_dir(path.parent().unwrap_or_else(|| Path::new(".")))?;
    }
    Ok(())
}

/// Virtual size of an image in the given format (file size for raw).
pub fn virtual_size(path: &Path, format: DiskFormat) -> Result<u64, DiskError> {
    let file = File::open(path).map_err(|source| DiskError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    match format {
        DiskFormat::Raw => file_size(&file, path),
        DiskFormat::Qcow2 => qcow2_check::read_header(&file)
            .map(|h| h.size)
            .map_err(|source| DiskError::Corrupt {
                path: path.to_path_buf(),
                source,
            }),
    }
}
