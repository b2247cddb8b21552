//! `manifest.json` of an image set: what it contains and what it was built
//! from. It has no build date, so identical inputs give an identical manifest.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::ImagesError;
use crate::key::hex;

/// The contents of `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Version of the builder that produced the set.
    pub builder_version: u32,
    /// Key of the set (the name of its directory).
    pub key: String,
    /// Key of the kernel component.
    pub kernel_key: String,
    /// Key of the root filesystem component.
    pub rootfs_key: String,
    /// Debian packages the set was built from, plus the tools whose identity is a key
    /// input: the C compiler (`cc`), the Rust compiler (`rustc`) and the grove-agent build
    /// recipe (`grove-agent build`).
    pub packages: Vec<Package>,
    /// Committed input files (relative to `images/`; the agent's as `../agent/...`,
    /// `../Cargo.lock`, ...) and their SHA-256.
    pub inputs: Vec<InputFile>,
    /// The files of the set.
    pub artefacts: Vec<Artefact>,
}

/// A Debian package (or tool) and its version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    /// Package name.
    pub name: String,
    /// Debian version (for a tool: its version line, or the recipe).
    pub version: String,
}

/// A committed input file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputFile {
    /// Path relative to `images/`.
    pub path: String,
    /// SHA-256 of the contents, lowercase hex.
    pub sha256: String,
}

/// One file of the image set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artefact {
    /// File name inside the set directory.
    pub file: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the contents, lowercase hex.
    pub sha256: String,
}

impl Artefact {
    /// Describes the file `dir/name`, hashing its contents.
    pub(crate) fn of(dir: &Path, name: &str) -> Result<Self, ImagesError> {
        let path = dir.join(name);
        let mut file = File::open(&path).map_err(|e| ImagesError::io("open", &path, e))?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = file
                .read(&mut buffer)
                .map_err(|e| ImagesError::io("read", &path, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
            size += n as u64;
        }
        Ok(Self {
            file: name.to_owned(),
            size,
            sha256: hex(&hasher.finalize()),
        })
    }
}

impl Manifest {
    /// Reads a manifest file.
    pub fn read(path: &Path) -> Result<Self, ImagesError> {
        let bytes = std::fs::read(path).map_err(|e| ImagesError::io("read", path, e))?;
        serde_json::from_slice(&bytes).map_err(|source| ImagesError::Manifest {
            path: path.to_owned(),
            source,
        })
    }

    /// Writes the manifest as pretty JSON with a final newline.
    pub(crate) fn write(&self, path: &Path) -> Result<(), ImagesError> {
        let mut json = serde_json::to_vec_pretty(self).map_err(|source| ImagesError::Manifest {
            path: path.to_owned(),
            source,
        })?;
        json.push(b'\n');
        crate::cmd::write_file(path, &json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_json() {
        let manifest = Manifest {
            builder_version: 1,
            key: "k".into(),
            kernel_key: "kk".into(),
            rootfs_key: "rk".into(),
            packages: vec![Package {
                name: "busybox-static".into(),
                version: "1:1.35.0-4".into(),
            }],
            inputs: vec![InputFile {
                path: "rootfs/init".into(),
                sha256: "00".into(),
            }],
            artefacts: vec![Artefact {
                file: "vmlinux".into(),
                size: 3,
                sha256: "ab".into(),
            }],
        };
        let json = serde_json::to_string(&manifest).expect("serialise");
        assert!(!json.contains("date"));
        let back: Manifest = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, manifest);
    }
}
