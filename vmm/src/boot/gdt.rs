//! GDT entries and their `kvm_segment` equivalents for the boot CPU state.

use kvm_bindings::kvm_segment;

/// Builds a GDT descriptor from flags (in the 0xF0FF layout: G/DB/L/AVL nibble and access byte),
/// base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0x0000_f0ff) << 40)
}

/// 64-bit code segment (L=1), present, ring 0, execute/read.
pub const CODE64: u64 = gdt_entry(0xa09b, 0, 0xfffff);
/// 32-bit code segment (D=1), for the PVH entry point.
pub const CODE32: u64 = gdt_entry(0xc09b, 0, 0xfffff);
/// Flat data segment.
pub const DATA: u64 = gdt_entry(0xc093, 0, 0xfffff);
/// 64-bit busy TSS (Linux boot protocol).
pub const TSS64: u64 = gdt_entry(0x808b, 0, 0xfffff);
/// 32-bit busy TSS (PVH: limit 0x67, byte granular).
pub const TSS32: u64 = gdt_entry(0x008b, 0, 0x67);

/// Converts GDT entry `index` into the segment register KVM expects.
pub fn kvm_segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = (entry & 0xffff) | ((entry >> 32) & 0x000f_0000);
    let g = ((entry >> 55) & 1) as u8;
    // With 4 KiB granularity the limit counts pages; KVM wants the byte limit.
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let s = ((entry >> 44) & 1) as u8;
    let type_ = ((entry >> 40) & 0xf) as u8;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit: limit as u32,
        selector: u16::from(index) * 8,
        type_,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        // A segment that is not present is unusable.
        unusable: u8::from(present == 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_flat_code_segment() {
        assert_eq!(CODE64, 0x00af_9b00_0000_ffff);
        let s = kvm_segment_from_gdt(CODE64, 1);
        assert_eq!(
            (s.selector, s.l, s.db, s.g, s.s, s.type_),
            (8, 1, 0, 1, 1, 0xb)
        );
        assert_eq!(s.limit, 0xffff_ffff);
        assert_eq!(s.unusable, 0);
    }

    #[test]
    fn encodes_tss_and_data() {
        let t = kvm_segment_from_gdt(TSS32, 3);
        assert_eq!(
            (t.selector, t.type_, t.s, t.g, t.limit),
            (0x18, 0xb, 0, 0, 0x67)
        );
        let d = kvm_segment_from_gdt(DATA, 2);
        assert_eq!((d.type_, d.db, d.s, d.present), (3, 1, 1, 1));
        assert_eq!(kvm_segment_from_gdt(0, 0).unusable, 1);
    }
}
