//! Disk images behind virtio-blk: raw files and qcow2 images with backing chains.
//!
//! A disk is a chain of layers, top first: the image the VM writes (the *active* layer) and
//! the read-only layers below it that it reads through. Raw images are a chain of one. qcow2
//! goes through the `imago` crate (see `docs/disk-layers.md` for why); this module decides
//! what may be opened and how:
//!
//! - the format of every layer is given, never guessed: the top's by the VM configuration,
//!   a backing layer's by the backing-format field of the image above it;
//! - backing files are followed only when the configuration allows it, or along a chain a
//!   Grove snapshot recorded (every other qcow2 image with a backing file is refused);
//! - every qcow2 layer's metadata is checked ([`qcow2_check`]) before imago sees it, so a
//!   corrupt or hostile image is refused with one line when the VM starts;
//! - every layer is locked: exclusively when written, shared when read;
//! - chains are at most [`DEFAULT_MAX_CHAIN_DEPTH`] layers deep unless configured otherwise.
//!
//! [`chain`] opens chains and creates overlays, [`branch`] freezes the active layer during a
//! snapshot, [`compact`] merges frozen layers.

pub mod branch;
pub mod chain;
pub mod compact;
pub mod qcow2_check;

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use imago::FormatAccess;
use serde::{Deserialize, Serialize};

pub use chain::{create_overlay, open, walk_chain, OpenOptions};

/// Layers a disk chain may have (active layer and base included) unless configured otherwise.
pub const DEFAULT_MAX_CHAIN_DEPTH: usize = 16;
/// The most a configuration may allow.
pub const MAX_CHAIN_DEPTH_LIMIT: usize = 256;

/// imago's storage type: a file Grove opened (and locked) itself.
pub(crate) type ImagoFile = imago::file::File;
/// An open layer others read through.
pub(crate) type Layer = Arc<FormatAccess<ImagoFile>>;

/// How a disk image's bytes are laid out. Always stated, never probed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// The guest's bytes, as they are.
    #[default]
    Raw,
    /// QEMU's copy-on-write format, possibly with a backing file.
    Qcow2,
}

impl DiskFormat {
    /// The name qcow2's backing-format field and `qemu-img` use.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }

    /// Parses a backing-format name; `None` for anything Grove does not open.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "raw" => Some(DiskFormat::Raw),
            "qcow2" => Some(DiskFormat::Qcow2),
            _ => None,
        }
    }
}

impl fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DiskFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::from_name(s).ok_or_else(|| format!("unknown disk format {s:?} (raw or qcow2)"))
    }
}

/// One file of a disk chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerRecord {
    pub path: PathBuf,
    pub format: DiskFormat,
}

/// Why a disk cannot be opened, created, branched or compacted. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open disk image {}", .path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "disk image {} is in use by another VM{}",
        .path.display(),
        if *.read_only { " that writes it" } else { "" }
    )]
    Locked { path: PathBuf, read_only: bool },
    #[error("cannot lock disk image {}", .path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot determine the size of disk image {}", .path.display())]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "disk image {} is {size} bytes, which is not a whole number of 512-byte sectors",
        .path.display()
    )]
    UnalignedSize { path: PathBuf, size: u64 },
    #[error("disk image {} is not a usable qcow2 image", .path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: qcow2_check::CheckError,
    },
    #[error(
        "disk image {} has a backing file ({backing}); following it needs allow_backing in the \
         disk's configuration",
        .path.display()
    )]
    BackingNotAllowed { path: PathBuf, backing: String },
    #[error(
        "disk image {} names backing file {backing} without its format; Grove never guesses a \
         format (recreate the image with -F raw or -F qcow2)",
        .path.display()
    )]
    BackingFormatMissing { path: PathBuf, backing: String },
    #[error("disk image {} has backing format {format:?}; only raw and qcow2 are supported", .path.display())]
    BackingFormatUnknown { path: PathBuf, format: String },
    #[error(
        "disk image {} is backed by {} ({found_format}), but the snapshot recorded {} ({expected_format})",
        .path.display(), .found.display(), .expected.display()
    )]
    BackingMismatch {
        path: PathBuf,
        found: PathBuf,
        found_format: DiskFormat,
        expected: PathBuf,
        expected_format: DiskFormat,
    },
    #[error(
        "disk image {} has no backing file, but the snapshot recorded {} below it",
        .path.display(), .expected.display()
    )]
    BackingMissing { path: PathBuf, expected: PathBuf },
    #[error("the backing chain of disk image {} loops back to {}", .path.display(), .repeated.display())]
    BackingLoop { path: PathBuf, repeated: PathBuf },
    #[error(
        "the chain of disk image {} is {depth} layers deep, more than its limit of {limit}; \
         merge frozen layers with `grove-vmm disk compact`",
        .path.display()
    )]
    TooDeep {
        path: PathBuf,
        depth: usize,
        limit: usize,
    },
    #[error("the chain depth limit must be between 1 and {MAX_CHAIN_DEPTH_LIMIT}, got {0}")]
    DepthLimit(usize),
    #[error("cannot open qcow2 image {}", .path.display())]
    Imago {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} already exists; Grove never overwrites a disk image", .path.display())]
    Exists { path: PathBuf },
    #[error("cannot create disk image {}", .path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot {action} {}", .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk image {} is {what}; only a writable qcow2 disk can be branched", .path.display())]
    NotBranchable { path: PathBuf, what: &'static str },
    #[error("{0}")]
    Refused(String),
}

/// The top of an open chain.
enum Top {
    Raw(File),
    Qcow2(FormatAccess<ImagoFile>),
}

/// An open disk: the active layer (read through to the layers below for qcow2), its size,
/// and the chain as files.
pub struct DiskImage {
    top: Top,
    /// The active layer's file again (same open file description), kept to change its lock
    /// when the layer is frozen.
    lock_file: File,
    read_only: bool,
    /// Virtual size in bytes (a multiple of 512).
    size: u64,
    /// Every layer, top first.
    chain: Vec<LayerRecord>,
    /// Whether backing files named by the images may be followed.
    allow_backing: bool,
    max_depth: usize,
    /// The open layers below the active one, top first (qcow2 only).
    below: Vec<OpenBelow>,
    /// A synced, empty overlay waiting for the next branch: (its temporary path, the frozen
    /// layer name its header names as backing file).
    spare: Option<(PathBuf, PathBuf)>,
}

/// A layer below the active one, open for reading.
pub(crate) struct OpenBelow {
    pub(crate) record: LayerRecord,
    /// Device and inode when it was opened.
    pub(crate) id: (u64, u64),
    pub(crate) access: Layer,
}

impl Drop for DiskImage {
    fn drop(&mut self) {
        if let Some((tmp, _)) = self.spare.take() {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

impl fmt::Debug for DiskImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiskImage")
            .field("chain", &self.chain)
            .field("read_only", &self.read_only)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl DiskImage {
    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The active layer's file.
    pub fn path(&self) -> &Path {
        &self.chain[0].path
    }

    pub fn format(&self) -> DiskFormat {
        self.chain[0].format
    }

    /// Every layer, top first.
    pub fn chain(&self) -> &[LayerRecord] {
        &self.chain
    }

    /// The layers below the active one, top first.
    pub fn backing(&self) -> &[LayerRecord] {
        &self.chain[1..]
    }

    pub fn allow_backing(&self) -> bool {
        self.allow_backing
    }

    pub fn max_depth(&self) -> usize {
        self.max_depth
    }

    /// Reads `buf.len()` bytes at `offset`; the caller keeps the range inside the disk.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match &self.top {
            Top::Raw(file) => file.read_exact_at(buf, offset),
            Top::Qcow2(q) => q.read(buf, offset),
        }
    }

    /// Writes `buf` at `offset`; the caller keeps the range inside the disk. On qcow2 this
    /// allocates clusters in the active layer; layers below are never written.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match &self.top {
            Top::Raw(file) => file.write_all_at(buf, offset),
            Top::Qcow2(q) => q.write(buf, offset),
        }
    }

    /// Makes every completed write durable: for qcow2, metadata caches are written (refcounts
    /// before the L2 tables that use them) and the file is synced.
    pub fn flush(&self) -> io::Result<()> {
        match &self.top {
            Top::Raw(file) => file.sync_all(),
            Top::Qcow2(q) => {
                q.flush()?;
                q.sync()
            }
        }
    }
}

/// Runs `attempt` until it stops failing with [`DiskError::Locked`] (at most 10 s).
///
/// Disk locks are `flock`s, held by every descriptor of the open file. When a multithreaded
/// test process spawns a child (`qemu-img`), the child holds a copy of every descriptor between
/// its fork and its exec, so a lock the test has just released may still be held for a moment.
/// Tests that reopen an image they have just closed go through this; the VMM itself never
/// spawns children.
#[cfg(test)]
pub(crate) fn retry_while_locked<T, E>(
    mut attempt: impl FnMut() -> Result<T, E>,
    locked: impl Fn(&E) -> bool,
) -> Result<T, E> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match attempt() {
            Err(e) if locked(&e) && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests;
