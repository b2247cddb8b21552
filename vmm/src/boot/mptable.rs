//! Intel MultiProcessor Specification 1.4 table: how a guest without ACPI finds its CPUs,
//! the IOAPIC and the ISA interrupt routing.
//!
//! The table is written as plain little-endian bytes (no packed structs, no `unsafe`) at
//! [`layout::MPTABLE_START`], in the last KiB of base memory where Linux scans for it.

use vm_memory::{Bytes, GuestAddress};

use super::layout;
use crate::vstate::memory::GuestMemoryMmap;

const MPC_SPEC: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT_PROCESSOR: u8 = 2;
// Family 6, model 0: what the MP spec calls the CPU "signature"; Linux ignores it.
const CPU_SIGNATURE: u32 = 0x600;
// FPU and on-chip APIC.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IOINT: u8 = 3;
const ENTRY_LINT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const ISA_BUS_ID: u8 = 0;
/// The MP spec (and the APIC ID space) limits us to 254 processors; the VMM allows 32.
pub const MAX_CPUS: u8 = 254;

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("{0} vCPUs do not fit in an MP table")]
    TooManyCpus(u8),
    #[error("the MP table does not fit below 640 KiB")]
    TooLarge,
    #[error("cannot write the MP table into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the MP floating pointer structure followed by the configuration table, for a table
/// that starts at `base`.
pub fn build(num_cpus: u8, base: u64) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus;
    let table_addr = u32::try_from(base + 16).map_err(|_| MptableError::TooLarge)?;

    // Entries first, so the header can carry the length, count and checksum.
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOT_PROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&layout::IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..=layout::IRQ_MAX as u8 {
        // Conforming polarity and trigger (flags 0): ISA defaults, edge-triggered, active high.
        entries.extend_from_slice(&[
            ENTRY_IOINT,
            INT_TYPE_INT,
            0,
            0,
            ISA_BUS_ID,
            irq,
            ioapic_id,
            irq,
        ]);
        count += 1;
    }
    // LINT0 of every LAPIC is ExtINT (the PIC), LINT1 is NMI.
    entries.extend_from_slice(&[ENTRY_LINT, INT_TYPE_EXTINT, 0, 0, ISA_BUS_ID, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LINT, INT_TYPE_NMI, 0, 0, ISA_BUS_ID, 0, 0xff, 1]);
    count += 2;

    let table_len = u16::try_from(44 + entries.len()).map_err(|_| MptableError::TooLarge)?;
    let mut table = Vec::with_capacity(usize::from(table_len));
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&table_len.to_le_bytes());
    table.push(MPC_SPEC);
    table.push(0); // checksum, patched below
    table.extend_from_slice(b"GROVE   ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&layout::LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended table length + checksum + reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut mpf = Vec::with_capacity(16);
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(&table_addr.to_le_bytes());
    mpf.push(1); // length in 16-byte units
    mpf.push(MPC_SPEC);
    mpf.push(0); // checksum, patched below
    mpf.extend_from_slice(&[0; 5]); // no default configuration, no IMCR
    mpf[10] = checksum(&mpf);

    let mut out = mpf;
    out.extend_from_slice(&table);
    if base + out.len() as u64 > 0xa_0000 {
        return Err(MptableError::TooLarge);
    }
    Ok(out)
}

/// Writes the MP table for `num_cpus` vCPUs into guest memory.
pub fn setup(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    let bytes = build(num_cpus, layout::MPTABLE_START)?;
    mem.write_slice(&bytes, GuestAddress(layout::MPTABLE_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts_are_consistent() {
        for cpus in [1u8, 2, 32] {
            let t = build(cpus, layout::MPTABLE_START).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0);
            let table = &t[16..];
            assert_eq!(&table[0..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0);
            let count = u16::from_le_bytes([table[34], table[35]]);
            // cpus + bus + ioapic + 24 io interrupts + 2 local interrupts
            assert_eq!(count, u16::from(cpus) + 1 + 1 + 24 + 2);
            // Only the first CPU is the boot processor.
            assert_eq!(table[44 + 3], CPU_ENABLED | CPU_BOOT_PROCESSOR);
            if cpus > 1 {
                assert_eq!(table[44 + 20 + 3], CPU_ENABLED);
                assert_eq!(table[44 + 20 + 1], 1);
            }
        }
    }

    #[test]
    fn rejects_zero_and_too_many_cpus() {
        assert!(matches!(
            build(0, 0x9fc00),
            Err(MptableError::TooManyCpus(0))
        ));
        assert!(matches!(
            build(255, 0x9fc00),
            Err(MptableError::TooManyCpus(255))
        ));
    }

    #[test]
    fn writes_into_guest_memory() {
        let mem = crate::vstate::memory::create_anonymous(1 << 20).unwrap();
        setup(&mem, 4).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(layout::MPTABLE_START))
            .unwrap();
        assert_eq!(&sig, b"_MP_");
    }
}
