//! Embeds the committed image inputs (everything under `kernel/` and `rootfs/`)
//! into the crate, so the input key and the build do not depend on the
//! current directory or on the source tree being present at run time.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::{env, fs, io};

/// Top-level directories whose files are build inputs.
const INPUT_DIRS: [&str; 2] = ["kernel", "rootfs"];

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
