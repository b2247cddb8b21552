//! Guest memory: layout constants and creation of anonymous guest RAM.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryMmap as VmGuestMemoryMmap, GuestRegionMmap};

/// The guest memory type used everywhere in the VMM. The bitmap exists only when dirty
/// pages are tracked: it records every page the VMM itself writes (virtio devices), which
/// KVM's dirty log does not see.
pub type GuestMemoryMmap = VmGuestMemoryMmap<Option<AtomicBitmap>>;
/// The bitmap of one region.
pub type RegionBitmap = Option<AtomicBitmap>;

/// A virtio descriptor chain reader over guest memory.
pub type MemReader<'a> = virtio_queue::Reader<'a, vm_memory::bitmap::BS<'a, RegionBitmap>>;
/// A virtio descriptor chain writer over guest memory (marks the pages it writes dirty).
pub type MemWriter<'a> = virtio_queue::Writer<'a, vm_memory::bitmap::BS<'a, RegionBitmap>>;

/// Page size of the dirty tracking (KVM's and the VMM's).
pub const PAGE_SIZE: usize = 4096;

/// A dirty bitmap for a region of `len` bytes when `track` is set.
pub fn new_bitmap(len: usize, track: bool) -> RegionBitmap {
    track.then(|| {
        AtomicBitmap::new(
            len,
            std::num::NonZeroUsize::MIN.saturating_add(PAGE_SIZE - 1),
        )
    })
}

/// Start of the 32-bit MMIO hole (LAPIC, IOAPIC, virtio-MMIO devices live here).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole; RAM above 3 GiB continues here.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size must be a non-zero multiple of 4 KiB, got {0} bytes")]
    BadSize(u64),
    #[error("cannot map {size_mib} MiB of guest memory")]
    Mmap {
        size_mib: u64,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("cannot assemble guest memory: {0}")]
    Regions(String),
}

/// RAM regions for `size` bytes of guest memory: below the MMIO hole, then above 4 GiB.
pub fn ram_regions(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize),
        ]
    }
}

/// Creates anonymous, private guest RAM of `size` bytes (not dirty-tracked).
pub fn create_anonymous(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    create_anonymous_tracked(size, false)
}

/// Creates anonymous, private guest RAM of `size` bytes, with a dirty bitmap per region
/// when `track` is set.
pub fn create_anonymous_tracked(size: u64, track: bool) -> Result<GuestMemoryMmap, MemoryError> {
    if size == 0 || !size.is_multiple_of(4096) {
        return Err(MemoryError::BadSize(size));
    }
    let mut regions = Vec::new();
    for (addr, len) in ram_regions(size) {
        let mapping = MmapRegionBuilder::new_with_bitmap(len, new_bitmap(len, track))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_PRIVATE)
            .build()
            .map_err(|source| MemoryError::Mmap {
                size_mib: size >> 20,
                source,
            })?;
        let region = GuestRegionMmap::new(mapping, addr)
            .ok_or_else(|| MemoryError::Regions(format!("region at {:#x} wraps", addr.0)))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Regions(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    #[test]
    fn splits_around_the_mmio_hole() {
        assert_eq!(ram_regions(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
        let r = ram_regions(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(r[1], (GuestAddress(MMIO_GAP_END), (1 << 30) as usize));
    }

    #[test]
    fn creates_memory_and_rejects_bad_sizes() {
        let m = create_anonymous(2 << 20).unwrap();
        assert_eq!(m.last_addr(), GuestAddress((2 << 20) - 1));
        assert!(matches!(create_anonymous(0), Err(MemoryError::BadSize(0))));
        assert!(matches!(
            create_anonymous(4097),
            Err(MemoryError::BadSize(4097))
        ));
    }
}
