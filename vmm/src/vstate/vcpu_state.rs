//! A vCPU's complete architectural state, and how it is read from and written to KVM.
//!
//! Saved on the vCPU's own thread while it is paused; restored on a new vCPU before its
//! thread starts. The restore order is KVM's: CPUID first (it decides which MSRs and XSAVE
//! components exist), MP state, registers, XSAVE/XCRs/debug registers, then the LAPIC before
//! the MSRs (the TSC-deadline MSR needs the LAPIC timer mode), and vCPU events last (pending
//! exceptions and interrupts refer to everything else).

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

/// Most MSRs a state may carry (KVM lists a few dozen).
const MAX_MSRS: usize = 1024;

/// kvmclock MSRs whose value is the guest address of a structure KVM writes into guest
/// memory: (MSR, size of the structure, whether bit 0 is an enable bit).
const KVMCLOCK_AREAS: [(u32, u64, bool); 4] = [
    (0x11, 12, false),        // MSR_KVM_WALL_CLOCK: pvclock_wall_clock
    (0x4b56_4d00, 12, false), // MSR_KVM_WALL_CLOCK_NEW
    (0x12, 32, true),         // MSR_KVM_SYSTEM_TIME: pvclock_vcpu_time_info
    (0x4b56_4d01, 32, true),  // MSR_KVM_SYSTEM_TIME_NEW
];

/// The guest memory areas KVM rewrites as a side effect of restoring this vCPU's MSRs (the
/// kvmclock structures), as (guest address, length). Restoring them from the snapshot after
/// the MSRs keeps a restored guest's memory exactly the snapshot's until it runs.
pub fn kvm_written_areas(state: &VcpuArchState) -> Vec<(u64, u64)> {
    state
        .msrs
        .iter()
        .filter_map(|m| {
            let &(_, len, enable_bit) = KVMCLOCK_AREAS.iter().find(|(i, _, _)| *i == m.index)?;
            if enable_bit && m.data & 1 == 0 {
                return None;
            }
            let gpa = m.data & !1;
            (gpa != 0).then_some((gpa, len))
        })
        .collect()
}

/// Everything KVM holds for one vCPU.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuArchState {
    pub index: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub vcpu_events: kvm_vcpu_events,
    /// TSC frequency the guest saw, so a restore on a host with another frequency is refused.
    pub tsc_khz: Option<u32>,
}

/// Errors reading or writing vCPU state.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("vCPU {index}: cannot {step}")]
    Kvm {
        index: u8,
        step: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: cannot build the {what} list")]
    Fam {
        index: u8,
        what: &'static str,
        #[source]
        source: vmm_sys_util::fam::Error,
    },
    #[error("vCPU {index}: KVM restored only {set} of {wanted} MSRs (first refused: {first:#x})")]
    MsrsRefused {
        index: u8,
        set: usize,
        wanted: usize,
        first: u32,
    },
    #[error("vCPU {index}: the state holds {count} MSRs, more than {MAX_MSRS}")]
    TooManyMsrs { index: u8, count: usize },
}

/// Reads the vCPU's complete state. The vCPU must not be running. `cpuid` is the table the
/// VMM configured: what the snapshot promises the guest. (Reading it back from KVM is not
/// the same everywhere: PVM answers with its own view of the host CPU.)
pub fn save(
    fd: &VcpuFd,
    index: u8,
    msr_list: &[u32],
    cpuid: &[kvm_cpuid_entry2],
) -> Result<VcpuArchState, VcpuStateError> {
    let step = |step| {
        move |source| VcpuStateError::Kvm {
            index,
            step,
            source,
        }
    };
    Ok(VcpuArchState {
        index,
        cpuid: cpuid.to_vec(),
        mp_state: fd.get_mp_state().map_err(step("read the MP state"))?,
        regs: fd.get_regs().map_err(step("read registers"))?,
        sregs: fd.get_sregs().map_err(step("read special registers"))?,
        xsave: fd.get_xsave().map_err(step("read XSAVE state"))?,
        xcrs: fd.get_xcrs().map_err(step("read XCRs"))?,
        debug_regs: fd.get_debug_regs().map_err(step("read debug registers"))?,
        lapic: fd.get_lapic().map_err(step("read the LAPIC"))?,
        msrs: save_msrs(fd, index, msr_list)?,
        vcpu_events: fd.get_vcpu_events().map_err(step("read vCPU events"))?,
        tsc_khz: fd.get_tsc_khz().ok(),
    })
}

/// Reads every listed MSR; KVM stops at the first one it cannot read, which is dropped.
fn save_msrs(fd: &VcpuFd, index: u8, list: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuStateError> {
    let mut saved = Vec::with_capacity(list.len());
    let mut rest: Vec<kvm_msr_entry> = list
        .iter()
        .map(|&i| kvm_msr_entry {
            index: i,
            ..Default::default()
        })
        .collect();
    while !rest.is_empty() {
        let mut msrs = Msrs::from_entries(&rest).map_err(|source| VcpuStateError::Fam {
            index,
            what: "MSR",
            source,
        })?;
        let read = fd
            .get_msrs(&mut msrs)
            .map_err(|source| VcpuStateError::Kvm {
                index,
                step: "read MSRs",
                source,
            })?;
        saved.extend_from_slice(&msrs.as_slice()[..read]);
        if read < rest.len() {
            log::debug!(
                "vCPU {index}: MSR {:#x} not readable, not saved",
                rest[read].index
            );
        }
        rest.drain(..(read + 1).min(rest.len()));
    }
    Ok(saved)
}

/// Writes `state` into a freshly created vCPU.
pub fn restore(fd: &VcpuFd, state: &VcpuArchState) -> Result<(), VcpuStateError> {
    let index = state.index;
    let step = |step| {
        move |source| VcpuStateError::Kvm {
            index,
            step,
            source,
        }
    };
    let fam = |what| {
        move |source| VcpuStateError::Fam {
            index,
            what,
            source,
        }
    };
    if state.msrs.len() > MAX_MSRS {
        return Err(VcpuStateError::TooManyMsrs {
            index,
            count: state.msrs.len(),
        });
    }
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(fam("CPUID"))?;
    fd.set_cpuid2(&cpuid).map_err(step("set CPUID"))?;
    fd.set_mp_state(state.mp_state)
        .map_err(step("set the MP state"))?;
    fd.set_regs(&state.regs).map_err(step("set registers"))?;
    fd.set_sregs(&state.sregs)
        .map_err(step("set special registers"))?;
    // SAFETY: KVM reads the guest FPU's uABI size from this pointer, which exceeds the 4 KiB
    // of `kvm_xsave` only for guests granted dynamic XSAVE features (AMX) through
    // ARCH_REQ_XCOMP_GUEST_PERM; grove-vmm never requests that, so KVM reads within the
    // struct. KVM validates the contents and rejects unsupported feature bits.
    unsafe { fd.set_xsave(&state.xsave) }.map_err(step("set XSAVE state"))?;
    fd.set_xcrs(&state.xcrs).map_err(step("set XCRs"))?;
    fd.set_debug_regs(&state.debug_regs)
        .map_err(step("set debug registers"))?;
    fd.set_lapic(&state.lapic).map_err(step("set the LAPIC"))?;
    let entries = state.msrs.clone();
    let msrs = Msrs::from_entries(&entries).map_err(fam("MSR"))?;
    let set = fd.set_msrs(&msrs).map_err(step("set MSRs"))?;
    if set != entries.len() {
        return Err(VcpuStateError::MsrsRefused {
            index,
            set,
            wanted: entries.len(),
            first: entries[set].index,
        });
    }
    fd.set_vcpu_events(&state.vcpu_events)
        .map_err(step("set vCPU events"))?;
    Ok(())
}
