//! Opening `/dev/kvm` and checking that it can run a Grove VM, with errors that say what to do.

use std::path::Path;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};

/// KVM capabilities a Grove VM cannot run without.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::PitState2, "KVM_CAP_PIT_STATE2"),
    (Cap::AdjustClock, "KVM_CAP_ADJUST_CLOCK"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::MpState, "KVM_CAP_MP_STATE"),
    (Cap::VcpuEvents, "KVM_CAP_VCPU_EVENTS"),
    // Snapshots: the complete FPU/XSAVE state, XCRs and debug registers.
    (Cap::Xsave, "KVM_CAP_XSAVE"),
    (Cap::Xcrs, "KVM_CAP_XCRS"),
    (Cap::Debugregs, "KVM_CAP_DEBUGREGS"),
];

/// Errors opening or checking KVM.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error(
        "/dev/kvm does not exist: this host has no KVM (load kvm_intel/kvm_amd, or enable \
         virtualization for this machine)"
    )]
    Missing,
    #[error("cannot open /dev/kvm: run as root or add the user to the group that owns /dev/kvm")]
    Permission(#[source] vmm_sys_util::errno::Error),
    #[error("cannot open /dev/kvm")]
    Open(#[source] vmm_sys_util::errno::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    #[error("KVM lacks the capability {0}, which grove-vmm needs")]
    MissingCapability(&'static str),
    #[error("{requested} vCPUs requested but this host's KVM allows at most {max}")]
    TooManyVcpus { requested: usize, max: usize },
    #[error("cannot read the list of MSRs KVM saves")]
    MsrList(#[source] vmm_sys_util::errno::Error),
    #[error("cannot read the CPUID KVM supports")]
    SupportedCpuid(#[source] vmm_sys_util::errno::Error),
}

/// An open, checked `/dev/kvm`.
pub struct KvmContext {
    kvm: Kvm,
    max_vcpus: usize,
}

impl KvmContext {
    /// Opens `/dev/kvm` and checks the API version and every required capability.
    pub fn open() -> Result<Self, KvmError> {
        if !Path::new("/dev/kvm").exists() {
            return Err(KvmError::Missing);
        }
        let kvm = Kvm::new().map_err(|e| match e.errno() {
            libc::EACCES | libc::EPERM => KvmError::Permission(e),
            libc::ENOENT | libc::ENXIO | libc::ENODEV => KvmError::Missing,
            _ => KvmError::Open(e),
        })?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(KvmError::ApiVersion(version));
        }
        for (cap, name) in REQUIRED_CAPS {
            if !kvm.check_extension(*cap) {
                return Err(KvmError::MissingCapability(name));
            }
        }
        let max_vcpus = kvm.get_max_vcpus();
        Ok(Self { kvm, max_vcpus })
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Checks that KVM can create `count` vCPUs.
    pub fn check_vcpu_count(&self, count: usize) -> Result<(), KvmError> {
        if count > self.max_vcpus {
            return Err(KvmError::TooManyVcpus {
                requested: count,
                max: self.max_vcpus,
            });
        }
        Ok(())
    }

    /// The MSRs KVM can save and restore for a vCPU.
    pub fn msr_index_list(&self) -> Result<Vec<u32>, KvmError> {
        Ok(self
            .kvm
            .get_msr_index_list()
            .map_err(KvmError::MsrList)?
            .as_slice()
            .to_vec())
    }

    /// CPUID leaves KVM can expose to a guest on this host.
    pub fn supported_cpuid(&self) -> Result<CpuId, KvmError> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(KvmError::SupportedCpuid)
    }
}

/// Whether `/dev/kvm` is provided by the PVM module (shadow-paging nested KVM whose guest
/// kernel mode is emulated; see docs/pvm.md).
pub fn is_pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}
