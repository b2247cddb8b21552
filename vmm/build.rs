//! Builds the tiny test guest (tests/guest) used by the KVM tests: a freestanding ELF that
//! the VMM boots through its real Linux 64-bit boot path. Needs only the C toolchain that
//! Rust already links with. If it cannot be built, the library still builds; the KVM tests
//! then fail naming the problem.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let elf = out.join("test-guest.elf");
    println!("cargo:rerun-if-changed=tests/guest/guest.c");
    println!("cargo:rerun-if-changed=tests/guest/start.S");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args([
            "-m64",
            "-O1",
            "-ffreestanding",
            "-fno-pic",
            "-no-pie",
            "-nostdlib",
            "-static",
            "-fno-stack-protector",
            "-fno-asynchronous-unwind-tables",
            "-fcf-protection=none",
            "-mno-red-zone",
            "-mgeneral-regs-only",
            "-Wall",
            "-Werror",
            "-Wl,--build-id=none",
            "-Wl,-Ttext-segment=0x200000",
            "-Wl,-e,_start",
            "-o",
        ])
        .arg(&elf)
        .args(["tests/guest/start.S", "tests/guest/guest.c"])
        .status();
    match status {
        Ok(s) if s.success() => {
            println!("cargo:rustc-env=GROVE_TEST_GUEST={}", elf.display());
        }
        other => {
            println!("cargo:warning=cannot build the test guest with {cc}: {other:?}; KVM tests will fail");
            println!("cargo:rustc-env=GROVE_TEST_GUEST=");
        }
    }
}
