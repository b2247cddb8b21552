//! Debian packages: candidate versions (`apt-cache policy`) and downloads
//! (`apt-get download`, no root needed).
//!
//! `apt-cache policy` takes about a second when apt keeps no binary package
//! cache (as in Debian container images), which would make every no-op build
//! and every `locate_default` slow. The answer is therefore memoised in the
//! cache directory, keyed by a fingerprint (names, sizes, mtimes) of apt's
//! package lists, dpkg's status and apt's configuration: any `apt-get update`
//! or configuration change invalidates it.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::cmd::{self, progress};
use crate::error::ImagesError;
use crate::key::{sha256_hex, PackageVersion};

/// Debian package with the kernel source tarball.
pub(crate) const KERNEL_SOURCE: &str = "linux-source-6.1";
/// Debian package with the static busybox binary.
pub(crate) const BUSYBOX: &str = "busybox-static";

/// Files whose change may change apt's candidate versions.
const APT_STATE_FILES: [&str; 3] = [
    "/var/lib/dpkg/status",
    "/etc/apt/sources.list",
    "/etc/apt/preferences",
];
/// Directories whose entries may change apt's candidate versions.
const APT_STATE_DIRS: [&str; 4] = [
    "/var/lib/apt/lists",
    "/etc/apt/sources.list.d",
    "/etc/apt/preferences.d",
    "/etc/apt/apt.conf.d",
];
/// Memo file name in the cache directory.
const MEMO_FILE: &str = "apt-candidates.json";

/// The package versions the default image set is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Candidates {
    /// `linux-source-6.1`.
    pub kernel_source: PackageVersion,
    /// `busybox-static`.
    pub busybox: PackageVersion,
}

#[derive(Serialize, Deserialize)]
struct Memo {
    fingerprint: String,
    versions: BTreeMap<String, String>,
}

/// Candidate versions of the packages, from the memo if apt's state is unchanged.
pub(crate) fn candidates(cache_dir: &Path) -> Result<Candidates, ImagesError> {
    let fingerprint = apt_state_fingerprint();
    let memo_path = cache_dir.join(MEMO_FILE);
    let memoised = fs::read(&memo_path)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Memo>(&bytes).ok())
        .filter(|memo| memo.fingerprint == fingerprint)
        .map(|memo| memo.versions);
    let versions = match memoised {
        Some(versions) => versions,
        None => {
            let apt_cache = cmd::require_tool("apt-cache", "apt")?;
            let output = cmd::run_captured(
                Command::new(apt_cache).args(["policy", KERNEL_SOURCE, BUSYBOX]),
                "asking apt for package versions",
            )?;
            let versions = parse_policy(&output);
            // Best effort: a memo that cannot be written only costs time.
            if cache_dir.is_dir() {
                let memo = Memo {
                    fingerprint,
                    versions: versions.clone(),
                };
                if let Ok(json) = serde_json::to_vec_pretty(&memo) {
                    let tmp = cache_dir.join(format!("{MEMO_FILE}.tmp.{}", std::process::id()));
                    if fs::write(&tmp, json).is_ok() && fs::rename(&tmp, &memo_path).is_err() {
                        let _ = fs::remove_file(&tmp);
                    }
                }
            }
            versions
        }
    };
    let pick = |name: &'static str| {
        versions
            .get(name)
            .map(|version| PackageVersion {
                name,
                version: version.clone(),
            })
            .ok_or_else(|| ImagesError::NoCandidate {
                package: name.to_owned(),
            })
    };
    Ok(Candidates {
        kernel_source: pick(KERNEL_SOURCE)?,
        busybox: pick(BUSYBOX)?,
    })
}

/// Parses `apt-cache policy` output into package -> candidate version,
/// leaving out packages without a candidate.
fn parse_policy(text: &str) -> BTreeMap<String, String> {
    let mut versions = BTreeMap::new();
    let mut current: Option<&str> = None;
    for line in text.lines() {
        if !line.starts_with(char::is_whitespace) {
            current = line.strip_suffix(':').filter(|name| !name.contains(' '));
        } else if let (Some(package), Some(candidate)) =
            (current, line.trim().strip_prefix("Candidate:"))
        {
            let candidate = candidate.trim();
            if !candidate.is_empty() && candidate != "(none)" {
                versions.insert(package.to_owned(), candidate.to_owned());
            }
        }
    }
    versions
}

/// Fingerprint of the apt state that determines candidate versions.
fn apt_state_fingerprint() -> String {
    let mut text = format!(
        "APT_CONFIG={:?}\n",
        std::env::var_os("APT_CONFIG").unwrap_or_default()
    );
    let mut add = |path: &Path| match fs::metadata(path) {
        Ok(meta) => text.push_str(&format!(
            "{} {} {}.{}\n",
            path.display(),
            meta.len(),
            meta.mtime(),
            meta.mtime_nsec()
        )),
        Err(_) => text.push_str(&format!("{} absent\n", path.display())),
    };
    for file in APT_STATE_FILES {
        add(Path::new(file));
    }
    for dir in APT_STATE_DIRS {
        let mut entries: Vec<PathBuf> = fs::read_dir(dir)
            .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        entries.sort();
        add(Path::new(dir));
        for entry in &entries {
            add(entry);
        }
    }
    sha256_hex(text.as_bytes())
}

/// The cached .deb of `package`, downloaded with `apt-get download` into
/// `<cache>/downloads/` if it is not there yet.
pub(crate) fn download(cache_dir: &Path, package: &PackageVersion) -> Result<PathBuf, ImagesError> {
    let downloads = cache_dir.join("downloads");
    let deb = downloads.join(format!(
        "{}_{}.deb",
        package.name,
        package.version.replace(':', "%3a")
    ));
    if deb.is_file() {
        progress(format_args!(
            "using cached {} {} ({})",
            package.name,
            package.version,
            deb.display()
        ));
        return Ok(deb);
    }
    progress(format_args!(
        "downloading {} {} with apt-get download",
        package.name, package.version
    ));
    let apt_get = cmd::require_tool("apt-get", "apt")?;
    let tmp = downloads.join(format!(".tmp-{}", package.name));
    cmd::remove_dir_if_exists(&tmp)?;
    cmd::create_dir_all(&tmp)?;
    cmd::run_captured(
        Command::new(apt_get)
            .arg("download")
            .arg(format!("{}={}", package.name, package.version))
            .current_dir(&tmp),
        &format!("downloading {} {}", package.name, package.version),
    )?;
    let mut debs: Vec<PathBuf> = fs::read_dir(&tmp)
        .map_err(|e| ImagesError::io("list directory", &tmp, e))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "deb"))
        .collect();
    let downloaded = match (debs.pop(), debs.is_empty()) {
        (Some(path), true) => path,
        _ => {
            return Err(ImagesError::Unexpected(format!(
                "apt-get download {}={} did not leave exactly one .deb in {}",
                package.name,
                package.version,
                tmp.display()
            )))
        }
    };
    cmd::rename(&downloaded, &deb)?;
    cmd::remove_dir_if_exists(&tmp)?;
    Ok(deb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_policy_output() {
        let text = "\
linux-source-6.1:
  Installed: (none)
  Candidate: 6.1.192-2
  Version table:
     6.1.192-2 500
        500 http://deb.debian.org/debian-security bookworm-security/main amd64 Packages
busybox-static:
  Installed: 1:1.35.0-4+deb12u1+b1
  Candidate: 1:1.35.0-4+deb12u1+b1
  Version table:
 *** 1:1.35.0-4+deb12u1+b1 500
        100 /var/lib/dpkg/status
other:
  Installed: (none)
  Candidate: (none)
";
        let versions = parse_policy(text);
        assert_eq!(versions.len(), 2);
        assert_eq!(versions["linux-source-6.1"], "6.1.192-2");
        assert_eq!(versions["busybox-static"], "1:1.35.0-4+deb12u1+b1");
    }
}
