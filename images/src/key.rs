//! Cache keys: SHA-256 over everything a build output depends on.
//!
//! The kernel and the root filesystem have separate keys, so that editing the
//! init script does not rebuild the kernel; the image set key combines both.

use sha2::{Digest, Sha256};

use crate::inputs::Input;

/// Version of the builder's own logic. Bump it whenever a change to this crate
/// changes what a build produces (build commands, rootfs layout, ...), so that
/// old cache entries are not reused.
pub const BUILDER_VERSION: u32 = 1;

/// A Debian package and the version a build uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PackageVersion {
    /// Package name, e.g. `linux-source-6.1`.
    pub name: &'static str,
    /// Debian version, e.g. `6.1.192-2`.
    pub version: String,
}

/// Feeds one length-prefixed field to the hasher, so that field boundaries
/// are unambiguous.
fn field(hasher: &mut Sha256, bytes: &[u8]) {
    hasher.update((bytes.len() as u64).to_le_bytes());
    hasher.update(bytes);
}

/// Key of one component (`kernel` or `rootfs`): the builder version, the
/// component name, the Debian packages with their versions, and every input
/// file's path and contents in path order.
pub(crate) fn component_key(
    component: &str,
    packages: &[PackageVersion],
    inputs: &[Input],
) -> String {
    let mut hasher = Sha256::new();
    field(&mut hasher, b"grove-images");
    field(&mut hasher, &BUILDER_VERSION.to_le_bytes());
    field(&mut hasher, component.as_bytes());
    field(&mut hasher, &(packages.len() as u64).to_le_bytes());
    for package in packages {
        field(&mut hasher, package.name.as_bytes());
        field(&mut hasher, package.version.as_bytes());
    }
    let mut sorted: Vec<&Input> = inputs.iter().collect();
    sorted.sort_by_key(|input| input.path);
    field(&mut hasher, &(sorted.len() as u64).to_le_bytes());
    for input in sorted {
        field(&mut hasher, input.path.as_bytes());
        field(&mut hasher, input.contents);
    }
    hex(&hasher.finalize())
}

/// Key of the image set made of the given kernel and root filesystem.
pub(crate) fn set_key(kernel_key: &str, rootfs_key: &str) -> String {
    let mut hasher = Sha256::new();
    field(&mut hasher, b"grove-images set");
    field(&mut hasher, &BUILDER_VERSION.to_le_bytes());
    field(&mut hasher, kernel_key.as_bytes());
    field(&mut hasher, rootfs_key.as_bytes());
    hex(&hasher.finalize())
}

/// SHA-256 of `bytes`, as lowercase hex.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Lowercase hex encoding.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packages(version: &str) -> Vec<PackageVersion> {
        vec![PackageVersion {
            name: "linux-source-6.1",
            version: version.to_owned(),
        }]
    }

    const FRAGMENT: Input = Input {
        path: "kernel/microvm.fragment",
        contents: b"CONFIG_SMP=y\n",
    };
    const PATCH: Input = Input {
        path: "kernel/patches/01-a.patch",
        contents: b"--- a/x\n+++ b/x\n",
    };

    #[test]
    fn key_is_stable() {
        let a = component_key("kernel", &packages("6.1.192-2"), &[FRAGMENT, PATCH]);
        let b = component_key("kernel", &packages("6.1.192-2"), &[FRAGMENT, PATCH]);
        assert_eq!(a, b);
        assert_eq!(a.len(), 64);
        // Input order does not matter: inputs are hashed in path order.
        let c = component_key("kernel", &packages("6.1.192-2"), &[PATCH, FRAGMENT]);
        assert_eq!(a, c);
    }

    #[test]
    fn key_changes_with_contents() {
        let a = component_key("kernel", &packages("6.1.192-2"), &[FRAGMENT, PATCH]);
        let edited = Input {
            contents: b"CONFIG_SMP=n\n",
            ..FRAGMENT
        };
        let b = component_key("kernel", &packages("6.1.192-2"), &[edited, PATCH]);
        assert_ne!(a, b);
    }

    #[test]
    fn key_changes_with_path() {
        let a = component_key("kernel", &packages("6.1.192-2"), &[FRAGMENT, PATCH]);
        let renamed = Input {
            path: "kernel/patches/02-a.patch",
            ..PATCH
        };
        let b = component_key("kernel", &packages("6.1.192-2"), &[FRAGMENT, renamed]);
        assert_ne!(a, b);
    }

    #[test]
    fn key_changes_with_added_or_removed_input() {
        let a = component_key("kernel", &packages("6.1.192-2"), &[FRAGMENT, PATCH]);
        let b = component_key("kernel", &packages("6.1.192-2"), &[FRAGMENT]);
        assert_ne!(a, b);
    }

    #[test]
    fn key_changes_with_package_version_and_component() {
        let a = component_key("kernel", &packages("6.1.192-2"), &[FRAGMENT]);
        let b = component_key("kernel", &packages("6.1.193-1"), &[FRAGMENT]);
        let c = component_key("rootfs", &packages("6.1.192-2"), &[FRAGMENT]);
        assert_ne!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn field_boundaries_are_unambiguous() {
        // Moving bytes from the path into the contents must change the key.
        let a = Input {
            path: "rootfs/ab",
            contents: b"c",
        };
        let b = Input {
            path: "rootfs/a",
            contents: b"bc",
        };
        assert_ne!(
            component_key("rootfs", &[], &[a]),
            component_key("rootfs", &[], &[b])
        );
    }

    #[test]
    fn set_key_depends_on_both_components() {
        let k1 = "1".repeat(64);
        let k2 = "2".repeat(64);
        assert_eq!(set_key(&k1, &k2), set_key(&k1, &k2));
        assert_ne!(set_key(&k1, &k2), set_key(&k2, &k1));
        assert_ne!(set_key(&k1, &k2), set_key(&k1, &k1));
    }

    #[test]
    fn hex_encodes() {
        assert_eq!(hex(&[0x00, 0x7b, 0xff]), "007bff");
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
