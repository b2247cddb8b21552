//! Embeds the committed image inputs (everything under `kernel/` and `rootfs/`)
//! into the crate, so the input key and the build do not depend on the
//! current directory or on the source tree being present at run time.
//!
//! It also embeds the inputs of the guest agent's build (the `agent/` crate's sources,
//! the workspace `Cargo.toml`, `Cargo.lock`, `rust-toolchain.toml` and
//! `.cargo/config.toml`) and the version of the Rust compiler, so that the root
//! filesystem's key covers them without running cargo or rustc to compute it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::{env, fs, io};

/// Top-level directories whose files are build inputs.
const INPUT_DIRS: [&str; 2] = ["kernel", "rootfs"];
/// Directories of the workspace whose files are inputs of the agent build.
const AGENT_DIRS: [&str; 1] = ["agent/src"];
/// Files of the workspace that are inputs of the agent build (if they exist).
const AGENT_FILES: [&str; 5] = [
    "agent/Cargo.toml",
    "Cargo.toml",
    "Cargo.lock",
    "rust-toolchain.toml",
    ".cargo/config.toml",
];

fn main() -> io::Result<()> {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "CARGO_MANIFEST_DIR is not set")
        })?);
    let mut files = Vec::new();
    for dir in INPUT_DIRS {
        // Cargo rescans a directory given here for any change below it.
        println!("cargo:rerun-if-changed={dir}");
        collect(&manifest_dir, &manifest_dir.join(dir), &mut files)?;
    }
    files.sort();

    let mut out = String::from(
        "/// Committed inputs, sorted by path (relative to `images/`, `/`-separated).\n\
         pub(crate) static COMMITTED_INPUTS: &[crate::inputs::Input] = &[\n",
    );
    for (rel, abs) in &files {
        writeln!(
            out,
            "    crate::inputs::Input {{ path: {rel:?}, contents: include_bytes!({abs:?}) }},"
        )
        .map_err(io::Error::other)?;
    }
    out.push_str("];\n");

    // Agent inputs, as paths relative to `images/` (`../agent/...`).
    let workspace = manifest_dir
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "images/ has no parent"))?;
    let mut agent = Vec::new();
    for dir in AGENT_DIRS {
        println!("cargo:rerun-if-changed=../{dir}");
        collect(workspace, &workspace.join(dir), &mut agent)?;
    }
    for file in AGENT_FILES {
        let path = workspace.join(file);
        // A file that does not exist is not named here: cargo would rerun every build.
        if path.is_file() {
            println!("cargo:rerun-if-changed=../{file}");
            let abs = path.to_str().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "input path is not UTF-8")
            })?;
            agent.push((file.to_owned(), abs.to_owned()));
        }
    }
    agent.sort();
    out.push_str(
        "/// Inputs of the guest agent build, sorted by path (relative to `images/`).\n\
         pub(crate) static AGENT_INPUTS: &[crate::inputs::Input] = &[\n",
    );
    for (rel, abs) in &agent {
        writeln!(
            out,
            "    crate::inputs::Input {{ path: {:?}, contents: include_bytes!({abs:?}) }},",
            format!("../{rel}")
        )
        .map_err(io::Error::other)?;
    }
    out.push_str("];\n");

    // The compiler building this crate is the one the nested cargo uses for the agent
    // (same toolchain file, same rustup environment); the build checks that it is.
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let version = std::process::Command::new(&rustc).arg("-V").output()?;
    if !version.status.success() {
        return Err(io::Error::other("`rustc -V` failed"));
    }
    let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();
    writeln!(
        out,
        "/// `rustc -V` of the compiler that built this crate.\n\
         pub(crate) const RUSTC_VERSION: &str = {version:?};"
    )
    .map_err(io::Error::other)?;

    let out_dir = PathBuf::from(
        env::var_os("OUT_DIR")
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "OUT_DIR is not set"))?,
    );
    fs::write(out_dir.join("committed_inputs.rs"), out)
}

/// Adds every regular file below `dir` as (path relative to `root`, absolute path).
/// Hidden files and editor backups (`*~`) are not inputs.
fn collect(root: &Path, dir: &Path, files: &mut Vec<(String, String)>) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name.ends_with('~') {
            continue;
        }
        let path = entry.path();
        let file_type = entry.file_type()?;
        if file_type.is_dir() {
            collect(root, &path, files)?;
        } else if file_type.is_file() {
            let rel = path
                .strip_prefix(root)
                .map_err(io::Error::other)?
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/");
            let abs = path.to_str().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "input path is not UTF-8")
            })?;
            files.push((rel, abs.to_owned()));
        }
    }
    Ok(())
}
