//! Serving virtio-blk requests (virtio spec 1.2, section 5.2.6) from a disk image (raw, or a
//! qcow2 chain; see [`crate::disk`]).
//!
//! A request is a descriptor chain: a 16-byte header the device reads (type, reserved, sector),
//! then data (read by the device for OUT, written for IN and GET_ID), then one status byte the
//! device writes. Under VIRTIO_F_VERSION_1 the driver may split these across descriptors as it
//! likes (section 2.7.4), so the header and data are read and written as byte streams over the
//! readable and writable descriptors (virtio-queue's `Reader` / `Writer`, which check every
//! descriptor against guest memory up front). The status byte is the last byte of the chain.
//!
//! Nothing in a chain is trusted: a malformed request completes with IOERR when there is a
//! status byte to write it to, and with a used length of 0 otherwise, so the driver always gets
//! its descriptors back and the device never touches memory outside guest RAM or bytes outside
//! the disk.

use std::io::{self, Read, Write};

use crate::vstate::memory::{MemReader as Reader, MemWriter as Writer};
use log::{debug, warn};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use vm_memory::{Address, Bytes, GuestAddress};

use super::SECTOR_SIZE;
use crate::devices::virtio::device_state::Chain;
use crate::disk::{DiskImage, LayerRecord};
use crate::vstate::memory::GuestMemoryMmap;

/// Length of `struct virtio_blk_outhdr`: type (u32), reserved / ioprio (u32), sector (u64).
const HEADER_LEN: usize = 16;
/// Length of the GET_ID answer.
pub const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Bounce buffer size: data moves between the file and guest memory in pieces of at most
/// this many bytes, so a large request costs no more host memory than a small one.
const CHUNK: usize = 256 * 1024;

/// Why a request failed; reported to the guest as a status byte, to the host log in detail.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    #[error("descriptor outside guest memory")]
    GuestMemory(#[source] virtio_queue::Error),
    #[error("cannot copy to or from guest memory")]
    Copy(#[source] io::Error),
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(usize),
    #[error("sectors {sector}+{len} bytes lie beyond the disk end ({capacity} sectors)")]
    OutOfRange {
        sector: u64,
        len: usize,
        capacity: u64,
    },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("disk I/O failed at byte {offset}")]
    Disk {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("flushing the disk failed")]
    Flush(#[source] io::Error),
}

impl RequestError {
    fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// The disk behind one virtio-blk device.
#[derive(Debug)]
pub struct Disk {
    image: DiskImage,
    /// Set when the image was just branched and the guest has not written since: the
    /// active layer is then an empty overlay on this frozen layer.
    fresh_on: Option<LayerRecord>,
    /// Size in 512-byte sectors.
    capacity: u64,
    /// GET_ID answer: the configured id, NUL-padded.
    id: [u8; ID_LEN],
    bounce: Vec<u8>,
}

impl Disk {
    /// `id` is at most [`ID_LEN`] bytes (longer ids are cut).
    pub fn new(image: DiskImage, id: &[u8]) -> Self {
        let mut padded = [0u8; ID_LEN];
        let n = id.len().min(ID_LEN);
        padded[..n].copy_from_slice(&id[..n]);
        Self {
            capacity: image.size() / SECTOR_SIZE,
            image,
            fresh_on: None,
            id: padded,
            bounce: Vec::new(),
        }
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn read_only(&self) -> bool {
        self.image.read_only()
    }

    pub fn image(&self) -> &DiskImage {
        &self.image
    }

    /// The frozen layer the active layer is an empty overlay on, if the disk was branched
    /// and the guest has not written since.
    pub fn fresh_on(&self) -> Option<&LayerRecord> {
        self.fresh_on.as_ref()
    }

    /// Takes a spare overlay created for the next branch (see
    /// [`crate::disk::DiskImage::spare_plan`]).
    pub fn install_spare(&mut self, plan: crate::disk::branch::SparePlan) {
        self.image.install_spare(plan)
    }

    /// Makes every completed write durable (data and metadata).
    pub fn flush(&self) -> io::Result<()> {
        self.image.flush()
    }

    /// Freezes the active layer as `frozen` and continues on a new overlay (see
    /// [`DiskImage::branch`]). Call with the queue stopped.
    pub fn branch(&mut self) -> Result<LayerRecord, crate::disk::DiskError> {
        let layer = self.image.branch()?;
        self.fresh_on = Some(layer.clone());
        Ok(layer)
    }

    /// Serves one request chain; returns the used length (bytes written into guest memory,
    /// status byte included).
    pub fn process_chain(&mut self, mem: &GuestMemoryMmap, chain: Chain<'_>) -> u32 {
        let Some(status_addr) = status_address(chain.clone()) else {
            debug!("virtio-blk: request without a writable status byte");
            return 0;
        };
        let mut written = 0usize;
        let status = match self.execute(mem, chain, &mut written) {
            Ok(()) => VIRTIO_BLK_S_OK as u8,
            Err(e) => {
                match &e {
                    // Host-side failures matter to the operator; the rest is the guest's doing.
                    RequestError::Disk { source, .. } | RequestError::Flush(source) => {
                        warn!("virtio-blk: {e}: {source}")
                    }
                    _ => debug!("virtio-blk: {e}"),
                }
                e.status()
            }
        };
        if let Err(e) = mem.write_obj(status, status_addr) {
            debug!("virtio-blk: cannot write the status byte: {e}");
            return 0;
        }
        // The chain is shorter than 4 GiB (virtio-queue stops iterating otherwise).
        u32::try_from(written.saturating_add(1)).unwrap_or(u32::MAX)
    }

    fn execute(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: Chain<'_>,
        written: &mut usize,
    ) -> Result<(), RequestError> {
        let mut reader: Reader<'_> = chain
            .clone()
            .reader(mem)
            .map_err(RequestError::GuestMemory)?;
        let mut writer: Writer<'_> = chain.writer(mem).map_err(RequestError::GuestMemory)?;
        if reader.available_bytes() < HEADER_LEN {
            return Err(RequestError::Malformed("header shorter than 16 bytes"));
        }
        let mut header = [0u8; HEADER_LEN];
        reader.read_exact(&mut header).map_err(RequestError::Copy)?;
        let request_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&header[8..]);
        let sector = u64::from_le_bytes(sector);
        // Leave the status byte (checked present by status_address) out of the data.
        let data_len = writer.available_bytes().saturating_sub(1);
        let _status = writer
            .split_at(data_len)
            .map_err(RequestError::GuestMemory)?;

        match request_type {
            VIRTIO_BLK_T_IN => {
                if reader.available_bytes() != 0 {
                    return Err(RequestError::Malformed("device-readable data in a read"));
                }
                let offset = self.check_range(sector, data_len)?;
                self.read_to_guest(&mut writer, offset, data_len, written)
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only() {
                    return Err(RequestError::ReadOnly);
                }
                if data_len != 0 {
                    return Err(RequestError::Malformed("device-writable data in a write"));
                }
                let len = reader.available_bytes();
                let offset = self.check_range(sector, len)?;
                self.write_from_guest(&mut reader, offset, len)
            }
            VIRTIO_BLK_T_FLUSH => self.flush().map_err(RequestError::Flush),
            VIRTIO_BLK_T_GET_ID => {
                let n = data_len.min(ID_LEN);
                writer
                    .write_all(&self.id[..n])
                    .map_err(RequestError::Copy)?;
                *written = n;
                Ok(())
            }
            other => Err(RequestError::Unsupported(other)),
        }
    }

    /// Byte offset of `len` bytes at `sector`, if they are whole sectors inside the disk.
    fn check_range(&self, sector: u64, len: usize) -> Result<u64, RequestError> {
        if !len.is_multiple_of(SECTOR_SIZE as usize) {
            return Err(RequestError::Unaligned(len));
        }
        let out_of_range = RequestError::OutOfRange {
            sector,
            len,
            capacity: self.capacity,
        };
        let sectors = (len as u64) / SECTOR_SIZE;
        match sector.checked_add(sectors) {
            // capacity * 512 is the file size, so sector * 512 <= it cannot overflow.
            Some(end) if end <= self.capacity => Ok(sector * SECTOR_SIZE),
            _ => Err(out_of_range),
        }
    }

    fn read_to_guest(
        &mut self,
        writer: &mut Writer<'_>,
        offset: u64,
        len: usize,
        written: &mut usize,
    ) -> Result<(), RequestError> {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            let buf = bounce(&mut self.bounce, n);
            let pos = offset + done as u64;
            self.image
                .read_at(buf, pos)
                .map_err(|source| RequestError::Disk {
                    offset: pos,
                    source,
                })?;
            writer.write_all(buf).map_err(RequestError::Copy)?;
            done += n;
            *written = done;
        }
        Ok(())
    }

    fn write_from_guest(
        &mut self,
        reader: &mut Reader<'_>,
        offset: u64,
        len: usize,
    ) -> Result<(), RequestError> {
        self.fresh_on = None;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            let buf = bounce(&mut self.bounce, n);
            reader.read_exact(buf).map_err(RequestError::Copy)?;
            let pos = offset + done as u64;
            self.image
                .write_at(buf, pos)
                .map_err(|source| RequestError::Disk {
                    offset: pos,
                    source,
                })?;
            done += n;
        }
        Ok(())
    }
}

/// The first `n` bytes of the bounce buffer, grown on first use.
fn bounce(buf: &mut Vec<u8>, n: usize) -> &mut [u8] {
    if buf.len() < n {
        buf.resize(n, 0);
    }
    &mut buf[..n]
}

/// Where the status byte goes: the last byte of the last descriptor, which must be
/// device-writable, with every device-readable descriptor before every device-writable one
/// (virtio spec 1.2, section 2.7.4.2). `None` when the chain does not allow a status byte.
fn status_address(chain: Chain<'_>) -> Option<GuestAddress> {
    let mut seen_writable = false;
    let mut last = None;
    for desc in chain {
        if desc.is_write_only() {
            seen_writable = true;
        } else if seen_writable {
            return None;
        }
        last = Some(desc);
    }
    // A last descriptor that still has NEXT set means the chain was cut short (bad index, loop).
    let last = last.filter(|d| d.is_write_only() && !d.has_next() && d.len() > 0)?;
    last.addr().checked_add(u64::from(last.len()) - 1)
}
