//! Guest CPUID: KVM's supported CPUID filtered through a named CPU template, normalised per
//! vCPU (APIC ID, topology, hypervisor bit), and restricted further on PVM hosts.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Named CPU templates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CpuTemplate {
    /// Everything KVM supports on this host (best performance, least portable snapshots).
    #[default]
    Host,
    /// The x86-64-v2 feature level (SSE4.2, POPCNT, CX16; no XSAVE/AVX), so that snapshots
    /// restore on any reasonably recent x86-64 host.
    #[serde(rename = "x86-64-v2")]
    X86_64V2,
}

impl CpuTemplate {
    pub fn name(self) -> &'static str {
        match self {
            CpuTemplate::Host => "host",
            CpuTemplate::X86_64V2 => "x86-64-v2",
        }
    }
}

impl std::str::FromStr for CpuTemplate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "host" => Ok(CpuTemplate::Host),
            "x86-64-v2" => Ok(CpuTemplate::X86_64V2),
            _ => Err(format!(
                "unknown CPU template {s:?} (known: host, x86-64-v2)"
            )),
        }
    }
}

/// Errors building the guest CPUID.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error("cannot build the CPUID table")]
    Fam(#[source] vmm_sys_util::fam::Error),
}

// Leaf 1 ECX
const ECX_SSE3: u32 = 1 << 0;
const ECX_PCLMULQDQ: u32 = 1 << 1;
const ECX_VMX: u32 = 1 << 5;
const ECX_SSSE3: u32 = 1 << 9;
const ECX_CX16: u32 = 1 << 13;
const ECX_PCID: u32 = 1 << 17;
const ECX_SSE41: u32 = 1 << 19;
const ECX_SSE42: u32 = 1 << 20;
const ECX_X2APIC: u32 = 1 << 21;
const ECX_POPCNT: u32 = 1 << 23;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_XSAVE: u32 = 1 << 26;
const ECX_OSXSAVE: u32 = 1 << 27;
const ECX_AVX: u32 = 1 << 28;
const ECX_FMA: u32 = 1 << 12;
const ECX_F16C: u32 = 1 << 29;
const ECX_HYPERVISOR: u32 = 1 << 31;
// Leaf 1 EDX: FPU VME DE PSE TSC MSR PAE MCE CX8 APIC SEP MTRR PGE MCA CMOV PAT PSE36
// CLFLUSH MMX FXSR SSE SSE2 (the x86-64 baseline).
const EDX_BASELINE: u32 = 0x0789_fbff;
const EDX_HTT: u32 = 1 << 28;
// Leaf 7 EBX
const EBX7_AVX2: u32 = 1 << 5;
const EBX7_ERMS: u32 = 1 << 9;
const EBX7_AVX512F: u32 = 1 << 16;
const EBX7_SMAP: u32 = 1 << 20;
// Leaf 7 EDX
const EDX7_FSRM: u32 = 1 << 4;
// Leaf 0x8000_0001 ECX / EDX
const ECX_EXT_LAHF: u32 = 1 << 0;
const EDX_EXT_SYSCALL: u32 = 1 << 11;
const EDX_EXT_NX: u32 = 1 << 20;
const EDX_EXT_RDTSCP: u32 = 1 << 27;
const EDX_EXT_LM: u32 = 1 << 29;

/// Builds the CPUID table of vCPU `index` out of `count` from KVM's supported CPUID.
pub fn build(
    supported: &CpuId,
    template: CpuTemplate,
    index: u8,
    count: u8,
    pvm: bool,
) -> Result<CpuId, CpuidError> {
    let mut entries: Vec<kvm_cpuid_entry2> = supported.as_slice().to_vec();
    if template == CpuTemplate::X86_64V2 {
        apply_x86_64_v2(&mut entries);
    }
    if pvm {
        apply_pvm_baseline(&mut entries);
    }
    normalize(&mut entries, index, count);
    CpuId::from_entries(&entries).map_err(CpuidError::Fam)
}

fn for_leaf(entries: &mut [kvm_cpuid_entry2], function: u32, f: impl FnMut(&mut kvm_cpuid_entry2)) {
    entries
        .iter_mut()
        .filter(|e| e.function == function)
        .for_each(f);
}

fn apply_x86_64_v2(entries: &mut Vec<kvm_cpuid_entry2>) {
    let ecx_allowed = ECX_SSE3
        | ECX_PCLMULQDQ
        | ECX_SSSE3
        | ECX_CX16
        | ECX_PCID
        | ECX_SSE41
        | ECX_SSE42
        | ECX_X2APIC
        | ECX_POPCNT
        | ECX_TSC_DEADLINE
        | ECX_HYPERVISOR;
    for_leaf(entries, 1, |e| {
        e.ecx &= ecx_allowed;
        e.edx &= EDX_BASELINE | EDX_HTT;
    });
    // Structured extended features: none beyond the baseline.
    for_leaf(entries, 7, |e| {
        e.ebx = 0;
        e.ecx = 0;
        e.edx = 0;
    });
    for_leaf(entries, 0x8000_0001, |e| {
        e.ecx &= ECX_EXT_LAHF;
        e.edx &= EDX_EXT_SYSCALL | EDX_EXT_NX | EDX_EXT_RDTSCP | EDX_EXT_LM;
    });
    // No XSAVE: drop the XSAVE state leaf entirely.
    entries.retain(|e| e.function != 0xd);
}

/// Masks what the PVM host's instruction emulator cannot execute in guest kernel mode
/// (XSAVE/XRSTOR, POPCNT, CLAC/STAC, CMPXCHG16B), and ERMS/FSRM, which make the kernel use
/// byte-wise `rep movsb/stosb` that is slow under emulation. See docs/pvm.md.
fn apply_pvm_baseline(entries: &mut Vec<kvm_cpuid_entry2>) {
    for_leaf(entries, 1, |e| {
        e.ecx &= !(ECX_XSAVE | ECX_OSXSAVE | ECX_AVX | ECX_FMA | ECX_F16C | ECX_POPCNT | ECX_CX16);
    });
    for_leaf(entries, 7, |e| {
        if e.index == 0 {
            e.ebx &= !(EBX7_SMAP | EBX7_ERMS | EBX7_AVX2 | EBX7_AVX512F);
            e.edx &= !EDX7_FSRM;
        }
    });
    entries.retain(|e| e.function != 0xd);
}

/// Number of bits needed to number `count` APIC IDs.
fn id_bits(count: u8) -> u32 {
    u32::from(count.max(1)).next_power_of_two().trailing_zeros()
}

/// Per-vCPU values: APIC ID, logical processor counts, one socket of `count` single-thread
/// cores, the hypervisor bit; nested virtualisation hidden.
fn normalize(entries: &mut Vec<kvm_cpuid_entry2>, index: u8, count: u8) {
    let apic_id = u32::from(index);
    let count32 = u32::from(count);
    for_leaf(entries, 1, |e| {
        e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (count32 << 16);
        e.ecx = (e.ecx | ECX_HYPERVISOR) & !ECX_VMX;
        if count > 1 {
            e.edx |= EDX_HTT;
        } else {
            e.edx &= !EDX_HTT;
        }
    });
    for_leaf(entries, 4, |e| {
        let cache_level = (e.eax >> 5) & 0x7;
        // Cores per package - 1 in [31:26]; threads sharing this cache - 1 in [25:14]:
        // L1/L2 are per core, L3 is shared by the socket.
        let sharing = if cache_level >= 3 { count32 - 1 } else { 0 };
        e.eax = (e.eax & 0x3fff) | ((sharing & 0xfff) << 14) | (((count32 - 1) & 0x3f) << 26);
    });
    // Extended topology (0xb, and 0x1f where the host has it): SMT level with one thread,
    // core level with `count` cores.
    for leaf in [0xb, 0x1f] {
        if !entries.iter().any(|e| e.function == leaf) {
            continue;
        }
        entries.retain(|e| e.function != leaf);
        for (sub, (eax, ebx, level_type)) in [
            (0u32, (0, 1, 1)),
            (1, (id_bits(count), count32, 2)),
            (2, (0, 0, 0)),
        ] {
            entries.push(kvm_cpuid_entry2 {
                function: leaf,
                index: sub,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                eax,
                ebx,
                ecx: (level_type << 8) | sub,
                edx: apic_id,
                ..Default::default()
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn host() -> CpuId {
        CpuId::from_entries(&[
            entry(0, 0, 0x1f, 0, 0, 0),
            entry(1, 0, 0x906ea, 0x0010_0800, !ECX_HYPERVISOR, 0xffff_ffff),
            entry(4, 0, (3 << 5) | 0x1, 0, 0, 0),
            entry(7, 0, 0, 0xffff_ffff, 0xffff_ffff, 0xffff_ffff),
            entry(0xb, 0, 1, 2, 0x100, 0),
            entry(0xd, 0, 0x7, 0, 0, 0),
            entry(0x8000_0001, 0, 0, 0, 0xffff_ffff, 0xffff_ffff),
        ])
        .unwrap()
    }

    fn get(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn host_template_sets_per_vcpu_topology() {
        let c = build(&host(), CpuTemplate::Host, 3, 4, false).unwrap();
        let l1 = get(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_eq!(l1.ecx & ECX_VMX, 0);
        assert_ne!(l1.ecx & ECX_XSAVE, 0, "host keeps XSAVE off PVM");
        let core = get(&c, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.edx, core.ecx >> 8), (2, 4, 3, 2));
        assert_eq!(get(&c, 0xb, 2).ecx >> 8, 0);
        assert_eq!(get(&c, 4, 0).eax >> 26, 3);
        assert!(c.as_slice().iter().any(|e| e.function == 0xd));
    }

    #[test]
    fn pvm_baseline_masks_what_the_emulator_lacks() {
        let c = build(&host(), CpuTemplate::Host, 0, 1, true).unwrap();
        let l1 = get(&c, 1, 0);
        for bit in [ECX_XSAVE, ECX_POPCNT, ECX_CX16, ECX_AVX] {
            assert_eq!(l1.ecx & bit, 0);
        }
        let l7 = get(&c, 7, 0);
        assert_eq!(l7.ebx & (EBX7_SMAP | EBX7_ERMS), 0);
        assert_eq!(l7.edx & EDX7_FSRM, 0);
        assert!(!c.as_slice().iter().any(|e| e.function == 0xd));
        assert_eq!(l1.edx & EDX_HTT, 0);
    }

    #[test]
    fn x86_64_v2_template_is_a_fixed_feature_level() {
        let c = build(&host(), CpuTemplate::X86_64V2, 0, 2, false).unwrap();
        let l1 = get(&c, 1, 0);
        assert_eq!(l1.ecx & ECX_XSAVE, 0);
        assert_ne!(l1.ecx & ECX_POPCNT, 0);
        assert_ne!(l1.ecx & ECX_SSE42, 0);
        assert_eq!(get(&c, 7, 0).ebx, 0);
        let ext = get(&c, 0x8000_0001, 0);
        assert_eq!(
            ext.edx,
            EDX_EXT_SYSCALL | EDX_EXT_NX | EDX_EXT_RDTSCP | EDX_EXT_LM
        );
    }

    #[test]
    fn template_names_round_trip() {
        for t in [CpuTemplate::Host, CpuTemplate::X86_64V2] {
            assert_eq!(t.name().parse::<CpuTemplate>().unwrap(), t);
        }
        assert!("t2".parse::<CpuTemplate>().is_err());
    }
}
