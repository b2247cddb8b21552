//! ACPI tables for guests built with ACPI (hardware-reduced): RSDP → XSDT → FADT (→ DSDT)
//! and MADT, written at [`layout::ACPI_START`] with the rust-vmm `acpi_tables` crate.
//!
//! They describe what the MP table and the command line describe (one local APIC per vCPU,
//! the IOAPIC, the serial port, each virtio-MMIO device with its window and GSI) plus what
//! only ACPI can: the VM generation ID device and the Generic Event Device (GED) that
//! announces its changes. On x86, a kernel in hardware-reduced ACPI mode has no legacy PIC
//! and gives an IRQ number only to the interrupts ACPI declares, so every device with an
//! interrupt is in the DSDT. A kernel with ACPI uses these tables and ignores the MP table; a
//! kernel without ACPI never looks here. docs/acpi.md has the whole picture.

use acpi_tables::fadt::{FADTBuilder, Flags, FADT};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress};

use super::layout;
use crate::vstate::memory::GuestMemoryMmap;

const OEM_ID: [u8; 6] = *b"GROVE ";
const OEM_TABLE_ID: [u8; 8] = *b"GROVEVM ";
const OEM_REVISION: u32 = 1;
/// DSDT revision 2 or later: AML integers are 64-bit.
const DSDT_REVISION: u8 = 6;
/// FADT IA-PC boot architecture flags: no VGA, no CMOS RTC. "Legacy devices" and "8042"
/// stay clear: the i8042 here is only a reset line (`reboot=k` does not depend on the flag).
const IAPC_BOOT_ARCH: u16 = (1 << 2) | (1 << 5);
/// Every table starts 16-byte aligned (the RSDP must; the others only need 8).
const TABLE_ALIGN: u64 = 16;
/// The XSDT lists the FADT and the MADT (the FADT points to the DSDT).
const XSDT_ENTRIES: u64 = 2;
/// The notification value a VM generation ID device receives when the ID changed.
pub const VMGENID_NOTIFY: u8 = 0x80;
/// The VM generation ID device's path in the ACPI namespace (the GED notifies it).
pub const VMGENID_DEVICE: &str = "\\_SB_.VGEN";

/// Errors building or writing the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("{0} vCPUs do not fit in a MADT with 8-bit APIC IDs")]
    TooManyCpus(u8),
    #[error("the ACPI tables ({size} bytes) do not fit below the VMGenID page")]
    TooLarge { size: u64 },
    #[error("cannot write the ACPI tables into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
    #[error("virtio-MMIO window {0:#x} is above 4 GiB, which the DSDT cannot describe")]
    VirtioAbove4G(u64),
    #[error("{0} virtio devices do not fit in the DSDT's device names")]
    TooManyVirtioDevices(usize),
}

/// The tables as laid out in guest memory from [`layout::ACPI_START`].
#[derive(Debug, Clone)]
pub struct AcpiTables {
    /// Guest-physical address of each table.
    pub rsdp: u64,
    pub xsdt: u64,
    pub fadt: u64,
    pub madt: u64,
    pub dsdt: u64,
    /// The region's bytes, `bytes[0]` at [`layout::ACPI_START`].
    pub bytes: Vec<u8>,
}

fn align(addr: u64) -> u64 {
    addr.div_ceil(TABLE_ALIGN) * TABLE_ALIGN
}

fn aml_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// A virtio-MMIO device as the DSDT declares it: its 4 KiB window and its GSI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    pub base: u64,
    pub irq: u32,
}

/// Legacy ISA interrupts are edge-triggered and active high, and so are the VMM's irqfd
/// pulses: every interrupt in the DSDT is declared so.
fn edge_irq(gsi: u32) -> aml::Interrupt {
    aml::Interrupt::new(true, true, false, false, gsi)
}

/// `Device (COM1)`: the 8250 UART at 0x3f8, IRQ 4 (`PNP0501`).
fn serial_aml() -> Vec<u8> {
    let io = aml::IO::new(layout::SERIAL_PORT, layout::SERIAL_PORT, 1, 8);
    let irq = edge_irq(layout::SERIAL_IRQ);
    aml_bytes(&aml::Device::new(
        "COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ONE),
            &aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&io, &irq])),
        ],
    ))
}

/// `Device (Vnnn)`: a virtio-MMIO device (`LNRO0005`, which Linux's virtio_mmio driver binds).
fn virtio_aml(index: usize, dev: &VirtioMmioDevice) -> Result<Vec<u8>, AcpiError> {
    let too_high = || AcpiError::VirtioAbove4G(dev.base);
    let base = u32::try_from(dev.base).map_err(|_| too_high())?;
    let window = u32::try_from(layout::MMIO_DEVICE_SIZE).map_err(|_| too_high())?;
    if index > 999 {
        return Err(AcpiError::TooManyVirtioDevices(index + 1));
    }
    let mem = aml::Memory32Fixed::new(true, base, window);
    let irq = edge_irq(dev.irq);
    let uid = index as u64;
    let name = format!("V{index:03}");
    Ok(aml_bytes(&aml::Device::new(
        name.as_str().into(),
        vec![
            &aml::Name::new("_HID".into(), &"LNRO0005"),
            &aml::Name::new("_UID".into(), &uid),
            &aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&mem, &irq])),
        ],
    )))
}

/// AML bytes already encoded, to place among other objects.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

/// The DSDT's AML under `\_SB`: the serial port (`COM1`), the virtio-MMIO devices (`V000`,
/// `V001`, ...), the VM generation ID device and the GED:
///
/// ```text
/// Device (VGEN) { _HID "VMGENCTR", _CID "VM_GEN_COUNTER", _DDN "VM_Gen_Counter",
///                 Method (ADDR) { Return (Package { low 32 bits, high 32 bits }) } }
/// Device (GED_) { _HID "ACPI0013", _UID 0,
///                 _CRS { Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { GED_IRQ } },
///                 Method (_EVT, 1, Serialized) { If (Arg0 == GED_IRQ) { Notify (VGEN, 0x80) } } }
/// ```
///
/// Linux's vmgenid driver binds to `VMGENCTR` or `VM_GEN_COUNTER`, maps the 16 bytes `ADDR`
/// points to, and re-reads them on `Notify(0x80)`; the GED driver runs `_EVT(gsi)` on each
/// interrupt. Edge-triggered: the VMM raises it through an irqfd, a pulse per change.
pub fn dsdt_aml(virtio: &[VirtioMmioDevice]) -> Result<Vec<u8>, AcpiError> {
    let addr_low = (layout::VMGENID_ADDR & 0xffff_ffff) as u32;
    let addr_high = (layout::VMGENID_ADDR >> 32) as u32;
    let addr_package = aml::Package::new(vec![&addr_low, &addr_high]);
    let addr_return = aml::Return::new(&addr_package);

    let ged_irq = edge_irq(layout::GED_IRQ);
    let crs = aml::ResourceTemplate::new(vec![&ged_irq]);
    let vgen_path = aml::Path::new(VMGENID_DEVICE);
    let notify = aml::Notify::new(&vgen_path, &VMGENID_NOTIFY);
    let is_ged_irq = aml::Equal::new(&aml::Arg(0), &layout::GED_IRQ);
    let on_ged_irq = aml::If::new(&is_ged_irq, vec![&notify]);

    let mut devices = serial_aml();
    for (index, dev) in virtio.iter().enumerate() {
        devices.extend(virtio_aml(index, dev)?);
    }
    let devices = RawAml(devices);
    Ok(aml_bytes(&aml::Scope::new(
        "\\_SB_".into(),
        vec![
            &devices,
            &aml::Device::new(
                "VGEN".into(),
                vec![
                    &aml::Name::new("_HID".into(), &"VMGENCTR"),
                    &aml::Name::new("_CID".into(), &"VM_GEN_COUNTER"),
                    &aml::Name::new("_DDN".into(), &"VM_Gen_Counter"),
                    &aml::Method::new("ADDR".into(), 0, false, vec![&addr_return]),
                ],
            ),
            &aml::Device::new(
                "GED_".into(),
                vec![
                    &aml::Name::new("_HID".into(), &"ACPI0013"),
                    &aml::Name::new("_UID".into(), &aml::ZERO),
                    &aml::Name::new("_CRS".into(), &crs),
                    &aml::Method::new("_EVT".into(), 1, true, vec![&on_ged_irq]),
                ],
            ),
        ],
    )))
}

fn dsdt(virtio: &[VirtioMmioDevice]) -> Result<Vec<u8>, AcpiError> {
    let mut dsdt = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    dsdt.append_slice(&dsdt_aml(virtio)?);
    Ok(dsdt.as_slice().to_vec())
}

/// One enabled local APIC per vCPU (APIC ID = vCPU index, as the MP table and CPUID say) and
/// the IOAPIC with ID `num_cpus` serving GSIs from 0.
fn madt(num_cpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(layout::LAPIC_ADDR),
    );
    for cpu in 0..num_cpus {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(num_cpus, layout::IOAPIC_ADDR, 0));
    aml_bytes(&madt)
}

/// Hardware-reduced ACPI (no PM/GPE register blocks, no SCI, no FACS): events come from
/// the GED. Power and sleep buttons, if any, would be control-method devices.
fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut builder = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    builder.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    aml_bytes(&builder.finalize())
}

/// Builds the tables for `num_cpus` vCPUs, laid out from [`layout::ACPI_START`]: RSDP, XSDT,
/// FADT, MADT, DSDT.
pub fn build(num_cpus: u8, virtio: &[VirtioMmioDevice]) -> Result<AcpiTables, AcpiError> {
    if num_cpus == 0 || num_cpus == u8::MAX {
        return Err(AcpiError::TooManyCpus(num_cpus));
    }
    let madt = madt(num_cpus);
    let dsdt = dsdt(virtio)?;
    let rsdp_addr = layout::RSDP_START;
    let xsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
    let fadt_addr = align(xsdt_addr + 36 + 8 * XSDT_ENTRIES);
    let madt_addr = align(fadt_addr + FADT::len() as u64);
    let dsdt_addr = align(madt_addr + madt.len() as u64);
    let end = dsdt_addr + dsdt.len() as u64;
    if end > layout::VMGENID_ADDR {
        return Err(AcpiError::TooLarge {
            size: end - layout::ACPI_START,
        });
    }

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let placed = [
        (rsdp_addr, aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr))),
        (xsdt_addr, aml_bytes(&xsdt)),
        (fadt_addr, fadt(dsdt_addr)),
        (madt_addr, madt),
        (dsdt_addr, dsdt),
    ];
    let mut bytes = vec![0u8; (end - layout::ACPI_START) as usize];
    for (addr, table) in &placed {
        let offset = (addr - layout::ACPI_START) as usize;
        bytes[offset..offset + table.len()].copy_from_slice(table);
    }
    Ok(AcpiTables {
        rsdp: rsdp_addr,
        xsdt: xsdt_addr,
        fadt: fadt_addr,
        madt: madt_addr,
        dsdt: dsdt_addr,
        bytes,
    })
}

/// Writes the tables for `num_cpus` vCPUs into guest memory; returns the RSDP's address.
pub fn setup(
    mem: &GuestMemoryMmap,
    num_cpus: u8,
    virtio: &[VirtioMmioDevice],
) -> Result<u64, AcpiError> {
    let tables = build(num_cpus, virtio)?;
    mem.write_slice(&tables.bytes, GuestAddress(layout::ACPI_START))
        .map_err(AcpiError::Write)?;
    Ok(tables.rsdp)
}

#[cfg(test)]
#[path = "acpi_tests.rs"]
mod tests;
