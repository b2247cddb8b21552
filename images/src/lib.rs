//! Grove's default guest image set: a Linux 6.1 microVM kernel (`vmlinux`
//! with the PVH entry note, and `bzImage`) plus an ext4 root filesystem with
//! static busybox, the project's init and the guest agent (`grove-agent`).
//!
//! Images are built from committed inputs (`images/kernel/`, `images/rootfs/`)
//! and Debian packages, into a cache directory outside the repository, under
//! keys that cover every input. [`build_default`] builds what is missing and is
//! a quick no-op when everything is cached; [`locate_default`] only looks.
//! See `images/README.md`.

mod agent;
mod apt;
mod cmd;
mod error;
mod inputs;
mod kconfig;
mod kernel;
mod key;
mod manifest;
mod rootfs;

use std::fs::{self, File, TryLockError};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub use error::{ImagesError, BUILD_COMMAND};
pub use kconfig::ConfigMismatch;
pub use key::BUILDER_VERSION;
pub use manifest::{Artefact, InputFile, Manifest, Package};

use cmd::progress;

/// File name of the manifest in an image set directory.
const MANIFEST: &str = "manifest.json";
/// Kernel files copied into the image set, besides the root filesystem.
const SET_KERNEL_FILES: [&str; 4] = kernel::OUTPUTS;

/// A complete image set in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSet {
    /// The set directory, `<cache>/images/<key>`.
    pub dir: PathBuf,
    /// Uncompressed ELF kernel with the Xen PVH entry note.
    pub vmlinux: PathBuf,
    /// The same kernel as a bzImage.
    pub bzimage: PathBuf,
    /// ext4 root filesystem image (treat as read-only: copy it before
    /// attaching it writable to a VM).
    pub rootfs: PathBuf,
    /// `manifest.json`.
    pub manifest: PathBuf,
}

impl ImageSet {
    fn in_dir(dir: PathBuf) -> Self {
        Self {
            vmlinux: dir.join("vmlinux"),
            bzimage: dir.join("bzImage"),
            rootfs: dir.join(rootfs::IMAGE),
            manifest: dir.join(MANIFEST),
            dir,
        }
    }
}

/// The cache directory: `$GROVE_CACHE_DIR` if set, else
/// `$XDG_CACHE_HOME/grove`, else `$HOME/.cache/grove`.
pub fn default_cache_dir() -> Result<PathBuf, ImagesError> {
    let var = |name: &str| std::env::var_os(name).filter(|value| !value.is_empty());
    if let Some(dir) = var("GROVE_CACHE_DIR") {
        return Ok(PathBuf::from(dir));
    }
    // The XDG spec says relative values are to be ignored.
    if let Some(dir) = var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|d| d.is_absolute())
    {
        return Ok(dir.join("grove"));
    }
    var("HOME")
        .map(|home| PathBuf::from(home).join(".cache").join("grove"))
        .ok_or(ImagesError::NoCacheDir)
}

/// Keys and package versions of the default image set for the current inputs.
struct Plan {
    packages: apt::Candidates,
    /// The C compiler builds the kernel and the init: its version is an input too.
    toolchain: key::PackageVersion,
    /// The Rust compiler and the recipe that build the guest agent (rootfs inputs).
    rustc: key::PackageVersion,
    agent_recipe: key::PackageVersion,
    kernel_key: String,
    rootfs_key: String,
    set_key: String,
}

impl Plan {
    fn compute(cache_dir: &Path) -> Result<Self, ImagesError> {
        let packages = apt::candidates(cache_dir)?;
        let toolchain = cmd::toolchain_version()?;
        let kernel_key = key::component_key(
            "kernel",
            &[packages.kernel_source.clone(), toolchain.clone()],
            &inputs::kernel(),
        );
        // The agent's inputs go into the rootfs key only: a change to the agent rebuilds
        // the root filesystem, never the kernel.
        let rustc = agent::rustc_version();
        let agent_recipe = agent::recipe();
        let rootfs_key = key::component_key(
            "rootfs",
            &[
                packages.busybox.clone(),
                toolchain.clone(),
                rustc.clone(),
                agent_recipe.clone(),
            ],
            &[inputs::rootfs(), inputs::agent()].concat(),
        );
        let set_key = key::set_key(&kernel_key, &rootfs_key);
        Ok(Self {
            packages,
            toolchain,
            rustc,
            agent_recipe,
            kernel_key,
            rootfs_key,
            set_key,
        })
    }

    fn kernel_dir(&self, cache_dir: &Path) -> PathBuf {
        cache_dir.join("kernel").join(&self.kernel_key)
    }

    fn rootfs_dir(&self, cache_dir: &Path) -> PathBuf {
        cache_dir.join("rootfs").join(&self.rootfs_key)
    }

    fn set_dir(&self, cache_dir: &Path) -> PathBuf {
        cache_dir.join("images").join(&self.set_key)
    }

    /// The manifest of the set this plan produces.
    fn manifest(&self, artefacts: Vec<Artefact>) -> Manifest {
        let packages = [
            &self.packages.kernel_source,
            &self.packages.busybox,
            &self.toolchain,
            &self.rustc,
            &self.agent_recipe,
        ]
        .into_iter()
        .map(|p| Package {
            name: p.name.to_owned(),
            version: p.version.clone(),
        })
        .collect();
        let inputs = inputs::kernel()
            .into_iter()
            .chain(inputs::rootfs())
            .chain(inputs::agent())
            .map(|input| InputFile {
                path: input.path.to_owned(),
                sha256: key::sha256_hex(input.contents),
            })
            .collect();
        Manifest {
            builder_version: BUILDER_VERSION,
            key: self.set_key.clone(),
            kernel_key: self.kernel_key.clone(),
            rootfs_key: self.rootfs_key.clone(),
            packages,
            inputs,
            artefacts,
        }
    }
}

/// Checks the set directory of `plan`: it must exist with a manifest for this
/// key, and every artefact must be present with the recorded size (contents
/// are not re-hashed, to stay cheap).
fn check_set(cache_dir: &Path, plan: &Plan) -> Result<ImageSet, ImagesError> {
    let dir = plan.set_dir(cache_dir);
    let set = ImageSet::in_dir(dir.clone());
    if !set.manifest.is_file() {
        return Err(ImagesError::NotBuilt {
            cache_dir: cache_dir.to_owned(),
        });
    }
    let manifest = Manifest::read(&set.manifest)?;
    let damaged = |detail: String| ImagesError::Damaged {
        dir: dir.clone(),
        detail,
    };
    if manifest.key != plan.set_key {
        return Err(damaged(format!(
            "manifest key {} does not match the directory",
            manifest.key
        )));
    }
    for required in ["vmlinux", "bzImage", rootfs::IMAGE] {
        if !manifest.artefacts.iter().any(|a| a.file == required) {
            return Err(damaged(format!("manifest lists no {required}")));
        }
    }
    for artefact in &manifest.artefacts {
        let path = dir.join(&artefact.file);
        match fs::metadata(&path) {
            Ok(meta) if meta.len() == artefact.size => {}
            Ok(meta) => {
                return Err(damaged(format!(
                    "{} has {} bytes, the manifest says {}",
                    artefact.file,
                    meta.len(),
                    artefact.size
                )))
            }
            Err(_) => return Err(damaged(format!("{} is missing", artefact.file))),
        }
    }
    Ok(set)
}

/// Finds the default image set for the current inputs in `cache_dir`,
/// without building anything. Cheap: computes the input key and checks that
/// the set is complete. If it is not built, the error says to run
/// `cargo run --release -p grove-images -- build`.
pub fn locate_default(cache_dir: &Path) -> Result<ImageSet, ImagesError> {
    if !cache_dir.is_dir() {
        return Err(ImagesError::NotBuilt {
            cache_dir: cache_dir.to_owned(),
        });
    }
    let plan = Plan::compute(cache_dir)?;
    check_set(cache_dir, &plan)
}

/// Builds whatever is missing of the default image set in `cache_dir`
/// (kernel, root filesystem, set directory) and returns it. Progress goes to
/// stderr. A no-op when the set for the current inputs is complete.
pub fn build_default(cache_dir: &Path) -> Result<ImageSet, ImagesError> {
    let started = Instant::now();
    cmd::create_dir_all(cache_dir)?;
    let cache_dir =
        fs::canonicalize(cache_dir).map_err(|e| ImagesError::io("resolve", cache_dir, e))?;
    let plan = Plan::compute(&cache_dir)?;
    if let Ok(set) = check_set(&cache_dir, &plan) {
        progress("default image set is up to date");
        return Ok(set);
    }

    // One build at a time per cache directory.
    let lock_path = cache_dir.join(".build.lock");
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| ImagesError::io("open lock file", &lock_path, e))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            progress(format_args!(
                "waiting for another grove-images build in {} to finish",
                cache_dir.display()
            ));
            lock.lock()
                .map_err(|e| ImagesError::io("lock", &lock_path, e))?;
        }
        Err(TryLockError::Error(e)) => return Err(ImagesError::io("lock", &lock_path, e)),
    }
    // Whoever held the lock may have built it meanwhile.
    if let Ok(set) = check_set(&cache_dir, &plan) {
        progress("default image set is up to date");
        return Ok(set);
    }

    remove_leftovers(&cache_dir)?;

    let kernel_dir = plan.kernel_dir(&cache_dir);
    let rootfs_dir = plan.rootfs_dir(&cache_dir);
    let need_kernel = !kernel::is_complete(&kernel_dir);
    let need_rootfs = !rootfs::is_complete(&rootfs_dir);
    // Check every tool up front, before spending minutes on the first step.
    let kernel_tools = need_kernel.then(kernel::check_tools).transpose()?;
    let rootfs_tools = need_rootfs.then(rootfs::check_tools).transpose()?;
    progress(format_args!(
        "kernel {} {} ({}), rootfs busybox-static {} ({})",
        plan.packages.kernel_source.name,
        plan.packages.kernel_source.version,
        if need_kernel { "to build" } else { "cached" },
        plan.packages.busybox.version,
        if need_rootfs { "to build" } else { "cached" },
    ));

    if let Some(tools) = &rootfs_tools {
        cmd::create_dir_all(&cache_dir.join("rootfs"))?;
        rootfs::build(&cache_dir, &rootfs_dir, &plan.packages.busybox, tools)?;
    }
    if let Some(tools) = &kernel_tools {
        cmd::create_dir_all(&cache_dir.join("kernel"))?;
        kernel::build(&cache_dir, &kernel_dir, &plan.packages.kernel_source, tools)?;
    }

    let set = assemble(&cache_dir, &plan, &kernel_dir, &rootfs_dir)?;
    progress(format_args!(
        "default image set ready in {}: {}",
        cmd::elapsed(started),
        set.dir.display()
    ));
    Ok(set)
}

/// Removes `*.work` and `*.tmp` directories of earlier interrupted or failed
/// builds (a failed build keeps its work directory, with logs, until the next
/// build). Only called while holding the build lock.
fn remove_leftovers(cache_dir: &Path) -> Result<(), ImagesError> {
    for sub in ["kernel", "rootfs", "images", "downloads"] {
        let Ok(entries) = fs::read_dir(cache_dir.join(sub)) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let leftover =
                name.ends_with(".work") || name.ends_with(".tmp") || name.starts_with(".tmp-");
            if leftover && entry.file_type().is_ok_and(|t| t.is_dir()) {
                progress(format_args!("removing leftover {}", entry.path().display()));
                cmd::remove_dir_if_exists(&entry.path())?;
            }
        }
    }
    Ok(())
}

/// Creates `<cache>/images/<key>`: hard links to (or copies of) the kernel
/// and rootfs outputs plus the manifest, written as `<dir>.tmp` and renamed.
fn assemble(
    cache_dir: &Path,
    plan: &Plan,
    kernel_dir: &Path,
    rootfs_dir: &Path,
) -> Result<ImageSet, ImagesError> {
    progress("assembling the image set (hashing artefacts for manifest.json)");
    let dir = plan.set_dir(cache_dir);
    let tmp = cmd::sibling(&dir, "tmp");
    cmd::create_dir_all(&cache_dir.join("images"))?;
    cmd::remove_dir_if_exists(&tmp)?;
    // A damaged set (it failed `check_set`) is replaced.
    cmd::remove_dir_if_exists(&dir)?;
    cmd::create_dir_all(&tmp)?;
    let sources = SET_KERNEL_FILES
        .iter()
        .map(|name| (kernel_dir, *name))
        .chain(std::iter::once((rootfs_dir, rootfs::IMAGE)));
    let mut artefacts = Vec::new();
    for (from_dir, name) in sources {
        let from = from_dir.join(name);
        let to = tmp.join(name);
        if fs::hard_link(&from, &to).is_err() {
            fs::copy(&from, &to).map_err(|e| ImagesError::io("copy", &from, e))?;
        }
        artefacts.push(Artefact::of(&tmp, name)?);
    }
    plan.manifest(artefacts).write(&tmp.join(MANIFEST))?;
    cmd::rename(&tmp, &dir)?;
    Ok(ImageSet::in_dir(dir))
}
