//! `cargo boot-default`: the main job on a fresh Debian host. Installs the host packages the
//! image build needs (when run as root), builds the default image set if it is not cached,
//! builds `grove-vmm`, and boots the default image with the console attached.
//!
//! Arguments after `--` go to `grove-vmm run` (for example `-- --vcpus 2`). The root
//! filesystem is a private copy, so writes in the guest never reach the cached image.

use std::process::Command;

use anyhow::Context;
use grove_integration::{build_release_vmm, ensure_host_packages, sparse_copy};

fn main() -> anyhow::Result<()> {
    ensure_host_packages("boot-default")?;
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
