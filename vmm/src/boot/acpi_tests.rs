use super::*;

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// The table at guest address `addr`, by the length in its header.
fn table(t: &AcpiTables, addr: u64) -> &[u8] {
    let off = (addr - layout::ACPI_START) as usize;
    let len = u32_at(&t.bytes, off + 4) as usize;
    &t.bytes[off..off + len]
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// `n` virtio devices placed as the device manager places them.
fn virtio(n: u64) -> Vec<VirtioMmioDevice> {
    (0..n)
        .map(|i| VirtioMmioDevice {
            base: layout::VIRTIO_MMIO_BASE + i * layout::MMIO_DEVICE_SIZE,
            irq: layout::VIRTIO_IRQ_BASE + i as u32,
        })
        .collect()
}

/// An extended interrupt descriptor: consumer, edge, active high, exclusive, one GSI.
fn edge_irq_descriptor(gsi: u32) -> Vec<u8> {
    let mut irq = vec![0x89, 0x06, 0x00, 0x03, 0x01];
    irq.extend_from_slice(&gsi.to_le_bytes());
    irq
}

#[test]
fn every_table_is_checksummed_and_linked_from_the_rsdp() {
    for cpus in [1u8, 2, 32] {
        let t = build(cpus, &virtio(2)).unwrap();
        assert_eq!(t.rsdp, layout::RSDP_START);
        assert_eq!(
            t.rsdp % 16,
            0,
            "the RSDP must be 16-byte aligned for the BIOS scan"
        );
        let rsdp = &t.bytes[..36];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(rsdp[15], 2, "ACPI 2.0+ RSDP (has an XSDT)");
        assert_eq!(sum(&rsdp[..20]), 0, "ACPI 1.0 checksum");
        assert_eq!(sum(rsdp), 0, "extended checksum");
        assert_eq!(u64_at(rsdp, 24), t.xsdt);

        let xsdt = table(&t, t.xsdt);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert_eq!(sum(xsdt), 0);
        let entries: Vec<u64> = xsdt[36..].chunks(8).map(|c| u64_at(c, 0)).collect();
        assert_eq!(entries, vec![t.fadt, t.madt]);

        let fadt = table(&t, t.fadt);
        assert_eq!(&fadt[..4], b"FACP");
        assert_eq!(sum(fadt), 0);
        assert_eq!(u64_at(fadt, 140), t.dsdt, "X_DSDT");
        assert_eq!(u32_at(fadt, 40), 0, "no 32-bit DSDT pointer beside X_DSDT");
        assert_ne!(u32_at(fadt, 112) & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_eq!(u16::from_le_bytes([fadt[109], fadt[110]]), IAPC_BOOT_ARCH);

        let madt = table(&t, t.madt);
        assert_eq!(&madt[..4], b"APIC");
        assert_eq!(sum(madt), 0);
        let dsdt = table(&t, t.dsdt);
        assert_eq!(&dsdt[..4], b"DSDT");
        assert_eq!(sum(dsdt), 0);
        assert!(t.dsdt + dsdt.len() as u64 <= layout::VMGENID_ADDR);
        for addr in [t.xsdt, t.fadt, t.madt, t.dsdt] {
            assert_eq!(addr % 8, 0);
        }
    }
}

#[test]
fn madt_has_one_local_apic_per_vcpu_and_the_ioapic() {
    for cpus in [1u8, 4, 32] {
        let t = build(cpus, &virtio(2)).unwrap();
        let madt = table(&t, t.madt);
        assert_eq!(u32_at(madt, 36), layout::LAPIC_ADDR);
        let mut apics = Vec::new();
        let mut ioapics = Vec::new();
        let mut off = 44;
        while off < madt.len() {
            let (kind, len) = (madt[off], usize::from(madt[off + 1]));
            let entry = &madt[off..off + len];
            match kind {
                0 => {
                    assert_eq!(len, 8);
                    assert_eq!(u32_at(entry, 4), 1, "enabled");
                    apics.push((entry[2], entry[3]));
                }
                1 => {
                    assert_eq!(len, 12);
                    ioapics.push((entry[2], u32_at(entry, 4), u32_at(entry, 8)));
                }
                other => panic!("unexpected MADT entry type {other}"),
            }
            off += len;
        }
        assert_eq!(off, madt.len());
        let expected: Vec<(u8, u8)> = (0..cpus).map(|i| (i, i)).collect();
        assert_eq!(apics, expected, "(processor UID, APIC ID) per vCPU");
        // Same IOAPIC ID as the MP table (after the CPUs), at the usual address, GSI base 0.
        assert_eq!(ioapics, vec![(cpus, layout::IOAPIC_ADDR, 0)]);
    }
}

#[test]
fn dsdt_declares_the_vmgenid_device_and_the_ged() {
    let aml = dsdt_aml(&[]).unwrap();
    // Linux's vmgenid driver matches either ID.
    assert!(contains(&aml, b"\x08_HID\x0dVMGENCTR\0"));
    assert!(contains(&aml, b"\x08_CID\x0dVM_GEN_COUNTER\0"));
    // Method (ADDR, 0) { Return (Package (2) { DWord low, Zero }) }
    let mut addr_method = vec![0x14]; // MethodOp
    let body: Vec<u8> = [
        &b"ADDR\x00"[..],                // name, flags: no args, not serialized
        &[0xa4, 0x12, 0x08, 0x02, 0x0c], // ReturnOp, PackageOp, len 8, 2 elements, DWordPrefix
        &(layout::VMGENID_ADDR as u32).to_le_bytes(),
        &[0x00], // ZeroOp: the high 32 bits
    ]
    .concat();
    addr_method.push(u8::try_from(body.len() + 1).unwrap()); // PkgLength
    addr_method.extend_from_slice(&body);
    assert!(
        contains(&aml, &addr_method),
        "ADDR returns the VMGenID address"
    );

    assert!(contains(&aml, b"\x08_HID\x0dACPI0013\0"), "GED hardware ID");
    assert!(
        contains(&aml, &edge_irq_descriptor(layout::GED_IRQ)),
        "GED interrupt"
    );
    // Method (_EVT, 1, Serialized) { If (LEqual (Arg0, GED_IRQ)) { Notify (\_SB.VGEN, 0x80) } }
    assert!(
        contains(&aml, b"_EVT\x09"),
        "_EVT takes one argument, serialized"
    );
    let gsi = u8::try_from(layout::GED_IRQ).unwrap();
    assert!(
        contains(&aml, &[0x93, 0x68, 0x0a, gsi]),
        "If (Arg0 == GED_IRQ)"
    );
    assert!(
        contains(&aml, b"\x86\\\x2e_SB_VGEN\x0a\x80"),
        "Notify (\\_SB.VGEN, 0x80)"
    );
}

#[test]
fn setup_writes_the_tables_where_the_rsdp_says() {
    let mem = crate::vstate::memory::create_anonymous(2 << 20).unwrap();
    let rsdp = setup(&mem, 2, &virtio(1)).unwrap();
    assert_eq!(rsdp, layout::RSDP_START);
    let mut sig = [0u8; 8];
    mem.read_slice(&mut sig, GuestAddress(rsdp)).unwrap();
    assert_eq!(&sig, b"RSD PTR ");
    let xsdt: u64 = mem.read_obj(GuestAddress(rsdp + 24)).unwrap();
    mem.read_slice(&mut sig[..4], GuestAddress(xsdt)).unwrap();
    assert_eq!(&sig[..4], b"XSDT");
}

#[test]
fn rejects_cpu_counts_the_madt_cannot_hold() {
    assert!(matches!(build(0, &[]), Err(AcpiError::TooManyCpus(0))));
    assert!(matches!(build(255, &[]), Err(AcpiError::TooManyCpus(255))));
}

#[test]
fn dsdt_declares_the_serial_port_and_every_virtio_device_with_its_interrupt() {
    // A hardware-reduced x86 kernel maps only the GSIs ACPI declares.
    let devices = virtio(19);
    let aml = dsdt_aml(&devices).unwrap();
    // COM1: _HID EISAID("PNP0501"), I/O 0x3f8-0x3ff, IRQ 4.
    assert!(contains(&aml, b"COM1\x08_HID\x0c\x41\xd0\x05\x01"));
    assert!(contains(
        &aml,
        &[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08]
    ));
    assert!(contains(&aml, &edge_irq_descriptor(layout::SERIAL_IRQ)));
    for (i, dev) in devices.iter().enumerate() {
        let name = format!("V{i:03}");
        assert!(contains(&aml, name.as_bytes()), "{name}");
        // Memory32Fixed (ReadWrite, base, 4 KiB)
        let mut mem = vec![0x86, 0x09, 0x00, 0x01];
        mem.extend_from_slice(&(dev.base as u32).to_le_bytes());
        mem.extend_from_slice(&0x1000u32.to_le_bytes());
        assert!(contains(&aml, &mem), "{name} window");
        assert!(contains(&aml, &edge_irq_descriptor(dev.irq)), "{name} IRQ");
    }
    assert_eq!(
        aml.windows(8).filter(|w| *w == b"LNRO0005").count(),
        devices.len()
    );
    assert!(matches!(
        dsdt_aml(&[VirtioMmioDevice {
            base: 1 << 32,
            irq: 5
        }]),
        Err(AcpiError::VirtioAbove4G(_))
    ));
}
