//! x86_64 boot: load a kernel (ELF vmlinux or bzImage) and an initrd, then lay out what the
//! kernel expects to find in memory: command line, memory map, MP table, ACPI tables, GDT and
//! page tables.
//!
//! An ELF vmlinux with a PVH note boots through PVH (32-bit entry, `hvm_start_info`), as
//! Firecracker and Cloud Hypervisor prefer; an ELF without the note and a bzImage boot through
//! the Linux 64-bit boot protocol (long mode entry, zero page).

pub mod acpi;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod regs;

use std::fs::File;
use std::io::Read;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::vstate::memory::{GuestMemoryMmap, MMIO_GAP_END, MMIO_GAP_START};

/// How the kernel is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootProtocol {
    /// Xen PVH entry (ELF note `XEN_ELFNOTE_PHYS32_ENTRY`): 32-bit protected mode.
    Pvh,
    /// Linux x86 64-bit boot protocol: long mode, `boot_params` in %rsi.
    Linux64,
}

/// Where and how to start the loaded kernel.
#[derive(Debug, Clone, Copy)]
pub struct KernelEntry {
    pub entry: GuestAddress,
    pub protocol: BootProtocol,
    /// First byte after the kernel image.
    pub kernel_end: u64,
    /// The bzImage setup header, to seed the zero page with.
    setup_header: Option<setup_header>,
}

/// An initrd placed in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct InitrdRegion {
    pub address: GuestAddress,
    pub size: u64,
}

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// Offset of the 64-bit entry point (`startup_64`) in a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const E820_MAX_ENTRIES: usize = 128;

/// Errors while loading the kernel or configuring boot memory.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}")]
    OpenKernel {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a kernel: expected an ELF vmlinux or a bzImage")]
    NotAKernel { path: String },
    #[error("cannot load kernel {path}")]
    LoadKernel {
        path: String,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("cannot open initrd {path}")]
    OpenInitrd {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("initrd {path} ({size} bytes) does not fit in guest memory above the kernel")]
    InitrdTooLarge { path: String, size: u64 },
    #[error("cannot copy initrd {path} into guest memory")]
    LoadInitrd {
        path: String,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("kernel command line is invalid")]
    Cmdline(#[source] linux_loader::loader::Error),
    #[error("cannot write boot structures into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
    #[error("cannot write the boot parameters")]
    Configure(#[source] linux_loader::configurator::Error),
    #[error("guest memory ends below the kernel's load address")]
    MemoryTooSmall,
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
}

/// Loads `path` into guest memory and says how to enter it.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<KernelEntry, BootError> {
    let display = path.display().to_string();
    let mut file = File::open(path).map_err(|source| BootError::OpenKernel {
        path: display.clone(),
        source,
    })?;
    let mut magic = [0u8; 4];
    if file.read_exact(&mut magic).is_err() {
        return Err(BootError::NotAKernel { path: display });
    }
    let load_err = |source| BootError::LoadKernel {
        path: display.clone(),
        source,
    };
    let highmem = Some(GuestAddress(layout::HIMEM_START));
    if magic == *b"\x7fELF" {
        let res = Elf::load(mem, None, &mut file, highmem).map_err(load_err)?;
        let (entry, protocol) = match res.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => (addr, BootProtocol::Pvh),
            _ => (res.kernel_load, BootProtocol::Linux64),
        };
        return Ok(KernelEntry {
            entry,
            protocol,
            kernel_end: res.kernel_end,
            setup_header: None,
        });
    }
    if !is_bzimage(&mut file) {
        return Err(BootError::NotAKernel { path: display });
    }
    let res = BzImage::load(mem, None, &mut file, highmem).map_err(load_err)?;
    Ok(KernelEntry {
        entry: GuestAddress(res.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET),
        protocol: BootProtocol::Linux64,
        kernel_end: res.kernel_end,
        setup_header: res.setup_header,
    })
}

/// A bzImage has "HdrS" at offset 0x202 of its real-mode header.
fn is_bzimage(file: &mut File) -> bool {
    use std::io::{Seek, SeekFrom};
    let mut hdr = [0u8; 4];
    file.seek(SeekFrom::Start(0x202)).is_ok()
        && file.read_exact(&mut hdr).is_ok()
        && u32::from_le_bytes(hdr) == KERNEL_HDR_MAGIC
}

/// End of RAM below the MMIO hole.
fn lowmem_end(mem: &GuestMemoryMmap) -> u64 {
    (mem.last_addr().0 + 1).min(MMIO_GAP_START)
}

/// Copies the initrd to the top of low memory (page aligned), above the kernel.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
) -> Result<InitrdRegion, BootError> {
    let display = path.display().to_string();
    let mut file = File::open(path).map_err(|source| BootError::OpenInitrd {
        path: display.clone(),
        source,
    })?;
    let size = file
        .metadata()
        .map_err(|source| BootError::OpenInitrd {
            path: display.clone(),
            source,
        })?
        .len();
    let address = lowmem_end(mem)
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end && size > 0)
        .ok_or(BootError::InitrdTooLarge {
            path: display.clone(),
            size,
        })?;
    let count = usize::try_from(size).map_err(|_| BootError::InitrdTooLarge {
        path: display.clone(),
        size,
    })?;
    mem.read_exact_volatile_from(GuestAddress(address), &mut file, count)
        .map_err(|source| BootError::LoadInitrd {
            path: display,
            source,
        })?;
    Ok(InitrdRegion {
        address: GuestAddress(address),
        size,
    })
}

/// RAM ranges as (start, length) for the memory map given to the guest.
fn ram_map(mem: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    let mut map = vec![(0, layout::EBDA_START)];
    let low_end = lowmem_end(mem);
    if low_end > layout::HIMEM_START {
        map.push((layout::HIMEM_START, low_end - layout::HIMEM_START));
    }
    let end = mem.last_addr().0 + 1;
    if end > MMIO_GAP_END {
        map.push((MMIO_GAP_END, end - MMIO_GAP_END));
    }
    map
}

/// The guest's memory map as (start, length, E820 type): RAM, and the reserved ACPI region
/// (tables and the VMGenID page), in address order.
fn e820_map(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u32)> {
    let mut map: Vec<(u64, u64, u32)> = ram_map(mem)
        .into_iter()
        .map(|(start, len)| (start, len, E820_RAM))
        .collect();
    let acpi = (
        layout::ACPI_START,
        layout::ACPI_END - layout::ACPI_START,
        E820_RESERVED,
    );
    let at = map.partition_point(|(start, _, _)| *start < layout::ACPI_START);
    map.insert(at, acpi);
    map
}

/// Writes everything the kernel reads at entry: GDT/IDT, page tables, command line, MP table,
/// ACPI tables, and the zero page (Linux protocol) or `hvm_start_info` (PVH). Both the MP table
/// and ACPI are written: a kernel with ACPI uses the ACPI tables (and ignores the MP table),
/// one without ACPI (the test guest, a minimal user kernel) uses the MP table.
pub fn configure_system(
    mem: &GuestMemoryMmap,
    kernel: &KernelEntry,
    cmdline: &Cmdline,
    initrd: Option<InitrdRegion>,
    num_cpus: u8,
    virtio: &[acpi::VirtioMmioDevice],
) -> Result<(), BootError> {
    if lowmem_end(mem) <= kernel.kernel_end {
        return Err(BootError::MemoryTooSmall);
    }
    write_gdt_idt(mem, kernel.protocol)?;
    load_cmdline(mem, GuestAddress(layout::CMDLINE_START), cmdline).map_err(BootError::Cmdline)?;
    mptable::setup(mem, num_cpus)?;
    let rsdp = acpi::setup(mem, num_cpus, virtio)?;
    match kernel.protocol {
        BootProtocol::Linux64 => {
            write_identity_page_tables(mem)?;
            write_zero_page(mem, kernel, cmdline, initrd, rsdp)
        }
        BootProtocol::Pvh => write_pvh_start_info(mem, cmdline, initrd, rsdp),
    }
}

fn write_gdt_idt(mem: &GuestMemoryMmap, protocol: BootProtocol) -> Result<(), BootError> {
    for (i, entry) in regs::gdt_table(protocol).iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(layout::GDT_START + 8 * i as u64))
            .map_err(BootError::Write)?;
    }
    mem.write_obj(0u64, GuestAddress(layout::IDT_START))
        .map_err(BootError::Write)
}

/// Identity-maps the first 4 GiB with 2 MiB pages: the kernel, zero page and command line
/// (all the 64-bit protocol requires), plus the MMIO hole, so code that runs before the
/// kernel's own page tables (and the test guest) can reach the virtio-MMIO devices.
fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let present_rw = 0x3;
    mem.write_obj(
        layout::PDPTE_START | present_rw,
        GuestAddress(layout::PML4_START),
    )
    .map_err(BootError::Write)?;
    for gib in 0..layout::BOOT_PAGE_TABLE_GIB {
        let pd = layout::PDE_START + gib * 0x1000;
        mem.write_obj(pd | present_rw, GuestAddress(layout::PDPTE_START + gib * 8))
            .map_err(BootError::Write)?;
        for i in 0..512u64 {
            // Present, writable, 2 MiB page (PS).
            let addr = (gib << 30) | (i << 21);
            mem.write_obj(addr | 0x83, GuestAddress(pd + i * 8))
                .map_err(BootError::Write)?;
        }
    }
    Ok(())
}

fn cmdline_len(cmdline: &Cmdline) -> Result<u32, BootError> {
    let s = cmdline
        .as_cstring()
        .map_err(|_| BootError::Cmdline(linux_loader::loader::Error::InvalidCommandLine))?;
    Ok(s.as_bytes().len() as u32)
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    kernel: &KernelEntry,
    cmdline: &Cmdline,
    initrd: Option<InitrdRegion>,
    rsdp: u64,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len(cmdline)?;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.address.0 as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    let map = e820_map(mem);
    if map.len() > E820_MAX_ENTRIES {
        return Err(BootError::MemoryTooSmall);
    }
    for (i, (addr, size, kind)) in map.iter().enumerate() {
        params.e820_table[i].addr = *addr;
        params.e820_table[i].size = *size;
        params.e820_table[i].r#type = *kind;
    }
    params.e820_entries = map.len() as u8;
    // Boot protocol 2.14: where the RSDP is (it is also in the BIOS area scan).
    params.acpi_rsdp_addr = rsdp;
    mem.write_obj(params, GuestAddress(layout::ZERO_PAGE_START))
        .map_err(BootError::Write)
}

fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    _cmdline: &Cmdline,
    initrd: Option<InitrdRegion>,
    rsdp: u64,
) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = e820_map(mem)
        .into_iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: layout::CMDLINE_START,
        memmap_paddr: layout::PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        rsdp_paddr: rsdp,
        ..Default::default()
    };
    let mut params = BootParams::new(&info, GuestAddress(layout::PVH_INFO_START));
    if let Some(initrd) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = layout::PVH_MODLIST_START;
        params = BootParams::new(&info, GuestAddress(layout::PVH_INFO_START));
        let module = hvm_modlist_entry {
            paddr: initrd.address.0,
            size: initrd.size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(layout::PVH_MODLIST_START));
    }
    params.set_sections(&memmap, GuestAddress(layout::PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(BootError::Configure)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_anonymous;

    #[test]
    fn memory_map_skips_the_bios_hole_and_mmio_gap() {
        let mem = create_anonymous(64 << 20).unwrap();
        assert_eq!(
            ram_map(&mem),
            vec![
                (0, layout::EBDA_START),
                (layout::HIMEM_START, (64 << 20) - layout::HIMEM_START)
            ]
        );
    }

    #[test]
    fn memory_map_reserves_the_acpi_region_between_the_ram_ranges() {
        let mem = create_anonymous(64 << 20).unwrap();
        let map = e820_map(&mem);
        assert_eq!(
            map,
            vec![
                (0, layout::EBDA_START, E820_RAM),
                (
                    layout::ACPI_START,
                    layout::ACPI_END - layout::ACPI_START,
                    E820_RESERVED
                ),
                (
                    layout::HIMEM_START,
                    (64 << 20) - layout::HIMEM_START,
                    E820_RAM
                ),
            ]
        );
    }

    #[test]
    fn rejects_files_that_are_not_kernels() {
        let mem = create_anonymous(32 << 20).unwrap();
        let dir = std::env::temp_dir().join(format!("grove-boot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("not-a-kernel");
        std::fs::write(&p, vec![0x42u8; 8192]).unwrap();
        assert!(matches!(
            load_kernel(&mem, &p),
            Err(BootError::NotAKernel { .. })
        ));
        std::fs::write(&p, b"x").unwrap();
        assert!(matches!(
            load_kernel(&mem, &p),
            Err(BootError::NotAKernel { .. })
        ));
        assert!(matches!(
            load_kernel(&mem, &dir.join("missing")),
            Err(BootError::OpenKernel { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_memory() {
        let mem = create_anonymous(32 << 20).unwrap();
        let dir = std::env::temp_dir().join(format!("grove-initrd-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("initrd");
        std::fs::write(&p, vec![7u8; 5000]).unwrap();
        let r = load_initrd(&mem, &p, 2 << 20).unwrap();
        assert_eq!(r.address.0 % 4096, 0);
        assert!(r.address.0 + r.size <= 32 << 20);
        let mut b = [0u8; 1];
        mem.read_slice(&mut b, GuestAddress(r.address.0 + 4999))
            .unwrap();
        assert_eq!(b[0], 7);
        assert!(matches!(
            load_initrd(&mem, &p, 32 << 20),
            Err(BootError::InitrdTooLarge { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
