//! `cargo boot-default`: the main job on a fresh Debian host. Installs the host packages the
//! image build needs (when run as root), builds the default image set if it is not cached,
//! builds `grove-vmm`, and boots the default image with the console attached.
//!
//! Arguments after `--` go to `grove-vmm run` (for example `-- --vcpus 2`). The root
//! filesystem is a private copy, so writes in the guest never reach the cached image.

use std::process::Command;

use anyhow::{bail, Context};
use grove_integration::{build_release_vmm, sparse_copy};

const PACKAGES: &str = include_str!("../../../images/host-packages.txt");

fn missing_packages() -> Vec<&'static str> {
    PACKAGES
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter(|pkg| {
            let out = Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]).output();
            !matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect()
}

fn ensure_packages() -> anyhow::Result<()> {
    let missing = missing_packages();
    if missing.is_empty() {
        return Ok(());
    }
    // Root can install; everyone else is told how.
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    if !is_root {
        bail!(
            "missing host packages: {}; install them with: sudo apt-get install -y {}",
            missing.join(" "),
            missing.join(" ")
        );
    }
    eprintln!(
        "boot-default: installing host packages: {}",
        missing.join(" ")
    );
    let ok = Command::new("apt-get").arg("update").status()?.success()
        && Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .status()?
            .success();
    if !ok {
        bail!("apt-get could not install: {}", missing.join(" "));
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    ensure_packages()?;
    let cache = grove_images::default_cache_dir()?;
    let images = grove_images::build_default(&cache).context("building the default images")?;
    let vmm = build_release_vmm()?;

    let work = std::env::temp_dir().join(format!("grove-boot-default-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let rootfs = work.join("rootfs.ext4");
    sparse_copy(&images.rootfs, &rootfs);
    eprintln!(
        "boot-default: booting {} with a private copy of {} (type `poweroff` to leave)",
        images.vmlinux.display(),
        images.rootfs.display()
    );
    let status = Command::new(&vmm)
        .arg("run")
        .arg("--kernel")
        .arg(&images.vmlinux)
        .arg("--rootfs")
        .arg(&rootfs)
        .args(std::env::args_os().skip(1))
        .status()
        .with_context(|| format!("cannot run {}", vmm.display()));
    let _ = std::fs::remove_dir_all(&work);
    std::process::exit(status?.code().unwrap_or(1));
}
