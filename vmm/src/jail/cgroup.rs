//! The jail's cgroup: memory, CPU and pids limits for one VMM.
//!
//! The leaf is `<own>/<parent>/<id>`, where `<own>` is the cgroup this process was started
//! in (from `/proc/self/cgroup`), so a VMM stays inside whatever limits its starter has.
//! cgroup v2 is used when its hierarchy offers the `memory`, `cpu` and `pids` controllers;
//! on a hybrid host whose controllers are still bound to cgroup v1 hierarchies, the same
//! limits are set in each v1 hierarchy (`memory.limit_in_bytes`, `cpu.cfs_quota_us`,
//! `pids.max`). Neither available: an error, the VMM does not start.

use std::path::{Path, PathBuf};

/// Limits of one jailed VMM.
#[derive(Clone, Debug, PartialEq)]
pub struct CgroupConfig {
    /// Path below the starting cgroup under which the leaf is made (e.g. `grove`).
    pub parent: String,
    /// The leaf's name (one path component).
    pub id: String,
    /// Memory limit in bytes; `None`: unlimited.
    pub memory_bytes: Option<u64>,
    /// CPU limit in CPUs (1.5 = one and a half CPUs' time per period); `None`: unlimited.
    pub cpus: Option<f64>,
    /// Maximum number of processes and threads.
    pub pids: u64,
}

/// Default pids limit: the VMM's threads (main, event loop, up to 32 vCPUs, control
/// clients) with room to spare.
pub const DEFAULT_PIDS: u64 = 128;
/// The CPU controller's period, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;
const V1_CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("bad cgroup name {0:?}: use path components of letters, digits, '-', '_' and '.'")]
    BadName(String),
    #[error("bad CPU limit {0}: give a number of CPUs above 0")]
    BadCpus(f64),
    #[error("no cgroup v2 hierarchy with the memory, cpu and pids controllers and no cgroup v1 hierarchy for {0}")]
    NoController(&'static str),
    #[error("cannot {step} {path}")]
    Io {
        step: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        step,
        path: path.display().to_string(),
        source,
    }
}

impl CgroupConfig {
    pub fn validate(&self) -> Result<(), CgroupError> {
        let good = |s: &str| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        };
        if !self.parent.split('/').all(good) {
            return Err(CgroupError::BadName(self.parent.clone()));
        }
        if !good(&self.id) {
            return Err(CgroupError::BadName(self.id.clone()));
        }
        if let Some(c) = self.cpus {
            if !(c.is_finite() && c > 0.0) {
                return Err(CgroupError::BadCpus(c));
            }
        }
        Ok(())
    }

    fn cpu_quota_us(&self) -> Option<u64> {
        // Validated finite and positive; at least 1 ms per period, as the kernel requires.
        self.cpus
            .map(|c| ((c * CPU_PERIOD_US as f64) as u64).max(1000))
    }
}

/// Which cgroup version holds the leaf, and where.
#[derive(Debug)]
enum Leaf {
    /// cgroup v2: the leaf directory and the starting cgroup (to move back to).
    V2 { leaf: PathBuf, own: PathBuf },
    /// cgroup v1: a leaf and starting cgroup per hierarchy (memory, cpu, pids).
    V1(Vec<(PathBuf, PathBuf)>),
}

/// A created cgroup leaf that this process has joined.
#[derive(Debug)]
pub struct Cgroup(Leaf);

/// One line of `/proc/self/mountinfo`: mount point, filesystem type, super options.
fn mounts() -> Result<Vec<(PathBuf, String, String)>, CgroupError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(path).map_err(io("read", path))?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let point = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            let fstype = r.next()?.to_string();
            let options = r.nth(1).unwrap_or_default().to_string();
            Some((PathBuf::from(unescape(point)), fstype, options))
        })
        .collect())
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// This process's cgroup in the hierarchy whose `/proc/self/cgroup` controller list
/// matches `pick` (the v2 line has an empty list).
fn own_cgroup(pick: impl Fn(&str) -> bool) -> Result<Option<String>, CgroupError> {
    let path = Path::new("/proc/self/cgroup");
    let text = std::fs::read_to_string(path).map_err(io("read", path))?;
    Ok(text.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let _id = parts.next()?;
        let controllers = parts.next()?;
        let cg = parts.next()?;
        pick(controllers).then(|| cg.trim_start_matches('/').to_string())
    }))
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(io("write", path))
}

fn mkdir(path: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(path) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(io("create", path)(e)),
        _ => Ok(()),
    }
}

impl Cgroup {
    /// Creates the leaf with `config`'s limits and moves this process into it. The leaf
    /// stays owned by root: the jailed VMM cannot change its own limits.
    pub fn create(config: &CgroupConfig) -> Result<Self, CgroupError> {
        let mounts = mounts()?;
        if let Some(cg) = Self::create_v2(config, &mounts)? {
            return Ok(cg);
        }
        Self::create_v1(config, &mounts)
    }

    fn create_v2(
        config: &CgroupConfig,
        mounts: &[(PathBuf, String, String)],
    ) -> Result<Option<Self>, CgroupError> {
        let Some((mnt, _, _)) = mounts.iter().find(|(_, t, _)| t == "cgroup2") else {
            return Ok(None);
        };
        let Some(own) = own_cgroup(|c| c.is_empty())? else {
            return Ok(None);
        };
        let own = mnt.join(own);
        let offered = std::fs::read_to_string(own.join("cgroup.controllers")).unwrap_or_default();
        let offered: Vec<&str> = offered.split_whitespace().collect();
        if !V1_CONTROLLERS.iter().all(|c| offered.contains(c)) {
            return Ok(None);
        }
        // Each level must hand the controllers down to the next.
        let mut dir = own.clone();
        for part in config.parent.split('/').chain([config.id.as_str()]) {
            write(&dir.join("cgroup.subtree_control"), "+memory +cpu +pids")?;
            dir = dir.join(part);
            mkdir(&dir)?;
        }
        let leaf = Cgroup(Leaf::V2 {
            leaf: dir.clone(),
            own,
        });
        let limits = || -> Result<(), CgroupError> {
            let memory = config
                .memory_bytes
                .map_or("max".to_string(), |b| b.to_string());
            write(&dir.join("memory.max"), &memory)?;
            if config.memory_bytes.is_some() && dir.join("memory.swap.max").exists() {
                write(&dir.join("memory.swap.max"), "0")?;
            }
            let cpu = config
                .cpu_quota_us()
                .map_or("max".to_string(), |q| q.to_string());
            write(&dir.join("cpu.max"), &format!("{cpu} {CPU_PERIOD_US}"))?;
            write(&dir.join("pids.max"), &config.pids.to_string())?;
            write(&dir.join("cgroup.procs"), &std::process::id().to_string())
        };
        match limits() {
            Ok(()) => Ok(Some(leaf)),
            Err(e) => {
                leaf.remove();
                Err(e)
            }
        }
    }

    fn create_v1(
        config: &CgroupConfig,
        mounts: &[(PathBuf, String, String)],
    ) -> Result<Self, CgroupError> {
        let mut dirs = Vec::new();
        for controller in V1_CONTROLLERS {
            let has = |list: &str| list.split(',').any(|c| c == controller);
            let mnt = mounts
                .iter()
                .find(|(_, t, o)| t == "cgroup" && has(o))
                .map(|(m, _, _)| m)
                .ok_or(CgroupError::NoController(controller))?;
            let own = own_cgroup(has)?.ok_or(CgroupError::NoController(controller))?;
            let own = mnt.join(own);
            dirs.push((own.join(&config.parent).join(&config.id), own));
        }
        let leaf = Cgroup(Leaf::V1(dirs.clone()));
        let limits = || -> Result<(), CgroupError> {
            for (dir, _) in &dirs {
                std::fs::create_dir_all(dir).map_err(io("create", dir))?;
            }
            let [memory, cpu, pids] = [&dirs[0].0, &dirs[1].0, &dirs[2].0];
            // -1: unlimited.
            let bytes = config.memory_bytes.map_or("-1".into(), |b| b.to_string());
            write(&memory.join("memory.limit_in_bytes"), &bytes)?;
            write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
            let quota = config.cpu_quota_us().map_or("-1".into(), |q| q.to_string());
            write(&cpu.join("cpu.cfs_quota_us"), &quota)?;
            write(&pids.join("pids.max"), &config.pids.to_string())?;
            let pid = std::process::id().to_string();
            for (dir, _) in &dirs {
                write(&dir.join("cgroup.procs"), &pid)?;
            }
            Ok(())
        };
        match limits() {
            Ok(()) => Ok(leaf),
            Err(e) => {
                leaf.remove();
                Err(e)
            }
        }
    }

    /// Removes the (empty) leaf that `config` names, if one was left behind by a jailed
    /// VMM whose starter was killed before it could clean up.
    pub fn remove_leftover(config: &CgroupConfig) -> Result<(), CgroupError> {
        config.validate()?;
        let mounts = mounts()?;
        let mut leaves = Vec::new();
        if let Some((mnt, _, _)) = mounts.iter().find(|(_, t, _)| t == "cgroup2") {
            if let Some(own) = own_cgroup(|c| c.is_empty())? {
                leaves.push(mnt.join(own).join(&config.parent).join(&config.id));
            }
        }
        for controller in V1_CONTROLLERS {
            let has = |list: &str| list.split(',').any(|c| c == controller);
            let mnt = mounts.iter().find(|(_, t, o)| t == "cgroup" && has(o));
            if let (Some((mnt, _, _)), Some(own)) = (mnt, own_cgroup(has)?) {
                leaves.push(mnt.join(own).join(&config.parent).join(&config.id));
            }
        }
        for leaf in leaves {
            match std::fs::remove_dir(&leaf) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io("remove", &leaf)(e))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The leaf directories (one for v2, one per controller for v1).
    pub fn leaves(&self) -> Vec<PathBuf> {
        match &self.0 {
            Leaf::V2 { leaf, .. } => vec![leaf.clone()],
            Leaf::V1(dirs) => dirs.iter().map(|(d, _)| d.clone()).collect(),
        }
    }

    /// Moves this process back to its starting cgroup and removes the (then empty) leaf;
    /// the parent levels stay for other VMMs. Failures are logged: the VM has ended.
    pub fn remove(self) {
        let pid = std::process::id().to_string();
        let pairs: Vec<(PathBuf, PathBuf)> = match self.0 {
            Leaf::V2 { leaf, own } => vec![(leaf, own)],
            Leaf::V1(dirs) => dirs,
        };
        for (leaf, own) in pairs {
            let _ = std::fs::write(own.join("cgroup.procs"), &pid);
            if let Err(e) = std::fs::remove_dir(&leaf) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    log::warn!("cannot remove cgroup {}: {e}", leaf.display());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> CgroupConfig {
        CgroupConfig {
            parent: "grove".into(),
            id: "vm-1".into(),
            memory_bytes: None,
            cpus: None,
            pids: DEFAULT_PIDS,
        }
    }

    #[test]
    fn names_are_plain_path_components() {
        assert!(config().validate().is_ok());
        for (parent, id) in [
            ("grove", ".."),
            ("grove", "a/b"),
            ("../x", "a"),
            ("", "a"),
            ("grove//x", "a"),
            ("grove", "a b"),
        ] {
            let c = CgroupConfig {
                parent: parent.into(),
                id: id.into(),
                ..config()
            };
            assert!(c.validate().is_err(), "{parent:?} {id:?}");
        }
        let nested = CgroupConfig {
            parent: "grove/tenants".into(),
            ..config()
        };
        assert!(nested.validate().is_ok());
    }

    #[test]
    fn cpu_limits_become_quotas() {
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let c = CgroupConfig {
                cpus: Some(bad),
                ..config()
            };
            assert!(c.validate().is_err(), "{bad}");
        }
        let c = |cpus| CgroupConfig {
            cpus: Some(cpus),
            ..config()
        };
        assert_eq!(c(1.5).cpu_quota_us(), Some(150_000));
        assert_eq!(c(0.0001).cpu_quota_us(), Some(1000));
        assert_eq!(config().cpu_quota_us(), None);
    }

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape("/a\\040b\\134c"), "/a b\\c");
    }
}
