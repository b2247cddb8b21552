//! `groved --snapshot-key` at startup: a key file that is missing, too short or readable by
//! others stops the daemon with one line and a non-zero exit before it serves anything, and
//! `--require-signed-snapshots` needs a key. No VM is started.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs groved in `dir` with `args`; one still running after 30 s is killed and fails.
fn groved(dir: &Path, args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_groved"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--socket")
        .arg(dir.join("groved.sock"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start groved");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "groved {args:?} kept running: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn assert_fails(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    for n in needles {
        assert!(lines[0].contains(n), "{:?} should mention {n:?}", lines[0]);
    }
}

#[test]
fn bad_snapshot_keys_stop_the_daemon_at_startup() {
    let dir = std::env::temp_dir().join(format!("grove-groved-key-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let s = Scratch(dir);
    let key = s.0.join("snapshot.key");
    let key_s = key.to_str().unwrap();

    let out = groved(&s.0, &["--snapshot-key", key_s]);
    assert_eq!(out.status.code(), Some(2));
    assert_fails(&out, &["cannot read snapshot key", key_s]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");

    std::fs::write(&key, [9u8; 32]).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = groved(
        &s.0,
        &["--snapshot-key", key_s, "--require-signed-snapshots"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert_fails(&out, &[key_s, "chmod 600"]);

    std::fs::write(&key, [9u8; 31]).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = groved(&s.0, &["--snapshot-key", key_s]);
    assert_fails(&out, &[key_s, "at least 32"]);
    assert!(!s.0.join("groved.sock").exists(), "it never listened");

    // clap's own (multi-line) usage error.
    let out = groved(&s.0, &["--require-signed-snapshots"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--snapshot-key <FILE>"));
}
