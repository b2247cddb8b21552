//! How the daemon jails each `grove-vmm` (docs/jail.md): one unprivileged uid/gid per
//! environment, a jail directory under the data directory, and the `--jail*` flags naming
//! exactly the files that environment's VM may see.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use vmm::jail::cgroup::{Cgroup, CgroupConfig, DEFAULT_PIDS};

/// cgroup (below the daemon's own) under which every VM's cgroup is made.
pub const CGROUP_PARENT: &str = "grove";
/// Memory the VMM process needs beyond the guest's, in MiB (its own heap, device buffers,
/// page cache of the files it writes).
pub const VMM_OVERHEAD_MIB: u64 = 256;
/// Slack on top of the largest file a VM legitimately writes (its disk overlay, at most
/// the disk's size plus qcow2 metadata, or its memory file in a snapshot).
const FILE_SIZE_SLACK: u64 = 1 << 30;
/// First uid of the default range; each environment gets `base + id`.
pub const DEFAULT_UID_BASE: u32 = 1_500_000;

/// The daemon's jail settings (`groved --jail-uid-base`).
#[derive(Clone, Debug, PartialEq)]
pub struct JailSettings {
    /// Environment `id` runs as uid and gid `uid_base + id`.
    pub uid_base: u32,
    /// Holds `<id>/`, each environment's jail directory.
    pub jails_dir: PathBuf,
}

/// What one VM's jail holds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VmFiles {
    /// The environment's directory: bound read-write, owned by the environment's uid.
    pub env_dir: PathBuf,
    /// Files the VM reads: kernel, initrd, the disk layers below its overlay, a snapshot.
    pub read_only: Vec<PathBuf>,
    /// The network namespace the VM joins, if it has a network.
    pub netns: Option<PathBuf>,
    pub vcpus: u8,
    pub memory_mib: u64,
    /// The disk's virtual size in bytes (bounds the files the VM writes).
    pub disk_bytes: u64,
}

impl JailSettings {
    /// The environment id a directory `<data>/envs/<id>` belongs to.
    fn env_id(env_dir: &Path) -> Result<u32, String> {
        env_dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("{} is not an environment directory", env_dir.display()))
    }

    /// The uid (and gid) of the environment in `env_dir`.
    pub fn uid(&self, env_dir: &Path) -> Result<u32, String> {
        let id = Self::env_id(env_dir)?;
        self.uid_base
            .checked_add(id)
            .filter(|uid| *uid < u32::MAX - 1)
            .ok_or_else(|| format!("environment {id}: no uid left above {}", self.uid_base))
    }

    fn cgroup(&self, env_dir: &Path) -> Result<CgroupConfig, String> {
        Ok(CgroupConfig {
            parent: CGROUP_PARENT.into(),
            id: Self::env_id(env_dir)?.to_string(),
            memory_bytes: None,
            cpus: None,
            pids: DEFAULT_PIDS,
        })
    }

    /// Makes the jail directory and gives the environment's directory (and what is in it)
    /// to the environment's uid, so the jailed VMM can create its sockets, console,
    /// overlays and snapshots there; returns the `grove-vmm` flags of the jail.
    pub fn prepare(&self, files: &VmFiles) -> Result<Vec<String>, String> {
        let uid = self.uid(&files.env_dir)?;
        let id = Self::env_id(&files.env_dir)?;
        let root = self.jails_dir.join(id.to_string());
        std::fs::create_dir_all(&root)
            .map_err(|e| format!("cannot create {}: {e}", root.display()))?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("cannot chmod {}: {e}", root.display()))?;
        chown_dir(&files.env_dir, uid)?;
        Ok(self.flags(files, &root, uid))
    }

    /// The `--jail*` flags for `files` (no side effects).
    pub fn flags(&self, files: &VmFiles, root: &Path, uid: u32) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "--jail".into(),
            root.display().to_string(),
            "--jail-uid".into(),
            uid.to_string(),
            "--jail-gid".into(),
            uid.to_string(),
            "--jail-rw".into(),
            files.env_dir.display().to_string(),
            "--jail-cgroup-parent".into(),
            CGROUP_PARENT.into(),
            "--jail-cgroup-id".into(),
            Self::env_id(&files.env_dir)
                .map(|id| id.to_string())
                .unwrap_or_default(),
            "--jail-memory".into(),
            (files.memory_mib + VMM_OVERHEAD_MIB).to_string(),
            "--jail-cpus".into(),
            files.vcpus.to_string(),
            "--jail-fsize".into(),
            (files.disk_bytes.max(files.memory_mib << 20) + FILE_SIZE_SLACK).to_string(),
        ];
        let mut seen = Vec::new();
        for path in &files.read_only {
            if !seen.contains(path) && !path.starts_with(&files.env_dir) {
                args.extend(["--jail-ro".into(), path.display().to_string()]);
                seen.push(path.clone());
            }
        }
        if let Some(ns) = &files.netns {
            args.extend(["--jail-netns".into(), ns.display().to_string()]);
        }
        args
    }

    /// Removes the cgroup a VM left behind when its `grove-vmm` was killed.
    pub fn cleanup(&self, env_dir: &Path) {
        if let Ok(config) = self.cgroup(env_dir) {
            if let Err(e) = Cgroup::remove_leftover(&config) {
                log::warn!("{e}");
            }
        }
    }
}

/// Gives `dir` and its direct entries (not following symbolic links) to `uid:uid`; mode
/// 0700 on the directory, so other environments' VMMs cannot look in.
fn chown_dir(dir: &Path, uid: u32) -> Result<(), String> {
    let chown = |p: &Path| {
        std::os::unix::fs::lchown(p, Some(uid), Some(uid))
            .map_err(|e| format!("cannot chown {}: {e}", p.display()))
    };
    chown(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("cannot chmod {}: {e}", dir.display()))?;
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let owned = std::fs::symlink_metadata(&path).is_ok_and(|m| m.uid() == uid);
        if !owned {
            chown(&path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> JailSettings {
        JailSettings {
            uid_base: 100_000,
            jails_dir: "/data/jails".into(),
        }
    }

    fn files() -> VmFiles {
        VmFiles {
            env_dir: "/data/envs/7".into(),
            read_only: vec![
                "/images/vmlinux".into(),
                "/images/rootfs.ext4".into(),
                "/images/vmlinux".into(),
                "/data/envs/7/disk@1.qcow2".into(),
            ],
            netns: Some("/run/netns/grove-7".into()),
            vcpus: 2,
            memory_mib: 512,
            disk_bytes: 4 << 30,
        }
    }

    fn value<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn each_environment_gets_its_own_uid() {
        let s = settings();
        assert_eq!(s.uid(Path::new("/data/envs/7")), Ok(100_007));
        assert_eq!(s.uid(Path::new("/data/envs/8")), Ok(100_008));
        assert!(s.uid(Path::new("/data/envs/x")).is_err());
        let high = JailSettings {
            uid_base: u32::MAX - 5,
            ..settings()
        };
        assert!(high.uid(Path::new("/data/envs/9")).is_err());
    }

    #[test]
    fn flags_name_exactly_the_vms_files_and_limits() {
        let args = settings().flags(&files(), Path::new("/data/jails/7"), 100_007);
        assert_eq!(value(&args, "--jail"), ["/data/jails/7"]);
        assert_eq!(value(&args, "--jail-uid"), ["100007"]);
        assert_eq!(value(&args, "--jail-gid"), ["100007"]);
        assert_eq!(value(&args, "--jail-rw"), ["/data/envs/7"]);
        // Deduplicated, and nothing the writable directory already holds.
        assert_eq!(
            value(&args, "--jail-ro"),
            ["/images/vmlinux", "/images/rootfs.ext4"]
        );
        assert_eq!(value(&args, "--jail-netns"), ["/run/netns/grove-7"]);
        assert_eq!(value(&args, "--jail-cgroup-parent"), [CGROUP_PARENT]);
        assert_eq!(value(&args, "--jail-cgroup-id"), ["7"]);
        assert_eq!(value(&args, "--jail-memory"), ["768"]);
        assert_eq!(value(&args, "--jail-cpus"), ["2"]);
        assert_eq!(
            value(&args, "--jail-fsize"),
            [((4u64 << 30) + (1 << 30)).to_string()]
        );
        let no_net = VmFiles {
            netns: None,
            ..files()
        };
        let args = settings().flags(&no_net, Path::new("/data/jails/7"), 100_007);
        assert!(value(&args, "--jail-netns").is_empty());
    }

    #[test]
    fn prepare_hands_the_environment_directory_to_its_uid() {
        let tmp = std::env::temp_dir().join(format!("grove-jail-prepare-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let env = tmp.join("envs/3");
        std::fs::create_dir_all(&env).unwrap();
        std::fs::write(env.join("disk.qcow2"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", env.join("link")).unwrap();
        let s = JailSettings {
            uid_base: 100_000,
            jails_dir: tmp.join("jails"),
        };
        let result = s.prepare(&VmFiles {
            env_dir: env.clone(),
            ..files()
        });
        // SAFETY: geteuid has no preconditions and touches no memory.
        if unsafe { libc::geteuid() } != 0 {
            assert!(result.is_err(), "chown needs root");
            std::fs::remove_dir_all(&tmp).unwrap();
            return;
        }
        let args = result.unwrap();
        assert_eq!(
            value(&args, "--jail"),
            [tmp.join("jails/3").to_str().unwrap()]
        );
        assert!(tmp.join("jails/3").is_dir());
        let meta = |p: &Path| std::fs::symlink_metadata(p).unwrap();
        assert_eq!(meta(&env).uid(), 100_003);
        assert_eq!(meta(&env).mode() & 0o777, 0o700);
        assert_eq!(meta(&env.join("disk.qcow2")).uid(), 100_003);
        // The link itself, never what it points to.
        assert_eq!(meta(&env.join("link")).uid(), 100_003);
        assert_eq!(meta(Path::new("/etc/hostname")).uid(), 0);
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
