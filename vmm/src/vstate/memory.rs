//! Guest memory: layout constants and creation of anonymous guest RAM.

use vm_memory::{GuestAddress, GuestMemoryMmap as VmGuestMemoryMmap};

/// The guest memory type used everywhere in the VMM.
pub type GuestMemoryMmap = VmGuestMemoryMmap<()>;

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
        source: vm_memory::mmap::FromRangesError,
    },
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

/// Creates anonymous, private guest RAM of `size` bytes.
pub fn create_anonymous(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    if size == 0 || !size.is_multiple_of(4096) {
        return Err(MemoryError::BadSize(size));
    }
    GuestMemoryMmap::from_ranges(&ram_regions(size)).map_err(|source| MemoryError::Mmap {
        size_mib: size >> 20,
        source,
    })
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
