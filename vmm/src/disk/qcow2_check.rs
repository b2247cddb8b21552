//! Strict validation of qcow2 image metadata before the image is handed to `imago`.
//!
//! A guest can only ever cause writes to *data* clusters; all other metadata (header, L1/L2
//! tables, refcount structures) is written by the VMM itself. Images, however, may come from
//! outside (downloads, other tools, a crashed host), so before opening one we make sure that:
//!
//! - the header is one we fully understand: version 2 or 3, no encryption, no internal
//!   snapshots, no external data file, no extended L2 entries, no non-zlib compression, not
//!   marked dirty or corrupt, and sizes within the limits qemu and imago themselves enforce;
//! - every metadata structure and every mapped data cluster lies inside the file, so neither a
//!   guest read nor a guest write can reach outside the image (or grow it arbitrarily);
//! - no host cluster serves two incompatible purposes (a data cluster on top of an L2 table
//!   would let the guest rewrite its own mapping, and from there any host offset);
//! - every cluster in use has a refcount of at least one, so the allocator never hands it out
//!   again while it is still referenced.
//!
//! The check costs one read per metadata cluster and memory proportional to the metadata, so
//! a sparse overlay checks in well under a millisecond. Leaked clusters (refcount > 0 but
//! unreferenced) are harmless and accepted, as is the persistent-bitmaps extension (imago
//! ignores bitmaps, and clears the autoclear bit that would mark them valid).

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

const MAGIC: [u8; 4] = *b"QFI\xfb";
const V2_HEADER_LEN: u64 = 72;
const V3_MIN_HEADER_LEN: u64 = 104;
const MAX_VIRTUAL_SIZE: u64 = 1 << 50;
/// qemu and imago both refuse larger L1 tables (32 MiB).
const MAX_L1_ENTRIES: u64 = 4 << 20;
/// qemu refuses larger refcount tables.
const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;

const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_CRYPTO_HEADER: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Bits 9..=55: host offset in L1 entries and standard L2 entries.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
const L2_ZERO: u64 = 1;
const L2_COMPRESSED: u64 = 1 << 62;
const COPIED: u64 = 1 << 63;
const REFTABLE_RESERVED: u64 = 0x1ff;

/// Parsed qcow2 header (the fields Grove needs). All multi-byte fields on disk are big-endian.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size, 9..=21.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// The backing file name as stored (UTF-8), None if absent.
    pub backing_file: Option<String>,
    /// From the backing-format header extension 0xe2792aca, if present.
    pub backing_format: Option<String>,
    pub l1_table_offset: u64,
    pub l1_size: u32,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    /// log2 of the refcount width in bits; 4 (16-bit) for v2.
    pub refcount_order: u32,
    /// Always 0 in an accepted image: every incompatible feature is refused.
    pub incompatible_features: u64,
}

impl Qcow2Header {
    /// Cluster size in bytes (0 if `cluster_bits` is nonsensical, which `read_header` refuses).
    pub fn cluster_size(&self) -> u64 {
        1u64.checked_shl(self.cluster_bits).unwrap_or(0)
    }
}

/// Why an image was refused. Messages are one line and name the offending structure; the
/// `String` fields describe it with its offset and where it is referenced from.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("failed to read {0} of the qcow2 image")]
    Io(String, #[source] std::io::Error),
    #[error("image file is too short ({0:#x} bytes) to hold its header cluster")]
    TooShort(u64),
    #[error("not a qcow2 image (magic {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("qcow2 version {0} is not supported (only 2 and 3)")]
    UnsupportedVersion(u32),
    #[error("cluster_bits {0} is outside 9..=21")]
    BadClusterBits(u32),
    #[error("encrypted qcow2 images are not supported (crypt_method {0})")]
    Encrypted(u32),
    #[error("virtual size {0:#x} is not a multiple of 512")]
    SizeNotAligned(u64),
    #[error("virtual size {0:#x} exceeds the supported maximum of 1 PiB")]
    SizeTooLarge(u64),
    #[error("header_length {0} is not a multiple of 8 in 104..=cluster size")]
    BadHeaderLength(u32),
    #[error("refcount_order {0} is invalid (at most 6)")]
    BadRefcountOrder(u32),
    #[error("image has {0} internal snapshots, which are not supported (qemu-img snapshot -d)")]
    Snapshots(u32),
    #[error("image is marked dirty; repair with qemu-img check -r all")]
    Dirty,
    #[error("image is marked corrupt; repair with qemu-img check -r all")]
    Corrupt,
    #[error("images with an external data file are not supported")]
    ExternalDataFile,
    #[error("images with extended L2 entries (subclusters) are not supported")]
    ExtendedL2,
    /// Compression type byte, and whether incompatible feature bit 3 is set.
    #[error(
        "compression type {0} (feature bit 3 set: {1}) is not supported, only zlib (0, bit clear)"
    )]
    UnsupportedCompression(u8, bool),
    #[error("unknown incompatible feature bits {0:#x}")]
    UnknownIncompatible(u64),
    /// Entries present, entries the virtual size needs.
    #[error("L1 table has {0} entries but the virtual size needs {1}")]
    L1TooSmall(u32, u64),
    #[error("L1 table of {0} entries exceeds the 4 Mi supported")]
    L1TooLarge(u64),
    #[error("refcount table of {0} clusters exceeds the 8 MiB supported")]
    RefcountTableTooLarge(u32),
    /// Offset, length, problem.
    #[error("backing file name at {0:#x} (length {1}) {2}")]
    BackingName(u64, u32, &'static str),
    /// Extension type, offset, problem.
    #[error("header extension {0:#010x} at {1:#x}: {2}")]
    HeaderExtension(u32, u64, &'static str),
    /// What, file size.
    #[error("{0} lies outside the file (size {1:#x})")]
    OutsideFile(String, u64),
    #[error("{0} is not aligned to the cluster size")]
    Unaligned(String),
    /// Whose entry, the entry.
    #[error("{0} has reserved bits set ({1:#018x})")]
    ReservedBits(String, u64),
    /// Whose entry, the entry, problem.
    #[error("{0}: {2} ({1:#018x})")]
    BadEntry(String, u64, &'static str),
    #[error("{0} overlaps {1}")]
    Overlap(String, String),
    #[error("{0} is referenced more than once")]
    Shared(String),
    #[error("{0} is in use but has refcount 0, so it could be allocated again and overwritten")]
    RefcountZero(String),
    /// Cluster offset, refcount.
    #[error("refcount of the cluster at {0:#x} is {1}, the maximum for its width (overflow)")]
    RefcountOverflow(u64, u64),
}

type Result<T, E = CheckError> = std::result::Result<T, E>;

fn read_at(file: &File, buf: &mut [u8], offset: u64, what: impl FnOnce() -> String) -> Result<()> {
    file.read_exact_at(buf, offset)
        .map_err(|e| CheckError::Io(what(), e))
}

fn file_size(file: &File) -> Result<u64> {
    let meta = file
        .metadata()
        .map_err(|e| CheckError::Io("the size".into(), e))?;
    Ok(meta.len())
}

/// `N` bytes at `off`, or zeros if out of range (callers check ranges that input decides).
fn bytes<const N: usize>(buf: &[u8], off: usize) -> [u8; N] {
    let slice = off.checked_add(N).and_then(|end| buf.get(off..end));
    slice.and_then(|s| s.try_into().ok()).unwrap_or([0; N])
}

fn be32(buf: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(bytes(buf, off))
}

fn be64(buf: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(bytes(buf, off))
}

/// Limits shared by `read_header` and `check_metadata` (which may be given a hand-made
/// header); afterwards, shifts by these values are in range and table sizes are bounded.
fn check_geometry(h: &Qcow2Header) -> Result<()> {
    if h.version != 2 && h.version != 3 {
        return Err(CheckError::UnsupportedVersion(h.version));
    }
    if !(9..=21).contains(&h.cluster_bits) {
        return Err(CheckError::BadClusterBits(h.cluster_bits));
    }
    if h.refcount_order > 6 {
        return Err(CheckError::BadRefcountOrder(h.refcount_order));
    }
    if u64::from(h.l1_size) > MAX_L1_ENTRIES {
        return Err(CheckError::L1TooLarge(h.l1_size.into()));
    }
    if u64::from(h.refcount_table_clusters) << h.cluster_bits > MAX_REFCOUNT_TABLE_BYTES {
        return Err(CheckError::RefcountTableTooLarge(h.refcount_table_clusters));
    }
    Ok(())
}

/// Checks a backing file name or format string.
fn parse_name(raw: &[u8]) -> std::result::Result<String, &'static str> {
    if raw.is_empty() {
        return Err("is empty");
    }
    if raw.contains(&0) {
        return Err("contains a NUL byte");
    }
    String::from_utf8(raw.to_vec()).map_err(|_| "is not valid UTF-8")
}

/// Reads and checks the header (first cluster): magic "QFI\xfb", version 2|3, cluster_bits
/// 9..=21, no encryption, size a multiple of 512 and at most 1 PiB, sane header_length,
/// well-formed header extensions, a backing file name inside the first cluster of at most 1023
/// bytes of non-empty UTF-8, no internal snapshots, no incompatible feature bits (dirty,
/// corrupt, external data file, compression type, extended L2, unknown), an L1 table covering
/// `size` of at most 4 Mi entries, refcount_order <= 6 and a refcount table of at most 8 MiB.
pub fn read_header(file: &File) -> Result<Qcow2Header, CheckError> {
    let file_size = file_size(file)?;
    if file_size < 512 {
        return Err(CheckError::TooShort(file_size));
    }
    let mut buf = vec![0u8; 512];
    read_at(file, &mut buf, 0, || "the header".into())?;
    let magic = bytes::<4>(&buf, 0);
    if magic != MAGIC {
        return Err(CheckError::BadMagic(magic));
    }
    let v3 = be32(&buf, 4) == 3;
    let mut header = Qcow2Header {
        version: be32(&buf, 4),
        cluster_bits: be32(&buf, 20),
        size: be64(&buf, 24),
        backing_file: None,
        backing_format: None,
        l1_table_offset: be64(&buf, 40),
        l1_size: be32(&buf, 36),
        refcount_table_offset: be64(&buf, 48),
        refcount_table_clusters: be32(&buf, 56),
        refcount_order: if v3 { be32(&buf, 96) } else { 4 },
        incompatible_features: if v3 { be64(&buf, 72) } else { 0 },
    };
    check_geometry(&header)?;
    let cluster_size = header.cluster_size();
    if file_size < cluster_size {
        return Err(CheckError::TooShort(file_size));
    }
    // At most 2 MiB (check_geometry).
    buf.resize(cluster_size as usize, 0);
    read_at(file, &mut buf, 0, || "the header cluster".into())?;

    match be32(&buf, 32) {
        0 => {}
        crypt_method => return Err(CheckError::Encrypted(crypt_method)),
    }
    if !header.size.is_multiple_of(512) {
        return Err(CheckError::SizeNotAligned(header.size));
    }
    if header.size > MAX_VIRTUAL_SIZE {
        return Err(CheckError::SizeTooLarge(header.size));
    }
    match be32(&buf, 60) {
        0 => {}
        nb_snapshots => return Err(CheckError::Snapshots(nb_snapshots)),
    }
    let header_len = match be32(&buf, 100) {
        _ if !v3 => V2_HEADER_LEN,
        len if len.is_multiple_of(8)
            && (V3_MIN_HEADER_LEN..=cluster_size).contains(&len.into()) =>
        {
            len.into()
        }
        len => return Err(CheckError::BadHeaderLength(len)),
    };
    check_features(header.incompatible_features)?;
    let compression_type = if header_len > V3_MIN_HEADER_LEN {
        bytes::<1>(&buf, 104)[0]
    } else {
        0
    };
    let feature_bit = header.incompatible_features & INCOMPAT_COMPRESSION != 0;
    if compression_type != 0 || feature_bit {
        // The spec and qemu forbid bit 3 with zlib; imago implements no other type.
        return Err(CheckError::UnsupportedCompression(
            compression_type,
            feature_bit,
        ));
    }
    // One L2 table covers (cluster_size / 8) clusters. There is no upper bound relative to
    // `size`: imago rounds the L1 table up to whole clusters, `qemu-img resize --shrink`
    // keeps it, and check_metadata makes sure it lies inside the file.
    let needed = header.size.div_ceil(1 << (2 * header.cluster_bits - 3));
    if needed > MAX_L1_ENTRIES {
        return Err(CheckError::L1TooLarge(needed));
    }
    if u64::from(header.l1_size) < needed {
        return Err(CheckError::L1TooSmall(header.l1_size, needed));
    }

    let (name_offset, name_len) = (be64(&buf, 8), be32(&buf, 16));
    let bad_name = |problem| CheckError::BackingName(name_offset, name_len, problem);
    let name_end = name_offset.saturating_add(name_len.into());
    // Like qemu, header extensions end where the backing file name starts.
    let mut ext_end = cluster_size;
    if name_offset != 0 {
        if name_len > 1023 {
            return Err(bad_name("is longer than 1023 bytes"));
        }
        if name_offset < header_len || name_end > cluster_size {
            return Err(bad_name(
                "is outside the header cluster or overlaps the header",
            ));
        }
        // Both bounds are at most cluster_size, so the casts are lossless.
        let raw = buf
            .get(name_offset as usize..name_end as usize)
            .unwrap_or_default();
        header.backing_file = Some(parse_name(raw).map_err(bad_name)?);
        ext_end = name_offset;
    }
    header.backing_format = read_extensions(&buf, header_len, ext_end)?;
    if header.backing_format.is_some() && header.backing_file.is_none() {
        let problem = "backing format given but the image has no backing file";
        return Err(CheckError::HeaderExtension(
            EXT_BACKING_FORMAT,
            header_len,
            problem,
        ));
    }
    Ok(header)
}

fn check_features(incompatible: u64) -> Result<()> {
    let refusals = [
        (INCOMPAT_DIRTY, CheckError::Dirty),
        (INCOMPAT_CORRUPT, CheckError::Corrupt),
        (INCOMPAT_DATA_FILE, CheckError::ExternalDataFile),
        (INCOMPAT_EXTENDED_L2, CheckError::ExtendedL2),
        // Bits 0..=4 are known; bit 3 is judged with the compression type.
        (!0x1f, CheckError::UnknownIncompatible(incompatible & !0x1f)),
    ];
    match refusals
        .into_iter()
        .find(|(bit, _)| incompatible & bit != 0)
    {
        Some((_, err)) => Err(err),
        None => Ok(()),
    }
}

/// Walks the header extensions in `buf[start..end]`; returns the backing format, if any.
fn read_extensions(buf: &[u8], start: u64, end: u64) -> Result<Option<String>> {
    let mut offset = start;
    let mut backing_format = None;
    while offset < end {
        let bad = move |ext_type, problem| CheckError::HeaderExtension(ext_type, offset, problem);
        if end - offset < 8 {
            return Err(bad(0, "truncated extension header"));
        }
        // offset < end <= cluster size <= 2 MiB: the casts below are lossless.
        let ext_type = be32(buf, offset as usize);
        let len = u64::from(be32(buf, offset as usize + 4));
        let data_start = offset + 8;
        // Checked even for the end marker, as qemu and imago do.
        if len > end - data_start {
            return Err(bad(ext_type, "extends beyond the header area"));
        }
        if ext_type == EXT_END {
            return Ok(backing_format);
        }
        let data = buf
            .get(data_start as usize..(data_start + len) as usize)
            .unwrap_or_default();
        match ext_type {
            EXT_BACKING_FORMAT if backing_format.is_some() => {
                return Err(bad(ext_type, "duplicate backing format"));
            }
            EXT_BACKING_FORMAT => {
                backing_format = Some(parse_name(data).map_err(|p| bad(ext_type, p))?);
            }
            EXT_CRYPTO_HEADER => return Err(bad(ext_type, "encryption is not supported")),
            EXT_DATA_FILE => return Err(bad(ext_type, "external data files are not supported")),
            // Feature names, bitmaps and unknown extensions are ignored, as the spec requires.
            _ => {}
        }
        offset = data_start + len.next_multiple_of(8);
    }
    if start < end {
        return Err(CheckError::HeaderExtension(
            EXT_END,
            start,
            "end marker missing",
        ));
    }
    Ok(backing_format)
}

/// What a metadata cluster is used for, to name both sides of a conflict.
#[derive(Debug, Clone, Copy)]
enum Meta {
    Header,
    L1Table,
    RefcountTable,
    RefBlock(usize),
    L2Table(usize),
}

impl Meta {
    fn describe(self, offset: u64) -> String {
        match self {
            Meta::Header => "the header cluster".into(),
            Meta::L1Table => format!("the L1 table cluster at {offset:#x}"),
            Meta::RefcountTable => format!("the refcount table cluster at {offset:#x}"),
            Meta::RefBlock(i) => {
                format!("refcount block at {offset:#x} (refcount table index {i})")
            }
            Meta::L2Table(i) => format!("L2 table at {offset:#x} (L1 index {i})"),
        }
    }
}

/// A set of host cluster indices in 64-bit words, so that memory stays proportional to the
/// metadata read for both densely and sparsely allocated images.
#[derive(Default)]
struct ClusterSet(HashMap<u64, u64>);

impl ClusterSet {
    /// Adds `cluster`; returns false if it was already present.
    fn insert(&mut self, cluster: u64) -> bool {
        let word = self.0.entry(cluster >> 6).or_insert(0);
        let old = *word;
        *word |= 1 << (cluster & 63);
        old != *word
    }

    fn contains(&self, cluster: u64) -> bool {
        self.word(cluster >> 6) & (1 << (cluster & 63)) != 0
    }

    fn word(&self, index: u64) -> u64 {
        self.0.get(&index).copied().unwrap_or(0)
    }
}

struct Checker<'a> {
    file: &'a File,
    header: &'a Qcow2Header,
    file_size: u64,
    bits: u32,
    meta: HashMap<u64, Meta>,
    /// Clusters mapped by standard L2 entries.
    data: ClusterSet,
    /// Every cluster that needs a refcount: metadata, data, and compressed data (the rest).
    used: ClusterSet,
}

/// Walks all metadata and checks that it stays inside the file and is consistent: tables and
/// blocks aligned, inside the file, with reserved bits clear; every mapped data cluster (or
/// compressed range) inside the file; no host cluster used for two purposes or mapped twice;
/// every used cluster with refcount >= 1; no refcount at the maximum of its width. Costs one
/// read per metadata structure, and memory proportional to the metadata.
pub fn check_metadata(file: &File, header: &Qcow2Header) -> Result<(), CheckError> {
    check_geometry(header)?;
    let mut c = Checker {
        file,
        header,
        file_size: file_size(file)?,
        bits: header.cluster_bits,
        meta: HashMap::new(),
        data: ClusterSet::default(),
        used: ClusterSet::default(),
    };
    c.claim(0, Meta::Header)?;
    // check_geometry bounds both sizes (32 MiB and 8 MiB).
    let (l1_offset, l1_len) = (header.l1_table_offset, u64::from(header.l1_size) * 8);
    let l1 = c.read_table("L1 table", l1_offset, l1_len)?;
    let rt_len = u64::from(header.refcount_table_clusters) << c.bits;
    let rt_offset = header.refcount_table_offset;
    let reftable = c.read_table("refcount table", rt_offset, rt_len)?;
    c.claim_range(l1_offset, l1_len, Meta::L1Table)?;
    c.claim_range(rt_offset, rt_len, Meta::RefcountTable)?;
    for (i, &entry) in l1.iter().enumerate() {
        c.check_pointer(entry, Meta::L2Table(i))?;
    }
    for (i, &entry) in reftable.iter().enumerate() {
        c.check_pointer(entry, Meta::RefBlock(i))?;
    }
    // All metadata clusters are known now, so data clusters can be checked against them.
    let mut buf = vec![0u8; 1 << c.bits];
    for (i, &entry) in l1.iter().enumerate() {
        let offset = entry & OFFSET_MASK;
        if offset != 0 {
            read_at(file, &mut buf, offset, || Meta::L2Table(i).describe(offset))?;
            c.check_l2_table(i as u64, &buf)?;
        }
    }
    c.check_refcounts(&reftable, &mut buf)
}

impl Checker<'_> {
    fn cluster_size(&self) -> u64 {
        1 << self.bits
    }

    /// Reads a table of big-endian u64 after checking it is aligned and inside the file.
    fn read_table(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u64>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let what = || format!("{name} at {offset:#x} (length {len:#x})");
        if !offset.is_multiple_of(self.cluster_size()) {
            return Err(CheckError::Unaligned(what()));
        }
        self.inside(offset, len, what)?;
        // Bounded by the file size (just checked) and by check_geometry.
        let mut raw = vec![0u8; len as usize];
        read_at(self.file, &mut raw, offset, what)?;
        Ok(raw.chunks_exact(8).map(|b| be64(b, 0)).collect())
    }

    fn inside(&self, offset: u64, len: u64, what: impl FnOnce() -> String) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.file_size => Ok(()),
            _ => Err(CheckError::OutsideFile(what(), self.file_size)),
        }
    }

    /// Records a metadata cluster, refusing a cluster that is already in use.
    fn claim(&mut self, cluster: u64, kind: Meta) -> Result<()> {
        let offset = cluster << self.bits;
        match self.meta.entry(cluster) {
            // The same role twice: an L2 table or refcount block referenced twice.
            Entry::Occupied(e)
                if std::mem::discriminant(e.get()) == std::mem::discriminant(&kind) =>
            {
                Err(CheckError::Shared(kind.describe(offset)))
            }
            Entry::Occupied(e) => Err(CheckError::Overlap(
                kind.describe(offset),
                e.get().describe(offset),
            )),
            Entry::Vacant(e) => {
                e.insert(kind);
                self.used.insert(cluster);
                Ok(())
            }
        }
    }

    fn claim_range(&mut self, offset: u64, len: u64, kind: Meta) -> Result<()> {
        let first = offset >> self.bits;
        for cluster in first..first + len.div_ceil(self.cluster_size()) {
            self.claim(cluster, kind)?;
        }
        Ok(())
    }

    /// Checks an L1 entry (`kind` L2 table) or a refcount table entry (`kind` refcount block)
    /// and claims the cluster it points at.
    fn check_pointer(&mut self, entry: u64, kind: Meta) -> Result<()> {
        // Most entries of a fresh image are empty: nothing to check, and no message to build.
        if entry == 0 {
            return Ok(());
        }
        let (what, reserved, offset) = match kind {
            Meta::L2Table(i) => (format!("L1 entry {i}"), L1_RESERVED, entry & OFFSET_MASK),
            Meta::RefBlock(i) => (
                format!("refcount table entry {i}"),
                REFTABLE_RESERVED,
                entry,
            ),
            _ => return Ok(()),
        };
        if entry & reserved != 0 {
            return Err(CheckError::ReservedBits(what, entry));
        }
        if offset == 0 {
            return match entry {
                0 => Ok(()),
                _ => Err(CheckError::BadEntry(
                    what,
                    entry,
                    "flags set without an offset",
                )),
            };
        }
        if !offset.is_multiple_of(self.cluster_size()) {
            return Err(CheckError::Unaligned(kind.describe(offset)));
        }
        self.inside(offset, self.cluster_size(), || kind.describe(offset))?;
        self.claim(offset >> self.bits, kind)
    }

    fn check_l2_table(&mut self, l1_index: u64, table: &[u8]) -> Result<()> {
        for (j, raw) in table.chunks_exact(8).enumerate() {
            let entry = be64(raw, 0);
            // l1_index < 4 Mi, j < 2^18 and clusters are at most 2 MiB: below 2^61.
            let guest = ((l1_index << (self.bits - 3)) + j as u64) << self.bits;
            let what = || format!("L2 entry for guest offset {guest:#x} (L1 index {l1_index})");
            let bad = |problem| CheckError::BadEntry(what(), entry, problem);
            if entry & L2_COMPRESSED != 0 {
                if entry & COPIED != 0 {
                    return Err(bad("copied flag set on a compressed cluster"));
                }
                self.check_compressed(entry, guest, what)?;
                continue;
            }
            if entry & L2_RESERVED != 0 {
                return Err(CheckError::ReservedBits(what(), entry));
            }
            if entry & L2_ZERO != 0 && self.header.version < 3 {
                return Err(bad("zero flag set in a version 2 image"));
            }
            let offset = entry & OFFSET_MASK;
            if offset == 0 {
                if entry & COPIED != 0 {
                    return Err(bad("copied flag set on an unallocated cluster"));
                }
                continue;
            }
            let what = || format!("data cluster at {offset:#x} (guest offset {guest:#x})");
            if !offset.is_multiple_of(self.cluster_size()) {
                return Err(CheckError::Unaligned(what()));
            }
            self.inside(offset, self.cluster_size(), what)?;
            let cluster = offset >> self.bits;
            self.check_not_meta(cluster, what)?;
            if !self.data.insert(cluster) {
                return Err(CheckError::Shared(what()));
            }
            if !self.used.insert(cluster) {
                return Err(CheckError::Overlap(what(), "compressed data".into()));
            }
        }
        Ok(())
    }

    /// Compressed data may share host clusters with other compressed data, but nothing else.
    fn check_compressed(
        &mut self,
        entry: u64,
        guest: u64,
        what: impl Fn() -> String,
    ) -> Result<()> {
        let offset_bits = 62 - (self.bits - 8);
        let offset = entry & ((1 << offset_bits) - 1);
        if offset >> 56 != 0 {
            return Err(CheckError::ReservedBits(what(), entry));
        }
        let sectors = ((entry & !L2_COMPRESSED) >> offset_bits) + 1;
        // offset < 2^56 and sectors <= 2^13, so this cannot overflow.
        let end = (offset & !511) + sectors * 512;
        let range =
            || format!("compressed data at {offset:#x}..{end:#x} (guest offset {guest:#x})");
        // The last sector may be partial: qemu reads it padded with zeros.
        let file_end = self
            .file_size
            .checked_next_multiple_of(512)
            .unwrap_or(u64::MAX);
        if end > file_end {
            return Err(CheckError::OutsideFile(range(), self.file_size));
        }
        for cluster in (offset >> self.bits)..=((end - 1) >> self.bits) {
            self.check_not_meta(cluster, range)?;
            if self.data.contains(cluster) {
                let other = format!("the data cluster at {:#x}", cluster << self.bits);
                return Err(CheckError::Overlap(range(), other));
            }
            self.used.insert(cluster);
        }
        Ok(())
    }

    fn check_not_meta(&self, cluster: u64, what: impl FnOnce() -> String) -> Result<()> {
        match self.meta.get(&cluster) {
            Some(kind) => Err(CheckError::Overlap(
                what(),
                kind.describe(cluster << self.bits),
            )),
            None => Ok(()),
        }
    }

    fn describe_used(&self, cluster: u64) -> String {
        let offset = cluster << self.bits;
        match self.meta.get(&cluster) {
            Some(kind) => kind.describe(offset),
            None if self.data.contains(cluster) => format!("data cluster at {offset:#x}"),
            None => format!("compressed data cluster at {offset:#x}"),
        }
    }

    /// Reads each refcount block once, refusing refcounts at the maximum and refcount 0 for
    /// any used cluster (including clusters that no refcount block covers).
    fn check_refcounts(&self, reftable: &[u64], buf: &mut [u8]) -> Result<()> {
        let order = self.header.refcount_order;
        // log2 of the entries per block; >= 6 since cluster_bits >= 9 and order <= 6.
        let block_bits = self.bits + 3 - order;
        let mut words: Vec<u64> = self.used.0.keys().copied().collect();
        words.sort_unstable();
        let mut next = 0;
        for (index, &block) in reftable.iter().enumerate() {
            let first = (index as u64) << block_bits;
            if block != 0 {
                read_at(self.file, buf, block, || {
                    Meta::RefBlock(index).describe(block)
                })?;
                // With 1-bit refcounts the maximum, 1, is the normal in-use value.
                if let Some(k) = find_max_refcount(buf, order).filter(|_| order > 0) {
                    let offset = (first + k).saturating_mul(self.cluster_size());
                    return Err(CheckError::RefcountOverflow(
                        offset,
                        refcount_at(buf, k, order),
                    ));
                }
            }
            let end_word = (first >> 6) + (1 << (block_bits - 6));
            while let Some(&word) = words.get(next).filter(|&&w| w < end_word) {
                let mut set = self.used.word(word);
                while set != 0 {
                    let cluster = word * 64 + u64::from(set.trailing_zeros());
                    set &= set - 1;
                    if block == 0 || refcount_at(buf, cluster - first, order) == 0 {
                        return Err(CheckError::RefcountZero(self.describe_used(cluster)));
                    }
                }
                next += 1;
            }
        }
        match words.get(next) {
            Some(&word) => {
                let cluster = word * 64 + u64::from(self.used.word(word).trailing_zeros());
                Err(CheckError::RefcountZero(self.describe_used(cluster)))
            }
            None => Ok(()),
        }
    }
}

/// Index of the first refcount in `block` at the maximum value of its width, if any.
fn find_max_refcount(block: &[u8], order: u32) -> Option<u64> {
    if order >= 3 {
        // Fast path (memchr): a maximal refcount of 8 or more bits is all 0xff bytes.
        if !block.contains(&0xff) {
            return None;
        }
        let mut entries = block.chunks_exact(1 << (order - 3));
        return entries
            .position(|e| e.iter().all(|&b| b == 0xff))
            .map(|i| i as u64);
    }
    let (width, per_byte) = (1 << order, 8 >> order);
    let max = 0xffu8 >> (8 - width);
    block.iter().enumerate().find_map(|(i, &byte)| {
        let mut fields = (0..per_byte).filter(|_| byte != 0);
        let field = fields.find(|f| (byte >> (f * width)) & max == max)?;
        Some((i * per_byte + field) as u64)
    })
}

/// Entry `index` of a refcount block with `2^order`-bit entries (sub-byte entries are packed
/// from the least significant bit, as qemu does). Out of range reads as 0.
fn refcount_at(block: &[u8], index: u64, order: u32) -> u64 {
    let Ok(index) = usize::try_from(index) else {
        return 0;
    };
    match order {
        0..=2 => {
            let (width, per_byte) = (1 << order, 8 >> order);
            let byte = block.get(index / per_byte).copied().unwrap_or(0);
            u64::from((byte >> ((index % per_byte) * width)) & (0xff >> (8 - width)))
        }
        3 => block.get(index).copied().map_or(0, u64::from),
        4 => u16::from_be_bytes(bytes(block, index * 2)).into(),
        5 => u32::from_be_bytes(bytes(block, index * 4)).into(),
        _ => be64(block, index * 8),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imago::file::File as ImagoFile;
    use imago::qcow2::Qcow2;
    use imago::{FormatAccess, FormatCreateBuilder, FormatDriverBuilder, StorageOpenOptions};
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::atomic::{AtomicU32, Ordering};

    const QEMU_IMG: &str = "/usr/bin/qemu-img";
    const GIB: u64 = 1 << 30;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("grove-qcow2-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn join(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn imago_file(path: &Path, create: bool) -> ImagoFile {
        let mut opts = std::fs::OpenOptions::new();
        let file = opts
            .read(true)
            .write(true)
            .create(create)
            .truncate(create)
            .open(path)
            .unwrap();
        let opts = StorageOpenOptions::new()
            .write(true)
            .filename(path.to_str().unwrap());
        ImagoFile::from_open_file(file, opts).unwrap()
    }

    fn create(path: &Path, size: u64, backing: Option<(&str, &str)>) {
        let mut builder = Qcow2::<ImagoFile>::create_builder(imago_file(path, true)).size(size);
        if let Some((name, format)) = backing {
            builder = builder.backing(name.into(), format.into());
        }
        builder.create().unwrap();
    }

    /// Writes 4 KiB at each guest offset through imago, allocating clusters.
    fn write(path: &Path, offsets: &[u64]) {
        let builder = Qcow2::<ImagoFile>::builder(imago_file(path, false)).backing(None);
        let qcow2 = builder
            .write(true)
            .open(imago::DenyImplicitOpenGate::default())
            .unwrap();
        let access = FormatAccess::new(qcow2);
        for (i, &offset) in offsets.iter().enumerate() {
            access.write(&vec![i as u8 + 1; 4096][..], offset).unwrap();
        }
        access.flush().unwrap();
    }

    fn check(path: &Path) -> Result<Qcow2Header> {
        let file = File::open(path).unwrap();
        let header = read_header(&file)?;
        check_metadata(&file, &header)?;
        Ok(header)
    }

    /// Runs qemu-img; None (with a note) if it is not installed.
    fn qemu_img(args: &[&str]) -> Option<bool> {
        if !Path::new(QEMU_IMG).exists() {
            eprintln!("{QEMU_IMG} not found: skipping the qemu-img part");
            return None;
        }
        Some(
            Command::new(QEMU_IMG)
                .args(args)
                .status()
                .unwrap()
                .success(),
        )
    }

    /// Asserts that both this module and (if installed) `qemu-img check` accept the image.
    fn assert_valid(path: &Path) -> Qcow2Header {
        let header = check(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let path = path.to_str().unwrap();
        assert_ne!(
            qemu_img(&["check", "-q", path]),
            Some(false),
            "qemu-img check {path}"
        );
        header
    }

    fn get64(path: &Path, offset: u64) -> u64 {
        let mut buf = [0u8; 8];
        File::open(path)
            .unwrap()
            .read_exact_at(&mut buf, offset)
            .unwrap();
        u64::from_be_bytes(buf)
    }

    #[test]
    fn imago_images_are_valid() {
        let dir = TempDir::new();
        let path = dir.join("fresh.qcow2");
        create(&path, GIB, None);
        let h = assert_valid(&path);
        assert_eq!(
            (h.version, h.cluster_bits, h.cluster_size(), h.size),
            (3, 16, 65536, GIB)
        );
        assert_eq!((h.refcount_order, h.incompatible_features), (4, 0));
        assert_eq!((&h.backing_file, &h.backing_format), (&None, &None));
        write(&path, &[0, 3 * 65536 + 512, 600 << 20, GIB - 4096]);
        assert_valid(&path);
    }

    #[test]
    fn backing_file_and_format_are_parsed() {
        let dir = TempDir::new();
        // qemu-img check opens the backing file, so it must exist.
        std::fs::File::create(dir.join("base.raw"))
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let imago = dir.join("imago.qcow2");
        create(&imago, GIB, Some(("base.raw", "raw")));
        let mut paths = vec![imago];
        for (name, compat) in [
            ("qemu-v3.qcow2", "compat=1.1"),
            ("qemu-v2.qcow2", "compat=0.10"),
        ] {
            let path = dir.join(name);
            let args = [
                "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "-o", compat,
            ];
            if qemu_img(&[&args[..], &[path.to_str().unwrap(), "1M"]].concat()).is_some() {
                paths.push(path);
            }
        }
        for path in paths {
            let h = assert_valid(&path);
            assert_eq!(h.backing_file.as_deref(), Some("base.raw"));
            assert_eq!(h.backing_format.as_deref(), Some("raw"));
        }
    }

    #[test]
    fn sub_byte_refcounts_are_read_lsb_first() {
        let dir = TempDir::new();
        for (order, max) in [(0u32, 1u8), (2, 0xf)] {
            let path = dir.join(&format!("order{order}.qcow2"));
            let builder = Qcow2::<ImagoFile>::create_builder(imago_file(&path, true));
            builder
                .size(GIB)
                .refcount_width(1 << order)
                .create()
                .unwrap();
            write(&path, &[0]);
            let h = assert_valid(&path);
            let l2 = get64(&path, h.l1_table_offset) & OFFSET_MASK;
            let cluster = (get64(&path, l2) & OFFSET_MASK) >> 16;
            let per_byte = 8 >> order;
            let at = get64(&path, h.refcount_table_offset) + cluster / per_byte;
            let shift = (cluster % per_byte) << order;
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap();
            let mut byte = [0u8];
            file.read_exact_at(&mut byte, at).unwrap();
            assert_eq!((byte[0] >> shift) & max, 1, "order {order}");
            file.write_all_at(&[byte[0] & !(max << shift)], at).unwrap();
            assert!(
                matches!(check(&path), Err(CheckError::RefcountZero(_))),
                "order {order}"
            );
            file.write_all_at(&[byte[0] | (max << shift)], at).unwrap();
            let overflow = check(&path);
            assert_eq!(
                matches!(overflow, Err(CheckError::RefcountOverflow(..))),
                order > 0
            );
        }
    }

    #[test]
    fn qemu_img_images_are_valid() {
        let dir = TempDir::new();
        let variants: &[(&str, &[&str])] = &[
            ("default", &[]),
            ("v2", &["-o", "compat=0.10"]),
            ("small-clusters", &["-o", "cluster_size=512"]),
            ("big-clusters", &["-o", "cluster_size=2M"]),
            ("refcount1", &["-o", "refcount_bits=1"]),
            ("refcount64", &["-o", "refcount_bits=64"]),
            ("prealloc", &["-o", "preallocation=metadata"]),
        ];
        for (name, opts) in variants {
            let path = dir.join(name);
            let p = path.to_str().unwrap();
            if qemu_img(&[&["create", "-q", "-f", "qcow2"], *opts, &[p, "64M"]].concat()).is_none()
            {
                return;
            }
            assert_valid(&path);
            write(&path, &[0, 5 << 20, (64 << 20) - 4096]);
            assert_valid(&path);
        }
        let empty = dir.join("empty.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", empty.to_str().unwrap(), "0"]);
        assert_eq!(assert_valid(&empty).l1_size, 0);
        // Compressed clusters, then an L1 table larger than the shrunk size needs.
        let raw = dir.join("text.raw");
        std::fs::write(&raw, b"grove ".repeat(200_000)).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&raw)
            .unwrap()
            .set_len(GIB + 65536)
            .unwrap();
        let (r, c) = (raw.to_str().unwrap(), dir.join("compressed.qcow2"));
        let c = c.to_str().unwrap();
        assert_eq!(
            qemu_img(&["convert", "-c", "-O", "qcow2", r, c]),
            Some(true)
        );
        assert_valid(Path::new(c));
        assert_eq!(
            qemu_img(&["resize", "-q", "--shrink", c, "64K"]),
            Some(true)
        );
        assert!(check(Path::new(c)).unwrap().l1_size > 1);
        assert_valid(Path::new(c));
    }

    #[test]
    fn empty_overlay_checks_quickly() {
        let dir = TempDir::new();
        let path = dir.join("overlay.qcow2");
        create(&path, 20 * GIB, Some(("base.qcow2", "qcow2")));
        let file = File::open(&path).unwrap();
        let start = std::time::Instant::now();
        check_metadata(&file, &read_header(&file).unwrap()).unwrap();
        let elapsed = start.elapsed();
        eprintln!("empty 20 GiB overlay checked in {elapsed:?}");
        // About 0.2 ms in release builds; the bounds leave room for loaded CI machines.
        let limit_ms = if cfg!(debug_assertions) { 150 } else { 5 };
        assert!(elapsed.as_millis() < limit_ms, "{elapsed:?}");
    }

    #[test]
    fn truncated_image_is_refused() {
        let dir = TempDir::new();
        let path = dir.join("truncated.qcow2");
        create(&path, GIB, None);
        let truncate = |len| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)?
                .set_len(len)
        };
        truncate(65536).unwrap();
        let file = File::open(&path).unwrap();
        let err = check_metadata(&file, &read_header(&file).unwrap()).unwrap_err();
        assert!(
            matches!(&err, CheckError::OutsideFile(w, _) if w.starts_with("L1 table")),
            "{err}"
        );
        truncate(100).unwrap();
        assert!(matches!(check(&path), Err(CheckError::TooShort(100))));
    }

    /// `case!(name, [(offset, value, bytes), ...], pattern)`: patch big-endian values into a copy
    /// of a valid image and expect an error matching the pattern.
    macro_rules! case {
        ($name:expr, [$(($off:expr, $val:expr, $len:expr)),*], $($pat:tt)+) => {
            ($name, vec![$(($off, $val, $len)),*], |e: &CheckError| matches!(e, $($pat)+))
        };
    }

    #[test]
    fn corruptions_are_refused() {
        let dir = TempDir::new();
        let base = dir.join("base.qcow2");
        create(&base, GIB, None);
        write(&base, &[0, 65536, 600 << 20]);
        let h = assert_valid(&base);
        let (l1, rt) = (h.l1_table_offset, h.refcount_table_offset);
        let l2 = get64(&base, l1) & OFFSET_MASK;
        let data = get64(&base, l2) & OFFSET_MASK;
        let rc = get64(&base, rt) + 2 * (data >> 16); // the first data cluster's refcount
        let far = std::fs::metadata(&base)
            .unwrap()
            .len()
            .next_multiple_of(65536)
            + (1 << 20);
        type Case = (
            &'static str,
            Vec<(u64, u64, usize)>,
            fn(&CheckError) -> bool,
        );
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            case!("magic", [(0, 0, 1)], CheckError::BadMagic(_)),
            case!("version", [(4, 4, 4)], CheckError::UnsupportedVersion(4)),
            case!("cluster bits", [(20, 30, 4)], CheckError::BadClusterBits(30)),
            case!("size", [(24, GIB + 1, 8)], CheckError::SizeNotAligned(_)),
            case!("huge", [(24, (1 << 50) + 512, 8)], CheckError::SizeTooLarge(_)),
            case!("crypt", [(32, 1, 4)], CheckError::Encrypted(1)),
            case!("l1 size", [(36, 1, 4)], CheckError::L1TooSmall(1, 2)),
            case!("snapshots", [(60, 1, 4)], CheckError::Snapshots(1)),
            case!("dirty", [(72, 1, 8)], CheckError::Dirty),
            case!("corrupt", [(72, 2, 8)], CheckError::Corrupt),
            case!("data file", [(72, 4, 8)], CheckError::ExternalDataFile),
            case!("compression", [(72, 8, 8)], CheckError::UnsupportedCompression(0, true)),
            case!("extended l2", [(72, 16, 8)], CheckError::ExtendedL2),
            case!("unknown bit", [(72, 1 << 40, 8)], CheckError::UnknownIncompatible(0x100_0000_0000)),
            case!("refcount order", [(96, 7, 4)], CheckError::BadRefcountOrder(7)),
            case!("header length", [(100, 100, 4)], CheckError::BadHeaderLength(100)),
            case!("extension", [(108, 65536, 4)], CheckError::HeaderExtension(0x6803_f857, 104, _)),
            case!("backing name", [(8, 65532, 8), (16, 8, 4)], CheckError::BackingName(65532, 8, _)),
            case!("l1 outside", [(40, far, 8)], CheckError::OutsideFile(w, _) if w.starts_with("L1 table")),
            case!("l1 reserved", [(l1, l2 | 2, 8)], CheckError::ReservedBits(w, _) if w == "L1 entry 0"),
            case!("l2 outside", [(l1, far, 8)], CheckError::OutsideFile(w, _) if w.starts_with("L2 table")),
            case!("l2 twice", [(l1 + 8, l2, 8)], CheckError::Shared(w) if w.starts_with("L2 table")),
            case!("data outside", [(l2, far | COPIED, 8)], CheckError::OutsideFile(w, _) if w.starts_with("data")),
            case!("unaligned", [(l2, data + 512, 8)], CheckError::Unaligned(w) if w.starts_with("data")),
            case!("l2 reserved", [(l2, data | 1 << 56, 8)], CheckError::ReservedBits(w, _) if w.starts_with("L2 entry")),
            case!("into header", [(l2, L2_COMPRESSED | 512, 8)], CheckError::Overlap(_, o) if o == "the header cluster"),
            case!("compressed outside", [(l2, L2_COMPRESSED | far, 8)], CheckError::OutsideFile(w, _) if w.starts_with("compressed")),
            case!("on reftable", [(l2, rt, 8)], CheckError::Overlap(_, o) if o.contains("refcount table")),
            case!("on l2", [(l2, l2, 8)], CheckError::Overlap(_, o) if o.starts_with("L2 table")),
            case!("data twice", [(l2 + 8, data, 8)], CheckError::Shared(w) if w.starts_with("data")),
            case!("refcount 0", [(rc, 0, 2)], CheckError::RefcountZero(w) if w.starts_with("data")),
            case!("l2 refcount 0", [(rc - 2 * ((data - l2) >> 16), 0, 2)], CheckError::RefcountZero(w) if w.starts_with("L2 table")),
            case!("overflow", [(rc, 0xffff, 2)], CheckError::RefcountOverflow(_, 0xffff)),
            case!("refblock outside", [(rt + 8, far, 8)], CheckError::OutsideFile(w, _) if w.starts_with("refcount block")),
            case!("reftable reserved", [(rt, 1, 8)], CheckError::ReservedBits(w, _) if w.starts_with("refcount table")),
        ];
        for (name, patches, expected) in cases {
            let path = dir.join(name);
            std::fs::copy(&base, &path).unwrap();
            let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            for (offset, value, len) in patches {
                file.write_all_at(&value.to_be_bytes()[8 - len..], offset)
                    .unwrap();
            }
            let err = check(&path).expect_err(name);
            assert!(expected(&err), "{name}: unexpected error: {err}");
            assert!(!err.to_string().contains('\n'), "{name}: {err}");
        }
    }
}
