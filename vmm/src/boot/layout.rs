//! Guest physical memory layout used at boot (x86_64).
//!
//! ```text
//! 0x0000_0500  GDT                      0x0000_9000  PML4
//! 0x0000_0520  IDT (empty)              0x0000_a000  PDPT
//! 0x0000_6000  PVH start_info + modlist 0x0000_b000  4 PDs (identity-map the first 4 GiB)
//! 0x0000_7000  Linux zero page / PVH memmap
//! 0x0000_8ff0  initial stack            0x0002_0000  kernel command line
//! 0x0009_fc00  MP table (EBDA)          0x0010_0000  kernel (bzImage) / vmlinux at its ELF address
//! 0x000e_0000  ACPI tables: RSDP, XSDT, FADT, MADT, DSDT (0xe0000-0xfffff reserved in the E820 map)
//! 0x000e_f000  VMGenID: the 16-byte VM generation ID
//! 0xc000_0000 - 0xffff_ffff  MMIO hole: virtio-MMIO devices, IOAPIC, LAPIC, KVM TSS
//! ```

pub const GDT_START: u64 = 0x500;
pub const IDT_START: u64 = 0x520;
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MODLIST_START: u64 = 0x6040;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const PVH_MEMMAP_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
/// Page directories, one per identity-mapped GiB (0xb000-0xefff).
pub const PDE_START: u64 = 0xb000;
pub const BOOT_PAGE_TABLE_GIB: u64 = 4;
pub const CMDLINE_START: u64 = 0x20000;
/// The x86 kernel's COMMAND_LINE_SIZE, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// The last KiB of base memory: where Linux looks for the MP floating pointer.
pub const EBDA_START: u64 = 0x9fc00;
pub const MPTABLE_START: u64 = EBDA_START;
/// ACPI tables, RSDP first: 16-byte aligned in the BIOS area Linux scans for it
/// (0xe0000-0xfffff), besides being handed over in the zero page or `hvm_start_info`.
pub const ACPI_START: u64 = 0xe_0000;
pub const RSDP_START: u64 = ACPI_START;
/// The VM generation ID (16 bytes, own page). Below 1 MiB and outside RAM, so a guest can read
/// it through `/dev/mem` even with `STRICT_DEVMEM`; see docs/acpi.md.
pub const VMGENID_ADDR: u64 = 0xe_f000;
/// End of the region the memory map reserves for the ACPI tables and the VMGenID page.
pub const ACPI_END: u64 = 0x10_0000;
const _: () = assert!(ACPI_START < VMGENID_ADDR && VMGENID_ADDR + 0x1000 <= ACPI_END);
/// Start of high memory: kernels load at or above 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;

pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Three pages KVM needs for the real-mode TSS on Intel; inside the MMIO hole, unused by devices.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

/// First virtio-MMIO device window; each device gets `MMIO_DEVICE_SIZE` bytes.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
/// First IRQ (IOAPIC pin / GSI) handed to virtio devices; 4 is the serial port.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Last usable IOAPIC pin of KVM's in-kernel IOAPIC.
pub const IRQ_MAX: u32 = 23;
/// GSI of the ACPI Generic Event Device (GED), which tells the guest the VM generation ID
/// changed: COM2's legacy IRQ, free here (one UART, on IRQ 4; virtio uses 5..=23).
pub const GED_IRQ: u32 = 3;

/// Legacy I/O ports.
pub const SERIAL_PORT: u16 = 0x3f8;
pub const SERIAL_IRQ: u32 = 4;
pub const I8042_PORT: u16 = 0x60;
/// Grove's boot-complete port: the guest init writes [`BOOT_COMPLETE_VALUE`] here.
pub const BOOT_COMPLETE_PORT: u16 = 0x3f0;
pub const BOOT_COMPLETE_VALUE: u8 = 123;
