//! Helpers shared by the VMM's integration tests (each test file includes this module).
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Guest console output captured in memory.
#[derive(Clone, Default)]
pub struct Console(Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Console {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Fails the test with a clear message when this host has no KVM.
pub fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "this test needs KVM: /dev/kvm is missing on this host"
    );
}

/// The test guest ELF built by vmm/build.rs.
pub fn test_guest() -> PathBuf {
    let path = env!("GROVE_TEST_GUEST");
    assert!(
        !path.is_empty(),
        "the test guest was not built (see the build warning of vmm)"
    );
    PathBuf::from(path)
}

/// A scratch directory removed when the test ends.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("grove-vmm-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A control client for the `grove-vmm` process `child` serving `sock`: waits up to 30 s
/// for the socket, and fails at once if the process ends first.
pub fn connect_control(
    sock: &Path,
    child: &mut std::process::Child,
) -> vmm::control::client::ControlClient {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Ok(c) = vmm::control::client::ControlClient::connect(sock) {
            return c;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("grove-vmm ended before serving its socket: {status}");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no control socket at {sock:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
