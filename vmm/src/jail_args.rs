//! `--jail*` flags of `grove-vmm run` and `restore` (see docs/jail.md).

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use vmm::jail::cgroup::{CgroupConfig, DEFAULT_PIDS};
use vmm::jail::{JailConfig, DEFAULT_MAX_OPEN_FILES};

#[derive(Args, Debug, Default)]
pub struct JailArgs {
    /// Run jailed (as root): DIR becomes the VMM's root, holding only the --jail-ro and
    /// --jail-rw paths (at their host paths) and /dev/{kvm,null,urandom}. See docs/jail.md.
    #[arg(long, value_name = "DIR", requires_all = ["jail_uid", "jail_gid"])]
    jail: Option<PathBuf>,
    /// Unprivileged user id the jailed VMM runs as (not 0).
    #[arg(long, value_name = "UID", requires = "jail")]
    jail_uid: Option<u32>,
    /// Unprivileged group id the jailed VMM runs as (not 0).
    #[arg(long, value_name = "GID", requires = "jail")]
    jail_gid: Option<u32>,
    /// A file or directory the VM reads (repeatable): kernel, initrd, base disk layers,
    /// the config file, a snapshot to restore. Absolute, without symbolic links.
    #[arg(long, value_name = "PATH", requires = "jail")]
    jail_ro: Vec<PathBuf>,
    /// A file or directory the VM writes or creates files in (repeatable): its disk
    /// overlay's directory, its sockets' and console's directory, snapshot destinations.
    #[arg(long, value_name = "PATH", requires = "jail")]
    jail_rw: Vec<PathBuf>,
    /// Join this network namespace (e.g. /run/netns/NAME, holding the VM's TAP) instead
    /// of a new empty one; /dev/net/tun is then available in the jail.
    #[arg(long, value_name = "PATH", requires = "jail")]
    jail_netns: Option<PathBuf>,
    /// cgroup under this process's own cgroup (per hierarchy) where the VM's cgroup is
    /// made [default: grove].
    #[arg(long, value_name = "PATH", requires = "jail")]
    jail_cgroup_parent: Option<String>,
    /// The VM's cgroup name [default: the jail directory's name].
    #[arg(long, value_name = "NAME", requires = "jail")]
    jail_cgroup_id: Option<String>,
    /// Do not create a cgroup (no memory, CPU or pids limits).
    #[arg(long, requires = "jail", conflicts_with_all = ["jail_cgroup_parent", "jail_cgroup_id", "jail_memory", "jail_cpus", "jail_pids"])]
    jail_no_cgroup: bool,
    /// Memory limit of the VMM's cgroup in MiB (guest memory plus the VMM's own).
    #[arg(long, value_name = "MiB", requires = "jail")]
    jail_memory: Option<u64>,
    /// CPU limit of the VMM's cgroup, in CPUs (e.g. 1.5).
    #[arg(long, value_name = "CPUS", requires = "jail")]
    jail_cpus: Option<f64>,
    /// Process and thread limit of the VMM's cgroup [default: 128].
    #[arg(long, value_name = "N", requires = "jail")]
    jail_pids: Option<u64>,
    /// RLIMIT_NOFILE of the jailed VMM [default: 1024].
    #[arg(long, value_name = "N", requires = "jail")]
    jail_nofile: Option<u64>,
    /// RLIMIT_FSIZE of the jailed VMM in bytes: the largest file it may write (a larger
    /// write ends it with SIGXFSZ) [default: unlimited].
    #[arg(long, value_name = "BYTES", requires = "jail")]
    jail_fsize: Option<u64>,
}

impl JailArgs {
    /// The jail these flags ask for, if any.
    pub fn config(&self) -> anyhow::Result<Option<JailConfig>> {
        let Some(root) = &self.jail else {
            return Ok(None);
        };
        let (Some(uid), Some(gid)) = (self.jail_uid, self.jail_gid) else {
            bail!("--jail needs --jail-uid and --jail-gid");
        };
        let cgroup = if self.jail_no_cgroup {
            None
        } else {
            let id = match &self.jail_cgroup_id {
                Some(id) => id.clone(),
                None => root
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            };
            let memory_bytes = self
                .jail_memory
                .map(|mib| mib.checked_mul(1 << 20))
                .map(|b| b.ok_or_else(|| anyhow::anyhow!("--jail-memory is too large")))
                .transpose()?;
            Some(CgroupConfig {
                parent: self
                    .jail_cgroup_parent
                    .clone()
                    .unwrap_or_else(|| "grove".into()),
                id,
                memory_bytes,
                cpus: self.jail_cpus,
                pids: self.jail_pids.unwrap_or(DEFAULT_PIDS),
            })
        };
        Ok(Some(JailConfig {
            root: root.clone(),
            uid,
            gid,
            read_only: self.jail_ro.clone(),
            read_write: self.jail_rw.clone(),
            netns: self.jail_netns.clone(),
            cgroup,
            max_open_files: self.jail_nofile.unwrap_or(DEFAULT_MAX_OPEN_FILES),
            max_file_size: self.jail_fsize,
        }))
    }
}

/// Enters the jail the flags ask for (returns in the jailed VMM only); exit code 2 with a
/// one-line error when any step fails.
pub fn enter(args: &JailArgs) -> Result<(), std::process::ExitCode> {
    let fail = |e: anyhow::Error| {
        eprintln!("grove-vmm: error: jail: {e:#}");
        std::process::ExitCode::from(2)
    };
    match args.config().map_err(fail)? {
        Some(config) => vmm::jail::enter(&config).map_err(|e| fail(e.into())),
        None => Ok(()),
    }
}
