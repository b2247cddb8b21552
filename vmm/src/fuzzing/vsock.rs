//! The vsock target: the whole device on an event loop, as in a VM. The guest side is a
//! driver script (packets on the transmit queue, buffers on the receive and event queues);
//! the host side is a service listening on port 52 and clients of the device's Unix socket,
//! driven by the same script.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};

use super::virtio::{guest_memory, Script, Step};
use crate::config::VsockConfig;
use crate::device_manager::Subscriber;
use crate::devices::virtio::device_state::PauseGate;
use crate::devices::virtio::{VirtioDevice, Vsock};

/// The host port the guest finds a service on.
const SERVICE_PORT: u32 = 52;
/// The guest's CID.
const GUEST_CID: u32 = 3;

/// A directory for one run's sockets, removed when dropped.
struct SocketDir(PathBuf);

impl SocketDir {
    fn new() -> Option<Self> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("grove-fuzz-vsock-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        Some(Self(dir))
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Guest packets and host socket activity in the order the input says; see the module docs.
pub fn vsock_packets(data: &[u8]) {
    // As in the VMM binary, where Rust's runtime ignores SIGPIPE before `main`: the device
    // writes guest data to host sockets with write(2) (vm-memory's `WriteVolatile`), so a host
    // end that closed first must give EPIPE, not kill the process. libFuzzer's own `main`
    // leaves SIGPIPE at its default, which killed a long run silently.
    static IGNORE_SIGPIPE: std::sync::Once = std::sync::Once::new();
    IGNORE_SIGPIPE.call_once(|| {
        // SAFETY: SIG_IGN installs no handler code; only the disposition of SIGPIPE changes.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    });
    let Some(mem) = guest_memory() else { return };
    let Some(dir) = SocketDir::new() else { return };
    let uds_path = dir.0.join("v.sock");
    let Ok(service) = UnixListener::bind(dir.0.join(format!("v.sock_{SERVICE_PORT}"))) else {
        return;
    };
    if service.set_nonblocking(true).is_err() {
        return;
    }
    let config = VsockConfig {
        guest_cid: GUEST_CID,
        uds_path: uds_path.clone(),
    };
    let Ok(mut vsock) = Vsock::new(&config) else {
        return;
    };
    let gate = PauseGate::default();
    gate.set_closed(false);
    vsock.set_pause_gate(gate);

    let mut script = Script::new(data);
    let features = script.features() & vsock.avail_features();
    vsock.set_acked_features(features);
    let Some(ctx) = script.activate(&mem, 3) else {
        return;
    };
    if vsock.activate(ctx).is_err() {
        return;
    }
    let kicks: Vec<_> = match vsock
        .queue_events()
        .iter()
        .map(|e| e.try_clone())
        .collect::<Result<_, _>>()
    {
        Ok(k) => k,
        Err(_) => return,
    };
    let vsock: Subscriber = Arc::new(Mutex::new(vsock));
    let Ok(mut manager) = EventManager::<Subscriber>::new() else {
        return;
    };
    manager.add_subscriber(vsock);
    let run = |manager: &mut EventManager<Subscriber>| {
        for _ in 0..4 {
            match manager.run_with_timeout(0) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    };
    run(&mut manager);

    // Host ends: accepted service connections and clients of the device's socket.
    let mut streams: Vec<UnixStream> = Vec::new();
    while let Some(step) = script.step(&mem) {
        match step {
            Step::Poked => continue,
            Step::Notify(n) => {
                let _ = kicks[n % kicks.len()].write(1);
            }
            Step::Other(n) => match n % 4 {
                0 => {
                    if let Ok(mut client) = UnixStream::connect(&uds_path) {
                        let line: &[u8] = if n & 0x80 == 0 {
                            b"CONNECT 1024\n"
                        } else {
                            b"CONNECT nope\n"
                        };
                        let _ = client.write_all(line);
                        let _ = client.set_nonblocking(true);
                        streams.push(client);
                    }
                }
                1 => {
                    while let Ok((s, _)) = service.accept() {
                        let _ = s.set_nonblocking(true);
                        streams.push(s);
                    }
                    for s in &mut streams {
                        let _ = s.write(&[n; 64]);
                    }
                }
                2 => {
                    let mut buf = [0u8; 4096];
                    for s in &mut streams {
                        while matches!(s.read(&mut buf), Ok(k) if k > 0) {}
                    }
                }
                _ => streams.clear(),
            },
        }
        run(&mut manager);
    }
    for kick in &kicks {
        let _ = kick.write(1);
    }
    run(&mut manager);
}
