//! `grove-vmm run` on bad input: a one-line error naming the problem and exit code 2, before
//! any vCPU runs. And the happy path of the binary with the test guest.

use std::process::{Command, Output};

mod common;
use common::TempDir;

fn grove_vmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_grove-vmm"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("grove-vmm runs")
}

fn test_guest() -> String {
    common::test_guest().display().to_string()
}

/// Exit code 2, and stderr is exactly one line that contains every `needle`.
fn assert_bad_input(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.contains(": info: ")).collect();
    assert_eq!(lines.len(), 1, "one line of error, got: {stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "{:?} should mention {n:?}", lines[0]);
    }
    assert!(
        out.stdout.is_empty(),
        "no guest ran: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn missing_kernel() {
    let out = grove_vmm(&["run", "--kernel", "/nonexistent/vmlinux"]);
    assert_bad_input(&out, &["/nonexistent/vmlinux", "No such file"]);
}

#[test]
fn file_that_is_not_a_kernel() {
    let dir = TempDir::new("notkernel");
    let p = dir.join("random.bin");
    std::fs::write(&p, vec![0x5au8; 10_000]).unwrap();
    let out = grove_vmm(&["run", "--kernel", p.to_str().unwrap()]);
    assert_bad_input(&out, &["is not a kernel"]);
}

#[test]
fn zero_vcpus() {
    let out = grove_vmm(&["run", "--kernel", &test_guest(), "--vcpus", "0"]);
    assert_bad_input(&out, &["vcpus", "got 0"]);
    let out = grove_vmm(&["run", "--kernel", &test_guest(), "--vcpus", "33"]);
    assert_bad_input(&out, &["vcpus", "33"]);
}

#[test]
fn more_memory_than_the_host_has() {
    let out = grove_vmm(&["run", "--kernel", &test_guest(), "--memory", "100000000"]);
    assert_bad_input(&out, &["memory", "100000000 MiB", "host"]);
}

#[test]
fn unknown_config_field() {
    let dir = TempDir::new("cfg");
    let p = dir.join("vm.json");
    std::fs::write(&p, format!(r#"{{"kernel":"{}","vcpu":2}}"#, test_guest())).unwrap();
    let out = grove_vmm(&["run", "--config", p.to_str().unwrap()]);
    assert_bad_input(&out, &["unknown field `vcpu`", "vm.json"]);
}

#[test]
fn malformed_config() {
    let dir = TempDir::new("badjson");
    let p = dir.join("vm.json");
    std::fs::write(&p, "{ not json").unwrap();
    let out = grove_vmm(&["run", "--config", p.to_str().unwrap()]);
    assert_bad_input(&out, &["vm.json"]);
}

#[test]
fn unreadable_disk() {
    let out = grove_vmm(&[
        "run",
        "--kernel",
        &test_guest(),
        "--disk",
        "/nonexistent/disk.img",
    ]);
    assert_bad_input(&out, &["/nonexistent/disk.img"]);
    let dir = TempDir::new("dirdisk");
    let out = grove_vmm(&[
        "run",
        "--kernel",
        &test_guest(),
        "--rootfs",
        dir.0.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn unknown_flag_and_bad_disk_option() {
    let out = grove_vmm(&["run", "--kernel", &test_guest(), "--vcpu", "2"]);
    assert_bad_input(&out, &["--vcpu"]);
    let out = grove_vmm(&["run", "--kernel", &test_guest(), "--disk", "/tmp/x,rx"]);
    assert_bad_input(&out, &["rx"]);
    let out = grove_vmm(&["run"]);
    assert_bad_input(&out, &["--kernel"]);
}

#[test]
fn bad_vsock_flags() {
    let g = test_guest();
    let out = grove_vmm(&["run", "--kernel", &g, "--vsock", "/tmp/v.sock"]);
    assert_bad_input(&out, &["--vsock", "CID,PATH"]);
    let out = grove_vmm(&["run", "--kernel", &g, "--vsock", "three,/tmp/v.sock"]);
    assert_bad_input(&out, &["--vsock", "not a number"]);
    let out = grove_vmm(&["run", "--kernel", &g, "--vsock", "2,/tmp/v.sock"]);
    assert_bad_input(&out, &["guest_cid", "got 2"]);
    let out = grove_vmm(&["run", "--kernel", &g, "--vsock", "3,"]);
    assert_bad_input(&out, &["--vsock", "empty"]);
}

#[test]
fn bad_network_devices_are_refused_before_the_vm_runs() {
    let run = |net: &str| grove_vmm(&["run", "--kernel", &test_guest(), "--net", net]);
    assert_bad_input(&run("tap0,06:00:ac:10:00"), &["tap0", "not a MAC address"]);
    assert_bad_input(&run("tap0,01:00:5e:00:00:01"), &["multicast"]);
    assert_bad_input(&run("name-longer-than-15"), &["at most 15 bytes"]);
    assert_bad_input(&run("tap0,"), &["--net", "TAP[,MAC]"]);
    let out = grove_vmm(&[
        "run",
        "--kernel",
        &test_guest(),
        "--net",
        "tap0",
        "--net",
        "tap0",
    ]);
    assert_bad_input(&out, &["tap0", "attached twice"]);
}

#[test]
fn boots_the_test_guest_and_exits_zero_on_guest_reset() {
    let out = grove_vmm(&[
        "run",
        "--kernel",
        &test_guest(),
        "--memory",
        "32",
        "--cmdline",
        "test=serial",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stdout.contains("hello from the test guest"), "{stdout}");
    assert!(stderr.contains("guest boot complete:"), "{stderr}");
}

#[test]
fn guest_failure_exits_one() {
    let out = grove_vmm(&[
        "run",
        "--kernel",
        &test_guest(),
        "--memory",
        "32",
        "--cmdline",
        "test=triple-fault",
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn serial_to_a_file() {
    let dir = TempDir::new("serial");
    let log = dir.join("console.log");
    let out = grove_vmm(&[
        "run",
        "--kernel",
        &test_guest(),
        "--memory",
        "32",
        "--cmdline",
        "test=serial",
        "--serial",
        log.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty());
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("hello from the test guest"));
}

#[test]
fn a_disk_in_use_by_another_vm_is_refused() {
    let dir = TempDir::new("locked");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    let disk = disk.to_str().unwrap().to_string();
    let mut first = Command::new(env!("CARGO_BIN_EXE_grove-vmm"))
        .args([
            "run",
            "--kernel",
            &test_guest(),
            "--memory",
            "32",
            "--cmdline",
            "test=counter",
            "--disk",
            &disk,
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the first VMM has opened (and locked) the disk: it logs boot completion.
    let mut stderr = first.stderr.take().unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 256];
    while !seen.contains("guest boot complete") {
        use std::io::Read;
        let n = stderr.read(&mut buf).unwrap();
        assert!(n > 0, "first VMM ended early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let out = grove_vmm(&[
        "run",
        "--kernel",
        &test_guest(),
        "--memory",
        "32",
        "--disk",
        &disk,
    ]);
    first.kill().unwrap();
    first.wait().unwrap();
    assert_bad_input(&out, &["in use by another VM", &disk]);
}

#[test]
fn corrupt_and_unsafe_qcow2_images_are_refused_with_one_line() {
    let dir = TempDir::new("badqcow2");
    let vmm = env!("CARGO_BIN_EXE_grove-vmm");
    let base = dir.join("base.raw");
    std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    let overlay = dir.join("overlay.qcow2");
    let out = grove_vmm(&[
        "disk",
        "create",
        overlay.to_str().unwrap(),
        "--backing",
        base.to_str().unwrap(),
        "--backing-format",
        "raw",
    ]);
    assert!(out.status.success(), "{out:?}");
    let disk = |opts: &str| format!("{}{opts}", overlay.display());
    // A backing file without permission to follow it.
    let out = grove_vmm(&["run", "--kernel", &test_guest(), "--disk", &disk(",qcow2")]);
    assert_bad_input(&out, &["overlay.qcow2", "allow_backing"]);
    // An L2 table pointing far outside the file: patch L1 entry 0 (the L1 table offset
    // is at header byte 40).
    let mut image = std::fs::read(&overlay).unwrap();
    let l1 = u64::from_be_bytes(image[40..48].try_into().unwrap()) as usize;
    image[l1..l1 + 8].copy_from_slice(&((1u64 << 40) | (1 << 63)).to_be_bytes());
    let corrupt = dir.join("corrupt.qcow2");
    std::fs::write(&corrupt, &image).unwrap();
    let spec = format!("{},qcow2,backing", corrupt.display());
    let out = grove_vmm(&["run", "--kernel", &test_guest(), "--disk", &spec]);
    assert_bad_input(&out, &["corrupt.qcow2", "outside the file"]);
    // A raw disk is never probed, even when it holds a qcow2 header: the VM starts with it
    // as raw (the `serial` scenario prints and resets, exit 0).
    let out = Command::new(vmm)
        .args([
            "run",
            "--kernel",
            &test_guest(),
            "--cmdline",
            "test=serial",
            "--disk",
            &format!("{},raw", corrupt.display()),
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}
