//! Initial vCPU register values for the two boot protocols. Pure functions: the vCPU code
//! applies them, the tests check them without KVM.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs};

use super::gdt::{self, kvm_segment_from_gdt};
use super::layout;
use super::BootProtocol;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 6;

/// The GDT written to guest memory for each protocol: null, code, data, TSS.
pub fn gdt_table(protocol: BootProtocol) -> [u64; 4] {
    match protocol {
        BootProtocol::Linux64 => [0, gdt::CODE64, gdt::DATA, gdt::TSS64],
        BootProtocol::Pvh => [0, gdt::CODE32, gdt::DATA, gdt::TSS32],
    }
}

/// General-purpose registers at the kernel entry point.
pub fn boot_regs(protocol: BootProtocol, entry: u64) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2, // bit 1 is reserved and always set
        rip: entry,
        ..Default::default()
    };
    match protocol {
        // Linux 64-bit boot protocol: %rsi points at the zero page.
        BootProtocol::Linux64 => {
            regs.rsp = layout::BOOT_STACK_POINTER;
            regs.rbp = layout::BOOT_STACK_POINTER;
            regs.rsi = layout::ZERO_PAGE_START;
        }
        // PVH: %ebx points at hvm_start_info.
        BootProtocol::Pvh => regs.rbx = layout::PVH_INFO_START,
    }
    regs
}

/// Special registers at the kernel entry point, on top of the vCPU's reset state: long mode
/// with the identity-mapped page tables for the Linux protocol, flat 32-bit protected mode
/// without paging for PVH.
pub fn boot_sregs(protocol: BootProtocol, mut sregs: kvm_sregs) -> kvm_sregs {
    let table = gdt_table(protocol);
    let code = kvm_segment_from_gdt(table[1], 1);
    let data = kvm_segment_from_gdt(table[2], 2);
    let tss = kvm_segment_from_gdt(table[3], 3);

    sregs.gdt.base = layout::GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&table) - 1) as u16;
    sregs.idt.base = layout::IDT_START;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    match protocol {
        BootProtocol::Linux64 => {
            sregs.cr0 = (sregs.cr0 | X86_CR0_PE | X86_CR0_PG) & !0x6000_0000;
            sregs.cr3 = layout::PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        BootProtocol::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    sregs
}

/// x87 and SSE control words as after FNINIT / reset.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSRs set before the first instruction: syscall MSRs cleared, fast strings on, MTRRs
/// enabled with write-back as the default memory type.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Routes LINT0 to ExtINT (the legacy PIC) and LINT1 to NMI, as a PC BIOS leaves them.
pub fn setup_lapic_lint(regs: &mut [std::os::raw::c_char; 1024]) {
    for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let mut raw = [0u8; 4];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = regs[offset + i] as u8;
        }
        let value = set_delivery_mode(u32::from_le_bytes(raw), mode).to_le_bytes();
        for (i, b) in value.iter().enumerate() {
            regs[offset + i] = *b as std::os::raw::c_char;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux64_enters_long_mode_with_paging() {
        let s = boot_sregs(BootProtocol::Linux64, kvm_sregs::default());
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE | X86_CR0_PG);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, layout::PML4_START);
        assert_eq!((s.cs.l, s.cs.selector), (1, 8));
        let r = boot_regs(BootProtocol::Linux64, 0x100_0000);
        assert_eq!(
            (r.rip, r.rsi, r.rflags),
            (0x100_0000, layout::ZERO_PAGE_START, 2)
        );
    }

    #[test]
    fn pvh_enters_flat_protected_mode() {
        let s = boot_sregs(BootProtocol::Pvh, kvm_sregs::default());
        assert_eq!(s.cr0, X86_CR0_PE | X86_CR0_ET);
        assert_eq!((s.efer, s.cr4), (0, 0));
        assert_eq!((s.cs.l, s.cs.db, s.cs.limit), (0, 1, 0xffff_ffff));
        assert_eq!(
            boot_regs(BootProtocol::Pvh, 0x1234).rbx,
            layout::PVH_INFO_START
        );
    }

    #[test]
    fn lapic_lint_modes() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT0 + 1] = 0x07; // garbage delivery mode bits to be replaced
        setup_lapic_lint(&mut regs);
        assert_eq!(regs[APIC_LVT0 + 1] as u8 & 0x7, 0x7);
        assert_eq!(regs[APIC_LVT1 + 1] as u8 & 0x7, 0x4);
    }
}
