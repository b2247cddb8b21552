//! The VM configuration accepted by `grove-vmm run --config vm.json` (and built from the
//! command-line flags). Separate from runtime objects; checked in one [`VmConfig::validate`].

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::disk::{DiskFormat, MAX_CHAIN_DEPTH_LIMIT};
use crate::vstate::cpuid::CpuTemplate;

/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u8 = 32;
/// Smallest guest memory: room for the boot structures and a kernel loaded at 16 MiB.
pub const MIN_MEMORY_MIB: u64 = 32;
/// Virtio-blk serial numbers are at most 20 bytes.
pub const MAX_DISK_ID_LEN: usize = 20;
/// The base command line used when the configuration gives none.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 quiet";

fn default_vcpus() -> u8 {
    1
}
fn default_memory_mib() -> u64 {
    128
}
fn default_true() -> bool {
    true
}

fn default_max_chain_depth() -> usize {
    crate::disk::DEFAULT_MAX_CHAIN_DEPTH
}

/// A virtio block device backed by a disk image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    /// Serial number returned to the guest (VIRTIO_BLK_T_GET_ID); defaults to `diskN`.
    #[serde(default)]
    pub id: Option<String>,
    /// The image's format; never guessed from its contents.
    #[serde(default)]
    pub format: DiskFormat,
    /// Follow the backing files a qcow2 image names (each must state its format). Without
    /// it, a qcow2 image with a backing file is refused.
    #[serde(default)]
    pub allow_backing: bool,
    /// Most layers the disk's chain may have (active layer and base included).
    #[serde(default = "default_max_chain_depth")]
    pub max_chain_depth: usize,
}

impl DiskConfig {
    /// A raw image with the defaults.
    pub fn raw(path: impl Into<PathBuf>, read_only: bool) -> Self {
        Self {
            path: path.into(),
            read_only,
            id: None,
            format: DiskFormat::Raw,
            allow_backing: false,
            max_chain_depth: default_max_chain_depth(),
        }
    }
}

/// A virtio-net device on a host TAP (`docs/networking.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The TAP's interface name in the VMM's network namespace (at most 15 bytes); created
    /// if it does not exist.
    pub tap: String,
    /// The guest's MAC address, `xx:xx:xx:xx:xx:xx` (unicast); random when absent.
    #[serde(default)]
    pub mac: Option<String>,
    /// The device's name in snapshots and for `--net-override`; defaults to `netN`.
    #[serde(default)]
    pub id: Option<String>,
}

impl NetConfig {
    /// The id of the `index`-th network device.
    pub fn id_or_default(&self, index: usize) -> String {
        self.id.clone().unwrap_or_else(|| format!("net{index}"))
    }
}

/// A whole VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// ELF vmlinux (PVH or 64-bit entry) or bzImage.
    pub kernel: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Replaces [`DEFAULT_CMDLINE`]; the VMM still appends root and device arguments.
    #[serde(default)]
    pub cmdline: Option<String>,
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// The root filesystem: attached first (`/dev/vda`) with `root=/dev/vda` on the command line.
    #[serde(default)]
    pub rootfs: Option<DiskConfig>,
    /// More disks, `/dev/vdb` onwards in order.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// Where the guest console goes; standard output when absent.
    #[serde(default)]
    pub serial: Option<PathBuf>,
    #[serde(default)]
    pub cpu_template: CpuTemplate,
    /// Attach a virtio-rng device (entropy from the host).
    #[serde(default = "default_true")]
    pub rng: bool,
    /// Track the pages the guest and the devices write (KVM dirty log plus the VMM's own
    /// bitmap), so diff snapshots can be taken.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Attach a virtio-vsock device whose host side is a Unix socket (docs/vsock.md).
    /// Absent from the JSON when `None`, so snapshots of VMs without one stay readable by
    /// a `grove-vmm` that predates the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// Network devices (virtio-net over TAP), in order.
    #[serde(default)]
    pub net: Vec<NetConfig>,
}

/// Longest `uds_path`: `<uds_path>_<port>` (up to 11 more bytes) must still fit a socket
/// address (108 bytes with the terminating NUL).
pub const MAX_VSOCK_PATH_LEN: usize = 107 - 11;

/// A virtio-vsock device (docs/vsock.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id: 3 to 2^32 - 2 (0-2 are reserved, -1 means "any").
    pub guest_cid: u32,
    /// The Unix socket the VMM listens on for host-initiated connections; guest-initiated
    /// connections to host port P go to `<uds_path>_<P>`.
    pub uds_path: PathBuf,
}

/// A configuration that cannot describe a VM.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("invalid config file {path}: {reason}")]
    Parse { path: String, reason: String },
    #[error("vcpus must be between 1 and {MAX_VCPUS}, got {0}")]
    VcpuCount(u8),
    #[error("memory must be at least {MIN_MEMORY_MIB} MiB, got {0} MiB")]
    MemoryTooSmall(u64),
    #[error("memory of {requested} MiB is more than this host has ({host} MiB)")]
    MemoryTooLarge { requested: u64, host: u64 },
    #[error("the kernel path is empty")]
    NoKernel,
    #[error("disk {0} is attached twice")]
    DuplicateDisk(String),
    #[error("disk id {0:?} is longer than {MAX_DISK_ID_LEN} bytes")]
    DiskIdTooLong(String),
    #[error("disk path is empty")]
    EmptyDiskPath,
    #[error("the command line contains a NUL byte")]
    CmdlineNul,
    #[error("vsock guest_cid must be between 3 and 4294967294 (0-2 and -1 are reserved), got {0}")]
    VsockCid(u32),
    #[error("vsock uds_path {0:?} must be a non-empty path of at most {MAX_VSOCK_PATH_LEN} bytes")]
    VsockPath(String),
    #[error(
        "disk {path}: max_chain_depth must be between 1 and {MAX_CHAIN_DEPTH_LIMIT}, got {depth}"
    )]
    ChainDepth { path: String, depth: usize },
    #[error("network device TAP {tap:?}: {reason}")]
    NetTap { tap: String, reason: String },
    #[error("network device id {0:?} is used twice")]
    DuplicateNetId(String),
}

impl VmConfig {
    /// A minimal configuration booting `kernel` with the defaults.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: None,
            vcpus: default_vcpus(),
            memory_mib: default_memory_mib(),
            rootfs: None,
            disks: Vec::new(),
            serial: None,
            cpu_template: CpuTemplate::default(),
            track_dirty_pages: false,
            rng: true,
            vsock: None,
            net: Vec::new(),
        }
    }

    /// Reads and parses a JSON configuration file (unknown fields are errors).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: display.clone(),
            reason: e.to_string(),
        })?;
        serde_json::from_str(&text).map_err(|e| ConfigError::Parse {
            path: display,
            reason: e.to_string(),
        })
    }

    /// All disks in attachment order: the root filesystem first.
    pub fn all_disks(&self) -> impl Iterator<Item = &DiskConfig> {
        self.rootfs.iter().chain(self.disks.iter())
    }

    /// Checks everything that can be checked without touching the host's files or KVM.
    /// `host_memory_mib` is the host's physical memory, when known.
    pub fn validate(&self, host_memory_mib: Option<u64>) -> Result<(), ConfigError> {
        if self.kernel.as_os_str().is_empty() {
            return Err(ConfigError::NoKernel);
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::VcpuCount(self.vcpus));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::MemoryTooSmall(self.memory_mib));
        }
        if let Some(host) = host_memory_mib {
            if self.memory_mib > host {
                return Err(ConfigError::MemoryTooLarge {
                    requested: self.memory_mib,
                    host,
                });
            }
        }
        if self.cmdline.as_deref().is_some_and(|c| c.contains('\0')) {
            return Err(ConfigError::CmdlineNul);
        }
        let mut seen = HashSet::new();
        for disk in self.all_disks() {
            if disk.path.as_os_str().is_empty() {
                return Err(ConfigError::EmptyDiskPath);
            }
            // Two devices on one file would corrupt it; compare canonical paths where possible.
            let key = std::fs::canonicalize(&disk.path).unwrap_or_else(|_| disk.path.clone());
            if !seen.insert(key) {
                return Err(ConfigError::DuplicateDisk(disk.path.display().to_string()));
            }
            if let Some(id) = &disk.id {
                if id.len() > MAX_DISK_ID_LEN {
                    return Err(ConfigError::DiskIdTooLong(id.clone()));
                }
            }
            if disk.max_chain_depth == 0 || disk.max_chain_depth > MAX_CHAIN_DEPTH_LIMIT {
                return Err(ConfigError::ChainDepth {
                    path: disk.path.display().to_string(),
                    depth: disk.max_chain_depth,
                });
            }
        }
        if let Some(vsock) = &self.vsock {
            vsock.validate()?;
        }
        self.validate_net()
    }

    /// Network devices: valid, distinct TAP names, unicast MACs, distinct ids.
    fn validate_net(&self) -> Result<(), ConfigError> {
        let mut taps = HashSet::new();
        let mut ids = HashSet::new();
        for (i, net) in self.net.iter().enumerate() {
            let bad = |reason: String| ConfigError::NetTap {
                tap: net.tap.clone(),
                reason,
            };
            crate::devices::virtio::net::tap::check_ifname(&net.tap)
                .map_err(|r| bad(r.to_string()))?;
            if !taps.insert(net.tap.as_str()) {
                return Err(bad("attached twice".into()));
            }
            if let Some(mac) = &net.mac {
                mac.parse::<crate::devices::virtio::net::MacAddr>()
                    .map_err(|e| bad(e.to_string()))?;
            }
            let id = net.id_or_default(i);
            if id.is_empty() || id.contains('=') {
                return Err(bad(format!("invalid id {id:?}")));
            }
            if !ids.insert(id.clone()) {
                return Err(ConfigError::DuplicateNetId(id));
            }
        }
        Ok(())
    }
}

impl VsockConfig {
    /// Checks the CID and that every socket path derived from `uds_path` fits an address.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.guest_cid < 3 || self.guest_cid == u32::MAX {
            return Err(ConfigError::VsockCid(self.guest_cid));
        }
        let len = self.uds_path.as_os_str().len();
        if len == 0 || len > MAX_VSOCK_PATH_LEN {
            return Err(ConfigError::VsockPath(self.uds_path.display().to_string()));
        }
        Ok(())
    }
}

/// Physical memory of this host in MiB, from /proc/meminfo.
pub fn host_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> VmConfig {
        let mut c = VmConfig::new("/k");
        c.rootfs = Some(DiskConfig::raw("/r", false));
        c
    }

    #[test]
    fn defaults_are_valid() {
        valid().validate(Some(1024)).unwrap();
    }

    #[test]
    fn rejects_bad_vcpus_memory_and_disks() {
        let mut c = valid();
        c.vcpus = 0;
        assert_eq!(c.validate(None), Err(ConfigError::VcpuCount(0)));
        c.vcpus = 33;
        assert_eq!(c.validate(None), Err(ConfigError::VcpuCount(33)));
        let mut c = valid();
        c.memory_mib = 8;
        assert_eq!(c.validate(None), Err(ConfigError::MemoryTooSmall(8)));
        c.memory_mib = 4096;
        assert!(matches!(
            c.validate(Some(2048)),
            Err(ConfigError::MemoryTooLarge { .. })
        ));
        let mut c = valid();
        c.disks.push(DiskConfig::raw("/r", true));
        assert!(matches!(
            c.validate(None),
            Err(ConfigError::DuplicateDisk(_))
        ));
        let mut c = valid();
        c.disks.push(DiskConfig {
            id: Some("x".repeat(21)),
            ..DiskConfig::raw("/d", true)
        });
        assert!(matches!(
            c.validate(None),
            Err(ConfigError::DiskIdTooLong(_))
        ));
        let mut c = valid();
        c.kernel = PathBuf::new();
        assert_eq!(c.validate(None), Err(ConfigError::NoKernel));
    }

    #[test]
    fn json_rejects_unknown_fields_and_fills_defaults() {
        let c: VmConfig =
            serde_json::from_str(r#"{"kernel":"/k","rootfs":{"path":"/r"}}"#).unwrap();
        assert_eq!((c.vcpus, c.memory_mib, c.rng), (1, 128, true));
        assert_eq!(c.cpu_template, CpuTemplate::Host);
        let err = serde_json::from_str::<VmConfig>(r#"{"kernel":"/k","vcpu":2}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `vcpu`"), "{err}");
        let err = serde_json::from_str::<VmConfig>(
            r#"{"kernel":"/k","disks":[{"path":"/d","ro":true}]}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `ro`"), "{err}");
        let c: VmConfig =
            serde_json::from_str(r#"{"kernel":"/k","cpu_template":"x86-64-v2"}"#).unwrap();
        assert_eq!(c.cpu_template, CpuTemplate::X86_64V2);
    }

    #[test]
    fn vsock_cid_and_path_are_checked() {
        let mut c = valid();
        let vsock = |cid, path: &str| {
            Some(VsockConfig {
                guest_cid: cid,
                uds_path: path.into(),
            })
        };
        c.vsock = vsock(3, "/run/v.sock");
        c.validate(None).unwrap();
        for cid in [0, 1, 2, u32::MAX] {
            c.vsock = vsock(cid, "/run/v.sock");
            assert_eq!(c.validate(None), Err(ConfigError::VsockCid(cid)));
        }
        c.vsock = vsock(3, "");
        assert!(matches!(c.validate(None), Err(ConfigError::VsockPath(_))));
        c.vsock = vsock(3, &"x".repeat(MAX_VSOCK_PATH_LEN + 1));
        assert!(matches!(c.validate(None), Err(ConfigError::VsockPath(_))));
        let c: VmConfig = serde_json::from_str(
            r#"{"kernel":"/k","vsock":{"guest_cid":7,"uds_path":"/run/v.sock"}}"#,
        )
        .unwrap();
        assert_eq!(c.vsock, vsock(7, "/run/v.sock"));
        let json = serde_json::to_string(&VmConfig::new("/k")).unwrap();
        assert!(!json.contains("vsock"), "{json}");
        let err = serde_json::from_str::<VmConfig>(
            r#"{"kernel":"/k","vsock":{"guest_cid":7,"uds_path":"/v","cid":3}}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `cid`"), "{err}");
    }

    #[test]
    fn network_devices_are_checked() {
        let net = |tap: &str, mac: Option<&str>, id: Option<&str>| NetConfig {
            tap: tap.into(),
            mac: mac.map(String::from),
            id: id.map(String::from),
        };
        let mut c = valid();
        c.net = vec![
            net("tap0", Some("06:00:ac:10:00:02"), None),
            net("tap1", None, Some("uplink")),
        ];
        c.validate(None).unwrap();
        assert_eq!(c.net[0].id_or_default(0), "net0");
        for bad in [
            vec![net("", None, None)],
            vec![net("sixteen-bytes-xx", None, None)],
            vec![net("a/b", None, None)],
            vec![net("tap0", Some("06:00:ac:10:00"), None)],
            vec![net("tap0", Some("01:00:5e:00:00:01"), None)],
            vec![net("tap0", None, None), net("tap0", None, None)],
            vec![net("tap0", None, Some("a=b"))],
        ] {
            let mut c = valid();
            c.net = bad;
            assert!(
                matches!(c.validate(None), Err(ConfigError::NetTap { .. })),
                "{:?}",
                c.net
            );
        }
        let mut c = valid();
        c.net = vec![net("tap0", None, Some("net1")), net("tap1", None, None)];
        assert_eq!(
            c.validate(None),
            Err(ConfigError::DuplicateNetId("net1".into()))
        );
        let c: VmConfig = serde_json::from_str(
            r#"{"kernel":"/k","net":[{"tap":"tap0","mac":"06:00:ac:10:00:02"}]}"#,
        )
        .unwrap();
        assert_eq!(c.net, vec![net("tap0", Some("06:00:ac:10:00:02"), None)]);
        let err = serde_json::from_str::<VmConfig>(r#"{"kernel":"/k","net":[{"if":"tap0"}]}"#)
            .unwrap_err();
        assert!(err.to_string().contains("unknown field `if`"), "{err}");
    }

    #[test]
    fn file_errors_name_the_file() {
        let err = VmConfig::from_file(Path::new("/nonexistent/vm.json")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vm.json"));
    }
}
