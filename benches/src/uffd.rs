//! `grove-bench uffd-wp`: what the userfaultfd write-protect alternative to pre-copy would
//! cost (docs/live-snapshot.md). With it, the pause write-protects all guest memory and the
//! copy happens after the resume, each first guest write to a page waiting until that page
//! is copied. This measures, on plain populated anonymous memory of the guest's size (no
//! KVM, so it is a lower bound): the time to write-protect it all (inside the pause), and
//! the round trip of one write fault served by a handler thread that copies the page and
//! lifts the protection (what each first write costs the guest after the resume).

use std::time::Instant;

use anyhow::bail;

use crate::stats;

const UFFD_API: u64 = 0xaa;
const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const PAGE: usize = 4096;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

#[repr(C)]
struct UffdMsg {
    event: u8,
    _reserved: [u8; 7],
    flags: u64,
    address: u64,
    _rest: [u8; 8],
}

/// `_IOWR(0xAA, nr, size)`.
const fn iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (0xaa << 8) | nr
}

fn ioctl<T>(fd: i32, request: u64, arg: &mut T, what: &str) -> anyhow::Result<()> {
    // SAFETY: `arg` is the structure the userfaultfd ioctl `request` reads and writes, of
    // the size encoded in `request`, and lives across the call.
    let r = unsafe { libc::ioctl(fd, request as _, arg as *mut T) };
    if r < 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn protect(fd: i32, start: u64, len: u64, on: bool) -> anyhow::Result<()> {
    let mut wp = UffdioWriteprotect {
        range: UffdioRange { start, len },
        mode: if on { UFFDIO_WRITEPROTECT_MODE_WP } else { 0 },
    };
    ioctl(
        fd,
        iowr(0x06, std::mem::size_of::<UffdioWriteprotect>()),
        &mut wp,
        "UFFDIO_WRITEPROTECT",
    )
}

pub fn bench_uffd_wp(sizes: &[u64], faults: usize) -> anyhow::Result<()> {
    println!("host: {}", crate::host_description());
    for &mib in sizes {
        let len = (mib as usize) << 20;
        // SAFETY: a fresh anonymous private mapping; nothing else refers to it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            bail!("mmap {mib} MiB: {}", std::io::Error::last_os_error());
        }
        // SAFETY: the mapping is `len` bytes, readable and writable, and ours alone.
        let mem = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) };
        for page in mem.chunks_mut(PAGE) {
            page[0] = 1; // populated, like a guest that used its memory
        }
        // SAFETY: userfaultfd takes flags only.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) } as i32;
        if fd < 0 {
            bail!(
                "userfaultfd: {} (vm.unprivileged_userfaultfd, or no CAP_SYS_PTRACE)",
                std::io::Error::last_os_error()
            );
        }
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_PAGEFAULT_FLAG_WP,
            ioctls: 0,
        };
        ioctl(
            fd,
            iowr(0x3f, std::mem::size_of::<UffdioApi>()),
            &mut api,
            "UFFDIO_API",
        )?;
        let start = addr as u64;
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start,
                len: len as u64,
            },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        ioctl(
            fd,
            iowr(0x00, std::mem::size_of::<UffdioRegister>()),
            &mut reg,
            "UFFDIO_REGISTER",
        )?;

        // In the pause: protect everything.
        let t = Instant::now();
        protect(fd, start, len as u64, true)?;
        let protect_ms = t.elapsed().as_secs_f64() * 1000.0;

        // After the resume: a writer touches pages, a handler copies each and unprotects it.
        let handler = std::thread::spawn(move || -> anyhow::Result<()> {
            let mut copy = vec![0u8; PAGE];
            for _ in 0..faults {
                let mut msg = std::mem::MaybeUninit::<UffdMsg>::uninit();
                // SAFETY: reads one message into a buffer of its size.
                let n = unsafe {
                    libc::read(
                        fd,
                        msg.as_mut_ptr() as *mut libc::c_void,
                        std::mem::size_of::<UffdMsg>(),
                    )
                };
                if n != std::mem::size_of::<UffdMsg>() as isize {
                    bail!("read a fault: {}", std::io::Error::last_os_error());
                }
                // SAFETY: the kernel filled the whole message.
                let msg = unsafe { msg.assume_init() };
                let page = msg.address & !(PAGE as u64 - 1);
                // SAFETY: `page` is a page of the registered mapping, still mapped.
                let src = unsafe { std::slice::from_raw_parts(page as *const u8, PAGE) };
                copy.copy_from_slice(src);
                protect(fd, page, PAGE as u64, false)?;
            }
            Ok(())
        });
        let stride = (len / PAGE / faults.max(1)).max(1) * PAGE;
        let mut round_trips = Vec::with_capacity(faults);
        for i in 0..faults {
            let t = Instant::now();
            // SAFETY: inside the mapping; the volatile write is the write fault measured.
            unsafe { std::ptr::write_volatile(mem.as_mut_ptr().add(i * stride), 2) };
            round_trips.push(t.elapsed().as_secs_f64() * 1e6);
        }
        handler
            .join()
            .map_err(|_| anyhow::anyhow!("the fault handler panicked"))??;
        let (min, median, max) = stats(&mut round_trips);
        println!(
            "{mib} MiB populated: write-protect all {protect_ms:.2} ms; first write to a \
             protected page {median:.1} us median ({min:.1}-{max:.1}) over {faults} pages"
        );
        // SAFETY: the mapping and the descriptor are no longer used.
        unsafe {
            libc::munmap(addr, len);
            libc::close(fd);
        }
    }
    println!(
        "reproduce: cargo run --release -p grove-benches -- uffd-wp --sizes {} --faults {faults}",
        sizes
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",")
    );
    Ok(())
}
