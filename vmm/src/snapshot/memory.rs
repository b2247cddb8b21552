//! Guest memory in a snapshot: `memory.bin` holds the RAM regions back to back (all-zero
//! blocks left as holes), hashed with BLAKE3 as it is written. A restore maps the file
//! `MAP_PRIVATE`: nothing is copied, pages load on demand, every clone of one snapshot
//! shares the page cache, and a clone's writes stay its own (copy-on-write).
//!
//! Verifying the hash costs a full read of the file, which would defeat on-demand loading,
//! so a verified file is stamped: `memory.verified` records the file's identity and change
//! times (device, inode, size, mtime, ctime) next to the hash. A later restore that finds a
//! matching stamp skips the full read; any write to the file changes its ctime (which no
//! user can set back), so a modified file is always hashed again. Corruption without a
//! write (media errors) is left to the storage layer.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap,
};

use crate::vstate::memory::{new_bitmap, GuestMemoryMmap};

/// Copy granularity; all-zero blocks of this size become holes.
const BLOCK: usize = 64 << 10;
/// Largest guest a snapshot may describe (matches the VMM's own limits with room to spare).
const MAX_GUEST_BYTES: u64 = 1 << 40;

/// One RAM region and where it is in `memory.bin`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionState {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

/// The memory file's layout and content hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryState {
    pub regions: Vec<RegionState>,
    pub file_size: u64,
    /// BLAKE3 of the whole file as written (a diff's holes hash as zeros), hex.
    pub blake3: String,
    /// For a diff snapshot: the snapshot its pages apply to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentRef>,
    /// For a diff snapshot: the pages present in the file, as (first page, page count) runs
    /// of file page indexes (file offset / 4096), sorted and disjoint. Every other page of
    /// the file is a hole that is never read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages: Option<Vec<(u64, u64)>>,
}

/// The parent of a diff snapshot: its directory (absolute, as written) and the BLAKE3 of
/// its memory file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParentRef {
    pub dir: std::path::PathBuf,
    pub blake3: String,
}

/// Errors writing, checking or mapping a memory file.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    #[error("cannot write guest memory to {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read guest memory")]
    Guest(#[source] vm_memory::GuestMemoryError),
    #[error("cannot open memory file {path}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("memory file {path} is {actual} bytes but the snapshot describes {expected}")]
    Size {
        path: String,
        expected: u64,
        actual: u64,
    },
    #[error("memory file {path} is corrupt: checksum mismatch")]
    Checksum { path: String },
    #[error("snapshot memory layout is invalid: {0}")]
    Layout(String),
    #[error("cannot map memory file {path}")]
    Map {
        path: String,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
}

/// Writes every RAM region of `mem` to `path` (fsynced) and returns the layout and hash.
pub fn write(mem: &GuestMemoryMmap, path: &Path) -> Result<MemoryState, MemoryFileError> {
    let display = path.display().to_string();
    let werr = |source| MemoryFileError::Write {
        path: display.clone(),
        source,
    };
    let mut file = File::create(path).map_err(werr)?;
    let mut hasher = blake3::Hasher::new();
    let mut regions = Vec::new();
    let mut offset = 0u64;
    let mut buf = vec![0u8; BLOCK];
    for region in mem.iter() {
        let size = region.len();
        regions.push(RegionState {
            guest_addr: region.start_addr().0,
            size,
            file_offset: offset,
        });
        let mut done = 0u64;
        while done < size {
            let n = (size - done).min(BLOCK as u64) as usize;
            let chunk = &mut buf[..n];
            mem.read_slice(chunk, GuestAddress(region.start_addr().0 + done))
                .map_err(MemoryFileError::Guest)?;
            hasher.update(chunk);
            if is_zero(chunk) {
                file.seek(SeekFrom::Current(n as i64)).map_err(werr)?;
            } else {
                file.write_all(chunk).map_err(werr)?;
            }
            done += n as u64;
        }
        offset += size;
    }
    // Trailing holes need the length set explicitly.
    file.set_len(offset).map_err(werr)?;
    file.sync_all().map_err(werr)?;
    let state = MemoryState {
        regions,
        file_size: offset,
        blake3: hasher.finalize().to_hex().to_string(),
        parent: None,
        pages: None,
    };
    write_stamp(path, &state.blake3);
    Ok(state)
}

/// Whether `chunk` (at most [`BLOCK`] bytes) is all zeros. A slice comparison is a
/// `memcmp`, fast even in unoptimised builds (where the tests run VMs).
fn is_zero(chunk: &[u8]) -> bool {
    static ZEROS: [u8; BLOCK] = [0; BLOCK];
    chunk.len() <= BLOCK && chunk == &ZEROS[..chunk.len()]
}

/// Whether page `page` is set in a dirty bitmap (bit `page % 64` of word `page / 64`).
fn bit_set(bitmap: &[u64], page: usize) -> bool {
    bitmap
        .get(page / 64)
        .is_some_and(|w| w & (1u64 << (page % 64)) != 0)
}

/// Writes the pages of `mem` marked in `dirty` (one bitmap per region, in region order, bit
/// per 4 KiB page) to `path` in the layout of a full memory file; every other page is a hole.
/// The hash covers the file as written (holes read as zeros).
pub fn write_diff(
    mem: &GuestMemoryMmap,
    path: &Path,
    dirty: &[Vec<u64>],
    parent: ParentRef,
) -> Result<MemoryState, MemoryFileError> {
    use std::os::unix::fs::FileExt;
    const PAGE: usize = crate::vstate::memory::PAGE_SIZE;
    let display = path.display().to_string();
    let werr = |source| MemoryFileError::Write {
        path: display.clone(),
        source,
    };
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(werr)?;
    let mut hasher = blake3::Hasher::new();
    let mut regions = Vec::new();
    let mut pages: Vec<(u64, u64)> = Vec::new();
    let mut offset = 0u64;
    let mut buf = vec![0u8; BLOCK];
    let zeros = vec![0u8; BLOCK];
    for (index, region) in mem.iter().enumerate() {
        let size = region.len();
        regions.push(RegionState {
            guest_addr: region.start_addr().0,
            size,
            file_offset: offset,
        });
        let bitmap = dirty.get(index).map(Vec::as_slice).unwrap_or(&[]);
        let mut done = 0u64;
        while done < size {
            let n = (size - done).min(BLOCK as u64) as usize;
            let first_page = done as usize / PAGE;
            if !(first_page..first_page + n.div_ceil(PAGE)).any(|p| bit_set(bitmap, p)) {
                // Nothing dirty: a hole, hashed as zeros without touching guest memory.
                hasher.update(&zeros[..n]);
                done += n as u64;
                continue;
            }
            let chunk = &mut buf[..n];
            mem.read_slice(chunk, GuestAddress(region.start_addr().0 + done))
                .map_err(MemoryFileError::Guest)?;
            for (i, page) in chunk.chunks_mut(PAGE).enumerate() {
                let page_in_region = (done as usize) / PAGE + i;
                if !bit_set(bitmap, page_in_region) {
                    page.fill(0);
                    continue;
                }
                let file_off = offset + done + (i * PAGE) as u64;
                let file_page = file_off / PAGE as u64;
                match pages.last_mut() {
                    Some((first, count)) if *first + *count == file_page => *count += 1,
                    _ => pages.push((file_page, 1)),
                }
                if !is_zero(page) {
                    file.write_all_at(page, file_off).map_err(werr)?;
                }
            }
            hasher.update(chunk);
            done += n as u64;
        }
        offset += size;
    }
    file.set_len(offset).map_err(werr)?;
    file.sync_all().map_err(werr)?;
    let state = MemoryState {
        regions,
        file_size: offset,
        blake3: hasher.finalize().to_hex().to_string(),
        parent: Some(parent),
        pages: Some(pages),
    };
    write_stamp(path, &state.blake3);
    Ok(state)
}

/// A memory file filled while the guest runs (a live snapshot): every pass copies whole
/// pages at their place in the layout of a full memory file, so a page copied again
/// simply replaces its older copy. [`finish`](Self::finish) syncs and hashes the file as
/// it ends up, after the guest has resumed.
pub struct LiveFile {
    file: File,
    path: std::path::PathBuf,
    display: String,
    regions: Vec<RegionState>,
    file_size: u64,
    /// For a diff: every file page written by any pass (bit per file page).
    written: Option<Vec<u64>>,
    buf: Vec<u8>,
}

impl LiveFile {
    /// Creates `path` (which must not exist) sized for all of `mem`; `diff` keeps the list
    /// of pages written, for a diff snapshot.
    pub fn create(mem: &GuestMemoryMmap, path: &Path, diff: bool) -> Result<Self, MemoryFileError> {
        let display = path.display().to_string();
        let file = OpenOptions::new()
            .write(true)
            .read(true)
            .create_new(true)
            .open(path)
            .map_err(|source| MemoryFileError::Write {
                path: display.clone(),
                source,
            })?;
        let mut regions = Vec::new();
        let mut offset = 0u64;
        for region in mem.iter() {
            regions.push(RegionState {
                guest_addr: region.start_addr().0,
                size: region.len(),
                file_offset: offset,
            });
            offset += region.len();
        }
        let pages = (offset / crate::vstate::memory::PAGE_SIZE as u64) as usize;
        let live = Self {
            file,
            path: path.to_path_buf(),
            display,
            regions,
            file_size: offset,
            written: diff.then(|| vec![0u64; pages.div_ceil(64)]),
            buf: vec![0u8; BLOCK],
        };
        live.file.set_len(offset).map_err(|e| live.werr(e))?;
        Ok(live)
    }

    fn werr(&self, source: std::io::Error) -> MemoryFileError {
        MemoryFileError::Write {
            path: self.display.clone(),
            source,
        }
    }

    /// Copies all of guest memory; blocks that read as zeros stay holes (the file is new).
    /// `cancelled` is asked between blocks: when it says yes the copy stops with an error.
    /// Returns the pages copied.
    pub fn copy_all(
        &mut self,
        mem: &GuestMemoryMmap,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<u64, MemoryFileError> {
        use std::os::unix::fs::FileExt;
        for index in 0..self.regions.len() {
            let RegionState {
                guest_addr,
                size,
                file_offset,
            } = self.regions[index];
            let mut done = 0u64;
            while done < size {
                if cancelled() {
                    return Err(self.werr(std::io::Error::new(
                        std::io::ErrorKind::Interrupted,
                        "the VM is exiting",
                    )));
                }
                let n = (size - done).min(BLOCK as u64) as usize;
                let chunk = &mut self.buf[..n];
                mem.read_slice(chunk, GuestAddress(guest_addr + done))
                    .map_err(MemoryFileError::Guest)?;
                if !is_zero(chunk) {
                    let r = self.file.write_all_at(chunk, file_offset + done);
                    r.map_err(|e| self.werr(e))?;
                }
                done += n as u64;
            }
        }
        Ok(self.file_size / crate::vstate::memory::PAGE_SIZE as u64)
    }

    /// Copies the pages set in `dirty` (per region, in region order, as
    /// [`crate::vstate::vm::Vm::take_dirty_pages`] returns them), zero pages included, in
    /// runs of consecutive pages. Returns the pages copied.
    pub fn copy_pages(
        &mut self,
        mem: &GuestMemoryMmap,
        dirty: &[Vec<u64>],
    ) -> Result<u64, MemoryFileError> {
        use std::os::unix::fs::FileExt;
        const PAGE: u64 = crate::vstate::memory::PAGE_SIZE as u64;
        const RUN: u64 = BLOCK as u64 / PAGE;
        let mut copied = 0u64;
        for (index, bitmap) in dirty.iter().enumerate().take(self.regions.len()) {
            let region = self.regions[index].clone();
            let pages = region.size / PAGE;
            let mut page = 0u64;
            while page < pages {
                if !bit_set(bitmap, page as usize) {
                    // Skip clean words whole.
                    if page.is_multiple_of(64)
                        && bitmap.get((page / 64) as usize).is_some_and(|w| *w == 0)
                    {
                        page += 64;
                    } else {
                        page += 1;
                    }
                    continue;
                }
                let first = page;
                while page < pages && page - first < RUN && bit_set(bitmap, page as usize) {
                    page += 1;
                }
                let len = ((page - first) * PAGE) as usize;
                let chunk = &mut self.buf[..len];
                mem.read_slice(chunk, GuestAddress(region.guest_addr + first * PAGE))
                    .map_err(MemoryFileError::Guest)?;
                let at = region.file_offset + first * PAGE;
                let r = self.file.write_all_at(chunk, at);
                r.map_err(|e| self.werr(e))?;
                if let Some(written) = &mut self.written {
                    for p in at / PAGE..at / PAGE + (page - first) {
                        if let Some(w) = written.get_mut((p / 64) as usize) {
                            *w |= 1 << (p % 64);
                        }
                    }
                }
                copied += page - first;
            }
        }
        Ok(copied)
    }

    /// Syncs the file and hashes it as written (a diff's unwritten pages hash as zeros and
    /// are never read), records the verification stamp, and returns the layout: full, or
    /// for `parent` a diff listing every page any pass wrote.
    pub fn finish(self, parent: Option<ParentRef>) -> Result<MemoryState, MemoryFileError> {
        use std::os::unix::fs::FileExt;
        const PAGE: u64 = crate::vstate::memory::PAGE_SIZE as u64;
        self.file.sync_all().map_err(|e| self.werr(e))?;
        let read_err = |source| MemoryFileError::Open {
            path: self.display.clone(),
            source,
        };
        let mut hasher = blake3::Hasher::new();
        let mut pages = None;
        match (&self.written, &parent) {
            (Some(written), Some(_)) => {
                let mut runs: Vec<(u64, u64)> = Vec::new();
                let mut buf = vec![0u8; BLOCK];
                let zeros = vec![0u8; BLOCK];
                let mut off = 0u64;
                while off < self.file_size {
                    let n = (self.file_size - off).min(BLOCK as u64);
                    let first = off / PAGE;
                    let any = (first..first + n / PAGE).any(|p| bit_set(written, p as usize));
                    if any {
                        let chunk = &mut buf[..n as usize];
                        self.file.read_exact_at(chunk, off).map_err(read_err)?;
                        hasher.update(chunk);
                        for p in first..first + n / PAGE {
                            if bit_set(written, p as usize) {
                                match runs.last_mut() {
                                    Some((f, c)) if *f + *c == p => *c += 1,
                                    _ => runs.push((p, 1)),
                                }
                            }
                        }
                    } else {
                        hasher.update(&zeros[..n as usize]);
                    }
                    off += n;
                }
                pages = Some(runs);
            }
            _ => {
                hasher.update_reader(&self.file).map_err(read_err)?;
            }
        }
        let state = MemoryState {
            regions: self.regions.clone(),
            file_size: self.file_size,
            blake3: hasher.finalize().to_hex().to_string(),
            parent: if pages.is_some() { parent } else { None },
            pages,
        };
        write_stamp(&self.path, &state.blake3);
        Ok(state)
    }
}

/// Checks a diff's page list against its layout: runs sorted, disjoint, non-empty, inside
/// the file.
pub fn check_pages(state: &MemoryState) -> Result<(), MemoryFileError> {
    let page = crate::vstate::memory::PAGE_SIZE as u64;
    let file_pages = state.file_size / page;
    let mut next = 0u64;
    for &(first, count) in state.pages.as_deref().unwrap_or(&[]) {
        let end = first.checked_add(count);
        if count == 0 || first < next || end.is_none_or(|e| e > file_pages) {
            return Err(MemoryFileError::Layout(format!(
                "diff page run {first}+{count} is empty, out of order or past the file"
            )));
        }
        next = end.unwrap_or(u64::MAX);
    }
    Ok(())
}

/// Copies the pages a diff's memory file holds (and only those) into `mem`, whose layout
/// must be the diff's (checked by the caller).
pub fn apply_diff(
    mem: &GuestMemoryMmap,
    path: &Path,
    state: &MemoryState,
) -> Result<(), MemoryFileError> {
    use std::os::unix::fs::FileExt;
    check_layout(state)?;
    check_pages(state)?;
    let page = crate::vstate::memory::PAGE_SIZE as u64;
    let display = path.display().to_string();
    let open_err = |source| MemoryFileError::Open {
        path: display.clone(),
        source,
    };
    let file = File::open(path).map_err(open_err)?;
    let mut buf = vec![0u8; BLOCK];
    for &(first, count) in state.pages.as_deref().unwrap_or(&[]) {
        let mut off = first * page;
        let end = (first + count) * page;
        while off < end {
            // The run may cross a region boundary: copy at most to the region's end.
            let Some(r) = state
                .regions
                .iter()
                .find(|r| off >= r.file_offset && off < r.file_offset + r.size)
            else {
                return Err(MemoryFileError::Layout(format!(
                    "diff page at file offset {off:#x} is in no region"
                )));
            };
            let n = (end - off)
                .min(r.file_offset + r.size - off)
                .min(BLOCK as u64) as usize;
            file.read_exact_at(&mut buf[..n], off).map_err(open_err)?;
            mem.write_slice(
                &buf[..n],
                GuestAddress(r.guest_addr + (off - r.file_offset)),
            )
            .map_err(MemoryFileError::Guest)?;
            off += n as u64;
        }
    }
    Ok(())
}

/// A BLAKE3 digest of all guest RAM (hex), as `write` would record it.
pub fn digest(mem: &GuestMemoryMmap) -> Result<String, MemoryFileError> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; BLOCK];
    for region in mem.iter() {
        let mut done = 0u64;
        while done < region.len() {
            let n = (region.len() - done).min(BLOCK as u64) as usize;
            mem.read_slice(&mut buf[..n], GuestAddress(region.start_addr().0 + done))
                .map_err(MemoryFileError::Guest)?;
            hasher.update(&buf[..n]);
            done += n as u64;
        }
    }
    Ok(hasher.finalize().to_hex().to_string())
}

#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    blake3: String,
}

fn stamp_path(memory: &Path) -> std::path::PathBuf {
    memory.with_extension("verified")
}

fn current_stamp(memory: &Path, blake3: &str) -> Option<Stamp> {
    let m = std::fs::metadata(memory).ok()?;
    Some(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
        blake3: blake3.to_string(),
    })
}

/// Records that `memory` has hash `blake3` as of now. Best effort: a read-only snapshot
/// directory just means every restore verifies in full.
fn write_stamp(memory: &Path, blake3: &str) {
    let Some(stamp) = current_stamp(memory, blake3) else {
        return;
    };
    let Ok(json) = serde_json::to_vec(&stamp) else {
        return;
    };
    let path = stamp_path(memory);
    let tmp = path.with_extension("verified.tmp");
    let ok = std::fs::write(&tmp, json).is_ok() && std::fs::rename(&tmp, &path).is_ok();
    if !ok {
        let _ = std::fs::remove_file(&tmp);
        log::debug!("cannot record the verification of {}", memory.display());
    }
}

/// Checks the memory file against `state`: its size always, its hash unless a matching
/// verification stamp shows the file is unchanged since it was last hashed.
pub fn verify(path: &Path, state: &MemoryState) -> Result<(), MemoryFileError> {
    let display = path.display().to_string();
    check_layout(state)?;
    let file = File::open(path).map_err(|source| MemoryFileError::Open {
        path: display.clone(),
        source,
    })?;
    let actual = file
        .metadata()
        .map_err(|source| MemoryFileError::Open {
            path: display.clone(),
            source,
        })?
        .len();
    if actual != state.file_size {
        return Err(MemoryFileError::Size {
            path: display,
            expected: state.file_size,
            actual,
        });
    }
    let recorded: Option<Stamp> = std::fs::read(stamp_path(path))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    if recorded.is_some() && recorded == current_stamp(path, &state.blake3) {
        return Ok(());
    }
    let mut hasher = blake3::Hasher::new();
    hasher
        .update_reader(&file)
        .map_err(|source| MemoryFileError::Open {
            path: display.clone(),
            source,
        })?;
    if hasher.finalize().to_hex().as_str() != state.blake3 {
        return Err(MemoryFileError::Checksum { path: display });
    }
    write_stamp(path, &state.blake3);
    Ok(())
}

/// Regions must be page aligned, non-empty, non-overlapping, inside the file and of a sane
/// total size: the state file is untrusted input.
fn check_layout(state: &MemoryState) -> Result<(), MemoryFileError> {
    let bad = |m: String| Err(MemoryFileError::Layout(m));
    if state.regions.is_empty() {
        return bad("no memory regions".into());
    }
    let mut total = 0u64;
    let mut prev_end = 0u64;
    for r in &state.regions {
        if r.size == 0
            || r.size % 4096 != 0
            || r.guest_addr % 4096 != 0
            || r.file_offset % 4096 != 0
        {
            return bad(format!(
                "region at {:#x} is empty or not page aligned",
                r.guest_addr
            ));
        }
        let Some(end) = r.guest_addr.checked_add(r.size) else {
            return bad(format!("region at {:#x} wraps around", r.guest_addr));
        };
        if r.guest_addr < prev_end {
            return bad(format!(
                "region at {:#x} overlaps the previous one",
                r.guest_addr
            ));
        }
        prev_end = end;
        match r.file_offset.checked_add(r.size) {
            Some(file_end) if file_end <= state.file_size => {}
            _ => {
                return bad(format!(
                    "region at {:#x} extends past the memory file",
                    r.guest_addr
                ))
            }
        }
        total = total.saturating_add(r.size);
    }
    if total > MAX_GUEST_BYTES {
        return bad(format!("{total} bytes of guest memory"));
    }
    Ok(())
}

/// Maps the memory file privately as guest RAM. Call [`verify`] first.
pub fn map(
    path: &Path,
    state: &MemoryState,
    track: bool,
) -> Result<GuestMemoryMmap, MemoryFileError> {
    check_layout(state)?;
    let display = path.display().to_string();
    // Read-only open: MAP_PRIVATE writes never reach the file.
    let file =
        OpenOptions::new()
            .read(true)
            .open(path)
            .map_err(|source| MemoryFileError::Open {
                path: display.clone(),
                source,
            })?;
    let mut regions = Vec::with_capacity(state.regions.len());
    for r in &state.regions {
        let clone = file.try_clone().map_err(|source| MemoryFileError::Open {
            path: display.clone(),
            source,
        })?;
        let size = usize::try_from(r.size)
            .map_err(|_| MemoryFileError::Layout("region too large".into()))?;
        let mapping = MmapRegionBuilder::new_with_bitmap(size, new_bitmap(size, track))
            .with_file_offset(FileOffset::new(clone, r.file_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|source| MemoryFileError::Map {
                path: display.clone(),
                source,
            })?;
        let region =
            GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr)).ok_or_else(|| {
                MemoryFileError::Layout(format!("region at {:#x} wraps around", r.guest_addr))
            })?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryFileError::Layout(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_anonymous;

    struct Dir(std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn dir(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("grove-mem-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    #[test]
    fn write_map_round_trip_is_private_and_byte_identical() {
        let d = dir("rt");
        let mem = create_anonymous(4 << 20).unwrap();
        mem.write_slice(b"hello", GuestAddress(0x1234)).unwrap();
        mem.write_slice(&[0xab; 8192], GuestAddress(3 << 20))
            .unwrap();
        let path = d.0.join("memory.bin");
        let state = write(&mem, &path).unwrap();
        assert_eq!(state.file_size, 4 << 20);
        assert_eq!(state.blake3, digest(&mem).unwrap());
        // Zero blocks are holes: far fewer blocks allocated than the file size.
        let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(allocated < 1 << 20, "{allocated} bytes allocated");

        verify(&path, &state).unwrap();
        let a = map(&path, &state, false).unwrap();
        let b = map(&path, &state, false).unwrap();
        assert_eq!(digest(&a).unwrap(), state.blake3);
        a.write_slice(b"clone a", GuestAddress(0x1234)).unwrap();
        let mut got = [0u8; 5];
        b.read_slice(&mut got, GuestAddress(0x1234)).unwrap();
        assert_eq!(&got, b"hello", "a clone's writes stay its own");
        verify(&path, &state).unwrap();
        assert_eq!(digest(&b).unwrap(), state.blake3, "the file is untouched");
    }

    #[test]
    fn a_changed_file_is_hashed_again_and_refused() {
        let d = dir("flip");
        let mem = create_anonymous(1 << 20).unwrap();
        mem.write_slice(&[1u8; 4096], GuestAddress(0)).unwrap();
        let path = d.0.join("memory.bin");
        let state = write(&mem, &path).unwrap();
        verify(&path, &state).unwrap();
        // Flip one bit in place (same size, same inode).
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[100] ^= 4;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            verify(&path, &state),
            Err(MemoryFileError::Checksum { .. })
        ));
        // Truncated.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(4096).unwrap();
        assert!(matches!(
            verify(&path, &state),
            Err(MemoryFileError::Size { .. })
        ));
    }

    #[test]
    fn a_diff_holds_only_dirty_pages_and_applies_over_its_parent() {
        let d = dir("diff");
        let mem = crate::vstate::memory::create_anonymous_tracked(1 << 20, true).unwrap();
        mem.write_slice(&[1u8; 8192], GuestAddress(0)).unwrap();
        let base_path = d.0.join("base.bin");
        let base = write(&mem, &base_path).unwrap();
        // Pages 3 and 4 changed, page 1 too (to zeros); page 0 did not.
        mem.write_slice(&[7u8; 8192], GuestAddress(3 * 4096))
            .unwrap();
        mem.write_slice(&[0u8; 4096], GuestAddress(4096)).unwrap();
        let mut bitmap = vec![0u64; (1 << 20) / 4096 / 64];
        bitmap[0] = 0b11010;
        let parent = ParentRef {
            dir: "/parent".into(),
            blake3: base.blake3.clone(),
        };
        let diff_path = d.0.join("diff.bin");
        let diff = write_diff(&mem, &diff_path, &[bitmap], parent).unwrap();
        assert_eq!(diff.pages, Some(vec![(1, 1), (3, 2)]));
        assert_eq!(diff.file_size, 1 << 20);
        verify(&diff_path, &diff).unwrap();
        let allocated = std::fs::metadata(&diff_path).unwrap().blocks() * 512;
        assert!(allocated <= 64 << 10, "{allocated} bytes allocated");

        let restored = map(&base_path, &base, false).unwrap();
        apply_diff(&restored, &diff_path, &diff).unwrap();
        assert_eq!(digest(&restored).unwrap(), digest(&mem).unwrap());
    }

    #[test]
    fn vmm_writes_mark_the_bitmap_only_when_tracking() {
        let mem = crate::vstate::memory::create_anonymous_tracked(1 << 20, true).unwrap();
        mem.write_obj(1u64, GuestAddress(5 * 4096 + 8)).unwrap();
        let region = mem.iter().next().unwrap();
        let bits = std::ops::Deref::deref(region)
            .bitmap()
            .as_ref()
            .unwrap()
            .get_and_reset();
        assert_eq!(bits[0], 1 << 5);
        let plain = crate::vstate::memory::create_anonymous(1 << 20).unwrap();
        assert!(std::ops::Deref::deref(plain.iter().next().unwrap())
            .bitmap()
            .is_none());
    }

    #[test]
    fn hostile_page_lists_are_refused() {
        let mut s = MemoryState {
            regions: vec![RegionState {
                guest_addr: 0,
                size: 8192,
                file_offset: 0,
            }],
            file_size: 8192,
            blake3: String::new(),
            parent: None,
            pages: Some(vec![(0, 2)]),
        };
        check_pages(&s).unwrap();
        for bad in [
            vec![(0, 3)],
            vec![(1, 1), (0, 1)],
            vec![(0, 1), (0, 1)],
            vec![(0, 0)],
            vec![(u64::MAX, 2)],
        ] {
            s.pages = Some(bad.clone());
            assert!(check_pages(&s).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hostile_layouts_are_refused() {
        let ok = MemoryState {
            regions: vec![RegionState {
                guest_addr: 0,
                size: 8192,
                file_offset: 0,
            }],
            file_size: 8192,
            blake3: String::new(),
            parent: None,
            pages: None,
        };
        check_layout(&ok).unwrap();
        let mut s = ok.clone();
        s.regions[0].size = 16384;
        assert!(check_layout(&s).is_err(), "past the file");
        let mut s = ok.clone();
        s.regions[0].guest_addr = u64::MAX - 4095;
        assert!(check_layout(&s).is_err(), "wraps");
        let mut s = ok.clone();
        s.regions[0].size = 100;
        assert!(check_layout(&s).is_err(), "unaligned");
        let mut s = ok.clone();
        s.regions.push(s.regions[0].clone());
        s.file_size = 16384;
        assert!(check_layout(&s).is_err(), "overlap");
        let mut s = ok;
        s.regions.clear();
        assert!(check_layout(&s).is_err(), "empty");
    }
}
