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
use vm_memory::mmap::NewBitmap;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap,
    MmapRegion,
};

use crate::vstate::memory::GuestMemoryMmap;

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
    /// BLAKE3 of the whole file, hex.
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
            if chunk.iter().all(|b| *b == 0) {
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
    };
    write_stamp(path, &state.blake3);
    Ok(state)
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

/// Copies `len` bytes at guest address `gpa` from the memory file back into `mem`, undoing a
/// write KVM made while the state was being restored. Areas outside the saved RAM are
/// ignored (the state file is untrusted; a bad MSR value must not fail a restore).
pub fn rewind(
    mem: &GuestMemoryMmap,
    path: &Path,
    state: &MemoryState,
    gpa: u64,
    len: u64,
) -> Result<(), MemoryFileError> {
    use std::os::unix::fs::FileExt;
    let Some(region) = state.regions.iter().find(|r| {
        gpa >= r.guest_addr
            && gpa
                .checked_add(len)
                .is_some_and(|end| end <= r.guest_addr + r.size)
    }) else {
        return Ok(());
    };
    let display = path.display().to_string();
    let file = File::open(path).map_err(|source| MemoryFileError::Open {
        path: display.clone(),
        source,
    })?;
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, region.file_offset + (gpa - region.guest_addr))
        .map_err(|source| MemoryFileError::Open {
            path: display,
            source,
        })?;
    mem.write_slice(&buf, GuestAddress(gpa))
        .map_err(MemoryFileError::Guest)
}

/// Maps the memory file privately as guest RAM. Call [`verify`] first.
pub fn map(path: &Path, state: &MemoryState) -> Result<GuestMemoryMmap, MemoryFileError> {
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
        let mapping = MmapRegion::<()>::build(
            Some(FileOffset::new(clone, r.file_offset)),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
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

// Keeps the NewBitmap bound visible for the `()` bitmap used above.
const _: fn() = || {
    fn assert_bitmap<B: NewBitmap>() {}
    assert_bitmap::<()>();
};

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
        let a = map(&path, &state).unwrap();
        let b = map(&path, &state).unwrap();
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
    fn hostile_layouts_are_refused() {
        let ok = MemoryState {
            regions: vec![RegionState {
                guest_addr: 0,
                size: 8192,
                file_offset: 0,
            }],
            file_size: 8192,
            blake3: String::new(),
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
