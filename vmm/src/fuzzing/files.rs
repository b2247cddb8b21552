//! File targets: the snapshot state decoder and the qcow2 metadata checks, on files that may
//! be damaged or crafted.

use std::fs::File;
use std::sync::{Arc, Mutex};

use super::virtio::{guest_memory, TempFile};
use crate::device_manager::VirtioKindState;
use crate::devices::virtio::mmio::MmioTransportRestoreArgs;
use crate::devices::virtio::{MmioTransport, Rng, VirtioDevice};
use crate::disk::{qcow2_check, DiskFormat, OpenOptions};
use crate::snapshot::{format, memory, Persist, SnapshotState};
use crate::vstate::vcpu_state;

/// `state.bin` as restore reads it. With the first input byte even, the rest is the whole
/// file (header checks, checksum); odd, the rest is the JSON payload, wrapped in a valid
/// header so the fuzzer reaches the parser and the checks a restore makes before touching KVM:
/// the configuration, the memory file's page list, the vCPU areas, and the virtio-MMIO
/// transport state (restored onto an entropy device over small guest memory).
pub fn snapshot_state(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let state = if mode & 1 == 0 {
        format::decode::<SnapshotState>(rest, "state.bin")
    } else {
        let Ok(payload) = std::str::from_utf8(rest) else {
            return;
        };
        let Ok(value) = serde_json::from_str::<serde_json::Value>(payload) else {
            return;
        };
        let Ok(file) = format::encode(&value) else {
            return;
        };
        format::decode::<SnapshotState>(&file, "state.bin")
    };
    let Ok(state) = state else { return };
    let _ = state.config.validate(None);
    let _ = memory::check_pages(&state.memory);
    for vcpu in &state.vcpus {
        let _ = vcpu_state::kvm_written_areas(vcpu);
    }
    for device in &state.devices.virtio {
        let VirtioKindState::Rng(rng_state) = &device.kind else {
            continue;
        };
        let Ok(rng) = Rng::restore((), rng_state) else {
            continue;
        };
        let Some(mem) = guest_memory() else { return };
        let device_arc: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(rng));
        let args = MmioTransportRestoreArgs {
            mem,
            device: device_arc,
        };
        let _ = MmioTransport::restore(args, &device.transport);
    }
}

/// A qcow2 image from outside: the header and metadata checks, then, for an image that
/// passes them, opening it and reading and writing guest sectors at both ends.
pub fn qcow2_image(data: &[u8]) {
    let Some(image) = TempFile::new("qcow2", data) else {
        return;
    };
    let Ok(file) = File::open(&image.0) else {
        return;
    };
    let Ok(header) = qcow2_check::read_header(&file) else {
        return;
    };
    if qcow2_check::check_metadata(&file, &header).is_err() {
        return;
    }
    drop(file);
    let Ok(disk) = crate::disk::open(&OpenOptions::new(&image.0, DiskFormat::Qcow2, false)) else {
        return;
    };
    let size = disk.size();
    let mut buf = [0u8; 4096];
    for offset in [0, size.saturating_sub(4096)] {
        let n = usize::try_from(size.min(4096)).unwrap_or(0);
        if disk.read_at(&mut buf[..n], offset).is_ok() {
            let _ = disk.write_at(&buf[..n], offset);
        }
    }
    let _ = disk.flush();
}
