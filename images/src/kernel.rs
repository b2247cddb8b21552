//! The guest kernel: Debian's linux-source-6.1, the project's patches and
//! config fragment, built out of tree in the cache.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::apt;
use crate::cmd::{self, progress};
use crate::error::ImagesError;
use crate::inputs::{self, Input};
use crate::kconfig;
use crate::key::PackageVersion;

/// Files of a finished kernel directory.
pub(crate) const OUTPUTS: [&str; 4] = ["vmlinux", "bzImage", "config", "System.map"];

/// Member of the linux-source .deb that holds the source tarball.
const SOURCE_TARBALL: &str = "./usr/src/linux-source-6.1.tar.xz";
/// Top-level directory inside the source tarball.
const SOURCE_DIR: &str = "linux-source-6.1";

/// `uname -v` date, user and host of the build, fixed for reproducibility.
const BUILD_TIMESTAMP: &str = "Mon Jan  1 00:00:00 UTC 2024";

/// Environment variables that would change what the kernel's make does.
const MAKE_ENV_REMOVE: [&str; 16] = [
    "MAKEFLAGS",
    "MFLAGS",
    "MAKELEVEL",
    "MAKEOVERRIDES",
    "GNUMAKEFLAGS",
    "ARCH",
    "SRCARCH",
    "CROSS_COMPILE",
    "KBUILD_OUTPUT",
    "KBUILD_EXTMOD",
    "KCONFIG_CONFIG",
    "KCFLAGS",
    "KCPPFLAGS",
    "KAFLAGS",
    "LLVM",
    "CC",
];

/// Programs used by the kernel build.
pub(crate) struct Tools {
    dpkg_deb: PathBuf,
    tar: PathBuf,
    patch: PathBuf,
    make: PathBuf,
}

/// Checks up front that everything the kernel build needs is installed.
pub(crate) fn check_tools() -> Result<Tools, ImagesError> {
    if std::env::consts::ARCH != "x86_64" {
        return Err(ImagesError::Unexpected(format!(
            "the guest kernel is built natively for x86_64, but this host is {}",
            std::env::consts::ARCH
        )));
    }
    let tools = Tools {
        dpkg_deb: cmd::require_tool("dpkg-deb", "dpkg")?,
        tar: cmd::require_tool("tar", "tar")?,
        patch: cmd::require_tool("patch", "patch")?,
        make: cmd::require_tool("make", "make")?,
    };
    cmd::require_tool("apt-get", "apt")?;
    cmd::require_tool("xz", "xz-utils")?;
    cmd::require_tool("gcc", "gcc")?;
    cmd::require_tool("ld", "binutils")?;
    cmd::require_tool("bc", "bc")?;
    cmd::require_tool("bison", "bison")?;
    cmd::require_tool("flex", "flex")?;
    cmd::require_file("/usr/include/libelf.h", "libelf-dev")?;
    cmd::require_file("/usr/include/openssl/ssl.h", "libssl-dev")?;
    Ok(tools)
}

/// Whether `dir` holds a finished kernel.
pub(crate) fn is_complete(dir: &Path) -> bool {
    OUTPUTS.iter().all(|name| dir.join(name).is_file())
}

/// Builds the kernel into `out` (`<cache>/kernel/<key>`): download and
/// extract the source, patch, configure, verify the configuration, compile.
/// Work happens in `<out>.work` (kept on failure, for its logs; deleted after
/// success); the outputs appear in `out` by one rename.
pub(crate) fn build(
    cache_dir: &Path,
    out: &Path,
    source: &PackageVersion,
    tools: &Tools,
) -> Result<(), ImagesError> {
    let started = Instant::now();
    let work = cmd::sibling(out, "work");
    cmd::remove_dir_if_exists(&work)?;
    cmd::create_dir_all(&work)?;

    let deb = apt::download(cache_dir, source)?;

    progress(format_args!(
        "kernel: extracting {} {}",
        source.name, source.version
    ));
    cmd::extract_deb(&tools.dpkg_deb, &tools.tar, &deb, &work, &[SOURCE_TARBALL])?;
    let tarball = work.join(SOURCE_TARBALL);
    cmd::run_captured(
        Command::new(&tools.tar)
            .arg("-xf")
            .arg(&tarball)
            .arg("-C")
            .arg(&work),
        "extracting the kernel source tarball",
    )?;
    cmd::remove_dir_if_exists(&work.join("usr"))?;
    let src = work.join(SOURCE_DIR);
    if !src.join("Makefile").is_file() {
        return Err(ImagesError::Unexpected(format!(
            "{} does not contain {SOURCE_DIR}/Makefile: unexpected layout of {}",
            tarball.display(),
            deb.display()
        )));
    }

    let inputs = inputs::kernel();
    apply_patches(&src, &work, &inputs, &source.version, tools)?;

    let fragment = inputs
        .iter()
        .find(|input| input.path == inputs::FRAGMENT)
        .ok_or_else(|| {
            ImagesError::Unexpected(format!("images/{} is missing", inputs::FRAGMENT))
        })?;
    let fragment_text = std::str::from_utf8(fragment.contents).map_err(|_| {
        ImagesError::Unexpected(format!("images/{} is not UTF-8", inputs::FRAGMENT))
    })?;
    let requirements = kconfig::parse_fragment(fragment_text)?;
    let fragment_path = work.join("microvm.fragment");
    cmd::write_file(&fragment_path, fragment.contents)?;

    let build = work.join("build");
    cmd::create_dir_all(&build)?;
    progress("kernel: configuring (make allnoconfig with KCONFIG_ALLCONFIG=microvm.fragment)");
    let mut configure = make(tools, &src, &build);
    configure
        .arg(format!("KCONFIG_ALLCONFIG={}", fragment_path.display()))
        .arg("allnoconfig");
    cmd::run_logged(
        &mut configure,
        "kernel configuration",
        &work.join("make-allnoconfig.log"),
    )?;

    let config_path = build.join(".config");
    let config = std::fs::read_to_string(&config_path)
        .map_err(|e| ImagesError::io("read", &config_path, e))?;
    let mismatches = kconfig::verify(&requirements, &config);
    if !mismatches.is_empty() {
        return Err(ImagesError::ConfigMismatch {
            config: config_path,
            mismatches,
        });
    }
    progress(format_args!(
        "kernel: all {} fragment lines hold in the resolved .config",
        requirements.len()
    ));

    let jobs = std::thread::available_parallelism().map_or(1, usize::from);
    let log = work.join("make-build.log");
    progress(format_args!(
        "kernel: compiling (make -j{jobs} vmlinux bzImage; several minutes on 2 cores; log: {})",
        log.display()
    ));
    let mut compile = make(tools, &src, &build);
    compile
        .arg(format!("-j{jobs}"))
        .args(["vmlinux", "bzImage"]);
    cmd::run_logged(&mut compile, "kernel build", &log)?;

    let tmp = cmd::sibling(out, "tmp");
    cmd::remove_dir_if_exists(&tmp)?;
    cmd::create_dir_all(&tmp)?;
    for (from, to) in [
        ("vmlinux", "vmlinux"),
        ("arch/x86/boot/bzImage", "bzImage"),
        (".config", "config"),
        ("System.map", "System.map"),
    ] {
        cmd::rename(&build.join(from), &tmp.join(to))?;
    }
    cmd::rename(&tmp, out)?;
    progress("kernel: removing the source and build tree");
    cmd::remove_dir_if_exists(&work)?;
    progress(format_args!(
        "kernel: built in {} -> {}",
        cmd::elapsed(started),
        out.display()
    ));
    Ok(())
}

/// Applies `kernel/patches/*.patch` in file name order with
/// `patch -p1 --forward`; the first one that does not apply fails the build.
fn apply_patches(
    src: &Path,
    work: &Path,
    inputs: &[Input],
    version: &str,
    tools: &Tools,
) -> Result<(), ImagesError> {
    let patch_dir = work.join("patches");
    cmd::create_dir_all(&patch_dir)?;
    let mut patches: Vec<&Input> = inputs
        .iter()
        .filter(|input| input.path.starts_with(inputs::PATCH_DIR) && input.path.ends_with(".patch"))
        .collect();
    patches.sort_by_key(|input| input.path);
    for patch in patches {
        let name = patch.path.trim_start_matches(inputs::PATCH_DIR);
        progress(format_args!("kernel: applying {name}"));
        let file = patch_dir.join(name);
        cmd::write_file(&file, patch.contents)?;
        let result = cmd::run_captured(
            Command::new(&tools.patch)
                .args([
                    "-p1",
                    "--forward",
                    "--batch",
                    "--no-backup-if-mismatch",
                    "-d",
                ])
                .arg(src)
                .arg("-i")
                .arg(&file),
            "patch",
        );
        if let Err(error) = result {
            let output = match error {
                ImagesError::CommandFailed { output, .. } => output,
                other => return Err(other),
            };
            return Err(ImagesError::PatchFailed {
                patch: name.to_owned(),
                version: version.to_owned(),
                output,
            });
        }
    }
    Ok(())
}

/// `make -C <src> O=<build> ARCH=x86` with a clean, reproducible environment.
fn make(tools: &Tools, src: &Path, build: &Path) -> Command {
    let mut command = Command::new(&tools.make);
    for var in MAKE_ENV_REMOVE {
        command.env_remove(var);
    }
    command
        .env("KBUILD_BUILD_TIMESTAMP", BUILD_TIMESTAMP)
        .env("KBUILD_BUILD_USER", "grove")
        .env("KBUILD_BUILD_HOST", "grove")
        .env("KBUILD_BUILD_VERSION", "1")
        .arg("-C")
        .arg(src)
        .arg(format!("O={}", build.display()))
        .arg("ARCH=x86");
    command
}
