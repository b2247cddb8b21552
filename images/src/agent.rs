//! The guest agent binary (`/usr/bin/grove-agent`): built by a nested cargo from this
//! workspace's `agent/` crate, statically linked, in its own target directory.
//!
//! The root filesystem key covers everything this build depends on without running
//! anything: the agent's sources, the workspace `Cargo.toml`/`Cargo.lock`, the toolchain
//! file and `.cargo/config.toml` (embedded by `build.rs`), the `rustc -V` of the compiler
//! that built grove-images, and [`RECIPE`] (the command and flags). Before building, the
//! sources on disk are checked against the embedded ones, and the compiler the nested
//! cargo will use against the embedded version, so the binary is always what the key says.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cmd::{self, progress};
use crate::error::ImagesError;
use crate::inputs;
use crate::key::PackageVersion;

/// The only target the guest needs (and the only one installed on the build hosts).
const TARGET: &str = "x86_64-unknown-linux-gnu";
/// Where the binary goes in the image.
pub(crate) const IMAGE_PATH: &str = "usr/bin/grove-agent";
/// Target directory below the workspace: separate from `target/` so that the host
/// builds' artefacts are not invalidated by these flags, and the other way round.
const TARGET_DIR: &str = "target/guest";

/// How the binary is built, as a key input. Machine-specific paths are placeholders: the
/// `--remap-path-prefix` flags make the binary independent of them.
pub(crate) const RECIPE: &str = "cargo build --release --locked -p grove-agent --bin grove-agent \
     --target x86_64-unknown-linux-gnu; rustflags: -C target-feature=+crt-static \
     -C relocation-model=static -C strip=symbols --remap-path-prefix=<workspace>=/grove \
     --remap-path-prefix=<cargo home>=/cargo";

/// Environment variables the nested cargo keeps among those starting with `CARGO_`:
/// where cargo lives and how it reaches registries. Every other `CARGO_*` variable
/// (`CARGO_TARGET_DIR`, `CARGO_BUILD_*`, `CARGO_PROFILE_*`, `CARGO_ENCODED_RUSTFLAGS`,
/// the package variables cargo sets for the running test or binary, ...) is removed: it
/// would change where or how the agent is built without changing the key.
const KEPT_CARGO_VARS: [&str; 6] = [
    "CARGO_HOME",
    "CARGO_NET_",
    "CARGO_HTTP_",
    "CARGO_REGISTRIES_",
    "CARGO_REGISTRY_",
    "CARGO_TERM_",
];
/// Other variables removed for the same reason (and the jobserver of an outer make/cargo).
const REMOVED_VARS: [&str; 7] = [
    "RUSTFLAGS",
    "RUSTDOCFLAGS",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "MAKEFLAGS",
    "MFLAGS",
    "CARGO_MAKEFLAGS",
];

/// The `rustc -V` of the toolchain, as a key input.
pub(crate) fn rustc_version() -> PackageVersion {
    PackageVersion {
        name: "rustc",
        version: inputs::RUSTC_VERSION.to_owned(),
    }
}

/// The build recipe, as a key input.
pub(crate) fn recipe() -> PackageVersion {
    PackageVersion {
        name: "grove-agent build",
        version: RECIPE.to_owned(),
    }
}

/// The workspace this crate was compiled in (the parent of `images/`).
fn workspace_dir() -> PathBuf {
    let images = Path::new(env!("CARGO_MANIFEST_DIR"));
    images.parent().unwrap_or(images).to_owned()
}

/// The cargo to run: `$CARGO` (set by cargo for the programs and tests it runs) if it
/// exists, else `cargo` from `PATH`.
pub(crate) fn find_cargo() -> Result<PathBuf, ImagesError> {
    if let Some(cargo) = std::env::var_os("CARGO").map(PathBuf::from) {
        if cargo.is_file() {
            return Ok(cargo);
        }
    }
    cmd::find_tool("cargo").ok_or(ImagesError::NoCargo)
}

/// Checks that the agent sources on disk are exactly the ones embedded at compile time
/// (and so covered by the key).
fn check_sources(workspace: &Path) -> Result<(), ImagesError> {
    let changed = |path: &str| ImagesError::AgentSourcesChanged {
        path: workspace.join(path.trim_start_matches("../")),
    };
    let embedded = inputs::agent();
    for input in &embedded {
        let path = workspace.join(input.path.trim_start_matches("../"));
        match fs::read(&path) {
            Ok(bytes) if bytes == input.contents => {}
            _ => return Err(changed(input.path)),
        }
    }
    // A source file added since (build.rs skips hidden files and editor backups too).
    let mut pending = vec![workspace.join("agent/src")];
    while let Some(dir) = pending.pop() {
        let entries = fs::read_dir(&dir).map_err(|e| ImagesError::io("read", &dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| ImagesError::io("read", &dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name.ends_with('~') {
                continue;
            }
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            let rel = path
                .strip_prefix(workspace)
                .map(|p| format!("../{}", p.to_string_lossy()))
                .unwrap_or_default();
            if !embedded.iter().any(|input| input.path == rel) {
                return Err(changed(&rel));
            }
        }
    }
    Ok(())
}

/// A command with the environment cleaned for a nested cargo or rustc.
fn clean_command(program: impl AsRef<OsStr>, workspace: &Path) -> Command {
    let mut command = Command::new(program);
    command.current_dir(workspace);
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let cargo_var = name.starts_with("CARGO_") || name.starts_with("__CARGO");
        let kept = KEPT_CARGO_VARS
            .iter()
            .any(|keep| name == *keep || (keep.ends_with('_') && name.starts_with(keep)));
        if (cargo_var && !kept) || REMOVED_VARS.contains(&name.as_ref()) {
            command.env_remove(name.as_ref());
        }
    }
    command
}

/// `$CARGO_HOME`, else `$HOME/.cargo`.
fn cargo_home() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
}

/// Whether `bytes` is an x86-64 ELF executable without a `PT_INTERP` program header, i.e.
/// one the kernel starts without a dynamic loader. `Err` says why it is not an ELF
/// executable at all.
pub(crate) fn is_static_elf(bytes: &[u8]) -> Result<bool, String> {
    const PT_INTERP: u32 = 3;
    let u16_at = |at: usize| {
        bytes
            .get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u64_at = |at: usize| {
        bytes
            .get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    if !bytes.starts_with(b"\x7fELF") || bytes.get(4..6) != Some(&[2, 1]) {
        return Err("not a 64-bit little-endian ELF file".to_owned());
    }
    if u16_at(18) != Some(62) {
        return Err("not an x86-64 ELF file".to_owned());
    }
    let truncated = || "truncated ELF header".to_owned();
    let phoff = usize::try_from(u64_at(32).ok_or_else(truncated)?).map_err(|_| truncated())?;
    let phentsize = usize::from(u16_at(54).ok_or_else(truncated)?);
    let phnum = usize::from(u16_at(56).ok_or_else(truncated)?);
    for i in 0..phnum {
        let at = i
            .checked_mul(phentsize)
            .and_then(|o| o.checked_add(phoff))
            .ok_or_else(truncated)?;
        let kind = bytes
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| "truncated program headers".to_owned())?;
        if kind == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Builds the static agent binary and returns its contents. `log` receives cargo's output.
pub(crate) fn build(cargo: &Path, log: &Path) -> Result<Vec<u8>, ImagesError> {
    let workspace = workspace_dir();
    if !workspace.join("agent/Cargo.toml").is_file() {
        return Err(ImagesError::AgentSourcesMissing { workspace });
    }
    check_sources(&workspace)?;

    // The compiler the nested cargo will run must be the one the key names.
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let version = cmd::run_captured(
        clean_command(&rustc, &workspace).arg("-V"),
        "asking rustc its version",
    )?;
    if version.trim() != inputs::RUSTC_VERSION {
        return Err(ImagesError::RustcChanged {
            compiled_with: inputs::RUSTC_VERSION.to_owned(),
            found: version.trim().to_owned(),
        });
    }

    // Static and not position-independent: no dynamic loader, and no relocations to apply
    // at start-up (a static-pie would rewrite ~10 pages of itself, each a page fault and
    // a copy under the emulated guest kernel). Stripped: smaller to read from the disk.
    let mut flags = vec![
        "-Ctarget-feature=+crt-static".to_owned(),
        "-Crelocation-model=static".to_owned(),
        "-Cstrip=symbols".to_owned(),
        format!("--remap-path-prefix={}=/grove", workspace.display()),
    ];
    if let Some(home) = cargo_home() {
        flags.push(format!("--remap-path-prefix={}=/cargo", home.display()));
    }
    let target_dir = workspace.join(TARGET_DIR);
    let mut command = clean_command(cargo, &workspace);
    command
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "grove-agent",
            "--bin",
            "grove-agent",
            "--target",
            TARGET,
            "--target-dir",
        ])
        .arg(&target_dir)
        // The unit separator joins the flags without quoting problems; with `--target`
        // they apply to the agent only, not to build scripts or proc macros.
        .env("CARGO_ENCODED_RUSTFLAGS", flags.join("\u{1f}"));
    progress(format_args!(
        "rootfs: building grove-agent (static, {TARGET}) in {}",
        target_dir.display()
    ));
    cmd::run_logged(&mut command, "building grove-agent", log)?;

    let binary = target_dir.join(TARGET).join("release/grove-agent");
    let bytes = fs::read(&binary).map_err(|e| ImagesError::io("read", &binary, e))?;
    match is_static_elf(&bytes) {
        Ok(true) => Ok(bytes),
        Ok(false) => Err(ImagesError::Unexpected(format!(
            "{} has a dynamic loader (PT_INTERP) although it was linked with +crt-static",
            binary.display()
        ))),
        Err(why) => Err(ImagesError::Unexpected(format!(
            "{}: {why}",
            binary.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_inputs_cover_the_agent_and_match_the_tree() {
        let paths: Vec<&str> = inputs::agent().iter().map(|i| i.path).collect();
        for wanted in [
            "../agent/Cargo.toml",
            "../agent/src/lib.rs",
            "../agent/src/main.rs",
            "../Cargo.lock",
            "../Cargo.toml",
        ] {
            assert!(paths.contains(&wanted), "{wanted} in {paths:?}");
        }
        assert!(inputs::RUSTC_VERSION.starts_with("rustc "));
        check_sources(&workspace_dir()).expect("the tree is what was embedded");
    }

    #[test]
    fn static_elf_detection() {
        let own = fs::read(std::env::current_exe().expect("exe")).expect("read");
        // The test binary is a normal dynamically linked host executable.
        assert_eq!(is_static_elf(&own), Ok(false));
        assert!(is_static_elf(b"#!/bin/sh\n").is_err());
        assert!(is_static_elf(&own[..40]).is_err());
        // Patching PT_INTERP out of every program header makes it "static".
        let mut patched = own.clone();
        let phoff = u64::from_le_bytes(own[32..40].try_into().expect("8 bytes")) as usize;
        let size = usize::from(u16::from_le_bytes([own[54], own[55]]));
        let count = usize::from(u16::from_le_bytes([own[56], own[57]]));
        for i in 0..count {
            let at = phoff + i * size;
            if patched[at..at + 4] == 3u32.to_le_bytes() {
                patched[at..at + 4].copy_from_slice(&0u32.to_le_bytes());
            }
        }
        assert_eq!(is_static_elf(&patched), Ok(true));
    }

    #[test]
    fn nested_cargo_environment_is_cleaned() {
        let command = clean_command("cargo", Path::new("/"));
        let removed: Vec<String> = command
            .get_envs()
            .filter(|(_, value)| value.is_none())
            .map(|(name, _)| name.to_string_lossy().into_owned())
            .collect();
        // cargo sets these for the test binary running this.
        assert!(
            removed.iter().any(|n| n == "CARGO_MANIFEST_DIR"),
            "{removed:?}"
        );
        assert!(removed.iter().any(|n| n == "CARGO_PKG_NAME"), "{removed:?}");
        assert!(!removed.iter().any(|n| n == "CARGO_HOME" || n == "PATH"));
    }
}
