//! The committed build inputs under `images/kernel/` and `images/rootfs/`, and those of
//! the guest agent (`agent/`, the workspace manifest and lock file), embedded at compile
//! time by `build.rs`.

/// One committed input file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Input {
    /// Path relative to `images/`, `/`-separated, e.g. `kernel/microvm.fragment` or
    /// `../agent/src/main.rs`.
    pub path: &'static str,
    /// The file's contents.
    pub contents: &'static [u8],
}

include!(concat!(env!("OUT_DIR"), "/committed_inputs.rs"));

/// Path of the kernel config fragment.
pub(crate) const FRAGMENT: &str = "kernel/microvm.fragment";
/// Directory of the kernel patches.
pub(crate) const PATCH_DIR: &str = "kernel/patches/";

/// All committed inputs whose path starts with `prefix`, in path order.
pub(crate) fn under(prefix: &str) -> Vec<Input> {
    COMMITTED_INPUTS
        .iter()
        .filter(|input| input.path.starts_with(prefix))
        .copied()
        .collect()
}

/// Inputs of the kernel build (`kernel/...`).
pub(crate) fn kernel() -> Vec<Input> {
    under("kernel/")
}

/// Inputs of the root filesystem build (`rootfs/...`).
pub(crate) fn rootfs() -> Vec<Input> {
    under("rootfs/")
}

/// Inputs of the guest agent build (`../agent/...`, `../Cargo.lock`, ...), which are
/// inputs of the root filesystem too.
pub(crate) fn agent() -> Vec<Input> {
    AGENT_INPUTS.to_vec()
}
