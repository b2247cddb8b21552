//! The hostile-guest suite: the test guest (tests/guest/guest.c) drives the devices like a
//! broken or malicious driver would, and prints what it got. `test=hostile` takes on
//! virtio-blk and virtio-rng (descriptor chains that loop or leave the queue, buffers outside
//! RAM or wrapping 2^64, zero and huge lengths, wrong-direction buffers, out-of-range and
//! unknown block requests, bad queue configurations, avail-index jumps, MMIO and port I/O at
//! unknown offsets, widths and addresses); `test=hostile-io` takes on the transmit and receive
//! queues of virtio-net and virtio-vsock (the same chain and buffer cases, frames too short,
//! too long or with offload headers, vsock headers that are short, spoofed or nonsensical,
//! bad packets on live connections). Every case must end with the VMM alive and the device
//! working, directly or after a device reset, with no byte of guest memory around the
//! targeted buffers changed, the disk untouched, and nothing a refused chain held reaching
//! the host. The policy is docs/hostile-guests.md.
//!
//! Runs the `grove-vmm` binary, so that a panic anywhere would show as a failed process. Needs
//! /dev/kvm, and root for the network namespace and TAP of the net cases; fails (not skips)
//! without them, saying so.

use std::ffi::CString;
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm::control::client::ControlClient;
use vmm::control::protocol::{Request, Response, VmRunState};

mod common;
use common::{connect_control, require_kvm, test_guest, TempDir};

const VMM: &str = env!("CARGO_BIN_EXE_grove-vmm");
const MEMORY_MIB: u64 = 32;
const DISK_SECTORS: usize = 64;

/// What each case must print: the whole "hostile NAME ..." line. Ring-level corruption ends
/// with `used=none nr=1` (the device stopped and asked for a reset); a bad request gets an
/// error status (01 IOERR, 02 UNSUPP) with the device still running (`nr=0`); a request
/// without a usable status byte comes back with used length 0 and its status byte untouched
/// (`ee`).
const EXPECTED: &[&str] = &[
    // Descriptor chains.
    "hostile loop status=ee used=none nr=1 canary=ok",
    "hostile longer-than-queue status=ee used=none nr=1 canary=ok",
    "hostile next-out-of-range status=ee used=none nr=1 canary=ok",
    "hostile head-out-of-range status=ee used=none nr=1 canary=ok",
    "hostile chain-over-4g status=ee used=none nr=1 canary=ok",
    "hostile indirect-outside-ram status=ee used=none nr=1 canary=ok",
    // Buffers.
    "hostile data-outside-ram status=01 used=0001 nr=0 canary=ok",
    "hostile data-straddles-ram-end status=01 used=0001 nr=0 canary=ok",
    "hostile data-wraps status=01 used=0001 nr=0 canary=ok",
    "hostile header-wraps status=01 used=0001 nr=0 canary=ok",
    "hostile status-outside-ram status=ee used=0000 nr=0 canary=ok",
    "hostile zero-length-data status=00 used=0001 nr=0 canary=ok",
    "hostile zero-length-header status=01 used=0001 nr=0 canary=ok",
    "hostile zero-length-status status=ee used=0000 nr=0 canary=ok",
    "hostile huge-length-data status=01 used=0001 nr=0 canary=ok",
    // The whole chain exceeds 4 GiB: virtio-queue stops there, like at a loop.
    "hostile max-length-data status=ee used=none nr=1 canary=ok",
    "hostile header-device-writable status=01 used=0001 nr=0 canary=ok",
    "hostile read-into-readonly-data status=01 used=0001 nr=0 canary=ok",
    "hostile write-from-writable-data status=01 used=0001 nr=0 canary=ok",
    "hostile status-readonly status=ee used=0000 nr=0 canary=ok",
    // Block requests.
    "hostile sector-past-end status=01 used=0001 nr=0 canary=ok",
    "hostile sector-overflows status=01 used=0001 nr=0 canary=ok",
    "hostile write-sector-overflows status=01 used=0001 nr=0 canary=ok",
    "hostile unknown-type status=02 used=0001 nr=0 canary=ok",
    "hostile partial-sector status=01 used=0001 nr=0 canary=ok",
    // Queue configuration, refused at DRIVER_OK.
    "hostile queue-size-0 init=00 nr=1 canary=ok",
    "hostile queue-size-3 init=00 nr=1 canary=ok",
    "hostile queue-size-above-max init=00 nr=1 canary=ok",
    "hostile desc-outside-ram init=00 nr=1 canary=ok",
    "hostile avail-straddles-ram-end init=00 nr=1 canary=ok",
    "hostile used-wraps init=00 nr=1 canary=ok",
    "hostile desc-misaligned init=00 nr=1 canary=ok",
    "hostile used-misaligned init=00 nr=1 canary=ok",
    "hostile notify-unknown-queue nr=0 canary=ok",
    "hostile avail-index-jump status=ee used=none nr=1 canary=ok",
    "hostile queue-regs-while-running nr=0 canary=ok",
    // MMIO and port I/O.
    "hostile mmio-unknown unknown-reads=0000000000000000 read-only-kept=1 nr=0",
    "hostile mmio-nowhere all-ones=1",
    "hostile pio-nowhere all-ones=1",
    // virtio-rng.
    "hostile rng-loop used=none nr=1 canary=ok",
    "hostile rng-next-out-of-range used=none nr=1 canary=ok",
    "hostile rng-outside-ram used=0000 nr=0 canary=ok",
    "hostile rng-straddles-ram-end used=0000 nr=0 canary=ok",
    "hostile rng-wraps used=0000 nr=0 canary=ok",
    "hostile rng-huge-length used=0000 nr=0 canary=ok",
    "hostile rng-zero-length used=0000 nr=0 canary=ok",
    "hostile rng-readonly-buffer used=0000 nr=0 canary=ok",
    "hostile rng-avail-index-jump used=none nr=1 canary=ok",
    // The same loop 50 times (0x32), each followed by a reset.
    "hostile repeat-50 stopped=32",
];

/// The disk: sector 1 holds 0x5a (what every recovery check reads), the rest a pattern
/// that must survive every hostile write attempt.
fn disk_content() -> Vec<u8> {
    let mut content: Vec<u8> = (0..DISK_SECTORS * 512).map(|i| (i % 251) as u8).collect();
    content[512..1024].fill(0x5a);
    content
}

/// The standard error of a child that ended (or is killed now).
fn stderr_of(child: &mut Child) -> String {
    let _ = child.kill();
    let _ = child.wait();
    let mut text = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut text);
    }
    text
}

fn wait_for(path: &Path, what: &str, child: &mut Child, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(what) {
            return text;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "grove-vmm ended ({status}) before the guest printed {what:?}; console:\n{text}\nstderr:\n{}",
                stderr_of(child)
            );
        }
        if Instant::now() > deadline {
            panic!(
                "no {what:?} after {timeout:?}; console:\n{text}\nstderr:\n{}",
                stderr_of(child)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running hostile-guest VMM, its console file and when it started.
struct Run {
    child: Child,
    client: ControlClient,
    console: PathBuf,
    started: Instant,
}

/// Starts `grove-vmm` with the test guest in `mode` and the device arguments `devices`.
fn start(tmp: &TempDir, mode: &str, devices: &[&OsStr]) -> Run {
    let console = tmp.join("console.txt");
    let sock = tmp.join("vm.sock");
    let started = Instant::now();
    let mut child = Command::new(VMM)
        .args(["run", "--kernel"])
        .arg(test_guest())
        .args(["--cmdline", &format!("test={mode}"), "--memory"])
        .arg(MEMORY_MIB.to_string())
        .args(devices)
        .arg("--serial")
        .arg(&console)
        .arg("--control")
        .arg(&sock)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let client = connect_control(&sock, &mut child);
    Run {
        child,
        client,
        console,
        started,
    }
}

/// Waits for the guest to finish its cases, checks that the VMM still serves its control
/// socket, lets the guest reset the machine and checks the clean exit, the log and its
/// bound (at most 10 lines per device per started 10 s window, plus one "suppressed" line
/// each, for `devices` devices the guest breaks). Returns the console output.
fn finish(mut run: Run, devices: u64) -> String {
    // The guest has run every case and now waits for a byte of console input.
    let out = wait_for(
        &run.console,
        "hostile-done\n",
        &mut run.child,
        Duration::from_secs(240),
    );
    assert!(
        run.child.try_wait().unwrap().is_none(),
        "the VMM is still running"
    );
    match run.client.request(Request::Status).unwrap() {
        Response::Status(s) => {
            assert_eq!(s.state, VmRunState::Running, "{s:?}");
            assert_eq!(s.memory_mib, MEMORY_MIB);
        }
        other => panic!("status: {other:?}"),
    }

    // Release the guest; it resets the machine: a clean exit.
    run.child.stdin.as_mut().unwrap().write_all(b"\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while run.child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the VMM did not exit after the guest reset"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let result = run.child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr).into_owned();
    let out = std::fs::read_to_string(&run.console).unwrap_or(out);
    assert_eq!(
        result.status.code(),
        Some(0),
        "stderr:\n{stderr}\nconsole:\n{out}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("VM exited: guest reset"), "{stderr}");
    assert!(out.contains("hostile-exit\n"), "{out}");

    // The log stays bounded although the guest broke its devices again and again.
    let windows = run.started.elapsed().as_secs() / 10 + 1;
    let bound = devices * windows * (10 + 1);
    let guest_caused = stderr
        .lines()
        .filter(|l| l.contains("DEVICE_NEEDS_RESET") || l.contains("were suppressed"))
        .count() as u64;
    assert!(guest_caused >= 1, "the misbehaviour is logged:\n{stderr}");
    assert!(
        guest_caused <= bound,
        "{guest_caused} guest-caused lines (at most {bound}):\n{stderr}"
    );
    // Nothing the guest did is an error of the VMM (nor logged by a crate without a limit).
    assert!(!stderr.contains(": error: "), "{stderr}");
    out
}

/// Every line of `expected` is in `out`, and no other case line: one per case.
fn assert_cases(out: &str, expected: &[&str]) {
    for line in expected {
        assert!(
            out.lines().any(|l| l == *line),
            "missing {line:?}; console:\n{out}"
        );
    }
    let cases: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("hostile ") && !l.starts_with("hostile-"))
        .collect();
    assert_eq!(cases.len(), expected.len(), "{out}");
    assert!(!out.contains("canary=BAD"), "{out}");
    assert!(!out.contains("ok=0"), "{out}");
}

/// After each case the device worked: directly, or after a reset exactly when it asked for
/// one. `shared` names the cases without a recovery line of their own.
fn assert_recovered(out: &str, expected: &[&str], shared: &[&str]) {
    for line in expected {
        let name = line.split(' ').nth(1).unwrap();
        if shared.contains(&name) {
            continue;
        }
        let needed_reset = line.contains(" nr=1");
        let recover = format!("recover {name} reset={} ok=1", u8::from(needed_reset));
        assert!(
            out.lines().any(|l| l == recover),
            "missing {recover:?}; console:\n{out}"
        );
    }
}

#[test]
fn hostile_guest_never_crashes_the_vmm_nor_reaches_outside_its_memory() {
    require_kvm();
    let tmp = TempDir::new("hostile");
    let disk = tmp.join("disk.img");
    let content = disk_content();
    std::fs::write(&disk, &content).unwrap();
    let run = start(&tmp, "hostile", &["--disk".as_ref(), disk.as_os_str()]);
    let out = finish(run, 2);

    // The guest found both devices and its RAM where the VMM put it.
    let start = format!("hostile-start ram-end={:08x} ", MEMORY_MIB << 20);
    assert!(out.contains(&start), "{out}");
    assert!(out.contains("blk-init=00\n"), "{out}");
    assert!(out.contains("rng-init=00\n"), "{out}");

    // Every case printed exactly what the policy says, and no case went unchecked. The
    // port-I/O and no-device cases share one recovery check; the repeated loop is reset by
    // the guest each time.
    assert_cases(&out, EXPECTED);
    assert_recovered(
        &out,
        EXPECTED,
        &["mmio-nowhere", "pio-nowhere", "repeat-50"],
    );
    assert!(out.contains("recover io-nowhere reset=0 ok=1\n"), "{out}");
    assert!(out.contains("recover repeat-50 reset=0 ok=1\n"), "{out}");

    // Not one byte of the disk changed: every hostile write was refused.
    assert_eq!(std::fs::read(&disk).unwrap(), content);
}

/// What each net and vsock case must print (`test=hostile-io`). Transmit chains always come
/// back with used length 0; `echo=1` means the frame reached the host (the host echoed it),
/// `rx=` lists the ops of the packets the vsock device answered with (3: RST; -: none) and
/// `conn-op=3` that a live connection was reset.
const EXPECTED_IO: &[&str] = &[
    // virtio-net transmit: ring corruption stops the device; a bad buffer is dropped.
    "hostile net-tx-loop used=none nr=1 echo=0 canary=ok",
    "hostile net-tx-next-out-of-range used=none nr=1 echo=0 canary=ok",
    "hostile net-tx-avail-index-jump used=none nr=1 echo=0 canary=ok",
    "hostile net-tx-outside-ram used=0000 nr=0 echo=0 canary=ok",
    "hostile net-tx-straddles-ram-end used=0000 nr=0 echo=0 canary=ok",
    "hostile net-tx-wraps used=0000 nr=0 echo=0 canary=ok",
    "hostile net-tx-huge-length used=0000 nr=0 echo=0 canary=ok",
    "hostile net-tx-zero-length used=0000 nr=0 echo=0 canary=ok",
    "hostile net-tx-too-short used=0000 nr=0 echo=0 canary=ok",
    "hostile net-tx-too-long used=0000 nr=0 echo=0 canary=ok",
    "hostile net-tx-device-writable used=0000 nr=0 echo=0 canary=ok",
    // Offloads nobody negotiated: the device sends the frame with an empty vnet header.
    "hostile net-tx-offload-header used=0000 nr=0 echo=1 canary=ok",
    // virtio-net receive: a buffer that cannot take the frame comes back empty, the frame
    // is dropped; a looping chain gets the frame in the buffers the loop names.
    "hostile net-rx-outside-ram used=0000 nr=0 canary=ok",
    "hostile net-rx-straddles-ram-end used=0000 nr=0 canary=ok",
    "hostile net-rx-wraps used=0000 nr=0 canary=ok",
    "hostile net-rx-huge-length used=0000 nr=0 canary=ok",
    "hostile net-rx-too-small used=0000 nr=0 canary=ok",
    "hostile net-rx-readonly used=0000 nr=0 canary=ok",
    "hostile net-rx-loop used=0048 nr=0 canary=ok",
    // virtio-vsock transmit: ring corruption stops the device; a packet that does not parse
    // is dropped (resetting the connection it names, below); one from another CID is
    // dropped silently; one to another CID, of another type or with an unknown op, and data
    // for no connection, get a RST.
    "hostile vsock-tx-loop used=none nr=1 rx=- canary=ok",
    "hostile vsock-tx-next-out-of-range used=none nr=1 rx=- canary=ok",
    "hostile vsock-tx-avail-index-jump used=none nr=1 rx=- canary=ok",
    "hostile vsock-tx-header-outside-ram used=0000 nr=0 rx=- canary=ok",
    "hostile vsock-tx-header-straddles-ram-end used=0000 nr=0 rx=- canary=ok",
    "hostile vsock-tx-header-wraps used=0000 nr=0 rx=- canary=ok",
    "hostile vsock-tx-header-short used=0000 nr=0 rx=- canary=ok",
    "hostile vsock-tx-header-device-writable used=0000 nr=0 rx=- canary=ok",
    "hostile vsock-tx-zero-length used=0000 nr=0 rx=- canary=ok",
    "hostile vsock-tx-spoofed-source-cid used=0000 nr=0 rx=- canary=ok",
    "hostile vsock-tx-other-destination-cid used=0000 nr=0 rx=3 canary=ok",
    "hostile vsock-tx-unknown-type used=0000 nr=0 rx=3 canary=ok",
    "hostile vsock-tx-unknown-op used=0000 nr=0 rx=3 canary=ok",
    "hostile vsock-tx-data-without-connection used=0000 nr=0 rx=3 canary=ok",
    // A data buffer far longer than RAM: the device reads only the header's length of it.
    "hostile vsock-tx-huge-length used=0000 nr=0 rx=3 canary=ok",
    "hostile vsock-tx-chain-over-4g used=none nr=1 rx=- canary=ok",
    // A packet that does not parse on a live connection resets it (RST to the guest, the
    // host's socket closed).
    "hostile vsock-conn-len-exceeds-data used=0000 nr=0 conn-op=3 canary=ok",
    "hostile vsock-conn-data-outside-ram used=0000 nr=0 conn-op=3 canary=ok",
    "hostile vsock-conn-data-device-writable used=0000 nr=0 conn-op=3 canary=ok",
    "hostile vsock-conn-len-above-max used=0000 nr=0 conn-op=3 canary=ok",
    // virtio-vsock receive: an unusable buffer comes back empty and the packet waits for
    // the next one.
    "hostile vsock-rx-outside-ram used=0000 nr=0 canary=ok",
    "hostile vsock-rx-straddles-ram-end used=0000 nr=0 canary=ok",
    "hostile vsock-rx-wraps used=0000 nr=0 canary=ok",
    "hostile vsock-rx-too-small used=0000 nr=0 canary=ok",
    "hostile vsock-rx-readonly used=0000 nr=0 canary=ok",
    "hostile vsock-rx-loop used=002c nr=0 canary=ok",
];

/// The host's side of the net cases: frames of ethertype 0x88b5 arriving on the TAP are
/// sent back with the addresses swapped; their payload markers are recorded.
struct Echo {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<u8>>,
}

/// Waits for the TAP `name` of this network namespace, brings it up and echoes on it.
fn echo_on_tap(name: &str, vmm: &mut Child) -> Echo {
    let cname = CString::new(name).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let index = loop {
        // SAFETY: if_nametoindex reads the NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if index != 0 {
            break index;
        }
        if let Some(status) = vmm.try_wait().unwrap() {
            panic!("grove-vmm ended before creating {name}: {status}");
        }
        assert!(Instant::now() < deadline, "no TAP {name}");
        std::thread::sleep(Duration::from_millis(10));
    };
    set_up(&cname);
    // SAFETY: socket() takes no pointers; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from((libc::ETH_P_ALL as u16).to_be()),
        )
    };
    assert!(
        fd >= 0,
        "packet socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd was just opened and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; all zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    addr.sll_ifindex = index as i32;
    // SAFETY: bind reads `addr`, whose size is passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 50_000,
    };
    // SAFETY: setsockopt reads the timeval, whose size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::addr_of!(timeout).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    assert_eq!(rc, 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut markers = Vec::new();
        let mut frame = [0u8; 2048];
        while !stopped.load(Ordering::Relaxed) {
            // SAFETY: as above.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: recvfrom writes at most frame.len() bytes into `frame` and at most
            // from_len bytes into `from`.
            let n = unsafe {
                libc::recvfrom(
                    fd.as_raw_fd(),
                    frame.as_mut_ptr().cast(),
                    frame.len(),
                    0,
                    std::ptr::addr_of_mut!(from).cast(),
                    &mut from_len,
                )
            };
            let Ok(n) = usize::try_from(n) else { continue };
            if from.sll_pkttype == libc::PACKET_OUTGOING || n < 15 || frame[12..14] != [0x88, 0xb5]
            {
                continue;
            }
            markers.push(frame[14]);
            let (dst, src) = frame.split_at_mut(6);
            dst.swap_with_slice(&mut src[..6]);
            // SAFETY: send reads n bytes of `frame`.
            let sent = unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), n, 0) };
            assert_eq!(
                sent,
                n as isize,
                "echo: {}",
                std::io::Error::last_os_error()
            );
        }
        markers
    });
    Echo { stop, thread }
}

/// Sets the interface `name` of this network namespace up.
fn set_up(name: &CString) {
    // SAFETY: socket() takes no pointers; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: fd was just opened and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write one ifreq, which `req` is.
    unsafe {
        assert_eq!(libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req), 0);
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(
            libc::ioctl(fd.as_raw_fd(), libc::SIOCSIFFLAGS, &req),
            0,
            "{}",
            std::io::Error::last_os_error()
        );
    }
}

/// The host's side of the vsock cases: listens on `<uds>_5000`, echoes what each connection
/// sends until it ends, and records how many bytes each one sent.
fn vsock_echo(uds: &Path, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<usize>> {
    let path = PathBuf::from(format!("{}_5000", uds.display()));
    let listener = UnixListener::bind(&path).unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let mut received = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let mut stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                Err(e) => panic!("accept: {e}"),
            };
            stream.set_nonblocking(false).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(60)))
                .unwrap();
            let mut total = 0;
            let mut buf = [0u8; 4096];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        total += n;
                        // The connection may be reset meanwhile: then there is nobody to echo to.
                        let _ = stream.write_all(&buf[..n]);
                    }
                    Err(e) => {
                        // A reset connection may end with ECONNRESET instead of EOF.
                        assert_ne!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock,
                            "connection not ended"
                        );
                        break;
                    }
                }
            }
            received.push(total);
        }
        received
    })
}

#[test]
fn hostile_guest_on_net_and_vsock_never_crashes_the_vmm_nor_reaches_outside_its_memory() {
    require_kvm();
    // A network namespace of its own: the TAP, and the echo on it, stay in there.
    std::thread::spawn(|| {
        // SAFETY: unshare moves only this thread into a new network namespace.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "this test needs root to create network namespaces: {}",
            std::io::Error::last_os_error()
        );
        // No IPv6 chatter from the host on the TAP (the guest skips foreign frames anyway).
        let _ = std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
        hostile_net_and_vsock();
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e));
}

fn hostile_net_and_vsock() {
    let tmp = TempDir::new("hostile-io");
    let uds = tmp.join("v.sock");
    let stop = Arc::new(AtomicBool::new(false));
    let listener = vsock_echo(&uds, stop.clone());
    let vsock = format!("3,{}", uds.display());
    let mut run = start(
        &tmp,
        "hostile-io",
        &[
            "--net".as_ref(),
            "tap0".as_ref(),
            "--vsock".as_ref(),
            vsock.as_ref(),
        ],
    );
    let echo = echo_on_tap("tap0", &mut run.child);
    wait_for(
        &run.console,
        "hostile-io-wait\n",
        &mut run.child,
        Duration::from_secs(60),
    );
    run.child.stdin.as_mut().unwrap().write_all(b"\n").unwrap();
    let out = finish(run, 2);
    echo.stop.store(true, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let markers = echo.thread.join().unwrap();
    let received = listener.join().unwrap();

    let start = format!("hostile-io-start ram-end={:08x} ", MEMORY_MIB << 20);
    assert!(out.contains(&start), "{out}");
    for line in [
        "net-init=00",
        "recover net-baseline reset=0 ok=1",
        "vsock-init=00 cid=03",
        "recover vsock-baseline reset=0 ok=1",
        "vsock-echo ok=1",
    ] {
        assert!(
            out.lines().any(|l| l == line),
            "missing {line:?}; console:\n{out}"
        );
    }
    assert_cases(&out, EXPECTED_IO);
    assert_recovered(&out, EXPECTED_IO, &[]);

    // What reached the host's end of the TAP: every good frame (markers 0x80 | case, 0xff
    // for the first), the frame whose offload header the device replaced (case 12), and the
    // frames of the receive cases (13 to 19), whose echoes the guest's broken buffers then
    // dropped. No frame of a refused transmit chain (cases 1 to 11) got out.
    let mut want = vec![0xffu8];
    want.extend(0x81..=0x8b);
    for case in 0x0c..=0x13u8 {
        want.extend([case, 0x80 | case]);
    }
    assert_eq!(markers, want, "{out}");
    // The host's port 5000 saw the five connections end: the echo one after its 5 bytes, the
    // four a bad packet reset before any data.
    let mut received = received;
    received.sort_unstable();
    assert_eq!(received, [0, 0, 0, 0, 5], "{out}");
}
